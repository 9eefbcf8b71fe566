"""Where resto_celery's messages and leases go: the Celery broker, and the Redis of the leases.

The Redis of the leases, breakers and fresh-URL marks is ``RESTO_REDIS_URL`` (the storage's
``redis_url`` option), or the Celery broker when that is Redis.
"""
from contextlib import contextmanager, nullcontext

from celery import bootsteps, current_app

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


def redis_url_of(broker_url):
    """The Redis URL in a Celery ``broker_url`` (the first of a failover list), or None when
    the broker is not a Redis server resto_celery can talk to (RabbitMQ, Sentinel...)."""
    url = (broker_url or "").split(";")[0]
    return url if url.startswith(REDIS_SCHEMES) else None


def redis_broker_url():
    """The Celery broker's URL when it is Redis (the first of a failover list); else an error."""
    url = redis_url_of(current_app.conf.broker_url)
    if url is not None:
        return url
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


def send_through_one_redis_client(producer):
    """Have ``producer``'s channel send every message through one ``redis.Redis`` client
    (:func:`use_one_redis_client`).

    kombu's Redis transport makes a new client for each message it sends (``_put`` calls
    ``conn_or_acquire()`` with no client), and redis-py fills some 170 response callbacks
    for each: a quarter of the CPU of a publish (372 µs in all, against 36 µs for the LPUSH
    alone). A pooled producer is given its connection's channel again at each acquire, so
    the client outlives the acquire. A producer's channel not yet opened is left as it is.
    """
    # The channel as it is now: a producer fresh from its pool holds a promise of one, which
    # only a publish (inside kombu's retry policy) should resolve; call this after publishing.
    channel = getattr(producer, "_channel", None)
    if channel is not None:
        use_one_redis_client(channel)


def use_one_redis_client(channel):
    """Have a kombu Redis ``channel`` make one ``redis.Redis`` client for the commands it
    would make a new client for (publishing; a consumer's acknowledgements: two pipelines
    per message, one as it arrives and one when its task ends). A client holds no
    connection of its own (each command takes one from the pool and gives it back), so one
    per channel is safe; a new one is made when the channel's pool changes (after a fork).
    Channels of other transports are left as they are."""
    if getattr(channel, "_resto_one_client", False) or not _is_kombu_redis(channel):
        return
    cached = {}

    @contextmanager
    def conn_or_acquire(client=None):
        if client is None:
            pool = channel.pool
            if cached.get("pool") is not pool:
                cached.update(pool=pool, client=channel._create_client())
            client = cached["client"]
        yield client

    channel.conn_or_acquire = conn_or_acquire
    channel._resto_one_client = True


class OneRedisClient(bootsteps.StartStopStep):
    """A worker consumer step: the channel the worker takes its tasks from makes one Redis
    client for its acknowledgements (:func:`use_one_redis_client`), not two per message
    (about a tenth of a prefork worker's main process CPU per message). It runs again on
    the new channel after a reconnection."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, consumer):
        channel = getattr(consumer.task_consumer, "channel", None)
        if channel is not None:
            use_one_redis_client(channel)


def install_consumer_steps(app):
    """Add :class:`OneRedisClient` to ``app``'s workers (before they start)."""
    if OneRedisClient not in app.steps["consumer"]:
        app.steps["consumer"].add(OneRedisClient)


def _is_kombu_redis(channel):
    try:
        from kombu.transport.redis import Channel
    except ImportError:  # no redis-py: not a Redis broker either
        return False
    return isinstance(channel, Channel)
