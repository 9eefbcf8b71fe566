"""WebDAV media hosts: collections made with MKCOL, files listed with PROPFIND.

A WebDAV server (lighttpd's ``mod_webdav``, Apache's ``mod_dav``, ``wsgidav``) refuses a
PUT into a collection that does not exist (409 Conflict) until each parent is made with
``MKCOL``. :class:`WebDAVTransport` makes missing parents top-down, remembers the ones it
made or saw, and takes "405 Method Not Allowed" (it exists already) as success, so two
workers making the same collection at once both go on. Like :mod:`resto_celery.transport`
it knows nothing of Django or Celery.
"""

from __future__ import annotations

import email.utils
import threading
import xml.etree.ElementTree as ElementTree
from datetime import timezone
from typing import IO, Any
from urllib.parse import unquote, urlsplit

from .exceptions import UnexpectedStatus
from .transport import HostTransport, Listing, RemoteFile

DAV = "{DAV:}"
MKCOL_OK = frozenset({200, 201, 204, 405})
#: Asks only for what a listing needs.
PROPFIND_BODY = (
    b'<?xml version="1.0" encoding="utf-8"?>'
    b'<propfind xmlns="DAV:"><prop><resourcetype/><getcontentlength/><getlastmodified/><getetag/></prop></propfind>'
)


class WebDAVTransport(HostTransport):
    """HTTP operations on a WebDAV host; see the module's documentation."""

    can_list = True

    def __init__(self, base_url: str, **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)
        self._collections: set[str] = set()  # collections known to exist ("a", "a/b")
        self._lock = threading.Lock()

    def put(self, name: str, fileobj: IO[bytes], length: int | None = None) -> int:
        """Upload ``name``, making its parent collections first when needed.

        A 409 for a collection we thought existed (someone removed it) makes them again
        and sends the file once more.
        """
        start = fileobj.tell()
        parent = name.rpartition("/")[0]
        if parent:
            self.make_collections(parent)
        try:
            return super().put(name, fileobj, length)
        except UnexpectedStatus as error:
            if error.status != 409 or not parent:
                raise
        self._forget(parent)
        self.make_collections(parent)
        fileobj.seek(start)
        return super().put(name, fileobj, length)

    def make_collections(self, path: str) -> None:
        """Make the collection ``path`` and its missing parents, top-down (MKCOL)."""
        parts = path.split("/")
        for depth in range(1, len(parts) + 1):
            collection = "/".join(parts[:depth])
            with self._lock:
                if collection in self._collections:
                    continue
            response = self._request("MKCOL", collection + "/")
            if response.status_code not in MKCOL_OK and not self._is_collection(collection):
                # Some servers answer a MKCOL that lost a race with 500 (wsgidav: EEXIST);
                # only a collection that still does not exist is a failure.
                self._expect(response, "MKCOL", collection + "/", MKCOL_OK)
            with self._lock:
                self._collections.add(collection)

    def _is_collection(self, path: str) -> bool:
        response = self._request(
            "PROPFIND", path + "/", data=PROPFIND_BODY,
            headers={"Depth": "0", "Content-Type": 'application/xml; charset="utf-8"'},
        )
        return response.status_code == 207 and b"collection" in response.content

    def _forget(self, path: str) -> None:
        """Stop trusting that ``path``, its ancestors and its descendants exist."""
        with self._lock:
            self._collections = {
                c for c in self._collections
                if not (c == path or path.startswith(c + "/") or c.startswith(path + "/"))
            }

    def list_directory(self, path: str = "") -> Listing:
        """Return ``(collections, files)`` directly in collection ``path`` ("" is the root).

        ``collections`` are names, ``files`` maps names to :class:`RemoteFile`. A missing
        collection raises :class:`~resto_celery.exceptions.MissingFile`.
        """
        target = path + "/" if path else ""
        response = self._request(
            "PROPFIND", target, data=PROPFIND_BODY,
            headers={"Depth": "1", "Content-Type": 'application/xml; charset="utf-8"'},
        )
        self._expect(response, "PROPFIND", target or "/", {207})
        try:
            root = ElementTree.fromstring(response.content)
        except ElementTree.ParseError as error:
            raise UnexpectedStatus(
                self.name, "PROPFIND", target or "/", f"unreadable multistatus: {error}", 207,
            ) from error
        prefix = unquote(urlsplit(self.base_url).path) + target
        collections: list[str] = []
        files: dict[str, RemoteFile] = {}
        for item in root.iter(DAV + "response"):
            href = item.findtext(DAV + "href") or ""
            member = unquote(urlsplit(href).path)
            if not member.startswith(prefix):
                continue
            member = member[len(prefix):]
            is_collection = item.find(f".//{DAV}resourcetype/{DAV}collection") is not None
            member = member.rstrip("/")
            if not member or "/" in member:
                continue  # the collection itself
            if is_collection:
                collections.append(member)
            else:
                files[member] = _remote_file(item)
        with self._lock:
            self._collections.update(f"{path}/{c}" if path else c for c in collections)
        return sorted(collections), files


def _remote_file(item: ElementTree.Element) -> RemoteFile:
    """The :class:`RemoteFile` in one PROPFIND ``response`` element (first ``propstat`` 200)."""
    length = modified = etag = None
    for propstat in item.iter(DAV + "propstat"):
        if " 200 " not in f" {propstat.findtext(DAV + 'status') or ''} ":
            continue
        prop = propstat.find(DAV + "prop")
        if prop is None:
            continue
        length = prop.findtext(DAV + "getcontentlength") or length
        modified = prop.findtext(DAV + "getlastmodified") or modified
        etag = prop.findtext(DAV + "getetag") or etag
    return RemoteFile(
        size=int(length) if length and length.strip().isdigit() else None,
        modified=email.utils.parsedate_to_datetime(modified).astimezone(timezone.utc) if modified else None,
        etag=etag,
    )
