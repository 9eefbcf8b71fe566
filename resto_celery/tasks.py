"""Celery tasks: thin wrappers over :mod:`resto_celery.replication`.

``resto_celery.upload`` and ``resto_celery.delete`` take ``(host, path)`` and nothing else
from the web request: the master's current state decides what is sent, so both run the
same code and any of them, late, retried or redelivered, sends the newest state. The name
says which change caused the task (the admin shows it).

``resto_celery.reconcile`` is for Celery beat; let a pass expire when the next is due::

    CELERY_BEAT_SCHEDULE = {
        "resto-reconcile": {"task": "resto_celery.reconcile", "schedule": 300.0, "options": {"expires": 300.0}},
    }
"""
import logging
from contextlib import nullcontext
from datetime import timedelta

from celery import current_app, shared_task
from celery.signals import worker_ready
from django.db import DatabaseError, connections
from django.utils import timezone
from redis.exceptions import LockError, RedisError

from . import marker, registry, replication
from .coordination import Coordinator, backoff, jittered
from .exceptions import MasterReadError, MasterUnavailable, TransportError
from .models import Replica
from .reconcile import reconcile as reconcile_storage

logger = logging.getLogger(__name__)

#: How many times a task waits for a lease held by another worker before giving up
#: (reconcile picks the path up again later).
MAX_LEASE_WAITS = 200

#: A host that answers again gets at most this many failed changes re-sent at once.
BACKLOG_RELEASE_LIMIT = 10_000

#: A reconcile pass holds its lock this long past its last batch (seconds); a pass whose
#: worker died frees the lock after that.
RECONCILE_LOCK_TTL = 120

#: A successful transfer is recorded in its ``Replica`` row: the result backend keeps only
#: failures (``store_errors_even_if_ignored``), which the admin shows by task id.
TASK_OPTIONS = {
    "bind": True, "acks_late": True, "reject_on_worker_lost": True, "max_retries": None,
    "ignore_result": True, "store_errors_even_if_ignored": True, "track_started": False,
}


@shared_task(name="resto_celery.upload", **TASK_OPTIONS)
def upload(self, host, path, failures=0):
    """Replicate ``path`` to ``host`` after a save (sends the master's current state)."""
    return _replicate(self, "upload", host, path, failures)


@shared_task(name="resto_celery.delete", **TASK_OPTIONS)
def delete(self, host, path, failures=0):
    """Replicate ``path`` to ``host`` after a delete (sends the master's current state)."""
    return _replicate(self, "delete", host, path, failures)


@shared_task(name="resto_celery.reconcile", acks_late=True)
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
                with current_app.producer_or_acquire() as producer, publish_batch(producer):
                    counts = reconcile_storage(
                        storage,
                        lambda operation, host, path: storage.enqueue(operation, host, path, producer=producer),
                        max_delete_share=storage.options.max_delete_share,
                        allow_deletes=tuple(allow_deletes),
                        heartbeat=lock.reacquire,
                    )
            finally:
                _release(lock)
            logger.info("Reconciled %s: %s", storage.location, counts)
        for key, value in counts.items():
            totals[key] = value if isinstance(value, str) else totals.get(key, 0) + value
    return totals


def _release(lock):
    try:
        lock.release()
    except (LockError, RedisError) as error:  # expired, or Redis restarted: nothing to give back
        logger.warning("Reconcile lock already gone: %s", error)


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
    """Records a failed attempt and decides: retry after ``delay``, or ``final``.

    A master that is not the site's (:class:`MasterUnavailable`) is not the host's failure,
    and retrying the task cannot help: the row is marked failed, due at once, and the next
    reconcile that sees the master again sends the change; the task itself does not come back.
    """

    def __init__(self, host, path, failures, options, task_id):
        self.host, self.path, self.failures = host, path, failures
        self.options, self.task_id = options, task_id
        self.final, self.retry, self.delay = True, False, 0

    def __call__(self, error):
        options = self.options
        if isinstance(error, MasterUnavailable):
            self.final, self.retry, self.delay = True, False, 0
        else:
            self.final = not error.retryable or self.failures >= options.max_retries
            self.retry = not self.final
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
    """The per-host tasks' body: retries are this task's own (``task.retry`` keeps its id)."""

    def retry(countdown, failures, exc=None):
        raise task.retry(countdown=countdown, kwargs={"failures": failures}, exc=exc)

    storage = registry.storage_for_host(host)
    action = _sync_host(storage, operation, host, path, failures, task.request.id or "",
                        task.request.retries - failures, retry)
    return {"action": action, "host": host, "path": path}


def _sync_host(storage, operation, host, path, failures, task_id, waits, retry):
    """Bring ``path`` in line on ``host``; on a busy lease or a retryable failure call
    ``retry(countdown, failures, exc)``, which raises (a task's own retry) or sends a task."""
    options = storage.options
    policy = _FailurePolicy(host, path, failures, options, task_id)
    coordinator = coordinator_for(options)
    try:
        return replication.sync(
            host, path, storage.path(path), storage.transport(host), coordinator,
            location=storage.location, on_failure=policy, task_id=task_id,
            on_arrival=lambda done, version: replication.announce(storage, host, path, done, version, coordinator),
            on_recovery=lambda back: release_backlog(storage, back),
        )
    except replication.LeaseBusy as busy:
        if waits >= MAX_LEASE_WAITS:
            raise
        # Short waits first (most transfers are quick), never past the holder's expiry.
        retry(jittered(min(max(busy.wait, 0.1), 0.25 * 2 ** min(max(waits, 0), 6))), failures)
        return "wait"
    except MasterUnavailable as error:
        logger.error("Failed to %s %s on %s: %s; reconcile sends it once the master is back.",
                     operation, path, host, error)
        raise
    except (TransportError, MasterReadError) as error:
        if policy.retry:
            logger.warning("Will retry to %s %s on %s in %.1fs: %s", operation, path, host, policy.delay, error.reason)
            retry(policy.delay, failures + 1, error)
            return "retry"
        logger.error("Failed to %s %s on %s: %s", operation, path, host, error.reason)
        raise


@shared_task(name="resto_celery.replicate", **TASK_OPTIONS)
def replicate(self, path, hosts, operation="upload"):
    """Bring ``path`` in line with the master on each of ``hosts``: one message per change.

    ``operation`` names the change that caused it (``"upload"`` or ``"delete"``); the
    master's current state decides what is sent. The hosts are synced in turn, each under
    its own lease, exactly as the per-host tasks do it; a host whose lease another worker
    holds, or that fails with a retryable error, gets a ``resto_celery.upload``/``delete``
    task of its own for the retries, so a slow or failing host never holds back the
    others. A host that fails for good is raised once every host was tried (the result
    backend records it).
    """
    storage = registry.storage_for_host(hosts[0])
    task = upload if operation == "upload" else delete
    outcomes, failure = {}, None

    for host in hosts:
        def retry(countdown, failures, exc=None, host=host):
            task.apply_async((host, path), kwargs={"failures": failures}, countdown=countdown,
                             queue=storage.options.queue_for(host))

        try:
            outcomes[host] = _sync_host(storage, operation, host, path, 0, self.request.id or "", 0, retry)
        except (TransportError, MasterReadError, MasterUnavailable) as error:
            outcomes[host], failure = "failed", error
    if failure is not None:
        raise failure
    return {"path": path, "outcomes": outcomes}


def release_backlog(storage, host, limit=BACKLOG_RELEASE_LIMIT):
    """``host`` answers again: send its failed changes now, not at their ``retry_at``.

    At most ``limit`` messages; the rest are due at the next reconcile (their rows were
    made due by :func:`resto_celery.replication.host_recovered`). Returns how many were sent.
    """
    paths = Replica.objects.filter(host=host, state=Replica.State.FAILED).values_list("path", flat=True)[:limit]
    sent = 0
    with current_app.producer_or_acquire() as producer, publish_batch(producer):
        for path in paths.iterator():
            storage.enqueue("upload", host, path, producer=producer)
            sent += 1
    if sent:
        logger.info("%s answers again: re-sent %d failed change(s).", host, sent)
    return sent


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
