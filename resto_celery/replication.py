"""Bring one ``(host, path)`` in line with the master copy. Plain functions, no Celery."""
import os
import threading

from .transport import HostTransport

_transports = {}
_transports_lock = threading.Lock()
# A forked child (a Celery prefork worker) must not reuse its parent's sockets.
os.register_at_fork(after_in_child=_transports.clear)


def transport_for(host, timeout):
    """Return the process-wide :class:`HostTransport` for a :class:`~resto_celery.conf.MediaHost`.

    Transports are shared so that every storage instance and every task in a process
    reuses the same keep-alive connections to a host.
    """
    key = (host, timeout)
    with _transports_lock:
        transport = _transports.get(key)
        if transport is None:
            transport = _transports[key] = HostTransport(
                host.base_url,
                name=host.name,
                timeout=timeout,
                auth=host.auth,
                headers=host.headers,
                verify=host.ca_bundle or True,
            )
        return transport


def push(master_path, transport, name):
    """Make the host's copy of ``name`` match the master file at ``master_path``.

    State-based: the master's *current* state decides what is sent, whatever change
    caused the call. A present file is PUT, streamed from disk; an absent one is DELETEd
    (already gone counts as success). Returns ``"upload"`` or ``"delete"``, what was done.
    Raises a :class:`~resto_celery.exceptions.TransportError` when the host fails.
    """
    try:
        source = open(master_path, "rb")
    except FileNotFoundError:
        transport.delete(name)
        return "delete"
    with source:
        transport.put(name, source, os.fstat(source.fileno()).st_size)
    return "upload"


def fingerprint(stat):
    """What identifies one version of a master file: size, mtime (ns) and inode.

    Master writes replace files (a new inode), never modify them in place, so equal
    fingerprints mean equal bytes.
    """
    return f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}"


class LeaseBusy(Exception):
    """Another worker holds the lease on this ``(host, path)``; try again in ``wait`` seconds."""

    def __init__(self, host, path, wait):
        self.host, self.path, self.wait = host, path, wait
        super().__init__(f"{path} on {host} is being replicated by another worker; retry in {wait:.1f}s")

    def __reduce__(self):
        return (type(self), (self.host, self.path, self.wait))


def sync(host, name, master_path, transport, coordinator, *, on_failure=None, task_id="", force=False):
    """Bring ``name`` on ``host`` in line with the master copy. The Celery tasks' body.

    Takes the lease on ``(host, name)`` (or raises :class:`LeaseBusy`), then reads the
    master's *current* state: present, it PUTs those bytes, unless the ``Replica`` row
    shows the host already has this fingerprint; absent, it DELETEs. Rows are written
    while the lease is held. A failure calls ``on_failure(error)`` (still under the lease)
    and is raised; when its outcome is in doubt (a timeout: the host may still apply what
    was sent), the lease is left to expire rather than released, which fences off the
    path until then. Returns ``"upload"``, ``"delete"`` or ``"skip"``. ``force`` sends the
    file even when the row's fingerprint matches (resync: the host may have lost it).
    """
    from .exceptions import HostShortCircuited, TransportError
    from .models import Replica

    lease = coordinator.lease(host, name)
    if not lease.acquire():
        raise LeaseBusy(host, name, lease.remaining())
    breaker = coordinator.breaker(host)
    keep_lease = False
    try:
        wait = breaker.open_for()
        if wait:
            raise HostShortCircuited(
                host, "PUT/DELETE", name,
                f"circuit breaker open after repeated failures; next try in {wait:.1f}s", wait=wait,
            )
        with lease.kept_alive():
            action = _apply(host, name, master_path, transport, Replica, task_id, lease, force)
        breaker.record_success()
        return action
    except TransportError as error:
        if error.retryable and not isinstance(error, HostShortCircuited):
            breaker.record_failure()
        keep_lease = error.in_doubt
        if on_failure is not None:
            on_failure(error)
        raise
    finally:
        if keep_lease:
            lease.abandon()
        else:
            lease.release()


def _apply(host, name, master_path, transport, Replica, task_id, lease, force=False):
    try:
        source = open(master_path, "rb")
    except FileNotFoundError:
        transport.delete(name)
        if _still_exclusive(lease, host, name, Replica, task_id):
            Replica.objects.record_gone(host, name)
        return "delete"
    with source:
        current = fingerprint(os.fstat(source.fileno()))
        known = Replica.objects.filter(host=host, path=name, state=Replica.State.SYNCED).values_list(
            "fingerprint", flat=True
        )
        if current in known and not force:
            return "skip"
        transport.put(name, source, int(current.split(":", 1)[0]))
    if _still_exclusive(lease, host, name, Replica, task_id):
        Replica.objects.record_success(host, name, current, task_id=task_id)
    return "upload"


def _still_exclusive(lease, host, name, Replica, task_id):
    """Whether nobody else could have worked on ``(host, name)`` during our transfer.

    If the lease was lost (Redis restarted, or the process stalled past the TTL), another
    worker may have applied a newer state before ours landed: the row is left pending so
    that reconcile checks the path again instead of trusting what we sent.
    """
    if lease.held():
        return True
    Replica.objects.record_failure(
        host, name, "lease lost during the transfer; reconcile will check this path again",
        final=False, retry_at=None, task_id=task_id,
    )
    return False


def walk_master(root):
    """Yield ``(name, fingerprint)`` for every file under ``root``, streaming (``os.scandir``).

    Names are relative with ``/``; in-progress master writes are skipped. Memory holds one
    directory listing per level of depth, never the whole tree.
    """
    from .master import is_temporary

    stack = [("", root)]
    while stack:
        prefix, directory = stack.pop()
        try:
            entries = os.scandir(directory)
        except FileNotFoundError:
            continue
        with entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append((prefix + entry.name + "/", entry.path))
                elif entry.is_file() and not is_temporary(entry.name):
                    yield prefix + entry.name, fingerprint(entry.stat())


def _batched(iterable, size):
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def reconcile(storage, enqueue, *, batch_size=1000, stale_after=600, now=None):
    """Compare the master tree with the ``Replica`` rows of every host; enqueue the repairs.

    - a master file a host has no row for, or a row with another fingerprint: ``upload``;
    - a ``failed`` row whose ``retry_at`` has come: ``upload`` (or ``delete``, below);
    - a ``pending`` row not touched for ``stale_after`` seconds (its task was lost): again;
    - a row whose master file is gone: ``delete``.

    ``enqueue(operation, host, name)`` sends one task. The tree is streamed and compared
    in batches of ``batch_size`` paths (one query each), and rows are read in primary-key
    order in batches, so memory stays flat whatever the size of the tree.
    Returns counts: ``files``, ``rows``, ``upload``, ``delete``.
    """
    from datetime import timedelta

    from django.utils import timezone

    from .models import Replica

    now = now or timezone.now()
    stale = now - timedelta(seconds=stale_after)
    hosts = storage.hosts
    counts = {"files": 0, "rows": 0, "upload": 0, "delete": 0}

    def due(state, retry_at, updated_at):
        if state == Replica.State.FAILED:
            return retry_at is None or retry_at <= now
        if state == Replica.State.PENDING:
            return updated_at <= stale
        return False

    for batch in _batched(walk_master(storage.location), batch_size):
        counts["files"] += len(batch)
        rows = {
            (host, path): (fp, state, retry_at, updated_at)
            for host, path, fp, state, retry_at, updated_at in Replica.objects.filter(
                path__in=[name for name, _ in batch], host__in=hosts
            ).values_list("host", "path", "fingerprint", "state", "retry_at", "updated_at")
        }
        for name, current in batch:
            for host in hosts:
                row = rows.get((host, name))
                if row is None or (row[1] == Replica.State.SYNCED and row[0] != current) or due(*row[1:]):
                    enqueue("upload", host, name)
                    counts["upload"] += 1

    last_pk = 0
    while True:
        rows = list(
            Replica.objects.filter(pk__gt=last_pk, host__in=hosts)
            .order_by("pk")
            .values_list("pk", "host", "path", "state", "retry_at", "updated_at")[:batch_size]
        )
        if not rows:
            break
        last_pk = rows[-1][0]
        counts["rows"] += len(rows)
        present = {}
        for _, host, path, state, retry_at, updated_at in rows:
            if path not in present:
                present[path] = os.path.lexists(storage.path(path))
            if not present[path] and (state == Replica.State.SYNCED or due(state, retry_at, updated_at)):
                enqueue("delete", host, path)
                counts["delete"] += 1
    return counts
