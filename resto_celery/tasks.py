"""Celery tasks: thin wrappers over :mod:`resto_celery.replication`.

``resto_celery.upload`` and ``resto_celery.delete`` take ``(host, path)`` and nothing else
from the web request: the master's current state decides what is sent, so both run the
same code and any of them, late, retried or redelivered, sends the newest state. The name
says which change caused the task (the admin shows it).

``resto_celery.reconcile`` is for Celery beat::

    CELERY_BEAT_SCHEDULE = {
        "resto-reconcile": {"task": "resto_celery.reconcile", "schedule": 300.0},
    }
"""
import logging
from contextlib import nullcontext
from datetime import timedelta

from celery import current_app, shared_task
from django.utils import timezone

from . import registry, replication
from .coordination import Coordinator, backoff, jittered
from .exceptions import TransportError

logger = logging.getLogger(__name__)

#: How many times a task waits for a lease held by another worker before giving up
#: (reconcile picks the path up again later).
MAX_LEASE_WAITS = 200

TASK_OPTIONS = {"bind": True, "acks_late": True, "reject_on_worker_lost": True, "max_retries": None}


@shared_task(name="resto_celery.upload", **TASK_OPTIONS)
def upload(self, host, path, failures=0):
    """Replicate ``path`` to ``host`` after a save (sends the master's current state)."""
    return _replicate(self, "upload", host, path, failures)


@shared_task(name="resto_celery.delete", **TASK_OPTIONS)
def delete(self, host, path, failures=0):
    """Replicate ``path`` to ``host`` after a delete (sends the master's current state)."""
    return _replicate(self, "delete", host, path, failures)


@shared_task(name="resto_celery.reconcile", acks_late=True)
def reconcile():
    """Enqueue whatever the master tree and the ``Replica`` rows say is missing or stale."""
    totals = {}
    for storage in registry.replicated_storages():
        with current_app.producer_or_acquire() as producer, publish_batch(producer):
            counts = replication.reconcile(
                storage,
                lambda operation, host, path: storage.enqueue(operation, host, path, producer=producer),
                stale_after=storage.options.failed_retry_after,
            )
        logger.info("Reconciled %s: %s", storage.location, counts)
        for key, value in counts.items():
            totals[key] = totals.get(key, 0) + value
    return totals


def publish_batch(producer):
    """``producer.batch()`` where kombu has it (5.7+), else a context that does nothing.

    In a batch the Redis transport buffers the messages and sends them in one pipeline when
    the block ends; other transports publish each message at once, as without a batch.
    """
    batch = getattr(producer, "batch", None)
    return batch() if batch is not None else nullcontext()


def coordinator_for(options):
    """The :class:`~resto_celery.coordination.Coordinator` for a storage's options.

    Redis is ``RESTO_REDIS_URL``, or the Celery broker when that is Redis.
    """
    url = options.redis_url or _redis_broker_url()
    return Coordinator(
        url,
        lease_ttl=options.lease_ttl,
        breaker_threshold=options.breaker_threshold,
        breaker_cooldown=options.breaker_cooldown,
    )


def _redis_broker_url():
    url = current_app.conf.broker_url or ""
    if url.startswith(("redis://", "rediss://", "unix://")):
        return url.split(";")[0]
    raise RuntimeError(
        "resto_celery needs Redis for its leases: set RESTO_REDIS_URL (the Celery broker is not Redis)."
    )


class _FailurePolicy:
    """Records a failed attempt and decides: retry after ``delay``, or ``final``."""

    def __init__(self, host, path, failures, options, task_id):
        self.host, self.path, self.failures = host, path, failures
        self.options, self.task_id = options, task_id
        self.final, self.delay = True, 0

    def __call__(self, error):
        from .models import Replica

        options = self.options
        self.final = not error.retryable or self.failures >= options.max_retries
        if self.final:
            self.delay = options.failed_retry_after
        else:
            # An open breaker says when the host may be tried again: no point before.
            self.delay = max(
                backoff(self.failures + 1, options.retry_backoff, options.retry_backoff_max),
                jittered(getattr(error, "wait", 0)),
            )
        Replica.objects.record_failure(
            self.host, self.path, error, final=self.final,
            retry_at=timezone.now() + timedelta(seconds=self.delay), task_id=self.task_id,
        )


def _replicate(task, operation, host, path, failures):
    storage = registry.storage_for_host(host)
    options = storage.options
    policy = _FailurePolicy(host, path, failures, options, task.request.id or "")
    try:
        action = replication.sync(
            host, path, storage.path(path), storage.transport(host), coordinator_for(options),
            on_failure=policy, task_id=policy.task_id,
        )
    except replication.LeaseBusy as busy:
        waits = task.request.retries - failures
        if waits >= MAX_LEASE_WAITS:
            raise
        # Short waits first (most transfers are quick), never past the holder's expiry.
        countdown = min(max(busy.wait, 0.1), 0.25 * 2 ** min(waits, 6))
        raise task.retry(countdown=jittered(countdown), kwargs={"failures": failures})
    except TransportError as error:
        if not policy.final:
            logger.warning("Will retry to %s %s on %s in %.1fs: %s", operation, path, host, policy.delay, error.reason)
            raise task.retry(countdown=policy.delay, kwargs={"failures": failures + 1}, exc=error)
        logger.error("Failed to %s %s on %s: %s", operation, path, host, error.reason)
        raise
    return {"action": action, "host": host, "path": path}
