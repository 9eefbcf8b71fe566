"""The worker's side of the lanes: it takes bulk messages only while it has a free bulk slot.

Priorities decide which message a worker takes next, but not how many of its pool slots
bulk work may fill: on a catch-up every slot runs a bulk message, and a live change waits
for one to end, on a machine whose CPU the catch-up saturates. With ``RESTO_BULK_SLOTS = N``
a worker holds at most N bulk messages at once; while it holds that many, it asks the
broker for live messages only, and asks again every :data:`FULL_POLL` seconds, so that it
takes bulk work again soon after a slot frees. The other slots stay free for live changes.

It is off by default, because it trades catch-up speed for live lag: one prefork/2 worker
with ``RESTO_BULK_SLOTS = 1`` kept the live lag p99 within 1.2-1.8x of its value without a
catch-up (3.1-4.6x unbounded), but caught up 10,000 files in 98-120 s instead of 18-22 s
(bench_catchup, 2 CPUs, 3 runs each).

This applies to Redis brokers, where the lanes are kombu's priority lists and the worker's
``BRPOP`` names the lists it takes from (the same hook Celery's ``worker_disable_prefetch``
uses), Redis 6 or newer (the short wait is a ``BRPOP`` timeout of a fraction of a second,
which older servers refuse). On RabbitMQ the lanes share one queue with priorities and the bound is not
enforced: give the bulk lane a queue and a worker of its own (``bulk_queue``) to bound it.
"""
import logging

from celery import bootsteps
from celery.worker import state
from django.conf import settings

from . import lanes

logger = logging.getLogger(__name__)

#: While its bulk slots are full, how long a worker's wait for a live message lasts before it
#: looks again whether a bulk slot has freed (seconds). Redis ends a blocked command's wait
#: when its event loop next wakes: on an idle server every 1/hz seconds (100 ms at the
#: default hz 10; measured on Redis 7.0), so a freed slot can stay idle that long. That, not
#: this figure, is why a bounded catch-up is slow (the bulk messages of one slot came 10-70
#: ms apart, each taking 7-9 ms).
FULL_POLL = 0.005


def configured_slots():
    """``RESTO_BULK_SLOTS``: how many bulk messages a worker holds at once; None, unbounded."""
    return getattr(settings, "RESTO_BULK_SLOTS", None)


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
        limit = configured_slots()
        channel = getattr(consumer.task_consumer, "channel", None)
        if limit is None or channel is None or not hasattr(channel, "_brpop_start"):
            return  # unbounded, or not kombu's Redis transport (see the module)
        take_any = channel._brpop_start
        live_steps = [step for step in channel.priority_steps if step < lanes.REDIS_BULK]

        def brpop_start(timeout=None):
            if bulk_held() < limit:
                return take_any(timeout)
            every_step = channel.priority_steps
            channel.priority_steps = live_steps
            try:
                return take_any(FULL_POLL)
            finally:
                channel.priority_steps = every_step

        channel._brpop_start = brpop_start
        logger.info("This worker holds at most %d bulk message(s) at once.", limit)


def install(app):
    """Add :class:`BulkSlots` to ``app``'s workers (before they start)."""
    if BulkSlots not in app.steps["consumer"]:
        app.steps["consumer"].add(BulkSlots)
