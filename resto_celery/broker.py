"""Where resto_celery's messages and leases go: the Celery broker, and the Redis of the leases.

The Redis of the leases, breakers and fresh-URL marks is ``RESTO_REDIS_URL`` (the storage's
``redis_url`` option), or the Celery broker when that is Redis.
"""
from contextlib import nullcontext

from celery import current_app

from .conf import REDIS_SCHEMES
from .coordination import Coordinator


def coordinator_for(options):
    """The :class:`~resto_celery.coordination.Coordinator` for a storage's options."""
    return Coordinator(
        options.redis_url or redis_broker_url(),
        lease_ttl=options.lease_ttl,
        breaker_threshold=options.breaker_threshold,
        breaker_cooldown=options.breaker_cooldown,
    )


def redis_broker_url():
    """The Celery broker's URL when it is Redis (the first of a failover list); else an error."""
    url = current_app.conf.broker_url or ""
    if url.startswith(REDIS_SCHEMES):
        return url.split(";")[0]
    raise RuntimeError(
        "resto_celery needs Redis for its leases: set RESTO_REDIS_URL (the Celery broker is not Redis)."
    )


def publish_batch(producer):
    """``producer.batch()`` where kombu has it (5.7+), else a context that does nothing.

    In a batch the Redis transport buffers the messages and sends them in one pipeline when
    the block ends; other transports publish each message at once, as without a batch.
    """
    batch = getattr(producer, "batch", None)
    return batch() if batch is not None else nullcontext()
