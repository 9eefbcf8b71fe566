"""HTTP to one media host: pooled sessions, streaming PUT (``sendfile()`` from a file), typed errors.

Knows nothing of Django models or Celery: a :class:`HostTransport` is built from a base
URL and a few connection settings, and speaks plain HTTP/1.1 ``PUT``, ``DELETE``,
``HEAD`` and ``GET``. A plain HTTP host served by nginx may also list its folders as JSON
(``autoindex_format json``): see :meth:`HostTransport.lists_folders`.

:class:`Transport` is what every kind of host offers replication, resync and the storages
(HTTP here, WebDAV, Tahoe-LAFS, any Django storage in :mod:`resto_celery.storage_host`).
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import io
import json
import logging
import mimetypes
import os
import queue
import selectors
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable, Collection, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO, TYPE_CHECKING, Any, Generic, TypeAlias, TypeVar, cast
from urllib.parse import quote, urlsplit

import requests
import requests.certs
import urllib3
from requests.adapters import HTTPAdapter

from .exceptions import HostTimeout, HostUnreachable, MissingFile, TLSFailure, TransportError, UnexpectedStatus

logger = logging.getLogger(__name__)

#: A transfer timeout: seconds for connecting and for every read, or a ``(connect, read)`` pair.
Timeout: TypeAlias = "float | tuple[float, float]"
#: A host's answer to a listing: directory names, and file names to :class:`RemoteFile`.
Listing: TypeAlias = "tuple[list[str], dict[str, RemoteFile]]"
_R = TypeVar("_R")

#: A PUT body is read and sent in blocks of this size (http.client's default is 8 KiB: a
#: 1 MB file would take 128 sends; memory stays bounded by one block per transfer).
SEND_BLOCK_SIZE = 256 * 1024

#: A PUT body up to this size is read whole and sent with the headers in one ``send()``
#: (a 10 KB PUT to nginx: 1.7 ms as a stream, against django-resto's 1.4 ms as bytes).
SMALL_BODY = 64 * 1024


def _read_exactly(fileobj: IO[bytes], length: int) -> bytes:
    """Up to ``length`` bytes of ``fileobj``. A file that shrank meanwhile gives fewer: the host
    then waits for the rest of ``Content-Length``, as for a stream, and the PUT times out."""
    parts, left = [], length
    while left > 0:
        part = fileobj.read(left)
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


PUT_OK = frozenset({200, 201, 204})
#: As in django-resto: 200 and 204 delete, 404 is already gone (logged: the host was out
#: of sync). Any other status, "202 Accepted" included (the deletion would only be queued,
#: not done), is a failure, as for a PUT.
DELETE_OK = frozenset({200, 204, 404})
CHUNK_SIZE = 64 * 1024
#: What nginx's autoindex calls the entries of a JSON listing that :meth:`HostTransport.list_directory` keeps.
NGINX_FILE, NGINX_DIRECTORY = "file", "directory"


@dataclass(frozen=True)
class RemoteFile:
    """What a ``HEAD`` (or a listing) tells about a file on a host.

    ``digests`` are hashes of the file's bytes that the host vouches for, as
    :meth:`Transport.digests` gives them: empty unless the host keeps such a thing (an
    object store's MD5 ETag or stored checksum; nginx's ETag is its mtime and size).
    """

    size: int | None
    modified: datetime | None
    etag: str | None
    digests: tuple[tuple[str, str], ...] = ()


def check_name(name: str) -> str:
    """Refuse a storage name that could leave the host's root (absolute, ``..``, NUL)."""
    if name.startswith("/") or ".." in name.split("/") or "\x00" in name:
        raise ValueError(f"Refusing unsafe file name {name!r}.")
    return name


class Transport:
    """What replication, resync and the storages ask of a media host, whatever its kind.

    :class:`HostTransport` speaks HTTP (and :mod:`resto_celery.webdav`,
    :mod:`resto_celery.tahoe` extend it); :class:`resto_celery.storage_host.StorageTransport`
    wraps a Django storage. Each implements :meth:`put`, :meth:`delete`, :meth:`head`,
    :meth:`download` and :meth:`list_directory`; the rest is built on those here.
    Failures raise :class:`~resto_celery.exceptions.TransportError` (retryable or final).
    """

    #: Whether :meth:`walk` can always list the files the host holds; for a plain HTTP
    #: host, :meth:`lists_folders` tells.
    can_list = False
    name: str | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    def exists(self, name: str) -> bool:
        """Return whether the host has ``name``."""
        return self.head(name) is not None

    def size(self, name: str) -> int:
        """Return the size of ``name`` in bytes; raises :class:`MissingFile` if absent."""
        remote = self._require(name)
        if remote.size is None:
            raise UnexpectedStatus(self.name, "HEAD", name, "no Content-Length in the answer", 200)
        return remote.size

    def modified_time(self, name: str) -> datetime:
        """Return the ``Last-Modified`` time of ``name`` as an aware UTC datetime."""
        remote = self._require(name)
        if remote.modified is None:
            raise UnexpectedStatus(self.name, "HEAD", name, "no Last-Modified in the answer", 200)
        return remote.modified

    def digests(self, name: str, remote: RemoteFile | None = None) -> dict[str, str]:
        """``{algorithm: hex digest}`` of ``name``'s bytes that the host keeps and tells without
        sending them (``remote``: what a listing or :meth:`head` already said, if anything).

        Empty for hosts that keep none (plain HTTP, WebDAV, Tahoe-LAFS): ``resto_resync
        --verify`` then downloads the file. Algorithms are ``md5``, ``sha1``, ``sha256``,
        ``crc32`` and ``md5-parts/<part size>`` (an object store's multipart ETag: the MD5
        of the parts' MD5s, ``hex-<part count>``).
        """
        return dict(remote.digests) if remote is not None else {}

    def lists_folders(self) -> tuple[bool, str | None]:
        """``(True, None)`` if :meth:`walk` works on this host, else ``(False, reason)``."""
        return (True, None) if self.can_list else (False, "this kind of host has no listing")

    def listing_hides(self, name: str) -> bool:
        """Whether a listing of this host (:meth:`walk`) leaves ``name`` out even when the host has it.

        nginx's autoindex never shows a file or folder whose name starts with a dot; WebDAV,
        Tahoe-LAFS and storage listings (``can_list``) show every name.
        """
        return not self.can_list and any(part.startswith(".") for part in name.split("/"))

    def listdir(self, path: str = "") -> tuple[list[str], list[str]]:
        """``(directories, file names)`` in ``path``, as Django's ``Storage.listdir``."""
        directories, files = self.list_directory(path)
        return directories, sorted(files)

    def walk(self) -> Iterator[tuple[str, RemoteFile]]:
        """Yield ``(name, RemoteFile)`` for every file on the host, depth first (see :meth:`lists_folders`)."""
        pending = [""]
        while pending:
            path = pending.pop()
            try:
                directories, files = self.list_directory(path)
            except MissingFile:
                continue  # removed while we walked
            for name, remote in sorted(files.items()):
                yield (f"{path}/{name}" if path else name), remote
            pending.extend(f"{path}/{d}" if path else d for d in reversed(directories))

    def directories_to_create(self, name: str) -> list[str]:
        """The parent directories of ``name`` that must be made, one at a time, before a PUT.

        Empty for hosts that make parents themselves or where concurrent creation is safe;
        see :class:`resto_celery.tahoe.TahoeTransport`.
        """
        return []

    def ensure_directory(self, path: str) -> None:
        """Make the directory ``path`` exist on the host (for :meth:`directories_to_create`)."""

    def close(self) -> None:
        """Close the pooled connections."""

    @property
    def pipelines(self) -> bool:
        """Whether :meth:`start_put` and :meth:`start_delete` return before the host has
        answered, so that one thread can keep requests to several hosts going at once
        (:func:`finish_together`). When false they do the whole request."""
        return False

    def start_put(self, name: str, fileobj: IO[bytes], length: int | None = None) -> PendingRequest[int]:
        """Begin a :meth:`put`; ``finish()`` of what it returns ends it (see :attr:`pipelines`)."""
        return _Done(self.put(name, fileobj, length))

    def start_delete(self, name: str) -> PendingRequest[bool]:
        """Begin a :meth:`delete`; ``finish()`` of what it returns ends it (see :attr:`pipelines`)."""
        return _Done(self.delete(name))

    if TYPE_CHECKING:  # What each kind of host implements (declared for type checkers only).

        def put(self, name: str, fileobj: IO[bytes], length: int | None = None) -> int:
            """Upload ``fileobj`` as ``name``; return the status code (200, 201 or 204)."""
            raise NotImplementedError

        def delete(self, name: str) -> bool:
            """Delete ``name``; return True if it was deleted, False if it was already gone."""
            raise NotImplementedError

        def head(self, name: str) -> RemoteFile | None:
            """A :class:`RemoteFile` for ``name``, or None if the host has no such file."""
            raise NotImplementedError

        def download(self, name: str, fileobj: IO[bytes]) -> int:
            """Write the bytes of ``name`` into ``fileobj``; return the byte count."""
            raise NotImplementedError

        def list_directory(self, path: str = "") -> Listing:
            """``(directories, files)`` directly in ``path``: names, and names to :class:`RemoteFile`."""
            raise NotImplementedError

        def public_link(self, name: str) -> str:
            """The URL of ``name`` for a browser (Tahoe-LAFS and storage hosts only)."""
            raise NotImplementedError

    def _require(self, name: str) -> RemoteFile:
        remote = self.head(name)
        if remote is None:
            raise MissingFile(self.name, "HEAD", name, "404 Not Found", 404)
        return remote


class HostTransport(Transport):
    """HTTP operations on one media host.

    ``base_url`` ends with ``/``; a storage name is appended to it, percent-encoded with
    ``/`` kept. ``timeout`` applies to connecting and to every read (seconds, or a
    ``(connect, read)`` pair). ``auth`` is a ``(user, password)`` pair for basic auth and
    ``headers`` are sent with every request (e.g. a bearer token); neither appears in
    error messages or logs, which name the host by ``name``. ``verify`` is passed to
    requests: True (system CAs), or the path of a CA bundle.

    Failures are raised, never logged here: callers log them in django-resto's words
    (``Failed to upload|delete|... <name> on <host>``). The one line this logs is
    django-resto's WARNING ``DELETE on missing file <name> on <host>.``

    One instance holds a keep-alive connection pool and may be shared between threads.
    Subclasses for other kinds of host (:mod:`resto_celery.webdav`,
    :mod:`resto_celery.tahoe`) always list their files (``can_list``). A plain HTTP host
    lists them only if its server answers a GET of a folder URL with nginx's JSON autoindex:
    :meth:`lists_folders` asks it once.
    """

    def __init__(
        self, base_url: str, *, name: str | None = None, timeout: Timeout = 2,
        auth: tuple[str, str] | list[str] | None = None, headers: Mapping[str, str] | None = None,
        verify: bool | str = True, pool_size: int = 16,
    ) -> None:
        if not base_url.endswith("/"):
            base_url += "/"
        self.base_url = base_url
        self.name = name or base_url
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = False  # no proxies or .netrc credentials picked up by accident
        self.session.auth = cast("tuple[str, str] | None", tuple(auth) if auth else None)
        self.session.headers.update(headers or {})
        self.session.verify = verify
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        # PUT and DELETE, a worker's every transfer, go over http.client connections kept
        # alive (_send): requests' machinery, then urllib3's, each took about half of the
        # client's CPU per small PUT.
        self._connections = _KeptConnections(base_url, timeout, verify, pool_size)
        # None: not asked yet (or no clear answer); else (bool, reason)
        self._lists_folders: tuple[bool, str | None] | None = None

    def url(self, name: str) -> str:
        """Return the URL of ``name`` on this host (no credentials in it)."""
        return self.base_url + quote(check_name(name), safe="/")

    def put(self, name: str, fileobj: IO[bytes], length: int | None = None) -> int:
        """Upload ``fileobj`` (opened in binary mode) as ``name``, streaming it.

        ``length`` defaults to the size of the file behind ``fileobj`` from its current
        position. The body is read in chunks as it is sent, never whole into memory.
        Returns the status code (200, 201 or 204); raises a ``TransportError`` otherwise.
        The ``Content-Type`` is guessed from the name (:func:`content_type`): hosts that keep
        the type they are given (WebDAV, Tahoe, object stores) then serve images as images.
        """
        if length is None:
            length = os.fstat(fileobj.fileno()).st_size - fileobj.tell()
        # A small file goes as bytes, in the same send() as the headers (http.client joins
        # them; a stream is sent after them). An empty one must be bytes anyway: a stream
        # would go chunked.
        return self._start_put(name, fileobj, length).finish()

    def delete(self, name: str) -> bool:
        """Delete ``name``. Returns True if it was deleted, False if it was already gone.

        A host that answers 404 did not have the file: that is logged at WARNING, in
        django-resto's words (``DELETE on missing file <name> on <host>.``). A status other
        than 200, 204 or 404 raises a ``TransportError``.
        """
        return self._start_delete(name).finish()

    @property
    def pipelines(self) -> bool:
        """True, unless a subclass changes :meth:`put` or :meth:`delete` (WebDAV, Tahoe-LAFS):
        :meth:`start_put` and :meth:`start_delete` would not do what those do."""
        kind = type(self)
        return kind.put is HostTransport.put and kind.delete is HostTransport.delete

    def start_put(self, name: str, fileobj: IO[bytes], length: int | None = None) -> PendingRequest[int]:
        """Begin a PUT of ``fileobj`` as ``name`` and return: the request is sent, with its
        body when that is small (up to :data:`SMALL_BODY`); the :class:`PendingRequest`'s
        ``finish()`` sends the rest and reads the answer, as :meth:`put` returns it.

        One thread can so send a file to every host, then read their answers, the hosts
        working meanwhile (:func:`finish_together`, as
        :func:`resto_celery.replication.push_everywhere` does). A failure to connect or send
        the request is raised here, a later one by ``finish()``.
        """
        if not self.pipelines:
            return super().start_put(name, fileobj, length)
        return self._start_put(name, fileobj, length)

    def start_delete(self, name: str) -> PendingRequest[bool]:
        """Send a DELETE of ``name`` and return; ``finish()`` answers as :meth:`delete`."""
        if not self.pipelines:
            return super().start_delete(name)
        return self._start_delete(name)

    def _start_put(self, name: str, fileobj: IO[bytes], length: int | None) -> PendingRequest[int]:
        if length is None:
            length = os.fstat(fileobj.fileno()).st_size - fileobj.tell()
        body: IO[bytes] | bytes = fileobj if length > SMALL_BODY else _read_exactly(fileobj, length)
        exchange = self._start("PUT", name, body, self._put_headers(name, length))
        return PendingRequest(exchange, lambda answer: self._put_answered(answer, name))

    def _start_delete(self, name: str) -> PendingRequest[bool]:
        return PendingRequest(self._start("DELETE", name), lambda answer: self._delete_answered(answer, name))

    def _put_headers(self, name: str, length: int) -> dict[str, str]:
        return {"Content-Length": str(length), "Content-Type": content_type(name)}

    def _put_answered(self, answer: _Answer, name: str) -> int:
        return self._expect(answer, "PUT", name, PUT_OK)

    def _delete_answered(self, answer: _Answer, name: str) -> bool:
        self._expect(answer, "DELETE", name, DELETE_OK)
        if answer.status_code == 404:
            logger.warning("DELETE on missing file %s on %s.", name, self.name)
            return False
        return True

    def head(self, name: str) -> RemoteFile | None:
        """Return a :class:`RemoteFile` for ``name``, or None if the host has no such file."""
        response = self._request("HEAD", name)
        if response.status_code == 404:
            return None
        self._expect(response, "HEAD", name, {200})
        length = response.headers.get("Content-Length")
        modified = response.headers.get("Last-Modified")
        return RemoteFile(
            size=int(length) if length is not None else None,
            modified=email.utils.parsedate_to_datetime(modified).astimezone(timezone.utc) if modified else None,
            etag=response.headers.get("ETag"),
        )

    def download(self, name: str, fileobj: IO[bytes]) -> int:
        """Write the bytes of ``name`` into ``fileobj`` in chunks; return the byte count."""
        response = self._request("GET", name, stream=True)
        with response:
            self._expect(response, "GET", name, {200})
            written = 0
            try:
                for chunk in response.iter_content(CHUNK_SIZE):
                    fileobj.write(chunk)
                    written += len(chunk)
            except requests.RequestException as exc:
                raise self._translate(exc, "GET", name) from None  # see _request
        return written

    def list_directory(self, path: str = "") -> Listing:
        """``(directories, files)`` directly in ``path``: names, and names to :class:`RemoteFile`.

        Hosts that can list (``can_list``) implement it; a missing directory raises
        :class:`~resto_celery.exceptions.MissingFile`. A plain HTTP host answers with a GET
        of the folder's URL (``path/``), which must be nginx's JSON autoindex (see
        :meth:`lists_folders`): any other answer raises
        :class:`~resto_celery.exceptions.UnexpectedStatus`. Names come unescaped, as on disk;
        nginx leaves out the ones that start with a dot (:meth:`listing_hides`).
        """
        target = path + "/" if path else ""
        response = self._request("GET", target, headers={"Accept": "application/json"})
        self._expect(response, "GET", target or "/", {200})
        entries = _nginx_entries(response)
        if entries is None:
            kind = response.headers.get("Content-Type", "no Content-Type").split(";")[0]
            raise UnexpectedStatus(
                self.name, "GET", target or "/",
                f"the folder's answer is not a JSON listing ({kind}): enable nginx's "
                f"'autoindex on; autoindex_format json;' for folder URLs", 200,
            )
        directories: list[str] = []
        files: dict[str, RemoteFile] = {}
        for entry in entries:
            name = entry["name"]
            if not name or name in (".", "..") or "/" in name:
                continue
            if entry["type"] == NGINX_DIRECTORY:
                directories.append(name)
            elif entry["type"] == NGINX_FILE:
                size, modified = entry.get("size"), entry.get("mtime")
                files[name] = RemoteFile(
                    size=size if isinstance(size, int) and not isinstance(size, bool) else None,
                    modified=_http_date(modified),
                    etag=None,
                )
        return sorted(directories), files

    def lists_folders(self) -> tuple[bool, str | None]:
        """``(True, None)`` if :meth:`walk` works on this host, else ``(False, reason)``.

        Always true for hosts that list (``can_list``). A plain HTTP host is asked once, with
        a GET of its root folder: a JSON listing in nginx's autoindex format (``autoindex on;
        autoindex_format json;``) says yes, and the answer is remembered, as is any other
        answer from the host (403 when listings are off, HTML, an index page). A host that
        does not answer, a 5xx or a missing root folder (404, which nginx gives with or
        without listings) say no this time and are asked again next time.
        """
        if self.can_list:
            return True, None
        known = self._lists_folders
        if known is not None:
            return known
        answer: tuple[bool, str | None]
        try:
            self.list_directory("")
        except TransportError as error:
            answer = (False, f"GET of its root folder: {error.reason}")
            if error.status is None or error.retryable or error.status == 404:
                return answer  # no clear answer from the host: ask again next time
        else:
            answer = (True, None)
            logger.info("Media host %s lists its folders as JSON (nginx autoindex).", self.name)
        self._lists_folders = answer
        return answer

    def close(self) -> None:
        """Close the pooled connections."""
        self.session.close()
        self._connections.clear()

    def needs_connection(self) -> bool:
        """Whether the next request would open a new connection (no kept-alive one is idle)."""
        return self.pipelines and not self._connections.has_idle()

    def connect_ahead(self) -> None:
        """Open a connection and keep it for the next request (see :func:`as_connected`);
        raises what connecting raised (``OSError``, ``ssl.SSLError``)."""
        self._connections.connect_one()

    def failed_to_connect(self, exc: BaseException, method: str, name: str) -> TransportError:
        """The :class:`~resto_celery.exceptions.TransportError` a ``method`` of ``name``
        raises when connecting to this host fails with ``exc``."""
        return self._translate_sent(exc, method, name, connected=False)

    def _start(
        self, method: str, name: str, body: IO[bytes] | bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> _Exchange:
        """Send ``method`` on ``name`` over a kept-alive connection, with the session's
        headers, basic auth and TLS settings (no redirect); the :class:`_Exchange`'s
        ``finish()`` reads the answer. A body that is a stream is sent by
        :func:`finish_together`.

        A connection the host closed while it was idle is found before it is used; one it
        closed as the request went out fails with nothing answered, and a bytes (or empty)
        body is then sent once more on a new connection: PUT and DELETE may be repeated.
        """
        sent: dict[str, Any] = {**self.session.headers, "Accept-Encoding": "identity", **(headers or {})}
        if self.session.auth:
            sent.update(urllib3.util.make_headers(basic_auth=":".join(cast("tuple[str, str]", self.session.auth))))
        exchange = _Exchange(self, method, name, self._connections.target(self.url(name)), body, sent)
        exchange.send()
        return exchange


    def _translate_sent(self, exc: BaseException, method: str, name: str, connected: bool) -> TransportError:
        """The :class:`~resto_celery.exceptions.TransportError` for a failure of :meth:`_send`;
        ``connected``: whether the connection was up, so the request may have been sent."""
        if isinstance(exc, ssl.SSLError):
            return self._tls_failure(exc, method, name)
        if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError
            return self._timed_out(method, name, connecting=not connected)
        reason = _root_cause(exc) or type(exc).__name__
        return HostUnreachable(self.name, method, name, f"connection failed: {reason}", in_doubt=connected)

    def _tls_failure(self, exc: BaseException, method: str, name: str) -> TLSFailure:
        return TLSFailure(self.name, method, name, f"TLS error: {_root_cause(exc)}")

    def _timed_out(self, method: str, name: str, connecting: bool) -> HostTimeout:
        """A timeout connecting (nothing was sent) or waiting for the answer (it may have been applied)."""
        if connecting:
            return HostTimeout(
                self.name, method, name, f"timed out connecting (timeout {self.timeout}s)", in_doubt=False,
            )
        return HostTimeout(
            self.name, method, name, f"timed out waiting for an answer (timeout {self.timeout}s)", in_doubt=True,
        )

    def _request(self, method: str, name: str, **kwargs: Any) -> requests.Response:
        try:
            return self.session.request(method, self.url(name), timeout=self.timeout, allow_redirects=False, **kwargs)
        except requests.RequestException as exc:
            # Not "from exc": requests' errors quote the whole URL, which for a Tahoe-LAFS host
            # holds the write cap, and tracebacks end up in result backends and error trackers.
            # The translated error keeps the root cause in its reason.
            raise self._translate(exc, method, name) from None

    def _expect(
        self, response: requests.Response | _Answer, method: str, name: str, accepted: Collection[int],
    ) -> int:
        status = response.status_code
        if status in accepted:
            return status
        reason = f"{status} {response.reason or ''}".strip()
        error = MissingFile if status == 404 else UnexpectedStatus
        raise error(self.name, method, name, reason, status)

    def _translate(self, exc: BaseException, method: str, name: str) -> TransportError:
        """The :class:`~resto_celery.exceptions.TransportError` for a requests or urllib3 error."""
        refused = _caused_by(exc, urllib3.exceptions.NewConnectionError)  # nothing was sent
        if isinstance(exc, (requests.exceptions.SSLError, urllib3.exceptions.SSLError)):
            return self._tls_failure(exc, method, name)
        if isinstance(exc, requests.ConnectTimeout) or (
            isinstance(exc, urllib3.exceptions.ConnectTimeoutError) and not refused
        ):
            return self._timed_out(method, name, connecting=True)
        if isinstance(exc, requests.Timeout) or (isinstance(exc, urllib3.exceptions.TimeoutError) and not refused):
            return self._timed_out(method, name, connecting=False)
        in_doubt = not refused
        if isinstance(exc, (requests.ConnectionError, urllib3.exceptions.HTTPError, OSError)):
            return HostUnreachable(self.name, method, name, f"connection failed: {_root_cause(exc)}", in_doubt=in_doubt)
        return HostUnreachable(self.name, method, name, f"{type(exc).__name__}: {exc}", in_doubt=in_doubt)

class _Exchange:
    """One request of :meth:`HostTransport._start`: :meth:`send` puts it on a connection
    (with its body when that is bytes; a stream's blocks go by :meth:`send_block`, see
    :func:`finish_together`), :meth:`finish` reads the answer and gives the connection back."""

    def __init__(
        self, transport: HostTransport, method: str, name: str, target: str, body: IO[bytes] | bytes | None,
        headers: Mapping[str, str],
    ) -> None:
        self.transport, self.method, self.name, self.target = transport, method, name, target
        self.headers = headers
        in_memory = body is None or isinstance(body, bytes)
        self.body = body if in_memory else None
        self.stream = None if in_memory else cast("IO[bytes]", body)
        self.length = int(headers.get("Content-Length", 0)) if self.stream is not None else 0
        self.stream_start = None if self.stream is None else _position(self.stream)
        self.repeatable = in_memory or self.stream_start is not None
        self.file_descriptor = None  # a regular file that sendfile() can send from where the stream began
        if self.stream is not None and self.stream_start is not None:
            self.file_descriptor = _regular_file_descriptor(self.stream)
        self.left = self.length
        self.upto = self.length  # how much of the stream may go now (see PendingRequest.hold)
        self.block = memoryview(b"")
        self.failure: BaseException | None = None  # what stopped the stream (the answer may still come)
        self.unreadable: Exception | None = None  # what reading the body raised: the request's outcome
        self.connection: http.client.HTTPConnection | None = None
        self.reused = False
        self.answer_by = 0.0  # when the host has had a whole read timeout since it got the last of the body

    def send(self) -> None:
        connections = self.transport._connections
        while True:
            connection, self.reused = connections.take()
            self.connection, connected = connection, self.reused
            try:
                if not self.reused:
                    connections.open(connection)
                    connected = True
                try:
                    connection.request(self.method, self.target, body=self.body, headers=dict(self.headers))
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the host may have answered before taking the whole body (413), then closed
                self.answer_by = time.monotonic() + connections.read_timeout
                return
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                if self._send_again(exc):
                    continue
                raise self.transport._translate_sent(exc, self.method, self.name, connected) from None  # see _request

    @property
    def sending(self) -> bool:
        """Whether some of the stream is still to send (and nothing stopped it)."""
        return self.left > 0 and self.failure is None

    @property
    def sendable(self) -> int:
        """How many bytes of the stream may go now (none once something stopped it)."""
        return 0 if self.failure is not None else max(0, self.left - (self.length - self.upto))

    def _offset(self) -> int:
        """Where in the file the next byte of the stream is."""
        return cast("int", self.stream_start) + self.length - self.left

    def send_block(self) -> None:
        """Send what the socket takes now of the stream's current block (read the next one
        first if it is all sent); the socket is non-blocking. A failure stops the stream.

        A regular file to a plain (not TLS) socket goes by ``sendfile()``: the kernel copies
        the page cache to the socket, and no block passes through Python.
        """
        if not self.block and self.sendable <= 0:
            return  # held back (PendingRequest.hold): nothing may go yet
        sock = cast("http.client.HTTPConnection", self.connection).sock
        if self.file_descriptor is not None and not self.block and not isinstance(sock, ssl.SSLSocket):
            if self._send_from_file(sock):
                return
            # Not something sendfile() can do: read and send the rest instead, from where it
            # stopped (sendfile() moves no stream's position).
            self.file_descriptor = None
            cast("IO[bytes]", self.stream).seek(self._offset())
        if not self.block:
            try:
                self.block = memoryview(self.stream.read(min(SEND_BLOCK_SIZE, self.sendable)))  # type: ignore[union-attr]
            except Exception as exc:  # noqa: BLE001 - the file's fault, not the host's: finish() raises it
                self.unreadable, self.left = exc, 0
                return
            if not self.block:  # the file ended early: the host waits for the rest, then gives up
                self.failure = TimeoutError("the file ended before its Content-Length")
                return
        try:
            sent = sock.send(self.block)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return
        except (BrokenPipeError, ConnectionResetError):
            self.left = 0  # the host may have answered before taking the whole body (413), then closed
            return
        except OSError as exc:
            self.failure = exc
            return
        self.block = self.block[sent:]
        self.left -= sent
        self.answer_by = time.monotonic() + self.transport._connections.read_timeout

    def _send_from_file(self, sock: socket.socket) -> bool:
        """Send what the socket takes now of the rest of the file with ``sendfile()``; False
        if that failed for something other than the host (then nothing was sent, and reading
        the file tells the file's error, sending it the host's)."""
        try:
            sent = os.sendfile(sock.fileno(), cast("int", self.file_descriptor), self._offset(), self.sendable)
        except BlockingIOError:
            return True
        except (BrokenPipeError, ConnectionResetError):
            self.left = 0  # as for send(): the host may have answered (413), then closed
            return True
        except OSError:
            return False
        if sent == 0:  # the file ended before its Content-Length: the host waits, then gives up
            self.failure = TimeoutError("the file ended before its Content-Length")
            return True
        self.left -= sent
        self.answer_by = time.monotonic() + self.transport._connections.read_timeout
        if self.left == 0:
            cast("IO[bytes]", self.stream).seek(self._offset())  # at its end, as if read
        return True

    def finish(self) -> _Answer:
        """Read the answer, waiting at most until :attr:`answer_by` (each host has its own
        read timeout from its last block, however long the answers read before took)."""
        connection = cast("http.client.HTTPConnection", self.connection)
        if self.unreadable is not None:
            connection.close()  # the host has part of the body: it drops it
            raise self.unreadable
        if self.failure is not None:
            connection.close()
            raise self.transport._translate_sent(self.failure, self.method, self.name, True) from None
        read_timeout = self.transport._connections.read_timeout
        try:
            if connection.sock is not None:
                connection.sock.settimeout(max(0.001, min(read_timeout, self.answer_by - time.monotonic())))
            response = connection.getresponse()
            if connection.sock is not None:
                connection.sock.settimeout(read_timeout)
            content = response.read()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            if self._send_again(exc):
                self._send_whole()
                return self.finish()
            raise self.transport._translate_sent(exc, self.method, self.name, True) from None  # see _request
        self.transport._connections.give_back(connection, keep=not response.will_close)
        return _Answer(response.status, response.reason, content)

    def _send_again(self, exc: BaseException) -> bool:
        """Whether to send again on a new connection: the host closed a kept one as the
        request went out (nothing was answered), and the body can be sent twice (bytes, or
        a stream that can go back to where it began)."""
        return self.reused and self.repeatable and isinstance(exc, _DROPPED)

    def _send_whole(self) -> None:
        """Send the request again, from the start of its body."""
        if self.stream is not None:
            self.stream.seek(cast("int", self.stream_start))
            self.left, self.block, self.failure, self.upto = self.length, memoryview(b""), None, self.length
        self.send()
        if self.sending:
            _send_streams([self])


class PendingRequest(Generic[_R]):
    """A request to a host whose answer is not read yet, and perhaps not all of its body
    sent (:meth:`HostTransport.start_put`, :meth:`HostTransport.start_delete`)."""

    def __init__(self, exchange: _Exchange | None, answered: Callable[[_Answer], _R]) -> None:
        self.exchange, self.answered = exchange, answered
        self.answered_at: float | None = None  # set by finish_together()

    def _answer(self) -> _R:
        return self.answered(cast("_Exchange", self.exchange).finish())

    def hold(self, upto: int) -> None:
        """Send no more than the first ``upto`` bytes of the body (a stream) until told
        otherwise, or until it is finished: :func:`send_available` sends what may go,
        :func:`finish_together` sends it all. A file still being written is so sent as it
        is written, and the host cannot take it before its last byte is let go."""
        if self.exchange is not None and self.exchange.stream is not None:
            self.exchange.upto = max(0, min(upto, self.exchange.length))

    def finish(self) -> _R:
        """Send the rest of the body, then read the answer: what :meth:`HostTransport.put`
        or ``delete`` would return, or the
        :class:`~resto_celery.exceptions.TransportError` they would raise."""
        (outcome,) = finish_together([self])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


class _Done(PendingRequest[_R]):
    """A request that a host which does not pipeline has done whole already."""

    def __init__(self, result: _R) -> None:
        super().__init__(None, lambda _answer: result)
        self.result = result

    def _answer(self) -> _R:
        return self.result


def as_connected(transports: Mapping[str, Transport]) -> Iterator[tuple[str, BaseException | None]]:
    """Yield ``(host, None)`` for each host of ``transports`` (``{host: transport}``) as it
    can take a request, ``(host, what connecting raised)`` for one that cannot be reached
    (:meth:`HostTransport.failed_to_connect` makes it the error a request raises).

    Hosts with a kept-alive connection idle come first. When two or more have none, they
    are connected to at once, a thread each, and come as their connections open: a host
    that does not answer then costs one connect timeout for the lot, and the requests to
    the others go out meanwhile (connected one after another in the requesting thread,
    each such host cost a timeout before the next host's request). With one such host, the
    request connects itself.
    """
    cold = [host for host, transport in transports.items()
            if isinstance(transport, HostTransport) and transport.needs_connection()]
    if len(cold) < 2:
        cold = []
    for host in transports:
        if host not in cold:
            yield host, None
    if not cold:
        return
    connected: queue.SimpleQueue[tuple[str, BaseException | None]] = queue.SimpleQueue()

    def connect(host: str) -> None:
        failure = None
        try:
            cast("HostTransport", transports[host]).connect_ahead()
        except Exception as exc:  # noqa: BLE001 - the caller turns it into the request's error
            failure = exc
        finally:
            connected.put((host, failure))  # whatever happened: the caller waits for each host

    for host in cold:
        threading.Thread(target=connect, args=(host,), name="resto-connect", daemon=True).start()
    for _ in cold:
        yield connected.get()


def finish_together(requests: Sequence[PendingRequest[Any]]) -> list[Any]:
    """Finish every request of ``requests`` from this thread: the rest of each body goes a
    block at a time to whichever host's socket takes one, then each answer is read as it
    comes. Returns, in order, what each ``finish()`` returns, or the
    :class:`~resto_celery.exceptions.TransportError` it raises; each request's
    :attr:`~PendingRequest.answered_at` (``time.perf_counter()``) says when it ended.

    A host that takes nothing for its transport's read timeout fails with a timeout (in
    doubt: it has part of the body); the others go on. What reading a body raised (the
    file's own error) is that request's outcome, as is. Anything else raised (a bug, a
    time limit) closes the connections of the requests not finished, then goes up.
    """
    outcomes: dict[int, Any] = {}
    try:
        for request in requests:
            if request.exchange is not None:
                request.exchange.upto = request.exchange.length
        streaming = [request.exchange for request in requests
                     if request.exchange is not None and request.exchange.sending]
        if streaming:
            _send_streams(streaming)
        with contextlib.closing(_in_answer_order(requests)) as ready:
            for index in ready:
                _read_answer(requests[index], index, outcomes)
    except BaseException:
        abandon([request for index, request in enumerate(requests) if index not in outcomes])
        raise
    return [outcomes[index] for index in range(len(requests))]


def send_available(requests: Sequence[PendingRequest[Any]]) -> None:
    """Send, without waiting, what each host's socket takes now of the part of its body
    that may go (:meth:`PendingRequest.hold`); a host that takes nothing is left for later."""
    for request in requests:
        exchange = request.exchange
        if exchange is None or exchange.connection is None or exchange.connection.sock is None:
            continue
        sock = exchange.connection.sock
        sock.setblocking(False)
        try:
            while exchange.sendable > 0 and exchange.unreadable is None:
                before = exchange.left
                exchange.send_block()
                if exchange.left == before:
                    break  # the socket took nothing: its buffer is full
        finally:
            if sock.fileno() >= 0:
                sock.settimeout(exchange.transport._connections.read_timeout)


def abandon(requests: Sequence[PendingRequest[Any]]) -> None:
    """Close the connections of ``requests`` without reading their answers: a host drops a
    body it did not get whole, so a PUT whose last bytes were held back changes nothing."""
    for request in requests:
        if request.exchange is not None and request.exchange.connection is not None:
            request.exchange.connection.close()


def _read_answer(request: PendingRequest[Any], index: int, outcomes: dict[int, Any]) -> None:
    try:
        outcomes[index] = request._answer()
    except TransportError as error:
        outcomes[index] = error
    except Exception as error:
        if request.exchange is None or error is not request.exchange.unreadable:
            raise
        outcomes[index] = error
    request.answered_at = time.perf_counter()


def _in_answer_order(requests: Sequence[PendingRequest[Any]]) -> Generator[int, None, None]:
    """The indexes of ``requests``, each once its answer can be read: first those that wait
    for nothing (done, failed), then each host's as its answer arrives or its time is up."""
    waiting: dict[int, _Exchange] = {}
    for index, request in enumerate(requests):
        exchange = request.exchange
        sock = None if exchange is None or exchange.connection is None else exchange.connection.sock
        if sock is None or exchange is None or exchange.failure is not None or exchange.unreadable is not None:
            yield index
        elif isinstance(sock, ssl.SSLSocket) and sock.pending():
            yield index  # TLS has part of the answer already
        else:
            waiting[index] = exchange
    if not waiting:
        return
    selector = selectors.DefaultSelector()
    try:
        for index, exchange in waiting.items():
            selector.register(cast("http.client.HTTPConnection", exchange.connection).sock, selectors.EVENT_READ, index)
        while waiting:
            soonest = min(exchange.answer_by for exchange in waiting.values())
            ready = [key.data for key, _ in selector.select(max(0.0, soonest - time.monotonic()))]
            now = time.monotonic()
            ready += [index for index, exchange in waiting.items() if exchange.answer_by <= now and index not in ready]
            for index in ready:
                selector.unregister(cast("http.client.HTTPConnection", waiting.pop(index).connection).sock)
                yield index  # an answer past its time fails with a timeout in finish()
    finally:
        selector.close()


def _send_streams(exchanges: list[_Exchange]) -> None:
    selector = selectors.DefaultSelector()
    sockets = [cast("http.client.HTTPConnection", exchange.connection).sock for exchange in exchanges]
    try:
        now = time.monotonic()
        deadlines = {}
        for exchange, sock in zip(exchanges, sockets, strict=True):
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_WRITE, exchange)
            deadlines[exchange] = now + exchange.transport._connections.read_timeout
        while deadlines:
            ready = selector.select(max(0.0, min(deadlines.values()) - time.monotonic()))
            now = time.monotonic()
            for key, _ in ready:
                exchange = key.data
                left = exchange.left
                exchange.send_block()
                if not exchange.sending:
                    selector.unregister(key.fileobj)
                    del deadlines[exchange]
                elif exchange.left < left:
                    deadlines[exchange] = now + exchange.transport._connections.read_timeout
            for exchange, deadline in list(deadlines.items()):
                if deadline <= now:  # the host took nothing for a whole read timeout
                    exchange.failure = TimeoutError("the host stopped taking the body")
                    selector.unregister(cast("http.client.HTTPConnection", exchange.connection).sock)
                    del deadlines[exchange]
    finally:
        selector.close()
        for exchange, sock in zip(exchanges, sockets, strict=True):
            if sock.fileno() >= 0:
                sock.settimeout(exchange.transport._connections.read_timeout)


def _regular_file_descriptor(stream: IO[bytes]) -> int | None:
    """The descriptor ``sendfile()`` can send ``stream``'s bytes from, else None: that of a
    regular file opened for reading whose bytes are those the stream reads, from the offset
    its ``tell()`` gives (a plain file; a stream that says so with a true ``sendfile_from_fileno``).
    A compressed file's, a spooled one's or one with writes still buffered are not."""
    if not hasattr(os, "sendfile"):
        return None
    if not (isinstance(stream, (io.FileIO, io.BufferedReader)) or getattr(stream, "sendfile_from_fileno", False)):
        return None
    try:
        descriptor = stream.fileno()
        return descriptor if stat.S_ISREG(os.fstat(descriptor).st_mode) else None
    except (AttributeError, OSError, ValueError):
        return None


def _position(stream: IO[bytes]) -> int | None:
    """Where ``stream`` is, if it can go back there (None if not)."""
    try:
        return stream.tell() if stream.seekable() else None
    except (AttributeError, OSError, ValueError):
        return None


#: How a kept-alive connection that the host closed while the request went out fails.
_DROPPED = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class _KeptConnections:
    """Idle ``http.client`` connections to one host, kept alive between requests, at most
    ``size`` of them; the one used last is taken first. Safe to share between threads: a
    connection is used by one request at a time."""

    def __init__(self, base_url: str, timeout: Timeout, verify: bool | str, size: int) -> None:
        parts = urlsplit(base_url)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.connect_timeout, self.read_timeout = timeout if isinstance(timeout, tuple) else (timeout, timeout)
        self.size = size
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        host, port = parts.hostname or "", parts.port
        self._new: Callable[[], http.client.HTTPConnection]
        if parts.scheme == "https":
            context = _tls_context(verify)
            self._new = lambda: http.client.HTTPSConnection(
                host, port, timeout=self.connect_timeout, context=context, blocksize=SEND_BLOCK_SIZE,
            )
        else:
            self._new = lambda: http.client.HTTPConnection(
                host, port, timeout=self.connect_timeout, blocksize=SEND_BLOCK_SIZE,
            )

    def target(self, url: str) -> str:
        """The request target (path and query) of ``url``, a URL on this host."""
        if not url.startswith(self.origin + "/"):
            raise ValueError(f"{url!r} is not on {self.origin}")
        return url[len(self.origin):]

    def take(self) -> tuple[http.client.HTTPConnection, bool]:
        """``(connection, reused)``: an idle connection the host has not closed, else a new
        one, not connected yet."""
        while True:
            with self._lock:
                connection = self._idle.pop() if self._idle else None
            if connection is None:
                return self._new(), False
            if not _closed_by_peer(connection.sock):
                return connection, True
            connection.close()

    def has_idle(self) -> bool:
        """Whether a kept-alive connection waits for the next request (the host may have closed it)."""
        return bool(self._idle)

    def open(self, connection: http.client.HTTPConnection) -> None:
        """Connect ``connection`` (within the connect timeout); its reads then wait up to the read timeout."""
        connection.connect()
        cast("socket.socket", connection.sock).settimeout(self.read_timeout)

    def connect_one(self) -> None:
        """Connect a new connection and keep it idle for the next request."""
        connection = self._new()
        try:
            self.open(connection)
        except BaseException:
            connection.close()
            raise
        self.give_back(connection, keep=True)

    def give_back(self, connection: http.client.HTTPConnection, keep: bool) -> None:
        """Keep ``connection`` for the next request, unless ``keep`` is false or enough are idle."""
        if keep and connection.sock is not None:
            with self._lock:
                if len(self._idle) < self.size:
                    self._idle.append(connection)
                    return
        connection.close()

    def clear(self) -> None:
        """Close every idle connection."""
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


def _closed_by_peer(sock: socket.socket | None) -> bool:
    """Whether an idle connection's socket was closed by the host (or has data it should not)."""
    return sock is None or urllib3.util.wait.wait_for_read(sock, timeout=0.0)


def _tls_context(verify: bool | str) -> ssl.SSLContext:
    """An ``ssl`` context for requests' ``verify``: True (requests' CA bundle), the path of a
    CA bundle or folder, or False (no verification)."""
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if verify is True:
        # certifi's where(), as requests uses it (types-requests does not declare it).
        return ssl.create_default_context(cafile=requests.certs.where())  # type: ignore[attr-defined]
    if os.path.isdir(verify):
        return ssl.create_default_context(capath=verify)
    return ssl.create_default_context(cafile=verify)


class _Answer:
    """What :meth:`HostTransport._send` answers: the parts of a response PUT and DELETE
    look at, named as requests names them."""

    __slots__ = ("content", "reason", "status_code")

    def __init__(self, status_code: int, reason: str | None, content: bytes) -> None:
        self.status_code, self.reason, self.content = status_code, reason, content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


#: What a compressed file is, when its name says so (``a.tar.gz``): as Django's FileResponse.
_COMPRESSED_TYPES = {
    "bzip2": "application/x-bzip", "gzip": "application/gzip", "xz": "application/x-xz",
    "br": "application/x-brotli", "compress": "application/x-compress",
}


class RedactingFilter(logging.Filter):
    """A logging filter that rewrites each record's message through ``redact(text)``: secrets
    a host kind keeps in URLs or headers (Tahoe write caps, S3 access keys) never reach a log,
    whatever library logs them (urllib3's request lines, botocore's signed headers)."""

    def __init__(self, redact: Callable[[str], str]) -> None:
        super().__init__()
        self.redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = self.redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def content_type(name: str) -> str:
    """The ``Content-Type`` of a file named ``name``, guessed from its extension with
    :mod:`mimetypes`; ``application/octet-stream`` when the extension says nothing."""
    # A "folder/" prefix: guess_type() takes a name such as "data:x.png" for a URL scheme.
    guessed, encoding = mimetypes.guess_type("folder/" + name.rsplit("/", 1)[-1], strict=False)
    if encoding:
        return _COMPRESSED_TYPES.get(encoding, "application/octet-stream")
    return guessed or "application/octet-stream"


def _nginx_entries(response: requests.Response) -> list[dict[str, Any]] | None:
    """The entries of nginx's JSON autoindex in ``response``, or None if it is not one.

    nginx writes names as they are on disk, escaping only what JSON must: bytes that are not
    UTF-8 are kept as surrogates, as ``os.listdir`` keeps them.
    """
    if response.headers.get("Content-Type", "").split(";")[0].strip().lower() != "application/json":
        return None
    try:
        entries = json.loads(response.content.decode("utf-8", "surrogateescape"))
    except ValueError:
        return None
    if not isinstance(entries, list) or not all(
        isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("type"), str)
        for entry in entries
    ):
        return None
    return entries


def _http_date(text: object) -> datetime | None:
    """An HTTP date (``Sun, 06 Nov 1994 08:49:37 GMT``) as an aware UTC datetime; None if absent or unreadable."""
    if not isinstance(text, str):
        return None
    try:
        return email.utils.parsedate_to_datetime(text).astimezone(timezone.utc)
    except (TypeError, ValueError):
        return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """Every exception wrapped in ``exc``: causes, ``reason`` attributes and arguments.

    Not ``__context__``, which may hold unrelated exceptions handled along the way.
    """
    pending: list[object] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending.extend([current.__cause__, getattr(current, "reason", None), *current.args])


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    return any(isinstance(inner, kind) for inner in _chain(exc))


def _root_cause(exc: BaseException) -> str:
    """The most specific message in an exception chain (urllib3 wraps errors deeply)."""
    best = exc
    for current in _chain(exc):
        if isinstance(current, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {current.verify_message or current.reason}"
        if isinstance(current, OSError) and current.strerror:
            best = current
    if isinstance(best, OSError) and best.strerror:
        return best.strerror
    return str(best)
