"""Sending the web request's changes to the broker, off the request's path.

``AsyncStorage.save()`` and ``delete()`` write the master, then hand the change to this
process's publisher thread and return: the request does not wait for the broker. The
thread sends whatever has accumulated since its last send in one go (``producer.batch()``:
one pipeline on Redis), usually within a millisecond of the save. A change made while
Django handles a request waits for that request to end (``request_finished``, sent once
the response has gone out), at most :data:`REQUEST_HOLD_MAX`: sending costs CPU, and in
the same process it would hold the request up through the GIL. A change it cannot send
is logged at ERROR and left to reconcile, as a failed publish always was; so is a change
still queued when the process is killed. At a normal exit (``atexit``) the thread is given
a few seconds to send what it holds; :func:`flush` waits for it explicitly (tests,
management commands that must know the messages left).

One thread per process, started on first use (after a fork, the child starts its own).
"""
import atexit
import logging
import os
import threading
import time
from collections import deque
from contextlib import nullcontext

from django.core.signals import request_finished, request_started

from . import lanes
from .broker import publish_batch, send_through_one_redis_client

logger = logging.getLogger(__name__)

#: How long a normal exit waits for the changes still to send (seconds).
EXIT_FLUSH_TIMEOUT = 10.0


#: A burst of changes for one queue goes out as messages of at most this many changes.
MAX_CHANGES_PER_MESSAGE = 100

#: Bulk work (reconcile, a returning host's backlog) goes out in messages of at most this
#: many changes: enough to share a message's fixed cost (leases, a query, a row write), few
#: enough that a worker slot busy with one frees up soon for a live change. With 5 rather
#: than 10, a prefork/2 worker's live lag p99 during a catch-up was 41-55 ms against 46-70
#: (4 runs each), and the catch-up 24-32 s against 20-26 (bench_catchup).
BULK_CHANGES_PER_MESSAGE = 5

#: In a burst, the thread waits this long (seconds) for more changes before it sends, so a
#: loop of saves sends a message per few saves, not one each; after a quiet spell it sends
#: at once.
LINGER = 0.002

#: A change made during a request is sent when the request ends, or this long (seconds) after
#: it was made if the request is still running (a slow or streaming response). Sent while
#: the request runs, the publish (about 0.3 ms of CPU in Celery and kombu) holds the
#: request up through the GIL: an upload through a Django view (10 KB, bench_upload_view,
#: 3 quick runs each way) took 1.23x / 1.18x (1 / 3 hosts) the time of FileSystemStorage's
#: without the hold, 1.16x / 1.15x with it; with no publish at all, 1.05x.
REQUEST_HOLD_MAX = 0.05

#: Publishing gets one quick retry, no more: a broker outage must not hold the changes
#: behind it (reconcile repairs what could not be sent).
RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}


def publish(app, queue, changes, producer=None, bulk=False):
    """Send ``changes`` (``(path, hosts, operation)`` each) to ``queue`` through ``app``: one
    ``resto_celery.replicate`` message for one change, ``resto_celery.replicate_batch`` for
    several (a worker treats each change as ``replicate`` would); in the live lane, or the
    bulk one (:mod:`resto_celery.lanes`)."""
    if len(changes) == 1:
        return send(app, "resto_celery.replicate", tuple(changes[0]), queue, producer, bulk=bulk)
    return send(app, "resto_celery.replicate_batch", ([list(change) for change in changes],), queue, producer,
                bulk=bulk)


def publish_in_messages(app, queue, changes, producer=None, bulk=False):
    """:func:`publish` ``changes`` as messages of at most :data:`MAX_CHANGES_PER_MESSAGE`
    changes each, :data:`BULK_CHANGES_PER_MESSAGE` in the bulk lane (a worker syncs one
    message's changes together)."""
    size = BULK_CHANGES_PER_MESSAGE if bulk else MAX_CHANGES_PER_MESSAGE
    for start in range(0, len(changes), size):
        publish(app, queue, changes[start:start + size], producer, bulk=bulk)


def send(app, task, arguments, queue, producer=None, bulk=False):
    """Publish the task named ``task`` with ``arguments`` to ``queue`` through ``app``, in the
    live lane or the bulk one, with one quick retry (:data:`RETRY_POLICY`); through
    ``producer``, or one of ``app``'s pool (as Celery would take)."""
    from . import tasks  # noqa: F401 - declares the shared tasks (they need the models: not at import)

    with app.producer_or_acquire(producer) as producer:
        result = app.tasks[task].apply_async(
            arguments, queue=queue, producer=producer, retry=True, retry_policy=RETRY_POLICY,
            priority=lanes.bulk_priority(app) if bulk else lanes.live_priority(app),
            argsrepr=repr(arguments), kwargsrepr="{}",  # Celery's saferepr of the same was a fifth of a publish
        )
        # Now that the publish has opened its channel (kept by its pooled connection).
        send_through_one_redis_client(producer)
    return result


def send_now(app, queue, changes, failed):
    """Publish ``changes`` in this thread; ``failed(error)`` if the broker would not take them."""
    try:
        with app.producer_or_acquire() as producer:
            publish(app, queue, changes, producer)
    except Exception as error:  # noqa: BLE001 - the request never fails for replication: log, reconcile repairs
        failed(error)


class Publisher:
    """A queue of changes and the daemon thread that publishes them in bursts.

    ``submit(app, queue, change, failed)`` queues one change; the thread publishes what it
    finds queued, per app and queue, as few messages as :data:`MAX_CHANGES_PER_MESSAGE`
    allows, inside one ``producer.batch()``. ``failed(error)`` is called for a change the
    broker would not take. The Celery app comes from the caller's thread: a new thread's
    ``current_app`` is Celery's default app, not the project's.
    """

    def __init__(self):
        self._reset()

    def _reset(self):
        self.pending = deque()
        self.held = {}  # thread ident: (deadline, [change]) of the request that thread handles
        self.condition = threading.Condition()
        self.in_flight = 0
        self.thread = None

    def submit(self, app, queue, change, failed, hold=False):
        """Queue ``change`` (``(path, hosts, operation)``) for ``queue`` of ``app``; with
        ``hold``, keep it until :meth:`release` from this thread or :data:`REQUEST_HOLD_MAX`."""
        with self.condition:
            entry = (app, queue, change, failed)
            if hold:
                deadline = time.monotonic() + REQUEST_HOLD_MAX
                self.held.setdefault(threading.get_ident(), (deadline, []))[1].append(entry)
            else:
                self.pending.append(entry)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, daemon=True, name="resto-publisher")
                self.thread.start()
            self.condition.notify_all()  # not notify(): a flush() waiting too must not take the publisher's turn

    def release(self, thread_id=None):
        """Queue for sending the changes held for the request of thread ``thread_id``, or of
        every thread when it is ``None``."""
        with self.condition:
            if self._queue_held([thread_id] if thread_id is not None else list(self.held)):
                self.condition.notify_all()  # every request ends here: most hold nothing, and wake nobody

    def _queue_held(self, idents):
        """(With the condition held.) Move the changes held for the threads ``idents`` to the
        queue; whether there were any."""
        moved = False
        for ident in idents:
            if ident in self.held:
                self.pending.extend(self.held.pop(ident)[1])
                moved = True
        return moved

    def flush(self, timeout=None):
        """Send the changes held for requests now, and wait until every change submitted so
        far was sent (or failed); False on timeout."""
        self.release()
        with self.condition:
            return self.condition.wait_for(lambda: not self.pending and not self.held and not self.in_flight, timeout)

    def _wait_for_changes(self):
        """(With the condition held.) Wait until changes are due: queued, or held past their deadline."""
        while True:
            if self.held:
                now = time.monotonic()
                self._queue_held([ident for ident, (deadline, _) in self.held.items() if deadline <= now])
            if self.pending:
                return
            timeout = min(deadline for deadline, _ in self.held.values()) - now if self.held else None
            self.condition.wait(timeout)

    def _run(self):
        last_sent = 0.0
        while True:
            with self.condition:
                self._wait_for_changes()
                # In a burst (the last send just ended), linger a moment so that the changes
                # coming behind share a message; a change after a quiet spell goes at once.
                if time.monotonic() - last_sent < LINGER:
                    self.condition.wait_for(lambda: len(self.pending) >= MAX_CHANGES_PER_MESSAGE, LINGER)
                batch = list(self.pending)
                self.pending.clear()
                self.in_flight = len(batch)
            try:
                by_app = {}
                for app, queue, change, failed in batch:
                    queues = by_app.setdefault(id(app), (app, {}))[1]
                    queues.setdefault(queue, []).append((change, failed))
                for app, queues in by_app.values():
                    _send_burst(app, queues)
            finally:
                last_sent = time.monotonic()
                with self.condition:
                    self.in_flight = 0
                    self.condition.notify_all()


def _send_burst(app, queues):
    """Publish ``{queue: [(change, failed)]}`` through ``app`` in one ``producer.batch()``."""
    messages = [
        (queue, items[start:start + MAX_CHANGES_PER_MESSAGE])
        for queue, items in queues.items()
        for start in range(0, len(items), MAX_CHANGES_PER_MESSAGE)
    ]
    handed_over, acquired = [], False
    try:
        with app.producer_or_acquire() as producer:
            acquired = True
            with publish_batch(producer) if len(messages) > 1 else nullcontext():
                for queue, items in messages:
                    try:
                        publish(app, queue, [change for change, _ in items], producer)
                    except Exception as error:  # noqa: BLE001 - this message is lost: say so, go on
                        _fail(items, error)
                    else:
                        handed_over.append(items)
    except Exception as error:  # noqa: BLE001 - no producer, or the batch could not be flushed
        for items in handed_over if acquired else [items for _, items in messages]:
            _fail(items, error)


def _fail(items, error):
    for _, failed in items:
        try:
            failed(error)
        except Exception:
            logger.exception("Could not report a change that was not sent")


_publisher = Publisher()
# A forked child (a prefork pool process) has none of its parent's thread, nor its changes.
os.register_at_fork(after_in_child=_publisher._reset)


def submit(app, queue, change, failed):
    """Queue ``change`` (``(path, hosts, operation)``) on this process's publisher thread
    (see :class:`Publisher`); ``failed(error)`` if the broker would not take it. Made while
    this thread handles a request, it goes when the request ends."""
    _publisher.submit(app, queue, change, failed, hold=threading.get_ident() in _requests)


#: Threads handling a request (between Django's request_started and request_finished).
_requests = set()
_requests_lock = threading.Lock()


def _request_started(**kwargs):
    with _requests_lock:
        _requests.add(threading.get_ident())


def _request_finished(**kwargs):
    ident = threading.get_ident()
    with _requests_lock:
        if ident in _requests:
            _requests.remove(ident)
            ended = ident
        else:
            # Ended on another thread than it began (Django's AsyncClient closes the response
            # off the view's thread): which request ended is unknown, so none is held any more.
            _requests.clear()
            ended = None
    _publisher.release(ended)


def _forget_requests_in_child():
    global _requests, _requests_lock
    _requests, _requests_lock = set(), threading.Lock()  # the parent's threads (and their lock) are gone


os.register_at_fork(after_in_child=_forget_requests_in_child)


request_started.connect(_request_started, dispatch_uid=f"{__name__}.request_started")
request_finished.connect(_request_finished, dispatch_uid=f"{__name__}.request_finished")


def flush(timeout=None):
    """Wait until every change this process submitted was sent or failed; False on timeout."""
    return _publisher.flush(timeout)


@atexit.register
def _flush_at_exit():
    if _publisher.pending or _publisher.held or _publisher.in_flight:
        if not flush(EXIT_FLUSH_TIMEOUT):
            with _publisher.condition:
                held = sum(len(entries) for _, entries in _publisher.held.values())
            logger.error("Exiting with %d change(s) not sent to the broker; reconcile will send them.",
                         len(_publisher.pending) + held + _publisher.in_flight)
