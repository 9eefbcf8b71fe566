"""Bring one ``(host, path)`` in line with the master copy. Plain functions, no Celery."""
import logging
import os
import threading

from django.db import DatabaseError
from django.utils import timezone
from redis.exceptions import RedisError

from . import marker, signals
from .exceptions import HostShortCircuited, MasterError, MasterReadError, TransportError
from .freshness import DELETED, Unconfirmed
from .master import is_temporary
from .models import Replica
from .transport import HostTransport

logger = logging.getLogger(__name__)

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


def open_master(master_path, location, name):
    """Open the master file of ``name`` for reading; None when the master has no such file.

    Only "no such file" (or a parent that is not a folder, or a folder where the file was)
    means absent. Any other error (permissions, I/O, a stale NFS handle) raises
    :class:`~resto_celery.exceptions.MasterReadError`: a failure to retry, never a delete.
    """
    try:
        return open(master_path, "rb")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as error:
        where = location or os.path.dirname(master_path)
        raise MasterReadError(where, name, f"cannot be read ({error.strerror or error})") from error


def push(master_path, transport, name, location=None):
    """Make the host's copy of ``name`` match the master file at ``master_path``.

    State-based: the master's *current* state decides what is sent, whatever change
    caused the call. A present file is PUT, streamed from disk; an absent one is DELETEd
    (already gone counts as success). Returns ``"upload"`` or ``"delete"``, what was done.
    Raises a :class:`~resto_celery.exceptions.TransportError` when the host fails, and
    :class:`~resto_celery.exceptions.MasterReadError` when the master file cannot be read.
    With ``location`` (the master folder), an absent file is deleted only from a verified
    master (:func:`resto_celery.marker.verify`).
    """
    source = open_master(master_path, location, name)
    if source is None:
        if location:
            marker.verify(location, name)
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


def sync(host, name, master_path, transport, coordinator, *, location=None, on_failure=None, on_arrival=None,
         on_recovery=None, task_id="", force=False):
    """Bring ``name`` on ``host`` in line with the master copy. The Celery tasks' body.

    First, when ``location`` (the master folder) is given, checks that it is the site's
    master (:func:`resto_celery.marker.verify`); if not, raises
    :class:`~resto_celery.exceptions.MasterUnavailable` and sends nothing. Then takes the
    lease on ``(host, name)`` (or raises :class:`LeaseBusy`) and reads the master's
    *current* state: present, it PUTs those bytes, unless the ``Replica`` row shows the host
    already has this fingerprint; absent (and the master still verified), it DELETEs. Rows
    are written while the lease is held. A failure calls ``on_failure(error)`` (still under
    the lease) and is raised; when its outcome is in doubt (a timeout: the host may still
    apply what was sent), the lease is left to expire rather than released, which fences
    off the path until then. Returns ``"upload"``, ``"delete"`` or ``"skip"``. ``force``
    sends the file even when the row's fingerprint matches (resync: the host may have lost it).
    After a transfer (not a skip), ``on_arrival(action, fingerprint)`` is called (see
    :func:`announce`); after the first success on a host that was failing,
    ``on_recovery(host)`` (the tasks re-send its failed changes at once).
    """
    try:
        if location:
            marker.verify(location, name)
    except MasterError as error:
        if on_failure is not None:
            on_failure(error)
        raise
    breaker = coordinator.breaker(host)
    lease = coordinator.lease(host, name)
    acquired, wait = lease.acquire_unless_open(breaker)  # one round trip for both
    if not acquired:
        raise LeaseBusy(host, name, wait)
    done = keep_lease = False
    try:
        if wait:
            raise HostShortCircuited(
                host, "PUT/DELETE", name,
                f"circuit breaker open after repeated failures; next try in {wait:.1f}s", wait=wait,
            )
        with lease.kept_alive():
            action, version = _apply(host, name, master_path, transport, task_id, lease, force, coordinator, location)
        done = True
    except TransportError as error:
        if error.retryable and not isinstance(error, HostShortCircuited):
            breaker.record_failure()
        keep_lease = error.in_doubt
        if on_failure is not None:
            on_failure(error)
        raise
    except MasterError as error:
        if on_failure is not None:
            on_failure(error)
        raise
    finally:
        if keep_lease:
            lease.abandon()
        elif not done:
            lease.release()
    if lease.release(breaker):  # a success closes the breaker; it had failures: the host is back
        host_recovered(host)
        if on_recovery is not None:
            on_recovery(host)
    if action != "skip" and on_arrival is not None:
        on_arrival(action, version)
    return action


def host_recovered(host):
    """A host that was failing answered again: make its failed rows due at the next reconcile.

    Their final failures were the host's absence; no timer (``failed_retry_after``) should
    stand between its return and the transfers.
    """
    Replica.objects.filter(host=host, state=Replica.State.FAILED).update(retry_at=timezone.now())


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


def _apply(host, name, master_path, transport, task_id, lease, force=False, coordinator=None, location=None):
    """Send the master's state of ``name``; return ``(action, fingerprint)``: the version the
    host now holds (for a delete, the one it held, "" if unknown)."""
    source = open_master(master_path, location, name)
    if source is None:
        if location:
            marker.verify(location, name)  # absent from a master that is (still) there
        transport.delete(name)
        gone = ""
        if _still_exclusive(lease, host, name, task_id):
            gone = Replica.objects.record_gone(host, name)
        return "delete", gone
    with source:
        current = fingerprint(os.fstat(source.fileno()))
        known = Replica.objects.filter(host=host, path=name, state=Replica.State.SYNCED).values_list(
            "fingerprint", flat=True
        )
        if current in known and not force:
            return "skip", current
        if coordinator is not None:
            _make_directories(host, name, transport, coordinator)
        transport.put(name, source, int(current.split(":", 1)[0]))
    if _still_exclusive(lease, host, name, task_id):
        Replica.objects.record_success(host, name, current, task_id=task_id)
    return "upload", current


def _still_exclusive(lease, host, name, task_id):
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

    Names are relative with ``/``; in-progress master writes and the marker are skipped.
    Memory holds one directory listing per level of depth, never the whole tree. An entry
    or a folder that cannot be read is logged at ERROR and skipped: it is sent nowhere,
    and nothing is deleted for it either (deletes look at each path, see reconcile).
    """
    stack = [("", root)]
    while stack:
        prefix, directory = stack.pop()
        try:
            entries = os.scandir(directory)
        except FileNotFoundError:
            continue
        except OSError as error:
            logger.error("Failed to list %s in the master copy: %s", prefix or "its top folder", error)
            continue
        with entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append((prefix + entry.name + "/", entry.path))
                    elif entry.is_file() and not is_temporary(entry.name):
                        if prefix or not marker.is_marker(entry.name):
                            yield prefix + entry.name, fingerprint(entry.stat())
                except FileNotFoundError:
                    continue  # removed while we walked
                except OSError as error:
                    logger.error("Failed to check %s%s in the master copy: %s", prefix, entry.name, error)


def announce(storage, host, name, action, version, coordinator):
    """Tell the site that a change just arrived on ``host``: signals, and fresh URLs.

    ``version`` is the fingerprint the host now holds (a delete: the one it held). When
    the change is now on every host (every row holds this fingerprint, for an upload; no
    host has a row left, for a delete), the path's read-your-writes mark is confirmed
    (:mod:`resto_celery.freshness`, storages with ``master_url``) and
    ``replicated_everywhere`` is sent. Each signal goes out once per change: a Redis
    ``SET NX`` per (host or "all", name, action, version) lets only the first sender
    through, whatever redelivery or duplicate follows. Costs nothing when nobody listens
    and ``master_url`` is off.
    """
    fresh = storage.options.master_url is not None
    if not (fresh or signals.replicated_to_host.has_listeners() or signals.replicated_everywhere.has_listeners()):
        return
    try:
        _announce(storage, host, name, action, version, coordinator, fresh)
    except (RedisError, DatabaseError) as error:  # the transfer stands; only the news is lost
        logger.error("Could not announce the %s of %s on %s: %s", action, name, host, error)


def _announce(storage, host, name, action, version, coordinator, fresh):
    tell_all = signals.replicated_everywhere.has_listeners()
    if signals.replicated_to_host.has_listeners() and coordinator.first_to_tell(host, name, action, version):
        _send(signals.replicated_to_host, storage, host=host, name=name, action=action)
    if not (fresh or tell_all):
        return
    rows = Replica.objects.filter(path=name, host__in=storage.hosts)
    if action == "upload":
        everywhere = rows.filter(state=Replica.State.SYNCED, fingerprint=version).count() == len(storage.hosts)
    else:
        everywhere = not rows.exists()
    if not everywhere:
        return
    if fresh:
        Unconfirmed(coordinator.client, storage.location).confirm(name, version if action == "upload" else DELETED)
    if tell_all and coordinator.first_to_tell("", name, action, version):
        _send(signals.replicated_everywhere, storage, name=name, action=action)


def _send(signal, storage, **arguments):
    for receiver, result in signal.send_robust(sender=storage, **arguments):
        if isinstance(result, Exception):
            logger.error("A receiver of %s failed for %s: %r", signal, arguments.get("name"), result)
