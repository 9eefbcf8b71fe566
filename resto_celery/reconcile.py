"""Anti-entropy: compare the master tree with the ``Replica`` rows and send what is missing.

The master tree plus the ``Replica`` table is the whole truth. A pass (the periodic
``resto_celery.reconcile`` task, or ``manage.py resto_reconcile``) re-sends:

- a master file a host has no row for, or a synced row with another fingerprint: ``upload``;
- a ``failed`` row, or one ``waiting`` for its host to come back, whose ``retry_at`` has
  come: ``upload`` (or ``delete``, below);
- a ``pending`` row whose retry should have run by now (its ``retry_at``, or its last
  update when it has none, is older than ``grace`` seconds): the retry was lost (a broker
  restart loses retries waiting for their countdown), so send it again;
- a row whose master file is gone: ``delete``, within the **deletion brake**;
- for a host whose failed or waiting rows are not due yet, one of them, as a **probe**: if
  the host is back, the probe's success sends all of them (``tasks.release_backlog``), so
  a returning host is caught up at once, not ``failed_retry_after`` later. (While changes
  wait, the host's own probe task does this every few seconds; this one is the safety net
  for a probe whose message was lost.)

Two guards stand before any decision. The master must be the site's (its marker,
:mod:`resto_celery.marker`): an unmounted volume is refused, not mirrored. And one pass
never deletes more than ``max_delete_share`` of a host's files (at least
:data:`BRAKE_FLOOR`): past that it deletes nothing on that host, records a
:class:`~resto_celery.models.Hold` saying how many it would delete, and waits for an
operator's go-ahead (``allow_deletes``).
"""
import logging
import math
import os
from datetime import timedelta

from django.db.models import BooleanField, Case, Count, Q, Value, When
from django.utils import timezone
from redis.exceptions import RedisError

from . import marker
from .broker import coordinator_for
from .exceptions import MasterUnavailable
from .models import Hold, Replica
from .replication import walk_master

logger = logging.getLogger(__name__)

#: How long after its ``retry_at`` a pending row is taken for lost (seconds). Short: a
#: retry that is merely late costs a duplicate, which the fingerprint makes cheap.
RETRY_GRACE = 5.0
#: The brake never holds back fewer deletions than this on a host (a small site's few
#: genuinely lost deletes go through).
BRAKE_FLOOR = 10
#: ``allow_deletes`` value that lifts the brake on every host.
ALL_HOSTS = "*"


def reconcile(storage, enqueue, *, batch_size=1000, grace=RETRY_GRACE, max_delete_share=0.1,
              allow_deletes=(), heartbeat=None, now=None):
    """Compare the master tree with the ``Replica`` rows of every host; enqueue the repairs.

    ``enqueue(operation, host, name)`` sends one task. The tree is streamed and compared
    in batches of ``batch_size`` paths (one query each), and rows are read in primary-key
    order in batches, so memory stays flat whatever the size of the tree (the deletions a
    pass may send are held in memory up to the brake's limit). ``heartbeat()``, if given,
    is called after each batch (to keep a pass lock). ``allow_deletes`` lists the hosts
    (or :data:`ALL_HOSTS`) whose brake this pass ignores: the operator's go-ahead.

    Returns counts: ``files``, ``rows``, ``upload``, ``delete``, ``held`` (deletions
    braked), ``unreadable`` (paths whose presence could not be told) and ``probe``; with
    ``refused`` (the reason) when the master is not the site's and nothing was sent.
    """
    counts = {"files": 0, "rows": 0, "upload": 0, "delete": 0, "held": 0, "unreadable": 0, "probe": 0}
    location = storage.location
    try:
        marker.verify(location)
    except MasterUnavailable as refusal:
        logger.error("Reconcile refused for %s: %s.", location, refusal.reason)
        return {**counts, "refused": refusal.reason}
    now = now or timezone.now()
    hosts = storage.hosts
    beat = heartbeat or (lambda: None)
    # Whether a row's own state asks for another attempt, decided by the database: reading
    # two timestamps per row into Python was most of the time of a reconcile in steady state.
    down = _down_hosts(storage)
    due = _due(now, now - timedelta(seconds=grace), down)
    rows = Replica.objects.filter(host__in=hosts).annotate(due=due)

    for batch in _batched(walk_master(location), batch_size):
        counts["files"] += len(batch)
        # The batch's rows on every host (Replica.objects.of_paths); only this storage's
        # hosts are looked up below.
        batch_rows = Replica.objects.of_paths([name for name, _ in batch]).annotate(due=due)
        known = {
            (host, path): (fp, state, is_due)
            for host, path, fp, state, is_due in batch_rows.values_list("host", "path", "fingerprint", "state", "due")
        }
        for name, current in batch:
            for host in hosts:
                row = known.get((host, name))
                if row is None or (row[1] == Replica.State.SYNCED and row[0] != current) or row[2]:
                    enqueue("upload", host, name)
                    counts["upload"] += 1
        beat()

    _send_deletes(storage, rows, enqueue, counts, batch_size, max_delete_share, allow_deletes, beat)
    _send_probes(hosts, down, enqueue, counts, now)
    return counts


def _send_probes(hosts, down, enqueue, counts, now):
    """One row per host whose failed (or, for a host that is down, waiting) rows are not due
    yet: if it goes through, the host is back and the others are sent at once."""
    for host in hosts:
        states = Replica.UNSCHEDULED if host in down else [Replica.State.FAILED]
        path = (
            Replica.objects.filter(host=host, state__in=states, retry_at__gt=now)
            .order_by("retry_at").values_list("path", flat=True).first()
        )
        if path is not None:
            enqueue("upload", host, path)
            counts["probe"] += 1


def _send_deletes(storage, rows, enqueue, counts, batch_size, share, allow_deletes, beat):
    """Deletions for rows whose master file is gone, host by host within the brake."""
    location = storage.location
    held_files = dict(
        Replica.objects.filter(host__in=storage.hosts, state=Replica.State.SYNCED)
        .values_list("host").annotate(count=Count("*")).order_by()
    )
    limits = {host: max(BRAKE_FLOOR, math.floor(share * held_files.get(host, 0))) for host in storage.hosts}
    wanted = {host: [] for host in storage.hosts}
    totals = dict.fromkeys(storage.hosts, 0)
    for host, path in _absent_rows(storage, rows, counts, batch_size, beat):
        totals[host] += 1
        if totals[host] <= limits[host] or _allowed(host, allow_deletes):
            wanted[host].append(path)
    try:
        marker.verify(location)  # the master may have gone away while we looked
    except MasterUnavailable as refusal:
        logger.error("Reconcile refused to delete anything from %s: %s.", location, refusal.reason)
        counts["refused"] = refusal.reason
        return
    for host in storage.hosts:
        if totals[host] > limits[host] and not _allowed(host, allow_deletes):
            counts["held"] += totals[host]
            reason = (
                f"reconcile would delete {totals[host]} of the {held_files.get(host, 0)} files it holds "
                f"(the brake allows {limits[host]}: RESTO_MAX_DELETE_SHARE = {share:g}); nothing was deleted. "
                f"If the master really lost these files, allow the deletions (dashboard, or "
                f"'manage.py resto_reconcile --allow-deletes {host}'); if not, restore the master"
            )
            logger.error("Deletions held on %s: %s.", host, reason)
            marker.record_hold(Hold.Kind.DELETES, location, host, reason, totals[host], add=False)
            continue
        for path in wanted[host]:
            enqueue("delete", host, path)
        counts["delete"] += len(wanted[host])
        marker.clear_hold(Hold.Kind.DELETES, location, host)


def _allowed(host, allow_deletes):
    return ALL_HOSTS in allow_deletes or host in allow_deletes


def _absent_rows(storage, rows, counts, batch_size, beat):
    """Yield ``(host, path)`` for rows due a delete: their master file is gone."""
    last_pk = 0
    while True:
        page = list(
            rows.filter(pk__gt=last_pk).order_by("pk").values_list("pk", "host", "path", "state", "due")[:batch_size]
        )
        if not page:
            return
        last_pk = page[-1][0]
        counts["rows"] += len(page)
        present = {}
        for _, host, path, state, due in page:
            if state != Replica.State.SYNCED and not due:
                continue
            if path not in present:
                present[path] = _master_has(storage, path)
                if present[path] is None:
                    counts["unreadable"] += 1
            if present[path] is False:
                yield host, path
        beat()


def _master_has(storage, name):
    """True or False; None when the master cannot tell (an error that is not "no such file")."""
    try:
        os.lstat(storage.path(name))
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as error:
        logger.error("Failed to check %s in the master copy: %s; it is not deleted anywhere.", name, error)
        return None
    return True


def _batched(iterable, size):
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _down_hosts(storage):
    """The hosts whose breaker is open: their waiting rows keep waiting for the host's probe."""
    try:
        coordinator = coordinator_for(storage.options)
        return [host for host in storage.hosts if coordinator.breaker(host).open_for()]
    except (RedisError, RuntimeError) as error:
        logger.warning("Could not read the circuit breakers (%s): waiting rows wait for their retry time.", error)
        return list(storage.hosts)


def _due(now, lost_before, down=()):
    """A boolean expression: the row waits for a host that is not down (any more), or it
    failed (or waits) and its ``retry_at`` has come, or it is pending and
    its retry (or, without one, its last attempt) is older than ``lost_before``."""
    failed_due = Q(state__in=Replica.UNSCHEDULED) & (Q(retry_at__isnull=True) | Q(retry_at__lte=now))
    host_back = Q(state=Replica.State.WAITING)
    if down:  # (an empty IN is something SQL has not)
        host_back &= ~Q(host__in=down)
    pending_lost = Q(state=Replica.State.PENDING) & (
        Q(retry_at__lte=lost_before) | Q(retry_at__isnull=True, updated_at__lte=lost_before)
    )
    due = failed_due | host_back | pending_lost
    return Case(When(due, then=Value(True)), default=Value(False), output_field=BooleanField())
