"""Celery tasks: thin wrappers over :mod:`resto_celery.replication` and :mod:`resto_celery.retries`.

``resto_celery.replicate`` is the message a save or a delete sends: ``(path, hosts,
operation)``, fanned out to the hosts by one worker (``resto_celery.replicate_batch``
carries several, for a burst of saves in one process). ``resto_celery.upload`` and
``resto_celery.delete`` take ``(host, path)``: a retry for one host, and what reconcile and
the operators' actions send. Nothing else comes from the web request: the master's current
state decides what is sent, so any of them, late, retried or redelivered, sends the newest
state. The name says which change caused the task (the admin shows it).
``resto_celery.probe`` tries a host that is down, one message per host at a time.

``resto_celery.reconcile`` is for Celery beat; let a pass expire when the next is due::

    CELERY_BEAT_SCHEDULE = {
        "resto-reconcile": {"task": "resto_celery.reconcile", "schedule": 300.0, "options": {"expires": 300.0}},
    }
"""
import functools
import inspect
import logging
import mimetypes
import time

from celery import current_app, shared_task
from celery.signals import worker_init, worker_process_shutdown, worker_ready
from django.db import DatabaseError, close_old_connections, connections
from redis.exceptions import LockError, RedisError

from . import broker, bulk_slots, checks, lanes, marker, metrics, publisher, registry, replication
from .broker import coordinator_for, publish_batch
from .exceptions import HostShortCircuited, MasterUnavailable
from .models import Replica
from .reconcile import reconcile as reconcile_storage
from .retries import RETRY, WAIT_FOR_HOST, FailureRecorder, lease_wait, probe_interval

logger = logging.getLogger(__name__)

#: How many times a task waits for a lease held by another worker before giving up
#: (reconcile picks the path up again later).
MAX_LEASE_WAITS = 200

#: A host that answers again gets at most this many failed changes re-sent at once.
BACKLOG_RELEASE_LIMIT = 10_000

#: A reconcile pass holds its lock this long past its last batch (seconds); a pass whose
#: worker died frees the lock after that.
RECONCILE_LOCK_TTL = 120



def database_task(**options):
    """``shared_task(**options)`` for a task that uses the database: failing on it, the task
    closes the connections that no longer work before Celery records the failure.

    With ``CELERY_DB_REUSE_MAX`` Celery keeps a worker's connections from task to task; one
    that the database server dropped (a restart, a failover) would fail every task after,
    and the result backend's record of this failure with them. The close is in the task's
    own function, not in an overridden ``Task.__call__``: Celery before 5.5 gives a task
    with its own ``__call__`` a request without the message's id and retry count.
    """

    def decorate(run):
        @functools.wraps(run)
        def closing_broken_connections(*args, **kwargs):
            try:
                return run(*args, **kwargs)
            except DatabaseError:
                close_old_connections()  # those that no longer work, as after a request
                raise

        # Celery checks a call's arguments against the task function's own (getfullargspec
        # does not follow functools.wraps): give it the signature of the one wrapped.
        closing_broken_connections.__signature__ = inspect.signature(run)
        return shared_task(**options)(closing_broken_connections)

    return decorate


#: A successful transfer is recorded in its ``Replica`` row: the result backend keeps only
#: failures (``store_errors_even_if_ignored``), which the admin shows by task id.
TASK_OPTIONS = {
    "bind": True, "acks_late": True, "reject_on_worker_lost": True, "max_retries": None,
    "ignore_result": True, "store_errors_even_if_ignored": True, "track_started": False,
}


@database_task(name="resto_celery.replicate", **TASK_OPTIONS)
def replicate(self, path, hosts, operation="upload"):
    """Bring ``path`` in line with the master on each of ``hosts``: one message per change.

    ``operation`` names the change that caused it (``"upload"`` or ``"delete"``); the
    master's current state decides what is sent. The hosts are synced together, each under
    its own lease (:func:`resto_celery.replication.sync_pairs`). A host whose lease another
    worker holds, or that fails with a retryable error, gets a ``resto_celery.upload``/
    ``delete`` task of its own for the retries, so a slow or failing host never holds back
    the others; a host that is down (its breaker open) gets no task at all: the change
    waits in its row for the host's probe.
    """
    done = _replicate_changes(self, [(path, hosts, operation)])
    return {host: action for (host, _), action in done.items()}


@database_task(name="resto_celery.replicate_batch", **TASK_OPTIONS)
def replicate_batch(self, changes):
    """Several changes in one message (a burst of saves in one app process, a page of
    reconcile's): each ``(path, hosts, operation)`` as :func:`replicate` handles one, all
    synced together (one lease round trip, one query, one row write for the batch). A
    final failure is raised once every change was tried."""
    _replicate_changes(self, changes)
    return len(changes)


def _replicate_changes(task, changes):
    """Sync the ``(path, hosts, operation)`` changes, storage by storage; a pair that must be
    tried again gets a ``resto_celery.upload``/``delete`` task of its own, in the lane of
    the message that brought it."""
    by_storage = {}
    for path, hosts, operation in changes:
        operations = by_storage.setdefault(registry.storage_for_host(hosts[0]), {})
        for host in hosts:
            operations[(host, path)] = operation
    priority = (task.request.delivery_info or {}).get("priority")
    if priority is None:
        priority = lanes.live_priority(current_app)
    bulk = priority == lanes.bulk_priority(current_app)
    done, final = {}, None
    for storage, operations in by_storage.items():

        def retry(host, path, countdown, failures, exc=None, storage=storage, operations=operations):
            per_host = upload if operations[(host, path)] == "upload" else delete
            per_host.apply_async((host, path), kwargs={"failures": failures}, countdown=countdown,
                                 queue=storage.options.queue_for(host, bulk=bulk), priority=priority)

        try:
            done.update(_replicate_to(storage, operations, task.request.id or "", failures=0, waits=0, retry=retry,
                                      bulk=bulk, fresh=not bulk))
        except Exception as error:  # noqa: BLE001 - the other storages' changes go on
            final = final or error
    if final is not None:
        raise final
    return done


@database_task(name="resto_celery.upload", **TASK_OPTIONS)
def upload(self, host, path, failures=0):
    """Replicate ``path`` to ``host`` after a save (sends the master's current state)."""
    return _replicate_one(self, "upload", host, path, failures)


@database_task(name="resto_celery.delete", **TASK_OPTIONS)
def delete(self, host, path, failures=0):
    """Replicate ``path`` to ``host`` after a delete (sends the master's current state)."""
    return _replicate_one(self, "delete", host, path, failures)


def _replicate_one(task, operation, host, path, failures):
    """The per-host tasks' body: retries are this task's own (``task.retry`` keeps its id)."""

    def retry(host, path, countdown, failures, exc=None):
        raise task.retry(countdown=countdown, kwargs={"failures": failures}, exc=exc)

    storage = registry.storage_for_host(host)
    done = _replicate_to(storage, {(host, path): operation}, task.request.id or "",
                         failures=failures, waits=task.request.retries - failures, retry=retry)
    return {host: done[(host, path)]}


@database_task(name="resto_celery.probe", **TASK_OPTIONS)
def probe(self, host):
    """Try a down host with the oldest change waiting for it: the breaker's half-open attempt.

    Success closes the breaker and sends every change that waits for the host at once
    (:func:`release_backlog`); failure keeps it open and the next probe comes
    :func:`~resto_celery.retries.probe_interval` later. One probe per host at a time,
    whatever the number of waiting changes.
    """
    storage = registry.storage_for_host(host)
    coordinator = coordinator_for(storage.options)
    coordinator.breaker(host).probe_started()
    path = (
        Replica.objects.filter(host=host, state__in=Replica.UNSCHEDULED)
        .order_by("retry_at").values_list("path", flat=True).first()
    )
    if path is None:
        return {host: "nothing waits"}

    def retry(host, path, countdown, failures, exc=None):  # another worker has the path: probe again soon
        _schedule_probe(storage, host, coordinator)

    done = _replicate_to(storage, {(host, path): "upload"}, self.request.id or "",
                         failures=0, waits=0, retry=retry, probe=True)
    return {host: done[(host, path)]}


def _replicate_to(storage, operations, task_id, *, failures, waits, retry, probe=False, bulk=False, fresh=False):
    """Bring each ``(host, path)`` of ``operations`` (which maps it to the operation that caused
    it) in line (:func:`resto_celery.replication.sync_pairs`), then act on each failure:
    ``retry(host, path, countdown, failures, exc)`` for a busy lease or a retryable error (a
    task of its own, or this task's retry), the host's probe when the host is down. A final
    failure is raised once every pair was tried (the result backend keeps it). Returns
    ``{(host, path): action}``, ``"wait"`` for a pair that failed. ``bulk``: the pairs came
    in the bulk lane; ``fresh``: they are a save's own changes (no row is read before
    sending, see :func:`~resto_celery.replication.sync_pairs`).
    """
    options = storage.options
    coordinator = coordinator_for(options)
    recorder = FailureRecorder(options, task_id, failures)
    released = set()

    def host_back(host):
        released.add(host)
        release_backlog(storage, host)

    hosts = dict.fromkeys(host for host, _ in operations)
    outcomes = replication.sync_pairs(
        list(operations), storage.path, {host: storage.transport(host) for host in hosts}, coordinator,
        location=storage.location, on_failure=recorder, task_id=task_id, probe=probe, bulk=bulk, fresh=fresh,
        on_arrivals=lambda arrivals: replication.announce(storage, arrivals, coordinator),
        on_recovery=host_back,
    )
    if probe:
        # The host answered. Whoever closed its breaker released what waited then; changes
        # that came to wait while it was closing are sent now.
        for host in {outcome.host for outcome in outcomes if outcome.error is None} - released:
            release_backlog(storage, host)
    final = None
    told_down = set()
    for outcome in outcomes:
        host, path, error = outcome.host, outcome.name, outcome.error
        about = log_fields(host, path, task_id, failures + 1)
        operation = operations[outcome.pair]
        if error is None:
            logger.debug("%s of %s on %s: %s", operation, path, host, outcome.action, extra=about)
            if outcome.action == "skip":
                metrics.transfer_done(host, operation, "skipped")
            else:
                metrics.transfer_done(host, outcome.action, "ok", outcome.nbytes, outcome.seconds)
            continue
        if isinstance(error, replication.LeaseBusy):
            metrics.lease_waited(host)
            if waits >= MAX_LEASE_WAITS:
                final = final or error
            else:
                retry(host, path, lease_wait(error.wait, waits), failures)
            continue
        decision = recorder.decisions[outcome.pair]
        # No attempt while the breaker is open: the change waits; any other error was an attempt.
        metrics.transfer_done(host, operation, "waiting" if isinstance(error, HostShortCircuited) else "failed",
                              0, outcome.seconds)
        if decision.kind == WAIT_FOR_HOST:
            if isinstance(error, HostShortCircuited):
                logger.debug("%s waits for %s to come back: %s", path, host, error.reason, extra=about)
            elif host not in told_down:
                logger.warning("%s is down (%s); changes wait for it, and it is probed every %.0fs.",
                               host, error.reason, probe_interval(options), extra=about)
            if host not in told_down:
                told_down.add(host)
                _schedule_probe(storage, host, coordinator)
        elif decision.kind == RETRY:
            logger.warning("Will retry to %s %s on %s in %.1fs: %s",
                           operation, path, host, decision.delay, error.reason, extra=about)
            metrics.retry_scheduled(host)
            retry(host, path, decision.delay, failures + 1, error)
        else:
            if isinstance(error, MasterUnavailable):
                logger.error("Failed to %s %s on %s: %s; reconcile sends it once the master is back.",
                             operation, path, host, error, extra=about)
            else:
                logger.error("Failed to %s %s on %s: %s", operation, path, host, error.reason, extra=about)
            final = final or error
    if final is not None:
        raise final
    return {outcome.pair: outcome.action or "wait" for outcome in outcomes}


def log_fields(host, path, task_id, attempt):
    """What every replication log record carries as ``extra=`` attributes, so that a log
    pipeline (a JSON formatter, Sentry, journald) can group by host: ``host``, ``path``,
    ``task_id`` and ``attempt`` (1 for a first try)."""
    return {"host": host, "path": path, "task_id": task_id, "attempt": attempt}


def _schedule_probe(storage, host, coordinator):
    """Make sure one probe of the down ``host`` is coming (one message, however many changes wait)."""
    every = probe_interval(storage.options)
    if coordinator.breaker(host).schedule_probe(every):
        probe.apply_async((host,), countdown=every, queue=storage.options.queue_for(host),
                          priority=lanes.live_priority(current_app))




@database_task(name="resto_celery.reconcile", acks_late=True)
def reconcile(allow_deletes=()):
    """Enqueue whatever the master tree and the ``Replica`` rows say is missing or stale.

    One pass per master at a time: a pass that finds another one running (a beat period
    shorter than a pass) skips. ``allow_deletes`` (host names, or ``"*"``) lifts the
    deletion brake for this pass: the operator's go-ahead.
    """
    totals = {}
    for storage in registry.replicated_storages():
        lock = coordinator_for(storage.options).pass_lock(f"reconcile:{storage.location}", RECONCILE_LOCK_TTL)
        if not lock.acquire():
            logger.info("Reconcile of %s skipped: another pass is still running.", storage.location)
            counts = {"skipped": 1}
        else:
            try:
                with current_app.producer_or_acquire() as producer:
                    pages = BulkPages(storage, producer, heartbeat=lock.reacquire)
                    counts = reconcile_storage(
                        storage, pages.enqueue,
                        max_delete_share=storage.options.max_delete_share,
                        allow_deletes=tuple(allow_deletes),
                        heartbeat=lock.reacquire,
                    )
                    pages.flush()
            finally:
                _release(lock)
            logger.info("Reconciled %s: %s", storage.location, counts)
        for key, value in counts.items():
            totals[key] = value if isinstance(value, str) else totals.get(key, 0) + value
    return totals


class BulkPages:
    """Bulk changes published a page at a time, each page in one ``producer.batch()`` as
    messages of many changes; after each page, while more than ``high_water`` changes may
    wait in the storage's queues (Redis brokers; every bulk message counted as a full one),
    wait for the workers to drain them (calling ``heartbeat`` to keep the pass's lock): a
    catch-up of a million files never holds a million changes in Redis."""

    PAGE = 1000
    HIGH_WATER = 10_000
    POLL = 1.0  # seconds between two looks at the backlog

    def __init__(self, storage, producer, heartbeat=None, page=PAGE, high_water=HIGH_WATER):
        self.storage, self.producer, self.heartbeat = storage, producer, heartbeat or (lambda: None)
        self.page, self.high_water = page, high_water
        self.pending = []
        self.waited = 0.0
        self.queues = sorted({storage.options.bulk_queue_for(host) for host in storage.hosts})
        self.started_at = time.time()
        self.sent = dict.fromkeys(storage.hosts, 0)

    def enqueue(self, operation, host, name):
        self.pending.append((operation, host, name))
        if len(self.pending) >= self.page:
            self.flush()
            self._wait_for_room()

    def flush(self):
        """Publish the page: the hosts that need the same change of one path share a change,
        and a queue's changes go in messages of many (``resto_celery.replicate_batch``, which
        a worker syncs together)."""
        changes = {}
        for operation, host, name in self.pending:
            changes.setdefault((operation, name, self.storage.options.bulk_queue_for(host)), []).append(host)
            self.sent[host] = self.sent.get(host, 0) + 1
        by_queue = {}
        for (operation, name, queue), hosts in changes.items():
            by_queue.setdefault(queue, []).append((name, hosts, operation))
        with publish_batch(self.producer):
            for queue, queued in by_queue.items():
                publisher.publish_in_messages(current_app, queue, queued, self.producer, bulk=True)
        self.pending = []
        try:
            lanes.record_catch_up(coordinator_for(self.storage.options).client, self.sent, self.started_at)
        except RedisError as error:  # only the dashboard's estimate is lost
            logger.warning("Could not record the catch-up's progress: %s", error)

    def _wait_for_room(self):
        started = time.monotonic()
        per_message = publisher.BULK_CHANGES_PER_MESSAGE
        while (lanes.bulk_backlog(current_app, self.queues) or 0) * per_message > self.high_water:
            self.heartbeat()
            time.sleep(self.POLL)
        self.waited += time.monotonic() - started


def _release(lock):
    try:
        lock.release()
    except (LockError, RedisError) as error:  # expired, or Redis restarted: nothing to give back
        logger.warning("Reconcile lock already gone: %s", error)


def release_backlog(storage, host, limit=BACKLOG_RELEASE_LIMIT):
    """``host`` answers again: send every change it is behind on now, whatever timer its row
    waits for (``retry_at``, a retry's backoff countdown: a retry that comes later finds the
    fingerprint recorded and skips).

    At most ``limit`` changes, in messages of many (a worker syncs a message's changes
    together); the rest are due at the next reconcile (their rows were made due by
    :func:`resto_celery.replication.host_recovered`). Returns how many changes were sent.
    """
    behind = (*Replica.UNSCHEDULED, Replica.State.PENDING)
    paths = Replica.objects.filter(host=host, state__in=behind).values_list("path", flat=True)[:limit]
    changes = [(path, [host], "upload") for path in paths]
    with current_app.producer_or_acquire() as producer, publish_batch(producer):
        publisher.publish_in_messages(current_app, storage.options.bulk_queue_for(host), changes, producer, bulk=True)
    sent = len(changes)
    if sent:
        logger.info("%s answers again: sent the %d change(s) it was behind on.", host, sent, extra={"host": host})
    return sent


@worker_init.connect
def load_before_the_pool_starts(**kwargs):
    """Read the system's MIME types (the uploads' ``Content-Type``) in the worker's main
    process, before a prefork pool forks: each pool process read them on its first
    transfer otherwise (about 18 ms)."""
    mimetypes.init()


@worker_init.connect
def add_consumer_steps(sender=None, **kwargs):
    """Give the worker's consumer its bulk slots (:mod:`resto_celery.bulk_slots`) and one
    Redis client for its acknowledgements (:class:`resto_celery.broker.OneRedisClient`)."""
    if sender is not None and getattr(sender, "app", None) is not None:
        bulk_slots.install(sender.app)
        broker.install_consumer_steps(sender.app)


@worker_ready.connect
def check_masters_at_start(**kwargs):
    """Say at worker start, at ERROR, when a master copy here is not the site's (unmounted?)."""
    try:
        for storage in registry.replicated_storages():
            try:
                marker.verify(storage.location)
            except MasterUnavailable as refusal:
                logger.error(
                    "This worker will replicate nothing from %s: %s.", storage.location, refusal.reason
                )
    except (DatabaseError, RedisError, LookupError) as error:
        logger.warning("Could not check the master copies at start: %s", error)
    finally:
        connections.close_all()  # a prefork child must not inherit this connection


@worker_ready.connect
def warn_of_reconnects_at_start(**kwargs):
    """Say at worker start, at WARNING, when the worker would reconnect to the database of the
    ``Replica`` rows for every task (``resto_celery.W003`` says it to ``check --deploy``)."""
    alias = checks.reconnecting_database()
    if alias is not None:
        logger.warning(
            "This worker reconnects to database %r for every task. %s",
            alias, checks.RECONNECT_HINT.format(alias=alias),
        )


@worker_process_shutdown.connect
def send_what_tasks_saved(**kwargs):
    """A pool process that ends (``max_tasks_per_child``, a warm shutdown) first sends the
    changes its tasks saved through AsyncStorage: pool processes exit without ``atexit``."""
    if not publisher.flush(publisher.EXIT_FLUSH_TIMEOUT):
        logger.error("A worker process exits with changes not sent to the broker; reconcile will send them.")
