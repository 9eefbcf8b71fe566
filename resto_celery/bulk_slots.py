"""The worker's side of the lanes: it takes bulk messages only while it has a free bulk slot.

Priorities decide which message a worker takes next, but not how many of its pool slots
bulk work may fill: on a catch-up every slot runs a bulk message, and a live change waits
for one to end, on a machine whose CPU the catch-up saturates. With ``RESTO_BULK_SLOTS = N``
a worker holds at most N bulk messages at once; while it holds that many, it asks the
broker for live messages only, so its other slots stay free for them. When a bulk slot
frees, that wait is cut short (``CLIENT UNBLOCK``, from a second connection) and the worker
asks for both lanes again: waiting for the wait's timeout left the slot idle, since Redis
ends a blocked command only when its event loop wakes (every 100 ms on an idle server at
the default ``hz``), which made a bounded catch-up five times slower than it needs to be.

By default (``RESTO_BULK_SLOTS = "auto"``) a worker gives the bulk lane half of its pool
slots, at least one, and bounds nothing when its pool has a single slot (there is none to
keep free). ``None`` takes the bound off. It trades catch-up speed for live lag: one
prefork/2 worker (one bulk slot) caught up 10,000 files in 26 s instead of 22-24 s, with
a live lag p99 1.2-1.6x its value without a catch-up, against 2.0-2.5x unbounded
(bench_catchup, 2 CPUs, two runs; see the README).

This applies to Redis brokers (5.0 or newer, for ``CLIENT UNBLOCK``), where the lanes are
kombu's priority lists and the worker's ``BRPOP`` names the lists it takes from (the hook
Celery's own ``worker_disable_prefetch`` patches too). On RabbitMQ the lanes share one
queue with priorities and the bound is not enforced: give the bulk lane a queue and a
worker of its own (``bulk_queue``) to bound it. On Redis older than 5.0 the default bounds
nothing; a bound set there holds, but a freed slot waits for the broker's wait to end.
"""
import logging

import redis
from celery import bootsteps
from celery.worker import state
from django.conf import settings

from . import lanes

logger = logging.getLogger(__name__)

#: How often the worker looks whether a bulk slot has freed while it waits for live
#: messages only (seconds).
WAKE_CHECK = 0.002


#: ``RESTO_BULK_SLOTS``'s default: half of the worker's pool slots, at least one.
AUTO = "auto"


def configured_slots():
    """``RESTO_BULK_SLOTS``: how many bulk messages a worker holds at once, ``"auto"`` (the
    default, see :func:`slots_for`) or None (unbounded)."""
    return getattr(settings, "RESTO_BULK_SLOTS", AUTO)


def slots_for(setting, pool_slots):
    """How many bulk messages a worker of ``pool_slots`` holds at once under ``setting``
    (a ``RESTO_BULK_SLOTS`` value); None, no bound. ``"auto"``: half the pool, at least one,
    and no bound for a pool of one slot."""
    if setting != AUTO:
        return setting
    if not pool_slots or pool_slots < 2:
        return None
    return pool_slots // 2


def can_unblock(redis_version):
    """Whether a Redis server of ``redis_version`` (``INFO``'s ``"7.0.15"``) has ``CLIENT UNBLOCK`` (5.0)."""
    try:
        return int(str(redis_version).split(".")[0]) >= 5
    except ValueError:
        return False


def bulk_held():
    """How many bulk messages this worker holds (running, or received and waiting for a slot)."""
    return sum(
        1 for request in list(state.reserved_requests)
        if (request.delivery_info or {}).get("priority") == lanes.REDIS_BULK
    )


class BulkSlots(bootsteps.StartStopStep):
    """A consumer step: bound the bulk messages the worker holds (see the module)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, consumer):
        setting = configured_slots()
        limit = slots_for(setting, getattr(consumer.pool, "limit", None))
        channel = getattr(consumer.task_consumer, "channel", None)
        if limit is None or channel is None or not hasattr(channel, "_brpop_start"):
            return  # unbounded, or not kombu's Redis transport (see the module)
        version = _redis_version(channel)
        if not can_unblock(version):
            if setting == AUTO:
                logger.info("Bulk messages are not bounded: Redis %s has no CLIENT UNBLOCK (5.0).", version)
                return
            logger.warning(
                "RESTO_BULK_SLOTS = %d on Redis %s: a freed bulk slot waits for the broker's wait to end "
                "(CLIENT UNBLOCK needs Redis 5.0); catch-ups will be slow.", limit, version,
            )
        _LiveOnlyWhileFull(channel, limit).install(consumer.timer)
        logger.info("This worker holds at most %d bulk message(s) at once.", limit)


def _redis_version(channel):
    try:
        return channel.client.info("server").get("redis_version", "unknown")
    except redis.RedisError as error:
        logger.debug("Could not ask the broker for its version: %s", error)
        return "unknown"


class _LiveOnlyWhileFull:
    """Wraps a kombu Redis channel's ``_brpop_start``: live lists only while ``limit`` bulk
    messages are held; a wait for live messages is cut short once a bulk slot frees."""

    def __init__(self, channel, limit):
        self.channel, self.limit = channel, limit
        self.take_any = channel._brpop_start
        self.live_steps = [step for step in channel.priority_steps if step < lanes.REDIS_BULK]
        self.unblocker = redis.Redis(connection_pool=channel.client.connection_pool)
        self.connection, self.connection_id = None, None
        self.waiting = None  # the client id of a wait for live messages only, while it lasts

    def install(self, timer):
        self.channel._brpop_start = self.brpop_start
        timer.call_repeatedly(WAKE_CHECK, self.wake)

    def brpop_start(self, timeout=None):
        if bulk_held() < self.limit:
            self.waiting = None
            return self.take_any(timeout)
        self.waiting = self._client_id()
        every_step = self.channel.priority_steps
        self.channel.priority_steps = self.live_steps
        try:
            return self.take_any(timeout)
        finally:
            self.channel.priority_steps = every_step

    def wake(self):
        if self.waiting is None or bulk_held() >= self.limit:
            return
        waiting, self.waiting = self.waiting, None
        try:
            # Ends the wait as a timeout would (nothing taken); a wait already over is left alone.
            self.unblocker.execute_command("CLIENT", "UNBLOCK", waiting, "TIMEOUT")
        except redis.RedisError as error:
            logger.debug("Could not cut short a wait for live messages: %s", error)

    def _client_id(self):
        """The Redis client id of the channel's connection (asked again after a reconnection);
        its ``BRPOP`` is not under way when this is called."""
        connection = self.channel.client.connection
        if connection is not self.connection:
            connection.send_command("CLIENT", "ID")
            self.connection, self.connection_id = connection, connection.read_response()
        return self.connection_id


def install(app):
    """Add :class:`BulkSlots` to ``app``'s workers (before they start)."""
    if BulkSlots not in app.steps["consumer"]:
        app.steps["consumer"].add(BulkSlots)
