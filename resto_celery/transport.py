"""HTTP to one media host: pooled sessions, streaming PUT, typed errors.

Knows nothing of Django models or Celery: a :class:`HostTransport` is built from a base
URL and a few connection settings, and speaks plain HTTP/1.1 ``PUT``, ``DELETE``,
``HEAD`` and ``GET``.
"""
import email.utils
import logging
import os
import ssl
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import quote

import requests
import urllib3
from requests.adapters import HTTPAdapter

from .exceptions import HostTimeout, HostUnreachable, MissingFile, TLSFailure, UnexpectedStatus

logger = logging.getLogger(__name__)

PUT_OK = frozenset({200, 201, 204})
#: As in django-resto: 200 and 204 delete, 404 is already gone (logged: the host was out
#: of sync). Any other status, "202 Accepted" included (the deletion would only be queued,
#: not done), is a failure, as for a PUT.
DELETE_OK = frozenset({200, 204, 404})
CHUNK_SIZE = 64 * 1024


@dataclass(frozen=True)
class RemoteFile:
    """What a ``HEAD`` tells about a file on a host."""

    size: int | None
    modified: datetime | None
    etag: str | None


class HostTransport:
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
    Plain HTTP cannot list a host's files (``can_list`` is False); subclasses for other
    kinds of host (:mod:`resto_celery.webdav`, :mod:`resto_celery.tahoe`) can.
    """

    #: Whether :meth:`walk` can list the files the host holds.
    can_list = False

    def __init__(self, base_url, *, name=None, timeout=2, auth=None, headers=None, verify=True, pool_size=16):
        if not base_url.endswith("/"):
            base_url += "/"
        self.base_url = base_url
        self.name = name or base_url
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = False  # no proxies or .netrc credentials picked up by accident
        self.session.auth = tuple(auth) if auth else None
        self.session.headers.update(headers or {})
        self.session.verify = verify
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}>"

    def url(self, name):
        """Return the URL of ``name`` on this host (no credentials in it)."""
        if name.startswith("/") or ".." in name.split("/") or "\x00" in name:
            raise ValueError(f"Refusing unsafe file name {name!r}.")
        return self.base_url + quote(name, safe="/")

    def put(self, name, fileobj, length=None):
        """Upload ``fileobj`` (opened in binary mode) as ``name``, streaming it.

        ``length`` defaults to the size of the file behind ``fileobj`` from its current
        position. The body is read in chunks as it is sent, never whole into memory.
        Returns the status code (200, 201 or 204); raises a ``TransportError`` otherwise.
        """
        if length is None:
            length = os.fstat(fileobj.fileno()).st_size - fileobj.tell()
        # requests sends an empty stream as chunked; an empty bytes body gets Content-Length: 0.
        body = fileobj if length else b""
        headers = {"Content-Length": str(length), "Content-Type": "application/octet-stream"}
        response = self._request("PUT", name, data=body, headers=headers)
        return self._expect(response, "PUT", name, PUT_OK)

    def delete(self, name):
        """Delete ``name``. Returns True if it was deleted, False if it was already gone.

        A host that answers 404 did not have the file: that is logged at WARNING, in
        django-resto's words (``DELETE on missing file <name> on <host>.``). A status other
        than 200, 204 or 404 raises a ``TransportError``.
        """
        response = self._request("DELETE", name)
        self._expect(response, "DELETE", name, DELETE_OK)
        if response.status_code == 404:
            logger.warning("DELETE on missing file %s on %s.", name, self.name)
            return False
        return True

    def head(self, name):
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

    def exists(self, name):
        """Return whether the host has ``name``."""
        return self.head(name) is not None

    def size(self, name):
        """Return the size of ``name`` in bytes; raises :class:`MissingFile` if absent."""
        remote = self._require(name)
        if remote.size is None:
            raise UnexpectedStatus(self.name, "HEAD", name, "no Content-Length in the answer", 200)
        return remote.size

    def modified_time(self, name):
        """Return the ``Last-Modified`` time of ``name`` as an aware UTC datetime."""
        remote = self._require(name)
        if remote.modified is None:
            raise UnexpectedStatus(self.name, "HEAD", name, "no Last-Modified in the answer", 200)
        return remote.modified

    def download(self, name, fileobj):
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

    def list_directory(self, path=""):
        """``(directories, files)`` directly in ``path``: names, and names to :class:`RemoteFile`.

        Hosts that can list (``can_list``) implement it; a missing directory raises
        :class:`~resto_celery.exceptions.MissingFile`.
        """
        raise NotImplementedError(f"{self.name} is a plain HTTP host: it cannot list its files.")

    def listdir(self, path=""):
        """``(directories, file names)`` in ``path``, as Django's ``Storage.listdir``."""
        directories, files = self.list_directory(path)
        return directories, sorted(files)

    def walk(self):
        """Yield ``(name, RemoteFile)`` for every file on the host, depth first (hosts that can list)."""
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

    def directories_to_create(self, name):
        """The parent directories of ``name`` that must be made, one at a time, before a PUT.

        Empty for hosts that make parents themselves or where concurrent creation is safe;
        see :class:`resto_celery.tahoe.TahoeTransport`.
        """
        return []

    def ensure_directory(self, path):
        """Make the directory ``path`` exist on the host (for :meth:`directories_to_create`)."""

    def close(self):
        """Close the pooled connections."""
        self.session.close()

    def _require(self, name):
        remote = self.head(name)
        if remote is None:
            raise MissingFile(self.name, "HEAD", name, "404 Not Found", 404)
        return remote

    def _request(self, method, name, **kwargs):
        try:
            return self.session.request(method, self.url(name), timeout=self.timeout, allow_redirects=False, **kwargs)
        except requests.RequestException as exc:
            # Not "from exc": requests' errors quote the whole URL, which for a Tahoe-LAFS host
            # holds the write cap, and tracebacks end up in result backends and error trackers.
            # The translated error keeps the root cause in its reason.
            raise self._translate(exc, method, name) from None

    def _expect(self, response, method, name, accepted):
        status = response.status_code
        if status in accepted:
            return status
        reason = f"{status} {response.reason or ''}".strip()
        error = MissingFile if status == 404 else UnexpectedStatus
        raise error(self.name, method, name, reason, status)

    def _translate(self, exc, method, name):
        if isinstance(exc, requests.exceptions.SSLError):
            return TLSFailure(self.name, method, name, f"TLS error: {_root_cause(exc)}")
        if isinstance(exc, requests.ConnectTimeout):
            return HostTimeout(self.name, method, name, f"timed out connecting (timeout {self.timeout}s)", in_doubt=False)
        if isinstance(exc, requests.Timeout):
            return HostTimeout(self.name, method, name, f"timed out waiting for an answer (timeout {self.timeout}s)", in_doubt=True)
        # Nothing was sent when the connection could not even be made.
        in_doubt = not _caused_by(exc, urllib3.exceptions.NewConnectionError)
        if isinstance(exc, requests.ConnectionError):
            return HostUnreachable(self.name, method, name, f"connection failed: {_root_cause(exc)}", in_doubt=in_doubt)
        return HostUnreachable(self.name, method, name, f"{type(exc).__name__}: {exc}", in_doubt=in_doubt)


def _chain(exc):
    """Every exception wrapped in ``exc``: causes, ``reason`` attributes and arguments.

    Not ``__context__``, which may hold unrelated exceptions handled along the way.
    """
    pending = [exc]
    seen = set()
    while pending:
        current = pending.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending.extend([current.__cause__, getattr(current, "reason", None), *current.args])


def _caused_by(exc, kind):
    return any(isinstance(inner, kind) for inner in _chain(exc))


def _root_cause(exc):
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
