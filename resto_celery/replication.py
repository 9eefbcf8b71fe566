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
            transport = _transports[key] = _make_transport(host, timeout)
        return transport


def _make_transport(host, timeout):
    common = {"name": host.name, "timeout": timeout, "verify": host.ca_bundle or True}
    if host.kind == "tahoe":
        from .tahoe import TahoeTransport

        return TahoeTransport(
            host.base_url, dircap=host.dircap, readcap=host.readcap, public_url=host.public_url, **common
        )
    if host.kind == "webdav":
        from .webdav import WebDAVTransport

        return WebDAVTransport(host.base_url, auth=host.auth, headers=host.headers, **common)
    return HostTransport(host.base_url, auth=host.auth, headers=host.headers, **common)


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
            action = _apply(host, name, master_path, transport, Replica, task_id, lease, force, coordinator)
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


def _make_directories(host, name, transport, coordinator):
    """Make the parents ``transport`` says must exist before a PUT, one lease per directory.

    Hosts where parallel creation of one directory loses files (Tahoe-LAFS) list them;
    the lease makes every worker wait its turn. A busy directory raises :class:`LeaseBusy`.
    """
    for directory in transport.directories_to_create(name):
        lease = coordinator.lease(host, directory + "/")  # no file name ends with "/"
        if not lease.acquire():
            raise LeaseBusy(host, name, lease.remaining())
        try:
            transport.ensure_directory(directory)
        finally:
            lease.release()


def _apply(host, name, master_path, transport, Replica, task_id, lease, force=False, coordinator=None):
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
        if coordinator is not None:
            _make_directories(host, name, transport, coordinator)
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
    hosts = storage.hosts
    counts = {"files": 0, "rows": 0, "upload": 0, "delete": 0}
    # Whether a row's own state asks for another attempt, decided by the database: reading
    # two timestamps per row into Python was most of the time of a reconcile in steady state.
    rows = Replica.objects.filter(host__in=hosts).annotate(due=_due(now, now - timedelta(seconds=stale_after)))

    for batch in _batched(walk_master(storage.location), batch_size):
        counts["files"] += len(batch)
        known = {
            (host, path): (fp, state, due)
            for host, path, fp, state, due in rows.filter(path__in=[name for name, _ in batch]).values_list(
                "host", "path", "fingerprint", "state", "due"
            )
        }
        for name, current in batch:
            for host in hosts:
                row = known.get((host, name))
                if row is None or (row[1] == Replica.State.SYNCED and row[0] != current) or row[2]:
                    enqueue("upload", host, name)
                    counts["upload"] += 1

    last_pk = 0
    while True:
        page = list(rows.filter(pk__gt=last_pk).order_by("pk").values_list("pk", "host", "path", "state", "due")[:batch_size])
        if not page:
            break
        last_pk = page[-1][0]
        counts["rows"] += len(page)
        present = {}
        for _, host, path, state, due in page:
            if state != Replica.State.SYNCED and not due:
                continue
            if path not in present:
                present[path] = os.path.lexists(storage.path(path))
            if not present[path]:
                enqueue("delete", host, path)
                counts["delete"] += 1
    return counts


def _due(now, stale):
    """A boolean expression: the row failed and its ``retry_at`` has come, or it has been
    pending since before ``stale`` (its task was lost)."""
    from django.db.models import BooleanField, Case, Q, Value, When

    from .models import Replica

    failed_due = Q(state=Replica.State.FAILED) & (Q(retry_at__isnull=True) | Q(retry_at__lte=now))
    pending_lost = Q(state=Replica.State.PENDING, updated_at__lte=stale)
    return Case(When(failed_due | pending_lost, then=Value(True)), default=Value(False), output_field=BooleanField())
