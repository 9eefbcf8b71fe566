"""The storage backends: ``HybridStorage``, ``DistributedStorage`` (and ``AsyncStorage``).

Methods with a docstring are the stable API: subclasses may call or override them.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import urlsplit

from celery import current_app
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, SuspiciousFileOperation
from django.core.files import File
from django.core.files.storage import Storage
from django.utils.deconstruct import deconstructible
from django.utils.encoding import filepath_to_uri
from django.utils.functional import Promise, cached_property
from redis.exceptions import RedisError

from . import conf, hosts, marker, publisher, registry, replication
from .broker import coordinator_for
from .exceptions import ReplicationError
from .freshness import DELETED, Unconfirmed
from .master import MasterStorage, in_memory, write_in_steps
from .names import clean_name, relative_name
from .transport import SMALL_BODY

if TYPE_CHECKING:
    from .conf import Options
    from .transport import Transport

_T = TypeVar("_T")

logger = logging.getLogger(__name__)

DOWNLOAD_SPOOL_SIZE = 1024 * 1024


class ReplicatedStorageMixin:
    """What every backend shares: options, per-host transports, parallel execution."""

    options: Options

    def _configure(self, options: dict[str, Any], media_url: str | None) -> None:
        # Only the Celery backend takes leases, so only it needs lease_ttl > timeout.
        self.options = conf.resolve(options, media_url=media_url, leases=isinstance(self, registry.CeleryReplicated))

    @property
    def hosts(self) -> list[str]:
        """The names of the configured media hosts, in order."""
        return [host.name for host in self.options.hosts]

    def transport(self, host: str) -> Transport:
        """Return the :class:`~resto_celery.transport.HostTransport` for the host named ``host``."""
        return hosts.transport_for(self.options.host(host), self.options.timeout)

    def execute(self, operation: str, name: str, **kwargs: Any) -> None:
        """Run ``execute_one(operation, host, name, **kwargs)`` on every host, in parallel.

        Every failure is logged at ERROR as ``Failed to <operation> <name> on <host>: ...``
        (with a traceback when ``show_traceback`` is on). When ``fatal_exceptions`` is on,
        a :class:`~resto_celery.exceptions.ReplicationError` is raised afterwards, once
        every host was tried.
        """
        self._report(operation, name, self._execute_everywhere(operation, name, **kwargs))

    def _report(self, operation: str, name: str, outcomes: list[tuple[str, BaseException | None]]) -> None:
        """Log each failure of ``outcomes`` (``[(host, error or None)]``) as :meth:`execute`
        says, then raise if ``fatal_exceptions`` is on and a host failed."""
        failures: dict[str, BaseException] = {}
        for host, error in outcomes:
            if error is not None:
                failures[host] = error
                reason = getattr(error, "reason", None) or f"{type(error).__name__}: {error}"
                logger.error(
                    "Failed to %s %s on %s: %s", operation, name, host, reason,
                    exc_info=error if self.options.show_traceback else None,
                )
        if failures and self.options.fatal_exceptions:
            raise ReplicationError(operation, name, failures, len(outcomes))

    def _execute_everywhere(self, operation: str, name: str, **kwargs: Any) -> list[tuple[str, BaseException | None]]:
        """``[(host, error or None)]`` of :meth:`execute_one` on every host, in parallel."""
        return replication.in_parallel(lambda host: self.execute_one(operation, host, name, **kwargs), self.hosts)

    def execute_one(self, operation: str, host: str, name: str, **kwargs: Any) -> None:  # pragma: no cover - abstract
        """Apply ``operation`` (``"upload"`` or ``"delete"``) for ``name`` on one host."""
        raise NotImplementedError


#: The arguments of Django's ``FileSystemStorage``, which ``HybridStorage`` takes too.
FILE_SYSTEM_OPTIONS = ("location", "base_url", "file_permissions_mode", "directory_permissions_mode", "allow_overwrite")


def _check_options(options: Iterable[str], own: Iterable[str]) -> None:
    unknown = sorted(set(options) - set(conf.SETTINGS))
    if unknown:
        raise ImproperlyConfigured(
            f"Unknown option(s) {', '.join(map(repr, unknown))} for a resto_celery storage; "
            f"known options are {', '.join(sorted(set(conf.SETTINGS) | set(own)))}."
        )


def _checked_base_url(url: _T) -> _T:
    """``url``, unless it has a query or a fragment (names are appended to it), as django-resto."""
    if url is not None and (urlsplit(str(url)).query or urlsplit(str(url)).fragment):
        raise ValueError(f"base_url may not contain a query or fragment: {url!r}.")
    return url


def _media_url_now(storage: HybridStorage | DistributedStorage, base_url: str | Promise | None) -> str | None:
    """The storage's base URL for its ``host[:port]`` entries, read now unless it is lazy.

    A lazy ``base_url`` (``reverse_lazy()``) is read on first use, as Django does; such
    entries then take their scheme and path from ``MEDIA_URL``.
    """
    return None if isinstance(base_url, Promise) else storage.base_url


@deconstructible(path="resto_celery.storage.HybridStorage")
class HybridStorage(ReplicatedStorageMixin, MasterStorage):
    """Master copy in ``MEDIA_ROOT``, then the same change on every host, within the request.

    A file saved from memory goes to HTTP hosts as the master writes it, each host
    getting its last byte once the master's file is in place (see :meth:`_save_and_push`).

    Options: those of ``FileSystemStorage``, in its order (``location``, ``base_url``,
    ``file_permissions_mode``, ``directory_permissions_mode``, ``allow_overwrite``), and
    the resto options (``hosts``, ``timeout``, ``fatal_exceptions``, ``show_traceback``,
    ``ca_bundle``), each defaulting to its ``RESTO_*`` setting. A file written through
    ``open(name, "wb")`` (or any writing mode) is replicated when it is closed.
    """

    def __init__(
        self, location: str | os.PathLike[str] | None = None, base_url: str | None = None,
        file_permissions_mode: int | None = None, directory_permissions_mode: int | None = None,
        allow_overwrite: bool = False, **options: Any,
    ) -> None:
        _check_options(options, FILE_SYSTEM_OPTIONS)
        super().__init__(location, base_url, file_permissions_mode, directory_permissions_mode, allow_overwrite)
        self._configure(options, media_url=_media_url_now(self, base_url))

    @cached_property
    def base_url(self) -> str:
        return _checked_base_url(super().base_url)

    def _save(self, name: str, content: File) -> str:
        whole = in_memory(content) if self._pushes_while_writing() else None
        if whole is not None and len(whole) > SMALL_BODY:
            transports = {host: self.transport(host) for host in self.hosts}
            if all(transport.pipelines for transport in transports.values()):
                return self._save_and_push(name, whole, transports)
        name = super()._save(name, content)
        self.execute("upload", name)
        return name

    def _pushes_while_writing(self) -> bool:
        """Whether a file may go to the hosts as the master writes it (when every host speaks
        HTTP, plain or TLS: not WebDAV, Tahoe-LAFS or a storage host): there are hosts, and
        no subclass changed how a change is executed or how the master is written."""
        kind = type(self)
        return (
            bool(self.hosts) and kind.execute is ReplicatedStorageMixin.execute
            and kind._write is MasterStorage._write
            and kind._execute_everywhere is HybridStorage._execute_everywhere
            and self._pushes_everywhere_at_once()
        )

    def _pushes_everywhere_at_once(self) -> bool:
        """Whether no subclass changed what one host gets (``execute_one``, ``replicate``):
        a change then goes to every host from this thread (``replication.push_everywhere``)."""
        kind = type(self)
        return kind.execute_one is HybridStorage.execute_one and kind.replicate is HybridStorage.replicate

    def _save_and_push(self, name: str, whole: memoryview, transports: dict[str, Transport]) -> str:
        """Write ``whole`` as the master's ``name`` and send it to every host meanwhile
        (:func:`~resto_celery.replication.push_as_written`): each host gets the file's last
        byte once the master holds the file. Returns the name saved, as ``_save()``."""
        full_path, fd, temp_path = self._temporary_beside(name)
        wanted = self._name_of(full_path)
        try:
            saved, outcomes = replication.push_as_written(
                fd, len(whole), transports, clean_name(wanted),
                write_in_steps(fd, whole), lambda: clean_name(self._into_place(wanted, full_path, temp_path)),
                self.location,
            )
        finally:
            os.close(fd)
            if os.path.lexists(temp_path):
                os.unlink(temp_path)
        if outcomes is None:  # the name was taken meanwhile: the file took another
            self.execute("upload", saved)
        else:
            self._report("upload", saved, outcomes)
        return saved

    def written(self, name: str) -> None:
        """Replicate ``name`` after a file opened for writing was closed, as after a save."""
        self.execute("upload", name)

    def delete(self, name: str) -> None:
        if not name:
            raise ValueError("The name must be given to delete().")
        name = clean_name(relative_name(name, self.location))
        super().delete(name)
        self.execute("delete", name)

    def execute_one(self, operation: str, host: str, name: str) -> None:  # type: ignore[override]
        """Make ``host`` hold the master's current state of ``name`` (see :meth:`replicate`)."""
        self.replicate(host, name)

    def replicate(self, host: str, name: str) -> str:
        """Push the master's current state of ``name`` to ``host``: PUT it, or DELETE it if absent.

        This is the per-host operation; it needs nothing but ``(host, name)``, so a task
        queue can call it later on any machine that sees the master copy.
        """
        return replication.push(self.path(name), self.transport(host), clean_name(name))

    def _execute_everywhere(self, operation: str, name: str, **kwargs: Any) -> list[tuple[str, BaseException | None]]:
        # Every host at once from this thread (replication.push_everywhere), unless a subclass
        # changed what one host gets: then its execute_one, host by host.
        if not self._pushes_everywhere_at_once():
            return super()._execute_everywhere(operation, name, **kwargs)
        transports = {host: self.transport(host) for host in self.hosts}
        return replication.push_everywhere(self.path(name), transports, clean_name(name))


@deconstructible(path="resto_celery.storage.AsyncStorage")
class AsyncStorage(registry.CeleryReplicated, HybridStorage):
    """Master copy in ``MEDIA_ROOT``, then one Celery task per host, run by workers.

    ``save()`` and ``delete()`` change the master, then hand the change to the process's
    publisher thread (:mod:`resto_celery.publisher`; ``publish="inline"`` sends it before
    returning), which sends one ``resto_celery.replicate`` message with ``(path, hosts,
    "upload"|"delete")`` to the queue named by the ``queue`` option (one per queue when hosts
    have queues of their own; a burst of changes shares a ``resto_celery.replicate_batch``);
    retries and repairs are ``resto_celery.upload``/``delete`` tasks for one ``(host, path)``.
    They never raise for replication: a broker that cannot take the message is logged at
    ERROR and ``reconcile`` repairs the path later. ``fatal_exceptions`` does not apply.

    Options: those of :class:`HybridStorage`, plus ``redis_url``, ``queue``,
    ``max_retries``, ``retry_backoff``, ``retry_backoff_max``, ``lease_ttl``,
    ``breaker_threshold``, ``breaker_cooldown``, ``failed_retry_after`` and ``publish``.
    """

    def execute(self, operation: str, name: str) -> None:  # type: ignore[override]
        """Send ``operation`` of ``name`` to the workers; log, never raise, on broker errors.

        One message per change (per queue, when hosts have queues of their own), which a
        worker fans out to the hosts (``resto_celery.replicate``): the request pays one
        publish whatever the number of hosts.
        """
        hosts = self.hosts
        if not hosts:
            return
        marker.ensure(self.location)  # workers replicate only from a folder that proves it is the master
        if self.options.master_url is not None:
            self._mark_unconfirmed(operation, name)
        groups: dict[str, list[str]] = {}
        for host in hosts:
            groups.setdefault(self.options.queue_for(host), []).append(host)
        app = current_app._get_current_object()  # the publisher thread's current_app is Celery's default
        background = self.options.publish == "background"
        for queue, group in groups.items():
            def failed(error: BaseException, group: list[str] = group) -> None:
                for host in group:
                    self._log_enqueue_failure(operation, host, name, error)

            if background:
                publisher.submit(app, queue, (name, group, operation), failed)
            else:
                publisher.send_now(app, queue, [(name, group, operation)], failed)

    def _log_enqueue_failure(self, operation: str, host: str, name: str, error: BaseException) -> None:
        logger.error(
            "Failed to enqueue %s of %s for %s: %s; reconcile will repair it.",
            operation, name, host, error,
            exc_info=error if self.options.show_traceback else None,
        )

    def execute_one(self, operation: str, host: str, name: str, producer: Any = None) -> None:  # type: ignore[override]
        """Send the task for ``operation`` on ``host`` alone (reconcile, operators' actions)."""
        self.enqueue(operation, host, name, producer=producer)

    def url(self, name: str | None) -> str:
        """The hosts' URL of ``name`` (``base_url``); with the ``master_url`` option, the master
        copy's URL while the newest change of ``name`` is not on every host yet.

        Decided from state every app process shares, read in bulk at most once a second per
        process (:mod:`resto_celery.freshness`); no request to Redis or a host per call.
        """
        master_url = self.options.master_url
        if master_url is not None and name:
            try:
                key = clean_name(relative_name(name, self.location))
            except (SuspiciousFileOperation, ValueError):
                key = None
            if key is not None and self._unconfirmed.pending(key):
                return str(master_url) + filepath_to_uri(key)
        return super().url(name)

    @cached_property
    def _unconfirmed(self) -> Unconfirmed:
        return Unconfirmed(coordinator_for(self.options).client, self.location)

    def _mark_unconfirmed(self, operation: str, name: str) -> None:
        try:
            version = replication.fingerprint(os.stat(self.path(name))) if operation == "upload" else DELETED
        except FileNotFoundError:
            version = DELETED
        try:
            self._unconfirmed.mark(name, version)
        except RedisError as error:  # url() may then point at a host that lags: say so
            logger.error("Could not mark %s as on its way to the media hosts: %s", name, error)

    def enqueue(self, operation: str, host: str, name: str, producer: Any = None, bulk: bool = True) -> Any:
        """Publish ``resto_celery.<operation>`` with ``(host, name)`` to the host's queue, in
        the bulk lane (reconcile, resync, the operators' actions: see :mod:`resto_celery.lanes`)
        unless ``bulk`` is False."""
        return publisher.send(
            current_app, f"resto_celery.{operation}", (host, name),
            self.options.queue_for(host, bulk=bulk), producer, bulk=bulk,
        )


@deconstructible(path="resto_celery.storage.DistributedStorage")
class DistributedStorage(ReplicatedStorageMixin, Storage):
    """Files on the media hosts only, no master copy.

    Reads (``open``, ``exists``, ``size``, ``get_modified_time``, ``listdir``) ask the hosts
    in order and use the first that has the file (:meth:`_first_answer`: one policy for
    every read). Hosts may be of any kind, an S3 bucket (kind ``"storage"``) included.
    Beware the race conditions: two uploads of the same name at the same time may leave
    one version on some hosts and the other elsewhere, and ``exists()`` costs a request
    to a host. Keep ``fatal_exceptions`` on, or a failed
    upload can lose a file silently.

    A host that fails a read is logged at ERROR in django-resto's words (``Failed to
    download|check if|get the size of <name> ... <host>``); an upload that replaces a
    file is logged at WARNING (``PUT on existing file <name> on <host>.``).

    Options: ``base_url`` (for ``url()``, default ``MEDIA_URL``) and the resto options.
    """

    def __init__(self, base_url: str | None = None, **options: Any) -> None:
        self._base_url = base_url
        self._configure(options, media_url=_media_url_now(self, base_url))
        if not self.options.hosts:
            raise ImproperlyConfigured("DistributedStorage needs at least one media host (RESTO_MEDIA_HOSTS).")

    @cached_property
    def base_url(self) -> str:
        url = self._base_url if self._base_url is not None else settings.MEDIA_URL
        return _checked_base_url(url if url.endswith("/") else url + "/")

    def _save(self, name: str, content: File) -> str:
        name = clean_name(name)
        with _staged(content) as source:
            self.execute("upload", name, source=source)
        return name

    def delete(self, name: str) -> None:
        if not name:
            raise ValueError("The name must be given to delete().")
        self.execute("delete", clean_name(name))

    def execute_one(self, operation: str, host: str, name: str, source: str | None = None) -> None:  # type: ignore[override]
        """Upload the staged file ``source`` as ``name`` on ``host``, or delete ``name`` there."""
        transport = self.transport(host)
        if operation == "delete":
            transport.delete(name)
            return
        with open(cast(str, source), "rb") as stream:  # an upload always has its staged file
            status = transport.put(name, stream)
        if status != 201:  # 200 or 204: the host had a file of that name
            logger.warning("PUT on existing file %s on %s.", name, host)

    def _open(self, name: str, mode: str = "rb") -> File:
        if any(flag in mode for flag in "wax+"):
            raise ValueError("DistributedStorage opens files for reading only; use save() to write.")
        name = clean_name(name)
        spool = tempfile.SpooledTemporaryFile(max_size=DOWNLOAD_SPOOL_SIZE)

        def download(transport: Transport) -> None:
            spool.seek(0)
            spool.truncate()  # a host that failed half-way must leave nothing behind
            transport.download(name, spool)

        try:
            self._first_answer(download, name, "read", "Failed to download %s from %s: %s")
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return File(spool, name)

    def exists(self, name: str) -> bool:
        name = clean_name(name)

        def has(transport: Transport) -> bool:
            if not transport.exists(name):
                raise FileNotFoundError(name)
            return True

        try:
            return self._first_answer(has, name, "check", "Failed to check if %s exists on %s: %s")
        except FileNotFoundError:
            return False

    def size(self, name: str) -> int:
        name = clean_name(name)
        return self._first_answer(
            lambda transport: transport.size(name), name, "read", "Failed to get the size of %s from %s: %s"
        )

    def get_modified_time(self, name: str) -> datetime:
        name = clean_name(name)
        return self._first_answer(
            lambda transport: transport.modified_time(name), name, "read",
            "Failed to get the modified time of %s from %s: %s",
        )

    def url(self, name: str | None) -> str:
        """``base_url`` + name. With no ``base_url`` option and a first host that hands out its
        own links, that host's link: a Tahoe-LAFS gateway's, through the directory's read-only
        cap (never the write cap); a storage host's ``public_url`` (the bucket's public address
        or a CDN's) + name, or else its storage's own ``url()`` (S3: a signed URL)."""
        name = clean_name(name)
        first = self.options.hosts[0]
        if self._base_url is None and first.kind in ("tahoe", "storage"):
            return self.transport(first.name).public_link(name)
        return self.base_url + filepath_to_uri(name)

    def listdir(self, path: str) -> tuple[list[str], list[str]]:
        """List ``path`` on the first host that can list (WebDAV, Tahoe-LAFS, storages) and has it."""
        path = clean_name(path).strip("/") if path else ""
        listing = [host for host in self.hosts if self.transport(host).can_list]
        if not listing:
            raise NotImplementedError(
                "DistributedStorage cannot list directories: plain HTTP PUT/DELETE hosts have no listing "
                "(WebDAV, Tahoe-LAFS and storage hosts do)."
            )
        try:
            return self._first_answer(
                lambda transport: transport.listdir(path), path, "list", "Failed to list %s on %s: %s", hosts=listing,
            )
        except FileNotFoundError:
            return [], []

    def _first_answer(
        self, read: Callable[[Transport], _T], name: str, operation: str, failure_message: str,
        hosts: Sequence[str] | None = None,
    ) -> _T:
        """Return ``read(transport)`` from the first of ``hosts`` (default: all) that has ``name``.

        The one policy of every read: a host without it (``read`` raises
        ``FileNotFoundError``) is no failure, and the next host is asked; so it is after any
        other error, which is logged at ERROR as ``failure_message % (name, host, reason)``.
        When no host has it, ``FileNotFoundError`` if a host said so, else (every host
        failed) :class:`~resto_celery.exceptions.ReplicationError` for ``operation``.
        """
        hosts = self.hosts if hosts is None else hosts
        failures: dict[str, BaseException] = {}
        answered = False
        for host in hosts:
            try:
                return read(self.transport(host))
            except FileNotFoundError:
                answered = True
            except Exception as error:  # noqa: BLE001 - try the next host
                failures[host] = error
                self._log_read_failure(failure_message, name, host, error)
        if answered:
            raise FileNotFoundError(f"{name} is on none of the media hosts.")
        raise ReplicationError(operation, name, failures, len(hosts))

    def _log_read_failure(self, message: str, name: str, host: str, error: BaseException) -> None:
        reason = getattr(error, "reason", None) or f"{type(error).__name__}: {error}"
        logger.error(message, name, host, reason, exc_info=error if self.options.show_traceback else None)


@contextmanager
def _staged(content: File) -> Iterator[str]:
    """Yield the path of a local file holding ``content``, so each host thread reads its own handle."""
    if hasattr(content, "temporary_file_path"):
        yield content.temporary_file_path()
        return
    with tempfile.NamedTemporaryFile(prefix="resto-upload-") as staging:
        for chunk in content.chunks():
            staging.write(chunk if isinstance(chunk, bytes) else chunk.encode())
        staging.flush()
        yield staging.name
