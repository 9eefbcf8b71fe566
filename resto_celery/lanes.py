"""Two lanes: live changes first, bulk work behind them, in the same queue.

A save's or a delete's message (and its retries, and the probes of a down host) travel in
the **live** lane; what reconcile, ``resto_resync --via-queue``, the dashboard's *Retry
failed* and *Full resync*, and a returning host's backlog send travels in the **bulk** lane.
The lanes are message priorities, so the same workers, consuming the same queue, drain the
bulk lane only when the live lane is empty, with no extra worker or setting:

- Redis (kombu's transport keeps one list per priority step and a worker pops from them
  highest priority first): bulk messages have priority 9, the lowest on Redis, live ones
  none (the highest).
- RabbitMQ: priorities count only in a queue declared with ``x-max-priority``; live
  messages have priority 5, bulk ones 0. Without the argument both lanes share one FIFO, as
  before (see the README).

With the ``bulk_queue`` option the bulk lane has a queue of its own instead
(:meth:`resto_celery.conf.Options.bulk_queue_for`): a worker of its own takes it, which can
run at a lower CPU priority (``nice``) than the workers of live changes, so that a catch-up
uses only the CPU they leave.
"""
from .broker import redis_url_of
from .conf import REDIS_SCHEMES
from .coordination import redis_client

#: Priorities on Redis, where 0 is the highest (kombu's ``priority_steps`` 0, 3, 6, 9).
REDIS_LIVE, REDIS_BULK = None, 9
#: Priorities on brokers where a higher number comes first (RabbitMQ with x-max-priority).
AMQP_LIVE, AMQP_BULK = 5, 0


def _on_redis(app):
    return (app.conf.broker_url or "").startswith((*REDIS_SCHEMES, "sentinel://"))


def live_priority(app):
    """The ``priority`` of a live message through ``app``'s broker (None: the default)."""
    return REDIS_LIVE if _on_redis(app) else AMQP_LIVE


def bulk_priority(app):
    """The ``priority`` of a bulk message through ``app``'s broker."""
    return REDIS_BULK if _on_redis(app) else AMQP_BULK


def queue_keys(queue):
    """The Redis lists that hold ``queue``'s messages, live lane first (kombu's layout)."""
    return [queue] + [f"{queue}\x06\x16{step}" for step in (3, 6, 9)]


def bulk_backlog(app, queues):
    """How many bulk messages wait in ``queues`` on a Redis broker; None on other brokers
    (RabbitMQ keeps long queues on disk: nothing to spare there)."""
    url = redis_url_of(app.conf.broker_url)
    if url is None:
        return None
    client = redis_client(url)
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        for key in queue_keys(queue)[1:]:
            pipe.llen(key)
    return sum(pipe.execute())


#: How long a catch-up's figures are kept (seconds).
CATCH_UP_KEPT = 24 * 3600


def _catch_up_key(host):
    return "resto:catch-up:" + host


def record_catch_up(client, counts, started_at):
    """A bulk pass started at ``started_at`` (Unix time) sent ``counts[host]`` messages for
    each host: the figures the dashboard estimates the host's catch-up from."""
    pipe = client.pipeline(transaction=False)
    for host, count in counts.items():
        if count:
            pipe.hset(_catch_up_key(host), mapping={"sent": count, "at": f"{started_at:.3f}"})
            pipe.expire(_catch_up_key(host), CATCH_UP_KEPT)
    pipe.execute()


def catch_up(client, host):
    """``(sent, started_at)`` of the host's last bulk pass that sent something, or None."""
    values = client.hgetall(_catch_up_key(host))
    if not values:
        return None
    return int(values[b"sent"]), float(values[b"at"])
