"""Bring a media host in line with the master copy (``resto_resync``), or the reverse (restore).

Plain functions over the storage's transports: no Celery unless asked to go via the queue.
"""
import hashlib
import os
import queue
import threading
import zlib
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from django.core.exceptions import SuspiciousFileOperation
from django.db import connections

from . import marker, registry, replication
from .broker import coordinator_for
from .exceptions import MasterError, MissingFile, TransportError
from .master import is_temporary
from .models import Replica
from .names import clean_name
from .reconcile import BRAKE_FLOOR

CHUNK = 1024 * 1024


class HostDown(Exception):
    """The host does not answer at all: nothing can be compared or copied."""


@dataclass
class Plan:
    """What a host needs: files to upload (missing or different), and what could be seen."""

    host: str
    upload: list = field(default_factory=list)  # (name, size, reason)
    unchanged: int = 0
    errors: list = field(default_factory=list)  # (name, error)
    can_list: bool = False  # whether the host was listed; if not, a HEAD per file and extra files stay unseen
    extra: list = field(default_factory=list)  # (name, size): on the host, not in the master
    listed: int = 0  # files the host listed (hosts that can list)
    unlisted: str | None = None  # why a plain HTTP host was not listed (its answer to a listing)
    # --verify: files whose contents were compared by what the host keeps (no download), and
    # files downloaded to compare them, with the bytes that cost.
    by_digest: int = 0
    downloaded: int = 0
    downloaded_bytes: int = 0

    @property
    def upload_bytes(self):
        return sum(size for _, size, _ in self.upload)


@dataclass
class Outcome:
    """What applying a plan did."""

    host: str
    uploaded: int = 0
    uploaded_bytes: int = 0
    queued: int = 0
    deleted: int = 0
    held: int = 0  # extra files not deleted: more than the deletion brake allows
    failures: list = field(default_factory=list)  # (name, error)


def delete_limit(plan, share):
    """How many extra files one pass may delete on ``plan.host`` (see the deletion brake)."""
    return max(BRAKE_FLOOR, int(share * plan.listed))


def _parallel(function, items, workers):
    """Yield ``function(item)`` for every item, as ``workers`` threads finish them.

    ``function`` returns its expected errors; anything else it raises is raised here, in
    the caller's thread, once the threads stop (never a hang waiting for a dead thread).
    Each thread closes its own database connections when it is done: Django opens one per
    thread, and nothing else would close it.
    """
    todo = queue.SimpleQueue()
    for item in items:
        todo.put(item)
    total = todo.qsize()
    done = queue.SimpleQueue()
    crashed = threading.Event()

    def work():
        try:
            while not crashed.is_set():
                try:
                    item = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    done.put((True, function(item)))
                except BaseException as error:  # noqa: BLE001 - handed to the caller
                    crashed.set()
                    done.put((False, error))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=work, daemon=True, name="resto-resync") for _ in range(min(workers, total))]
    for thread in threads:
        thread.start()
    try:
        for _ in range(total):
            ok, value = done.get()
            if not ok:
                raise value
            yield value
    finally:
        crashed.set()
        for thread in threads:
            thread.join()


def _sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _Hasher:
    """A sink for :meth:`~resto_celery.transport.Transport.download` that keeps only a SHA-256."""

    def __init__(self):
        self.digest = hashlib.sha256()

    def write(self, chunk):
        self.digest.update(chunk)


class _PartsMD5:
    """The MD5 of the MD5s of consecutive parts of ``part_size`` bytes, ``hex-<parts>``: an
    S3 multipart ETag, computed from the master file."""

    def __init__(self, part_size):
        self.part_size, self.filled, self.current, self.parts = part_size, 0, hashlib.md5(usedforsecurity=False), []

    def update(self, chunk):
        view = memoryview(chunk)
        while view:
            take = min(len(view), self.part_size - self.filled)
            self.current.update(view[:take])
            self.filled += take
            view = view[take:]
            if self.filled == self.part_size:
                self.parts.append(self.current.digest())
                self.current, self.filled = hashlib.md5(usedforsecurity=False), 0

    def hexdigest(self):
        parts = self.parts + ([self.current.digest()] if self.filled or not self.parts else [])
        return f"{hashlib.md5(b''.join(parts), usedforsecurity=False).hexdigest()}-{len(parts)}"


class _CRC32:
    def __init__(self):
        self.value = 0

    def update(self, chunk):
        self.value = zlib.crc32(chunk, self.value)

    def hexdigest(self):
        return self.value.to_bytes(4, "big").hex()


def _local_hasher(algorithm):
    """A hasher for ``algorithm`` as :meth:`~resto_celery.transport.Transport.digests` names
    them, or None for one this does not know."""
    if algorithm in ("md5", "sha1", "sha256"):
        return hashlib.new(algorithm, usedforsecurity=False)  # comparing contents, not securing them
    if algorithm == "crc32":
        return _CRC32()
    kind, _, part_size = algorithm.partition("/")
    if kind == "md5-parts" and part_size.isdigit() and int(part_size) > 0:
        return _PartsMD5(int(part_size))
    return None


def _matches(path, digests):
    """Whether the master file at ``path`` has ``digests`` (``{algorithm: hex}``), read once:
    True, False, or None when no algorithm is one this knows."""
    hashers = {algorithm: _local_hasher(algorithm) for algorithm in digests}
    hashers = {algorithm: hasher for algorithm, hasher in hashers.items() if hasher is not None}
    if not hashers:
        return None
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            for hasher in hashers.values():
                hasher.update(chunk)
    return all(hasher.hexdigest() == digests[algorithm].lower() for algorithm, hasher in hashers.items())


def same_content(transport, name, remote, path):
    """``(same, downloaded bytes)``: whether the host's ``name`` has the bytes of the master
    file at ``path``.

    Where the host vouches for a hash of its bytes (:meth:`~resto_celery.transport.Transport.digests`:
    an object store's MD5 ETag or stored checksum, from its listing or a ``HEAD``), that
    hash of the master file decides and nothing is downloaded. A listing's ETag that does
    not match is checked once more with a ``HEAD`` (which tells whether encryption makes the
    ETag something else than an MD5). Otherwise the file is downloaded and SHA-256s compared.
    """
    digests = transport.digests(name, remote)
    verdict = _matches(path, digests) if digests else None
    if verdict is False and remote is not None and not remote.digests:
        digests = transport.digests(name)
        verdict = _matches(path, digests) if digests else None
    if verdict is not None:
        return verdict, 0
    sink = _Hasher()
    downloaded = transport.download(name, sink)
    return sink.digest.hexdigest() == _sha256_file(path), downloaded


def make_plan(storage, host, *, verify=False, workers=8, progress=None):
    """Compare every master file with ``host``: its size, and with ``verify`` its contents
    (:func:`same_content`: by the hash the host keeps where it keeps one, else a download and
    a SHA-256 of both; ``plan.by_digest``, ``plan.downloaded`` and ``plan.downloaded_bytes``
    say which it took).

    A host that lists its files is listed once (its folders by ``workers`` threads) instead
    of asked with a HEAD per file, and the files it holds that the master has not go to
    ``plan.extra``: WebDAV and Tahoe-LAFS hosts always, a plain HTTP host when it serves
    nginx's JSON autoindex (:meth:`~resto_celery.transport.HostTransport.lists_folders`).
    Otherwise, and for the names a listing leaves out (nginx hides dot files), it is a HEAD
    per file; ``plan.unlisted`` says why a plain HTTP host was not listed.
    ``progress(name, size)`` is called after each file is checked. Raises :class:`HostDown`
    when the host does not answer at all, and
    :class:`~resto_celery.exceptions.MasterUnavailable` when the master folder is not the
    site's (no marker, or another master's): an empty folder must not be taken for a master.
    """
    marker.verify(storage.location, create=True)
    transport = storage.transport(host)
    master = [(name, int(fp.split(":", 1)[0])) for name, fp in replication.walk_master(storage.location)]
    if master:
        _probe(transport, master[0][0])
    listable, unlisted = transport.lists_folders()
    plan = Plan(host, can_list=listable, unlisted=unlisted)
    listing = None
    if listable:
        try:
            listing = _walk(transport, workers)
        except TransportError as error:
            if error.retryable:
                raise HostDown(f"{transport.name} does not answer: {error.reason}") from error
            if transport.can_list:
                raise
            # A plain HTTP host that listed its root but not a folder (listings switched off
            # meanwhile, an index page served instead): compare file by file after all.
            plan.can_list, plan.unlisted, listing = False, f"its listing failed: {error.reason}", None
    if listing is not None:
        plan.listed = len(listing)
        in_master = {name for name, _ in master}
        plan.extra = sorted(
            (name, remote.size or 0) for name, remote in listing.items() if name not in in_master and _plain(name)
        )

    def check(item):
        name, size = item
        try:
            if listing is None or transport.listing_hides(name):
                remote = transport.head(name)
            else:
                remote = listing.get(name)
            if remote is None:
                return name, size, "missing", None, None
            if remote.size != size:
                return name, size, f"size {remote.size} on the host, {size} in the master", None, None
            if verify:
                same, downloaded = same_content(transport, name, remote, storage.path(name))
                return name, size, None if same else "different content", None, downloaded
            return name, size, None, None, None
        except (TransportError, OSError) as error:
            return name, size, None, error, None

    for name, size, reason, error, downloaded in _parallel(check, master, workers):
        if downloaded == 0:
            plan.by_digest += 1
        elif downloaded is not None:
            plan.downloaded += 1
            plan.downloaded_bytes += downloaded
        if error is not None:
            plan.errors.append((name, error))
        elif reason is not None:
            plan.upload.append((name, size, reason))
        else:
            plan.unchanged += 1
        if progress:
            progress(name, size)
    return plan


def apply_plan(storage, plan, *, workers=8, via_queue=False, delete_extra=False, allow_mass_delete=False,
               max_delete_share=0.1, progress=None):
    """Upload what ``plan`` lists: in this process (streamed, in parallel), or as Celery tasks.

    With an ``AsyncStorage`` the copies take the same leases as the workers and record their
    ``Replica`` rows; going via the queue first forgets the rows' fingerprints, so the
    workers do not skip files the host turned out to lack. With ``delete_extra`` the files
    only the host holds (``plan.extra``) are deleted the same way, after a last check that
    the master still has no such file. More extra files than :func:`delete_limit` allows
    are deleted only with ``allow_mass_delete`` (else none is, and ``outcome.held`` says
    how many were held back). Raises :class:`~resto_celery.exceptions.MasterUnavailable`
    when the master is not the site's.
    """
    marker.verify(storage.location)
    outcome = Outcome(plan.host)
    extra = [(name, 0, "extra") for name, _ in plan.extra] if delete_extra else []
    if len(extra) > delete_limit(plan, max_delete_share) and not allow_mass_delete:
        outcome.held, extra = len(extra), []
    if via_queue:
        names = [name for name, _, _ in plan.upload]
        for start in range(0, len(names), 1000):
            Replica.objects.filter(host=plan.host, path__in=names[start : start + 1000]).update(fingerprint="")
        for name, size, reason in plan.upload + extra:
            storage.enqueue("delete" if reason == "extra" else "upload", plan.host, name)
            outcome.queued += 1
            if progress:
                progress(name, size)
        return outcome

    copy = _copier(storage, plan.host)

    def apply(item):
        name, size, _ = item
        try:
            return name, size, copy(name), None
        except (TransportError, MasterError, OSError, replication.LeaseBusy) as error:
            return name, size, None, error

    for name, size, action, error in _parallel(apply, plan.upload + extra, workers):
        if error is not None:
            outcome.failures.append((name, error))
        elif action == "delete":
            outcome.deleted += 1
        elif action is not None:
            outcome.uploaded += 1
            outcome.uploaded_bytes += size
        if progress:
            progress(name, size)
    return outcome


def _walk(transport, workers):
    """``{name: RemoteFile}`` for every file ``transport`` lists, its folders listed by ``workers`` threads.

    A folder that is gone when its turn comes (404) holds nothing; any other error is raised
    once the folders being listed are done. A host whose flat listing is cheaper
    (``lists_flat``: an S3 bucket) is listed in one go.
    """
    if getattr(transport, "lists_flat", False):
        return dict(transport.walk())

    def list_folder(path):
        try:
            return path, transport.list_directory(path)
        except MissingFile:
            return path, ([], {})

    files = {}
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="resto-list") as pool:
        pending = {pool.submit(list_folder, "")}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    path, (directories, found) = future.result()
                    prefix = f"{path}/" if path else ""
                    files.update((prefix + name, remote) for name, remote in found.items())
                    pending.update(pool.submit(list_folder, prefix + directory) for directory in directories)
        finally:
            for future in pending:
                future.cancel()
    return files


def _plain(name):
    """Whether a name listed by a host is one the master could hold (no traversal, no temp file, no marker)."""
    try:
        return clean_name(name) == name and not is_temporary(name.rpartition("/")[2]) and not marker.is_marker(name)
    except SuspiciousFileOperation:
        return False


def _copier(storage, host):
    transport = storage.transport(host)
    location = storage.location
    if isinstance(storage, registry.CeleryReplicated):
        coordinator = coordinator_for(storage.options)
        return lambda name: replication.sync(
            host, name, storage.path(name), transport, coordinator, location=location, force=True
        )

    return lambda name: replication.push(storage.path(name), transport, name, location)


def _probe(transport, name):
    try:
        transport.head(name)
    except TransportError as error:
        if error.retryable:
            raise HostDown(f"{transport.name} does not answer: {error.reason}") from error
        raise


def restore(storage, host, names, *, force=False, workers=8, progress=None):
    """Copy ``names`` from ``host`` into the master copy (disaster recovery).

    A master file newer than the host's copy is kept unless ``force``. Each file is written
    atomically (temporary file, then rename). Returns ``(restored, skipped, failures)``.
    The master folder must carry the site's marker (a restore into the wrong folder is
    refused with :class:`~resto_celery.exceptions.MasterUnavailable`; to rebuild a master
    that lost its marker too, ``manage.py resto_master --adopt`` it first; a site that never
    had one gets its marker here).
    """
    marker.verify(storage.location, create=True)
    transport = storage.transport(host)
    names = list(names)
    if names:
        _probe(transport, names[0])

    def fetch(name):
        try:
            remote = transport.head(name)
            if remote is None:
                return name, "missing on the host", None
            target = storage.path(name)
            if os.path.exists(target) and not force and remote.modified is not None:
                if os.stat(target).st_mtime >= remote.modified.timestamp():
                    return name, "the master copy is newer (use --force to overwrite it)", None
            with storage.replacing(name) as sink:
                transport.download(name, sink)
            return name, None, None
        except (TransportError, OSError) as error:
            return name, None, error

    restored, skipped, failures = [], [], []
    for name, reason, error in _parallel(fetch, names, workers):
        if error is not None:
            failures.append((name, error))
        elif reason is not None:
            skipped.append((name, reason))
        else:
            restored.append(name)
        if progress:
            progress(name)
    return restored, skipped, failures
