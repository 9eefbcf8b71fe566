"""Tahoe-LAFS media hosts: files under a directory cap, through a node's web API.

Files are written with ``PUT /uri/$DIRCAP/path`` and read, listed and deleted under the
same path. The read-write directory cap is the only credential: it stays out of every
error message, log line and ``repr()`` (this module redacts it, and a filter on urllib3's
logger hides it from request logs). Download links use the read-only cap.

Two traps, both seen on a real grid:

- A PUT into a missing directory creates it implicitly, and parallel PUTs that create the
  same directory each make their own: all answer 201 and only one file survives. So
  :meth:`TahoeTransport.put` first makes every missing parent itself, one directory at a
  time (a lock per directory in this process; across workers,
  :func:`resto_celery.replication.sync` holds a lease per directory around
  :meth:`~TahoeTransport.ensure_directory`), and only then PUTs into the existing one.
- Until the node is connected to enough storage servers, writes answer
  ``500 NoServersError``: retryable, like any 5xx.

Like :mod:`resto_celery.transport` it knows nothing of Django or Celery.
"""

from __future__ import annotations

import logging
import re
import threading
from datetime import datetime, timezone
from typing import IO, TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from .exceptions import MissingFile, TransportError, UnexpectedStatus
from .transport import HostTransport, Listing, RedactingFilter, RemoteFile

if TYPE_CHECKING:
    from collections.abc import Collection

    import requests

    from .transport import _Answer

_Error = TypeVar("_Error", bound=TransportError)

#: Write caps (directory and mutable file) in any text: redacted wherever they could leak.
WRITE_CAP = re.compile(r"URI(?::|%3A)(?:DIR2|DIR2-MDMF|SSK|MDMF)(?::|%3A)[A-Za-z0-9:%]+")
REDACTED = "URI:<write cap redacted>"


def redact(text: str) -> str:
    """``text`` with every Tahoe-LAFS write cap replaced by a placeholder."""
    return WRITE_CAP.sub(REDACTED, text) if text else text


# urllib3's connection-pool logger logs request lines (with the cap in the path) at DEBUG.
logging.getLogger("urllib3.connectionpool").addFilter(RedactingFilter(redact))


class TahoeTransport(HostTransport):
    """The files under one Tahoe-LAFS directory, through a node's web API.

    ``node_url`` is the node's web API (``http://127.0.0.1:3456/``), ``dircap`` the
    read-write directory cap, ``readcap`` its read-only cap (asked of the node on first
    use when not given), ``public_url`` the gateway that serves downloads (default
    ``node_url``). ``name`` names the host in errors and logs; it must not hold the cap.
    """

    can_list = True

    def __init__(
        self, node_url: str, *, dircap: str, readcap: str | None = None, public_url: str | None = None,
        **kwargs: Any,
    ) -> None:
        if not node_url.endswith("/"):
            node_url += "/"
        self.node_url = node_url
        self._dircap = dircap
        self._readcap = readcap
        self.public_url = public_url or node_url
        kwargs.setdefault("name", node_url)
        super().__init__(node_url + "uri/" + quote(dircap, safe=":") + "/", **kwargs)
        self._directories = {""}  # directories known to exist ("" is the cap's own)
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    # Writing

    def put(self, name: str, fileobj: IO[bytes], length: int | None = None) -> int:
        """Make the missing parents of ``name`` one at a time, then PUT it (201 or 200)."""
        for directory in self.directories_to_create(name):
            with self._directory_lock(directory):
                self.ensure_directory(directory)
        return super().put(name, fileobj, length)

    def directories_to_create(self, name: str) -> list[str]:
        """The parents of ``name`` not known to exist, top-down."""
        parts = name.split("/")[:-1]
        candidates = ["/".join(parts[:depth]) for depth in range(1, len(parts) + 1)]
        with self._lock:
            return [directory for directory in candidates if directory not in self._directories]

    def ensure_directory(self, path: str) -> None:
        """Make directory ``path`` if it does not exist; its parent must exist.

        ``PUT path?t=mkdir`` leaves an existing directory alone; asking first (``t=json``)
        keeps it from racing with a creation by someone who does not hold our lease.
        """
        with self._lock:
            if path in self._directories:
                return
        response = self._request("GET", path, params={"t": "json"})
        if response.status_code == 404:
            response = self._request("PUT", path, params={"t": "mkdir"})
            self._expect(response, "MKDIR", path, {200, 201})
        else:
            self._expect(response, "GET", path, {200})
            kind = _json(response, self, path)[0]
            if kind != "dirnode":
                raise UnexpectedStatus(self.name, "MKDIR", path, f"a {kind} is in the way of this directory", 200)
        with self._lock:
            self._directories.add(path)

    def _directory_lock(self, path: str) -> threading.Lock:
        with self._lock:
            return self._locks.setdefault(path, threading.Lock())

    # Reading

    def head(self, name: str) -> RemoteFile | None:
        """The size and link time of file ``name`` (from ``?t=json``), or None if absent."""
        response = self._request("GET", name, params={"t": "json"})
        if response.status_code == 404:
            return None
        self._expect(response, "GET", name, {200})
        kind, info = _json(response, self, name)
        if kind != "filenode":
            return None
        return _remote_file(info)

    def list_directory(self, path: str = "") -> Listing:
        """``(directories, files)`` directly in ``path``: names, and names to :class:`RemoteFile`."""
        response = self._request("GET", path, params={"t": "json"})
        self._expect(response, "GET", path or "/", {200})
        kind, info = _json(response, self, path)
        if kind != "dirnode":
            raise MissingFile(self.name, "GET", path, f"not a directory but a {kind}", 404)
        directories: list[str] = []
        files: dict[str, RemoteFile] = {}
        for child, (child_kind, child_info) in info.get("children", {}).items():
            if child_kind == "dirnode":
                directories.append(child)
            elif child_kind == "filenode":
                files[child] = _remote_file(child_info)
        with self._lock:
            self._directories.update(f"{path}/{d}" if path else d for d in directories)
        return sorted(directories), files

    # Links

    def readcap(self) -> str:
        """The read-only cap of the directory (asked of the node once, then remembered)."""
        if self._readcap is None:
            response = self._request("GET", "", params={"t": "json"})
            self._expect(response, "GET", "/", {200})
            kind, info = _json(response, self, "/")
            if kind != "dirnode" or not info.get("ro_uri"):
                raise UnexpectedStatus(self.name, "GET", "/", "the directory cap gave no read-only cap", 200)
            self._readcap = info["ro_uri"]
        return self._readcap

    def public_link(self, name: str) -> str:
        """The download URL of ``name``: the gateway, the read-only cap, the path."""
        self.url(name)  # refuses unsafe names
        return f"{self.public_url}uri/{quote(self.readcap(), safe=':')}/{quote(name, safe='/')}"

    # Errors never carry the cap

    def _expect(
        self, response: requests.Response | _Answer, method: str, name: str, accepted: Collection[int],
    ) -> int:
        try:
            return super()._expect(response, method, name, accepted)
        except UnexpectedStatus as error:
            detail = _tahoe_error(response)
            if detail:
                error.reason = f"{error.reason}: {detail}"
            if detail in UNAVAILABLE:
                error = TahoeUnavailable(error.host, error.method, error.name, error.reason, error.status)
            raise _redacted(error) from None

    def _translate(self, exc: BaseException, method: str, name: str) -> TransportError:
        return _redacted(super()._translate(exc, method, name))


def _redacted(error: _Error) -> _Error:
    error.reason = redact(error.reason)
    error.args = (str(error),)
    return error


#: Errors of a node that cannot reach enough storage servers (yet): worth trying again.
UNAVAILABLE = ("NoServersError", "NotEnoughServersError", "UploadUnhappinessError", "UnrecoverableFileError",
               "NotEnoughSharesError", "NoSharesError")
ERROR_NAME = re.compile(r"\b([A-Z][A-Za-z]*(?:Error|Exception))\b")


class TahoeUnavailable(UnexpectedStatus):
    """The node answered, but cannot reach enough storage servers (``NoServersError`` 500,
    ``UnrecoverableFileError`` 410...): retryable, they may connect again."""

    retryable = True


def _tahoe_error(response: requests.Response | _Answer) -> str:
    """The name of the Tahoe error in an error page (``NoServersError``...), or ''."""
    found = ERROR_NAME.search(redact(response.text or ""))
    return found.group(1) if found else ""


def _json(response: requests.Response, transport: TahoeTransport, name: str) -> tuple[str, dict[str, Any]]:
    try:
        kind, info = response.json()
        return kind, info
    except (ValueError, TypeError) as error:
        raise UnexpectedStatus(transport.name, "GET", name, f"unreadable JSON from the node: {error}", 200) from error


def _remote_file(info: dict[str, Any]) -> RemoteFile:
    tahoe = (info.get("metadata") or {}).get("tahoe") or {}
    moment = tahoe.get("linkmotime")
    return RemoteFile(
        size=info.get("size"),
        modified=datetime.fromtimestamp(moment, timezone.utc) if moment else None,
        etag=info.get("ro_uri") or None,
    )
