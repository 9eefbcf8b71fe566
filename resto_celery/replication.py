"""Bring ``(host, path)`` pairs in line with the master copy: the protocol of DESIGN.md, in
:func:`sync_pairs` (its steps in the order they run). Plain functions, no Celery: the tasks
call them."""
import io
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

from django.db import DatabaseError
from django.utils import timezone
from redis.exceptions import RedisError

from . import marker, signals
from .exceptions import (
    HostShortCircuited,
    HostTimeout,
    HostUnreachable,
    MasterError,
    MasterReadError,
    TransportError,
)
from .freshness import DELETED, Unconfirmed
from .master import is_temporary
from .models import Replica
from .transport import SMALL_BODY, abandon, as_connected, finish_together, send_available

logger = logging.getLogger(__name__)

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
    master (:func:`resto_celery.marker.verify`). No lease, no row: HybridStorage's path.
    """
    return _send_current_state(master_path, transport, name, location)[0]


def push_everywhere(master_path, transports, name, location=None):
    """:func:`push` of ``name`` to every host of ``transports`` (``{host: transport}``):
    ``[(host, error or None)]``, in order.

    When every host speaks plain HTTP (:attr:`~resto_celery.transport.Transport.pipelines`),
    this thread sends the requests to every host, then the file's blocks to whichever host
    takes one (each at its own pace), then reads every answer
    (:func:`~resto_celery.transport.finish_together`). A thread per host added a hand-off
    each: ``HybridStorage.save()`` to 3 nginx hosts took about twice as long at 10 KB, a
    quarter longer at 1 MB. Hosts with no kept-alive connection are connected to at once,
    each request sent as its host's connection opens
    (:func:`~resto_celery.transport.as_connected`): hosts that do not answer cost one
    connect timeout, not one each, and hold back no small file to the others. Other kinds
    of host get a transfer thread each (:func:`in_parallel`).
    """
    if not all(transport.pipelines for transport in transports.values()):
        return in_parallel(lambda host: push(master_path, transports[host], name, location), transports)

    def begin(transport):
        _, _, _, request, source = _start_current_state(master_path, transport, name, location)
        return request, source

    started = []
    try:
        failed = _begin_everywhere(transports, name, lambda: _method_for(master_path), begin, started)
        finished = finish_together([request for _, request, _ in started])
    finally:
        for _, _, source in started:
            if source is not None:
                source.close()
    return _outcomes(transports, failed, started, finished)


def push_as_written(descriptor, size, transports, name, written, commit, location):
    """Send a master file to every HTTP host of ``transports`` (plain or TLS: hosts whose
    transport :attr:`~resto_celery.transport.Transport.pipelines`) while it is written:
    ``HybridStorage.save()`` of bytes in memory. The hosts then take the file as the master
    writes it, rather than after.

    ``descriptor`` is the file being written (opened for reading too), ``size`` its length
    (more than :data:`~resto_celery.transport.SMALL_BODY`); iterating ``written`` writes it
    and yields how many bytes are written so far; ``commit()`` then moves it into place and
    returns its name (another one if ``name`` was taken meanwhile). ``location``: the
    master folder, for errors.

    The last byte goes to no host before ``commit()`` returns: if writing or committing
    raises, or the file took another name, every request is abandoned (a host drops a body
    it did not get whole) and nothing changes on the hosts. Returns ``(the name committed,
    [(host, error or None)] in order)``, or ``(that name, None)`` when it is not ``name``:
    the caller then pushes it as usual.
    """
    if size <= SMALL_BODY or not all(transport.pipelines for transport in transports.values()):
        raise ValueError("push_as_written() takes a file over SMALL_BODY bytes and hosts that pipeline.")

    def begin(transport):
        request = transport.start_put(name, _PositionalReader(descriptor, size, location, name), size)
        request.hold(0)
        return request, None

    started = []
    try:
        failed = _begin_everywhere(transports, name, lambda: "PUT", begin, started)
        requests = [request for _, request, _ in started]
        for count in written:
            for request in requests:
                request.hold(min(count, size - 1))
            send_available(requests)
        committed = commit()
    except BaseException:
        abandon([request for _, request, _ in started])
        raise
    if committed != name:
        abandon(requests)
        return committed, None
    return committed, _outcomes(transports, failed, started, finish_together(requests))


def _begin_everywhere(transports, name, method, begin, started):
    """Begin a request of ``name`` to each host of ``transports`` as it can take one
    (:func:`~resto_celery.transport.as_connected`): ``begin(transport)`` returns ``(request,
    source or None)``, appended to ``started`` as ``(host, request, source)`` at once (the
    caller cleans up what began, should this raise). Returns ``{host: error}`` for the
    hosts that could not be connected to (``method()`` says what would have been sent: asked
    only then, as it may look at the master) or whose ``begin`` raised: the caller sorts the
    outcomes out, as :func:`in_parallel`'s."""
    failed = {}
    for host, failed_to_connect in as_connected(transports):
        transport = transports[host]
        if failed_to_connect is not None:
            failed[host] = transport.failed_to_connect(failed_to_connect, method(), name)
            continue
        try:
            request, source = begin(transport)
        except Exception as error:  # noqa: BLE001 - that host's outcome
            failed[host] = error
        else:
            started.append((host, request, source))
    return failed


def _outcomes(transports, failed, started, finished):
    """``[(host, error or None)]`` in the order of ``transports``, from the hosts that failed
    to begin and what :func:`~resto_celery.transport.finish_together` gave the others."""
    outcomes = dict(failed)
    for (host, _, _), outcome in zip(started, finished, strict=True):
        outcomes[host] = outcome if isinstance(outcome, BaseException) else None
    return [(host, outcomes[host]) for host in transports]


def _method_for(master_path):
    """The request the master's current state of a file calls for: PUT, or DELETE when it is gone."""
    return "PUT" if os.path.exists(master_path) else "DELETE"


def _send_current_state(master_path, transport, name, location, has=None, before_put=None):
    """:func:`_start_current_state`, finished: ``(action, fingerprint, bytes sent)``."""
    action, version, nbytes, request, source = _start_current_state(
        master_path, transport, name, location, has, before_put
    )
    with source if source is not None else nullcontext():
        if request is not None:
            request.finish()
    return action, version, nbytes


def _start_current_state(master_path, transport, name, location, has=None, before_put=None):
    """The one rule of :func:`push` and :func:`sync_pairs`: the master's current state of
    ``name`` goes to the host. Absent (from a master verified when ``location`` is given):
    DELETE. Present: PUT, streamed, unless ``has`` is its fingerprint already (the host's
    row says it holds those bytes); ``before_put()`` first.

    Returns ``(action, fingerprint, bytes, request, source)``: the action ``"upload"``,
    ``"delete"`` or ``"skip"``; the :class:`~resto_celery.transport.PendingRequest` to
    finish (None for a skip) and the master file it reads, to close once it is finished
    (None but for an upload).
    """
    source = open_master(master_path, location, name)
    if source is None:
        if location:
            marker.verify(location, name)  # absent from a master that is (still) there
        return "delete", "", 0, transport.start_delete(name), None
    try:
        stat = os.fstat(source.fileno())
        version = fingerprint(stat)
        if has == version:
            source.close()
            return "skip", version, 0, None, None
        if before_put is not None:
            before_put()
        reader = _PositionalReader(source.fileno(), stat.st_size, location or os.path.dirname(master_path), name)
        request = transport.start_put(name, reader, stat.st_size)
    except BaseException:
        source.close()
        raise
    return "upload", version, stat.st_size, request, source


class Fingerprint(NamedTuple):
    """What identifies one version of a master file: size, mtime (ns) and inode.

    Master writes replace files (a new inode), never modify them in place, so equal
    fingerprints mean equal bytes. Stored in ``Replica.fingerprint`` as ``str()``.
    """

    size: int
    mtime_ns: int
    inode: int

    def __str__(self):
        return f"{self.size}:{self.mtime_ns}:{self.inode}"


def fingerprint(stat):
    """The :class:`Fingerprint` of a master file's ``os.stat`` result, as stored (a string)."""
    return str(Fingerprint(stat.st_size, stat.st_mtime_ns, stat.st_ino))


class LeaseBusy(Exception):
    """Another worker holds the lease on this ``(host, path)``; try again in ``wait`` seconds."""

    def __init__(self, host, path, wait):
        self.host, self.path, self.wait = host, path, wait
        super().__init__(f"{path} on {host} is being replicated by another worker; retry in {wait:.1f}s")

    def __reduce__(self):
        return (type(self), (self.host, self.path, self.wait))


@dataclass
class Outcome:
    """What :func:`sync_pairs` did for one ``(host, name)``.

    ``action`` is ``"upload"``, ``"delete"`` or ``"skip"`` on success, "" otherwise;
    ``error`` the failure (:class:`LeaseBusy`, a
    :class:`~resto_celery.exceptions.TransportError` or a
    :class:`~resto_celery.exceptions.MasterError`); ``host_down`` whether the host's
    breaker is open after it (the change now waits for the host's probe); ``version`` the
    fingerprint the host holds now (what was sent, or what a deleted row had); ``nbytes``
    the bytes sent and ``seconds`` how long the transfer took.
    """

    host: str
    name: str
    action: str = ""
    error: Exception | None = None
    host_down: bool = False
    version: str = ""
    nbytes: int = 0
    seconds: float = 0.0

    @property
    def pair(self):
        return self.host, self.name


def sync(host, name, master_path, transport, coordinator, *, location=None, on_failure=None, on_arrival=None,
         on_recovery=None, task_id="", force=False, probe=False):
    """Bring ``name`` on one ``host`` in line with the master copy: :func:`sync_pairs` for one
    pair. Returns ``"upload"``, ``"delete"`` or ``"skip"``, or raises the failure
    (:class:`LeaseBusy`, a ``TransportError``, a ``MasterError``) after ``on_failure(error)``.
    """
    (outcome,) = sync_pairs(
        [(host, name)], lambda _name: master_path, {host: transport}, coordinator, location=location,
        on_failure=(lambda _host, _name, error, _down: on_failure(error)) if on_failure else None,
        on_arrivals=(lambda arrivals: on_arrival(*arrivals[0][2:])) if on_arrival else None,
        on_recovery=on_recovery, task_id=task_id, force=force, probe=probe,
    )
    if outcome.error is not None:
        raise outcome.error
    return outcome.action


def sync_pairs(pairs, master_path, transports, coordinator, *, location=None, on_failure=None,
               on_arrivals=None, on_recovery=None, task_id="", force=False, probe=False, bulk=False,
               fresh=False):
    """Bring each ``(host, name)`` of ``pairs`` in line with the master copy; return an
    :class:`Outcome` per pair, in order. ``master_path(name)`` is the master file's path,
    ``transports`` maps each host to its transport. A path on several hosts (a fan-out) and
    a batch of paths are synced together: every step below costs one round trip or one
    query for all the pairs. The protocol of DESIGN.md, in the order it runs:

    1. When ``location`` (the master folder) is given, check that it is the site's master
       (:func:`resto_celery.marker.verify`); if not, every pair fails with
       :class:`~resto_celery.exceptions.MasterUnavailable` and nothing is sent.
    2. Take the lease on every pair and read the hosts' breakers. A lease another worker
       holds: :class:`LeaseBusy` for that pair. An open breaker:
       :class:`~resto_celery.exceptions.HostShortCircuited` (unless ``probe``: the caller
       is the breaker's probe, the half-open attempt).
    3. For each pair, read the master's *current* state. Present: PUT those bytes
       (streamed) unless the ``Replica`` row holds this fingerprint already (one query for
       all; ``force`` sends anyway: resync). ``fresh`` pairs, a save's own change, are sent
       without the query: no host can hold bytes the master wrote a moment ago, and sending
       them again (a redelivered message) is harmless. Absent (and the master still
       verified): DELETE.
       The pairs are sent in parallel (on the process's bulk transfer threads when
       ``bulk``, bulk-lane work, so that live changes never queue behind it); once a host
       is unreachable, its other pairs fail without another try.
    4. Record: the successes in one statement, each failure in its row
       (``on_failure(host, name, error, host_down)``, still under the lease), those of the
       hosts whose breaker is open last: the hosts that answer do not wait for them. A pair whose
       lease was lost meanwhile (Redis restarted, a stall past the TTL) gets a pending row
       instead: another worker may have sent a newer state.
    5. Give the leases back and close the breakers of the hosts that succeeded; a lease
       whose outcome is in doubt (a timeout: the host may still apply what was sent) is
       left to expire, fencing off the pair until then.
    6. ``on_recovery(host)`` for each host that had been failing (its backlog can go now),
       then ``on_arrivals([(host, name, action, fingerprint), ...])`` once, with every
       transfer made (:func:`announce`).
    """
    outcomes = {pair: Outcome(*pair) for pair in pairs}

    def fail(pair, error, host_down=False):
        outcome = outcomes[pair]
        outcome.error, outcome.host_down = error, host_down
        if on_failure is not None:
            on_failure(*pair, error, host_down)

    try:
        if location and outcomes:
            marker.verify(location, next(iter(outcomes))[1])
    except MasterError as error:
        for pair in outcomes:
            fail(pair, error)
        return list(outcomes.values())

    leases = coordinator.leases(list(outcomes))
    active, short_circuited = [], []
    succeeded, in_doubt = set(), set()
    try:
        for pair, (acquired, wait) in leases.acquire().items():
            host, name = pair
            if not acquired:
                outcomes[pair].error = LeaseBusy(host, name, wait)
            elif wait and not probe:
                cause = leases.causes.get(host)
                short_circuited.append((pair, HostShortCircuited(
                    host, "PUT/DELETE", name,
                    f"circuit breaker open after repeated failures{f' ({cause})' if cause else ''}; "
                    f"next try in {wait:.1f}s", wait=wait,
                )))
            else:
                active.append(pair)
        try:
            if active:
                with leases.kept_alive(active):
                    _transfer(active, master_path, transports, coordinator, location, force or fresh, outcomes, bulk)
                done = [pair for pair in active if outcomes[pair].error is None]
                _record(done, leases, outcomes, task_id)
                succeeded = set(done)
                for pair in active:
                    error = outcomes[pair].error
                    if isinstance(error, TransportError):
                        down = False
                        if error.retryable:
                            down = leases.breakers[pair[0]].record_failure(error.reason)
                        if error.in_doubt:
                            in_doubt.add(pair)
                        fail(pair, error, down)
                    elif isinstance(error, MasterError):
                        fail(pair, error)
                    # LeaseBusy (a directory another worker is making): no failure, try again soon
        finally:
            # The rows of the changes that wait for a down host are written once the hosts
            # that answer have theirs (still under the leases): written first, they held up
            # every transfer to the others by a few queries while a host was down.
            for pair, error in short_circuited:
                fail(pair, error, host_down=True)
    finally:
        came_back = leases.release(succeeded, keep=in_doubt)
    for host in dict.fromkeys(host for host, _ in outcomes):
        if host in came_back:
            host_recovered(host)
            if on_recovery is not None:
                on_recovery(host)
    arrivals = [(o.host, o.name, o.action, o.version) for o in outcomes.values() if o.action in ("upload", "delete")]
    if on_arrivals is not None and arrivals:
        on_arrivals(arrivals)
    return list(outcomes.values())


def _transfer(pairs, master_path, transports, coordinator, location, force, outcomes, bulk):
    """Send the master's current state of each pair's name to its host (the leases held);
    fill in each outcome's ``action`` and ``version``, or its ``error``.

    When every host pipelines (plain HTTP), this thread keeps up to
    :data:`TRANSFER_THREADS` transfers going at once (:func:`_transfer_pipelined`), the
    pairs of hosts with a kept-alive connection begun first, the others' as their
    connections open (:func:`_in_connect_order`); else each pair has a transfer thread (the
    process's pool of the lane).
    """
    has = {} if force else Replica.objects.synced_fingerprints(pairs)
    unreachable = {}

    def start(pair):
        """Begin the pair's transfer: ``(request, source)`` as :func:`_start_current_state`'s."""
        host, name = pair
        outcome, transport = outcomes[pair], transports[host]
        if host in unreachable:
            raise unreachable[host]
        try:
            outcome.action, outcome.version, outcome.nbytes, request, source = _start_current_state(
                master_path(name), transport, name, location, has=has.get(pair),
                before_put=lambda: _make_directories(host, name, transport, coordinator),
            )
        except (HostUnreachable, HostTimeout) as error:
            if _unreachable(error):
                unreachable.setdefault(host, error)
            raise
        return request, source

    if all(transports[host].pipelines for host, _ in pairs):
        results = _transfer_pipelined(_in_connect_order(pairs, transports, master_path, unreachable), start,
                                      outcomes, unreachable)
    else:
        def bring_in_line(pair):
            started = time.perf_counter()
            try:
                request, source = start(pair)
                with source if source is not None else nullcontext():
                    if request is not None:
                        request.finish()
            except (HostUnreachable, HostTimeout) as error:
                if _unreachable(error):
                    unreachable.setdefault(pair[0], error)
                raise
            finally:
                outcomes[pair].seconds = time.perf_counter() - started

        results = _transfers_in_parallel(bring_in_line, pairs, "bulk" if bulk else "live")
    for pair, error in results:
        if error is not None:
            outcomes[pair].action, outcomes[pair].error = "", error


def _in_connect_order(pairs, transports, master_path, unreachable):
    """``pairs``, host by host as each host can take a request
    (:func:`~resto_celery.transport.as_connected`): a host that does not answer a connect
    holds back neither the others' transfers nor this task by more than one connect
    timeout. A host that could not be connected to goes in ``unreachable`` before its
    pairs come (their transfers fail with that error without another try)."""
    by_host = {}
    for pair in pairs:
        by_host.setdefault(pair[0], []).append(pair)
    for host, failed_to_connect in as_connected({host: transports[host] for host in by_host}):
        if failed_to_connect is not None:
            name = by_host[host][0][1]
            unreachable[host] = transports[host].failed_to_connect(failed_to_connect, _method_for(master_path(name)),
                                                                   name)
        yield from by_host[host]


def _unreachable(error):
    """Whether ``error`` says the host cannot be reached at all: its other pairs then fail
    without another try. A refused connection or one that timed out connecting; not a
    timeout waiting for an answer (that host is there, and slow), nor a connection dropped
    once the request was sent."""
    return isinstance(error, (HostUnreachable, HostTimeout)) and not error.in_doubt


def _transfer_pipelined(pairs, start, outcomes, unreachable):
    """``[(pair, error or None)]`` of ``start(pair)`` and the request it begins, from this
    thread: :data:`TRANSFER_THREADS` pairs at a time are begun, then finished together
    (:func:`~resto_celery.transport.finish_together`). Transport and master failures are
    outcomes; anything else is raised once the requests begun are finished."""
    results = []
    pairs = iter(pairs)
    while True:
        chunk, started, errors, unexpected = [], [], {}, None
        begun = time.perf_counter()
        try:
            for pair in pairs:  # begun as they come (see _in_connect_order), TRANSFER_THREADS at a time
                chunk.append(pair)
                try:
                    request, source = start(pair)
                except (TransportError, MasterError, LeaseBusy) as error:
                    errors[pair] = error
                except Exception as error:  # noqa: BLE001 - raised below, once the requests begun are done
                    unexpected = error
                    break
                else:
                    if request is not None:
                        started.append((pair, request, source))
                if len(chunk) == TRANSFER_THREADS:
                    break
            finished = finish_together([request for _, request, _ in started])
        finally:
            for _, _, source in started:
                if source is not None:
                    source.close()
        if unexpected is not None:
            raise unexpected
        ended = time.perf_counter()
        answered = {}
        for (pair, request, _), outcome in zip(started, finished, strict=True):
            answered[pair] = request.answered_at or ended
            if isinstance(outcome, BaseException):
                errors[pair] = outcome
                if _unreachable(outcome):
                    unreachable.setdefault(pair[0], outcome)
        for pair in chunk:
            outcomes[pair].seconds = answered.get(pair, ended) - begun  # a slow host's time is its own
            results.append((pair, errors.get(pair)))
        if len(chunk) < TRANSFER_THREADS:
            return results


def _record(pairs, leases, outcomes, task_id):
    """Write the rows of the pairs that succeeded, if nobody else could have worked on them
    meanwhile (their leases still ours): one statement for all the uploads, one for all
    the deletes."""
    changed = [pair for pair in pairs if outcomes[pair].action != "skip"]
    if not changed:
        return
    exclusive = leases.held(changed)
    for host, name in changed:
        if (host, name) not in exclusive:
            Replica.objects.record_failure(
                host, name, "lease lost during the transfer; reconcile will check this path again",
                final=False, retry_at=None, task_id=task_id,
            )
    uploaded = [outcomes[pair] for pair in changed if pair in exclusive and outcomes[pair].action == "upload"]
    deleted = [pair for pair in changed if pair in exclusive and outcomes[pair].action == "delete"]
    if uploaded:
        Replica.objects.record_synced([(o.host, o.name, o.version) for o in uploaded], task_id=task_id)
    for pair, version in Replica.objects.record_gone(deleted).items():
        outcomes[pair].version = version


class _PositionalReader(io.RawIOBase):
    """A read-only view of an open master file with a position of its own (``os.pread``):
    one file streamed to several hosts at once, each at its own pace (a plain HTTP host's
    socket is fed from :meth:`fileno` by ``sendfile()``, from :meth:`tell` on). A read that fails
    raises :class:`~resto_celery.exceptions.MasterReadError` (the master's fault, not the
    host's: a failure to retry)."""

    def __init__(self, fd, size, location, name):
        super().__init__()
        self.fd, self.size, self.position = fd, size, 0
        self.location, self.name = location, name

    def readable(self):
        return True

    #: Its file's bytes are those it reads, from tell(): sendfile() may send them.
    sendfile_from_fileno = True

    def fileno(self):
        # For sendfile(), which takes the offset it is given (tell()): the descriptor's own
        # position is nobody's.
        return self.fd

    def seekable(self):
        return True

    def __len__(self):
        return self.size - self.position

    def read(self, size=-1):
        if size is None or size < 0:
            size = self.size - self.position
        try:
            chunk = os.pread(self.fd, min(size, self.size - self.position), self.position)
        except OSError as error:
            raise MasterReadError(self.location, self.name, f"cannot be read ({error.strerror or error})") from error
        self.position += len(chunk)
        return chunk

    def readinto(self, buffer):
        chunk = self.read(len(buffer))
        buffer[:len(chunk)] = chunk
        return len(chunk)

    def tell(self):
        return self.position

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position


_pools = {}
_pool_lock = threading.Lock()


def _reset_pools():
    _pools.clear()


os.register_at_fork(after_in_child=_reset_pools)

#: A task's transfers (a fan-out's hosts, a batch's pairs) run on this many threads per
#: process: as many as a host's transport keeps connections (``HostTransport`` pool_size),
#: so that a batch to one host reuses its connections rather than opening more.
TRANSFER_THREADS = 16

#: Bulk work (a catch-up, a resync) has threads of its own, fewer: a live change's transfers
#: never queue behind a backlog's in a worker that takes both lanes.
BULK_TRANSFER_THREADS = 4

_THREADS = {"live": TRANSFER_THREADS, "bulk": BULK_TRANSFER_THREADS}


def in_parallel(function, items, lane="live"):
    """``[(item, error or None)]`` for ``function(item)`` on every item: the first in this
    thread, the others on the process's transfer threads of ``lane`` (``"live"`` or
    ``"bulk"``; a pool kept for the process, so a fan-out starts no thread). Every call has
    returned when this returns."""
    items = list(items)
    if not items:
        return []
    futures = []
    if len(items) > 1:
        with _pool_lock:
            pool = _pools.get(lane)
            if pool is None:
                pool = _pools[lane] = ThreadPoolExecutor(
                    max_workers=_THREADS[lane], thread_name_prefix=f"resto-transfer-{lane}"
                )
        futures = [(item, pool.submit(_outcome_of, function, item)) for item in items[1:]]
    results = [(items[0], _outcome_of(function, items[0]))]
    results += [(item, future.result()) for item, future in futures]
    return results


def _transfers_in_parallel(function, pairs, lane):
    """:func:`in_parallel` for transfers: a pair's transport or master failure is its outcome;
    anything else (Redis down, a bug) is raised, once every transfer has ended."""
    results = in_parallel(function, pairs, lane)
    for _, error in results:
        if error is not None and not isinstance(error, (TransportError, MasterError, LeaseBusy)):
            raise error
    return results


def _outcome_of(function, item):
    try:
        function(item)
    except Exception as error:  # noqa: BLE001 - the caller sorts the outcomes out
        return error
    return None


def host_recovered(host):
    """A host that was failing answered again: make its failed and waiting rows due now.

    Their failures were the host's absence; no timer (``failed_retry_after``) should
    stand between its return and the transfers.
    """
    Replica.objects.filter(host=host, state__in=Replica.UNSCHEDULED).update(retry_at=timezone.now())


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


def announce(storage, arrivals, coordinator):
    """Tell the site that changes just arrived: signals, and fresh URLs. ``arrivals`` are
    one task's transfers, ``(host, name, action, fingerprint)``: the fingerprint the host
    now holds (a delete: the one it held).

    First ``replicated_to_host`` for each arrival; then, for each change now on every host
    (every row holds this fingerprint, for an upload; no host has a row left, for a
    delete), the path's read-your-writes mark is confirmed (:mod:`resto_celery.freshness`,
    storages with ``master_url``) and ``replicated_everywhere`` is sent: after the
    per-host signals of the same task. Each signal goes out once per change: a Redis ``SET
    NX`` per (host or "all", name, action, fingerprint) lets only the first sender through,
    whatever redelivery or duplicate follows. Costs nothing when nobody listens and
    ``master_url`` is off.
    """
    fresh = storage.options.master_url is not None
    if not (fresh or signals.replicated_to_host.has_listeners() or signals.replicated_everywhere.has_listeners()):
        return
    if signals.replicated_to_host.has_listeners():
        for host, name, action, version in arrivals:
            try:
                if coordinator.first_to_tell(host, name, action, version):
                    _send(signals.replicated_to_host, storage, host=host, name=name, action=action)
            except (RedisError, DatabaseError) as error:
                _not_told(action, name, host, error)
    if fresh or signals.replicated_everywhere.has_listeners():
        changes = dict.fromkeys((name, action, version) for _, name, action, version in arrivals)
        try:
            _announce_everywhere(storage, changes, coordinator, fresh)
        except (RedisError, DatabaseError) as error:
            _not_told("changes", ", ".join(name for name, _, _ in changes), "every host", error)


def _not_told(action, name, host, error):
    """The transfer stands; only the news is lost."""
    logger.error("Could not announce the %s of %s on %s: %s", action, name, host, error,
                 extra={"host": host, "path": name})


def _announce_everywhere(storage, changes, coordinator, fresh):
    """The changes of ``changes`` (``(name, action, fingerprint)``) now on every host: confirmed and told."""
    hosts = set(storage.hosts)
    rows = {}
    for host, path, state, fingerprint in Replica.objects.of_paths({name for name, _, _ in changes}).values_list(
        "host", "path", "state", "fingerprint",
    ):
        if host in hosts:
            rows.setdefault(path, []).append((state, fingerprint))
    for name, action, version in changes:
        held = rows.get(name, [])
        if action == "upload":
            everywhere = len(hosts) == sum(state == Replica.State.SYNCED and fingerprint == version
                                           for state, fingerprint in held)
        else:
            everywhere = not held
        if not everywhere:
            continue
        if fresh:
            Unconfirmed(coordinator.client, storage.location).confirm(name, version if action == "upload" else DELETED)
        if signals.replicated_everywhere.has_listeners() and coordinator.first_to_tell("", name, action, version):
            _send(signals.replicated_everywhere, storage, name=name, action=action)


def _send(signal, storage, **arguments):
    for _receiver, result in signal.send_robust(sender=storage, **arguments):
        if isinstance(result, Exception):
            logger.error("A receiver of %s failed for %s: %r", signal, arguments.get("name"), result)
