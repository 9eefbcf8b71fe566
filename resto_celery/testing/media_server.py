"""A real HTTP media server for tests, with fault injection.

:class:`MediaServer` answers ``PUT``, ``DELETE``, ``GET`` and ``HEAD`` on ``127.0.0.1``
the way nginx's ``dav`` module does, in background threads. Point your storage at it, then
check what arrived, or make it fail the way real media hosts fail: error statuses, slow
answers, read-only mode, going down and coming back on the same port. Example with pytest
and pytest-django::

    import pytest
    from resto_celery.testing.media_server import MediaServer

    @pytest.fixture
    def media_server(tmp_path, settings):
        with MediaServer(tmp_path / "host") as server:  # or MediaServer() to keep files in memory
            settings.RESTO_MEDIA_HOSTS = [server.address]
            yield server

    def test_upload_survives_an_outage(media_server):
        media_server.fail_next(status=503)
        with media_server.down():
            ...  # connections to media_server.address are refused here
        ...
        assert media_server.read("photos/cat.jpg") == b"..."
        assert [r.status for r in media_server.requests] == [503, 201]

Files live under ``prefix`` (``/media/`` by default): URL ``/media/a/b%20c.txt`` is the file
``"a/b c.txt"``. Every method that takes or returns a name uses such relative names, ``/``
separated and unquoted. Names with a ``..``, ``.`` or empty segment, or a NUL byte, are
refused (HTTP 400, or ValueError for direct calls). All methods are thread-safe. ``GET`` and
``HEAD`` answer with the type nginx gives the name's extension (:func:`content_type`),
whatever the ``PUT`` sent.

Only the standard library is used, so the module can be imported anywhere.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any, Protocol, cast
from urllib.parse import quote, unquote

__all__ = ["MediaServer", "RequestRecord", "content_type"]

CHUNK_SIZE = 64 * 1024
JOIN_TIMEOUT = 5  # seconds stop() waits for the serving thread and open connections
POLL_INTERVAL = 0.005  # seconds the serving thread takes to notice stop()
METHODS = ("GET", "HEAD", "PUT", "DELETE")
TEMP_PREFIX = ".mediaserver-upload-"  # uploads in progress; never listed as files


@dataclass(frozen=True)
class RequestRecord:
    """One request the server answered.

    ``name`` is the file name (unquoted, relative to the prefix), or the raw request path
    when it is outside the prefix. ``time`` is a :func:`time.monotonic` timestamp.
    ``content_type`` is the request's ``Content-Type`` header (None without one).
    """

    method: str
    name: str
    status: int
    time: float
    content_type: str | None = None


class MediaServer:
    """An HTTP media server on ``host``, storing files under ``root`` or in memory.

    ``root`` is a directory (created if missing), or None to keep files in memory.
    ``prefix`` is the URL path of the files, normalized to start and end with ``/``.
    ``port=0`` picks a free port when the server first starts; later starts (and
    :meth:`come_back`) reuse it. Use it as a context manager, or call :meth:`start` and
    :meth:`stop`. Files stay readable through :meth:`files` and :meth:`read` after a stop.
    """

    def __init__(
        self, root: str | os.PathLike[str] | None = None, *, prefix: str = "/media/", host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.root = None if root is None else os.fspath(root)
        stripped = prefix.strip("/")
        self.prefix = f"/{stripped}/" if stripped else "/"
        self.host = host
        self.port = port
        #: When True, ``PUT`` and ``DELETE`` answer 403 and change nothing.
        self.read_only = False
        self._store: _Store = _MemoryStore() if self.root is None else _DiskStore(self.root)
        self._lock = threading.Condition()  # guards everything below, the store and the faults
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._requests: list[RequestRecord] = []
        self._failures: list[_Fault] = []
        self._delay: _Fault | None = None
        self._receive_rate: float | None = None

    def __repr__(self) -> str:
        return f"<MediaServer {self.url} {self.root or 'in memory'}>"

    def __enter__(self) -> MediaServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """``"host:port"``, as listed in ``RESTO_MEDIA_HOSTS``."""
        return f"{self.host}:{self.port}"

    @property
    def serving(self) -> bool:
        """Whether the server listens now (False before :meth:`start`, while down, after a stop)."""
        with self._lock:
            return self._server is not None

    @property
    def url(self) -> str:
        """The base URL of the files, e.g. ``"http://127.0.0.1:8123/media/"``."""
        return f"http://{self.address}{quote(self.prefix)}"

    # Lifecycle

    def start(self) -> MediaServer:
        """Listen on ``host:port`` and serve in a daemon thread; return the server.

        Does nothing if the server is already serving.
        """
        with self._lock:
            if self._server is not None:
                return self
            server = _HTTPServer(self)
            self.port = server.server_address[1]
            self._server = server
            self._thread = threading.Thread(
                target=server.serve_forever, args=(POLL_INTERVAL,), name=f"MediaServer-{self.port}", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: close the listening socket and every open connection.

        Requests in progress, delayed ones included, end without an answer. Waits a few
        seconds at most for the threads to finish. Stored files are kept. Idempotent.
        """
        with self._lock:
            server, self._server = self._server, None
            self._lock.notify_all()  # wakes delayed requests, see _interrupted()
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT)
        with self._lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):  # its handler closed it already
                    connection.shutdown(socket.SHUT_RDWR)
            self._lock.wait_for(lambda: not self._connections, JOIN_TIMEOUT)

    def go_down(self) -> None:
        """Simulate a host outage: refuse connections and cut the open ones.

        Clients see connection errors, delayed requests end without an answer and without
        applying their change. Stored files are kept; :meth:`come_back` ends the outage.
        """
        self.stop()

    def come_back(self) -> None:
        """End an outage: listen again on the same port, with the same files."""
        self.start()

    @contextlib.contextmanager
    def down(self) -> Iterator[MediaServer]:
        """Context manager: the server is down (see :meth:`go_down`) inside the block."""
        self.go_down()
        try:
            yield self
        finally:
            self.come_back()

    # Stored files

    def files(self) -> dict[str, bytes]:
        """Return every stored file as a ``{name: bytes}`` dict."""
        with self._lock:
            names = self._store.names()
        return {name: data for name in sorted(names) if (data := self.read(name)) is not None}

    def read(self, name: str) -> bytes | None:
        """Return the bytes of ``name``, or None if there is no such file."""
        _check_name(name)
        with self._lock:
            found = self._store.open(name)
        if found is None:
            return None
        with found[0] as fileobj:
            data: bytes = fileobj.read()
            return data

    def has(self, name: str) -> bool:
        """Return whether ``name`` is stored."""
        return self.read(name) is not None

    def seed(self, name: str, data: bytes) -> None:
        """Store ``data`` (bytes) as ``name`` without HTTP, creating its folders.

        Raises ValueError if ``name`` is unsafe, is a folder, or a file is in its path.
        """
        _check_name(name)
        staged = self._store.receive(name, [bytes(data)])
        with self._lock:
            self._store.commit(name, staged)

    def remove(self, name: str) -> None:
        """Delete ``name`` without HTTP; do nothing if it is absent.

        Raises ValueError if ``name`` is unsafe or is a folder.
        """
        _check_name(name)
        with self._lock:
            self._store.delete(name)

    def clear(self) -> None:
        """Delete every file (folders stay, as after ``DELETE``)."""
        with self._lock:
            for name in self._store.names():
                self._store.delete(name)

    # Request log

    @property
    def requests(self) -> list[RequestRecord]:
        """The requests answered so far, oldest first, as a list of :class:`RequestRecord`."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        """Forget the requests answered so far."""
        with self._lock:
            self._requests.clear()

    # Fault injection

    def fail_next(self, count: int = 1, status: int = 500, methods: str | Iterable[str] | None = None) -> None:
        """Answer the next ``count`` requests with ``status``, changing nothing.

        ``methods`` (e.g. ``{"PUT"}``) restricts which requests are failed and counted;
        None means every method. Calls add up: each request takes the oldest pending failure
        that matches it. Requests refused for their path (400, 404, 405) are not counted.
        """
        with self._lock:
            self._failures.append(_Fault(status, _methods(methods), count))

    def set_delay(self, seconds: float, methods: str | Iterable[str] | None = None, count: int | None = None) -> None:
        """Delay answers by ``seconds``, replacing any previous delay.

        The request body is received first; the change is applied and the answer sent after
        the delay, so a client that times out still sees its change applied later (unless
        the server stops or goes down meanwhile: then the request ends unanswered and
        unapplied). ``methods`` restricts which requests are delayed; ``count`` limits how
        many (None: until :meth:`reset_faults`). Failures from :meth:`fail_next` and
        :attr:`read_only` are delayed too.
        """
        with self._lock:
            self._delay = _Fault(seconds, _methods(methods), count)

    def set_receive_rate(self, bytes_per_second: float | None = None) -> None:
        """Read request bodies at most ``bytes_per_second`` (None: full speed).

        Keeps a large PUT in flight long enough to kill its client in the middle of it.
        """
        with self._lock:
            self._receive_rate = bytes_per_second

    def reset_faults(self) -> None:
        """Cancel pending failures, delays and receive-rate limits, and clear :attr:`read_only`."""
        with self._lock:
            self._failures.clear()
            self._delay = None
            self._receive_rate = None
            self.read_only = False

    # Used by the request handler

    def _take_faults(self, method: str) -> tuple[int | None, float]:
        """Return ``(status, delay)`` for an arriving request: an injected status or None, and seconds to wait."""
        with self._lock:
            status = next((cast(int, fault.value) for fault in self._failures if fault.take(method)), None)
            self._failures = [fault for fault in self._failures if fault.count]
            if status is None and self.read_only and method in ("PUT", "DELETE"):
                status = 403
            delay = self._delay.value if self._delay and self._delay.take(method) else 0
        return status, delay

    def _interrupted(self, server: _HTTPServer, seconds: float) -> bool:
        """Wait ``seconds``; return True early if ``server`` stopped serving meanwhile."""
        with self._lock:
            return self._lock.wait_for(lambda: self._server is not server, seconds)

    def _record(self, method: str, name: str, status: int, content_type: str | None = None) -> None:
        with self._lock:
            self._requests.append(RequestRecord(method, name, status, time.monotonic(), content_type))


@dataclass
class _Fault:
    value: float  # the status to answer, or the seconds to wait
    methods: frozenset[str] | None  # None: every method
    count: int | None  # requests left; None: no limit

    def take(self, method: str) -> bool:
        """Count a request against this fault; return whether the fault applies to it."""
        if self.count == 0 or (self.methods is not None and method not in self.methods):
            return False
        if self.count is not None:
            self.count -= 1
        return True


def _methods(methods: str | Iterable[str] | None) -> frozenset[str] | None:
    if methods is None:
        return None
    return frozenset(m.upper() for m in ([methods] if isinstance(methods, str) else methods))


def _check_name(name: str) -> None:
    """Raise ValueError unless ``name`` is a plain relative file name."""
    if "\x00" in name or any(part in ("", ".", "..") for part in name.split("/")):
        raise ValueError(f"Unsafe or malformed file name {name!r}.")


def _parents(name: str) -> list[str]:
    parts = name.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


class _Conflict(ValueError):
    """A folder stands where a file should, or a file where a folder should (HTTP 409)."""


# Stores. receive() runs without the lock (it streams the request body); every other
# method runs with the MediaServer's lock held.


class _Store(Protocol):
    def names(self) -> list[str]: ...
    def open(self, name: str) -> tuple[IO[bytes], int, float] | None: ...
    def receive(self, name: str, chunks: Iterable[bytes]) -> Any: ...
    def commit(self, name: str, staged: Any) -> bool: ...
    def discard(self, staged: Any) -> None: ...
    def delete(self, name: str) -> bool: ...


class _DiskStore:
    def __init__(self, root: str) -> None:
        self.root = root
        os.makedirs(root, exist_ok=True)

    def _path(self, name: str) -> str:
        return os.path.join(self.root, *name.split("/"))

    def names(self) -> list[str]:
        return [
            os.path.relpath(os.path.join(folder, file), self.root).replace(os.sep, "/")
            for folder, _, files in os.walk(self.root)
            for file in files
            if not file.startswith(TEMP_PREFIX)
        ]

    def open(self, name: str) -> tuple[IO[bytes], int, float] | None:
        """Return ``(binary file, size, mtime)`` for ``name``, or None."""
        try:
            fileobj = open(self._path(name), "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        stat = os.fstat(fileobj.fileno())
        return fileobj, stat.st_size, stat.st_mtime

    def receive(self, name: str, chunks: Iterable[bytes]) -> str:
        """Write ``chunks`` into a temporary file in ``name``'s folder; return its path."""
        folder = os.path.dirname(self._path(name))
        try:
            os.makedirs(folder, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            _drain(chunks)
            raise _Conflict(f"A file is in the way of {name!r}.") from None
        fd, temp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=folder)
        try:
            with os.fdopen(fd, "wb") as fileobj:
                for chunk in chunks:
                    fileobj.write(chunk)
        except BaseException:
            os.unlink(temp)
            raise
        return temp

    def commit(self, name: str, temp: str) -> bool:
        """Move a received file into place atomically; return whether ``name`` is new."""
        target = self._path(name)
        if os.path.isdir(target):
            os.unlink(temp)
            raise _Conflict(f"{name!r} is a folder.")
        created = not os.path.lexists(target)
        os.replace(temp, target)
        return created

    def discard(self, temp: str) -> None:
        os.unlink(temp)

    def delete(self, name: str) -> bool:
        """Delete ``name``; return whether it existed."""
        path = self._path(name)
        if os.path.isdir(path):
            raise _Conflict(f"{name!r} is a folder.")
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True


class _MemoryStore:
    """Same behaviour as _DiskStore, folders included, in dicts."""

    def __init__(self) -> None:
        self._files: dict[str, tuple[bytes, float]] = {}  # name: (bytes, time stored)
        self._folders: set[str] = set()  # like on disk, folders outlive their files

    def names(self) -> list[str]:
        return list(self._files)

    def open(self, name: str) -> tuple[IO[bytes], int, float] | None:
        if name not in self._files:
            return None
        data, mtime = self._files[name]
        return io.BytesIO(data), len(data), mtime

    def receive(self, name: str, chunks: Iterable[bytes]) -> bytes:
        return b"".join(chunks)

    def commit(self, name: str, data: bytes) -> bool:
        if name in self._folders:
            raise _Conflict(f"{name!r} is a folder.")
        if any(parent in self._files for parent in _parents(name)):
            raise _Conflict(f"A file is in the way of {name!r}.")
        self._folders.update(_parents(name))
        created = name not in self._files
        self._files[name] = (data, time.time())
        return created

    def discard(self, data: bytes) -> None:
        pass

    def delete(self, name: str) -> bool:
        if name in self._folders:
            raise _Conflict(f"{name!r} is a folder.")
        return self._files.pop(name, None) is not None


def _drain(chunks: Iterable[bytes]) -> None:
    for _ in chunks:
        pass


# HTTP


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # MediaServer.stop() waits for the connections itself
    # socketserver's listen backlog is 5: a worker's burst of parallel transfers would see
    # refused connections that a real server (nginx: 511) never gives.
    request_queue_size = 128

    def __init__(self, media: MediaServer) -> None:
        self.media = media
        super().__init__((media.host, media.port), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # Runs in the serving thread, so stop() sees every connection once serving ends.
        with self.media._lock:
            self.media._connections.add(request)
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.media._lock:
                self.media._connections.discard(request)
                self.media._lock.notify_all()

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client, stop() or go_down() cut it
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "MediaServer"
    server: _HTTPServer

    def __getattr__(self, attr: str) -> Any:
        # BaseHTTPRequestHandler calls do_<METHOD>; send every method to _handle, which
        # answers 405 to unknown ones (the default would be 501).
        if attr.startswith("do_"):
            return self._handle
        raise AttributeError(attr)

    def log_message(self, format: str, *args: Any) -> None:
        """Print nothing: MediaServer.requests is the log."""

    def _handle(self) -> None:
        """Answer any request: check the path, take faults, read the body, wait, then act."""
        media = self.server.media
        name, status = self._target()
        if status is None and self.command not in METHODS:
            status = 405
        delay: float = 0
        if status is None:
            status, delay = media._take_faults(self.command)
        staged = None
        try:
            if status is None and self.command == "PUT":
                staged = media._store.receive(name, self._body())
            else:
                _drain(self._body())
        except _Conflict:
            status = 409
        if delay and media._interrupted(self.server, delay):
            if staged is not None:
                media._store.discard(staged)
            self.close_connection = True  # like a host that crashed: no answer, no change
            return
        if status == 405:
            self._respond(405, name, {"Allow": ", ".join(METHODS)})
        elif status is not None:
            self._respond(status, name)
        elif self.command in ("PUT", "DELETE"):
            self._respond(self._apply(name, staged), name)
        else:
            self._send_file(name)

    def _apply(self, name: str, staged: Any) -> int:
        """Apply a PUT or DELETE to the store; return the status to answer."""
        media = self.server.media
        with media._lock:
            try:
                if self.command == "PUT":
                    return 201 if media._store.commit(name, staged) else 204
                return 204 if media._store.delete(name) else 404
            except _Conflict:
                return 409

    def _target(self) -> tuple[str, int | None]:
        """Return ``(name, None)`` for a valid file URL, else ``(name or raw path, error status)``."""
        prefix = self.server.media.prefix
        try:
            # Split the query off before decoding: '?' in a file name arrives as %3F.
            path = unquote(self.path.split("?", 1)[0], errors="strict")
        except UnicodeDecodeError:
            return self.path, 400
        if not path.startswith(prefix):
            return self.path, 404
        name = path[len(prefix) :]
        try:
            _check_name(name)
        except ValueError:
            return name, 400
        return name, None

    def _body(self) -> Iterator[bytes]:
        """Yield the request body in chunks, framed by Content-Length or chunked encoding.

        Malformed framing raises ConnectionError: the connection is dropped.
        """
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while size := _size(self._line().split(b";")[0], 16):
                yield from self._read(size)
                self._line()  # the CRLF that ends the chunk
            while self._line() not in (b"\r\n", b"\n"):  # trailers, up to a blank line
                pass
        else:
            yield from self._read(_size(self.headers.get("Content-Length", "0")))

    def _read(self, size: int) -> Iterator[bytes]:
        while size:
            chunk = self.rfile.read(min(size, CHUNK_SIZE))
            if not chunk:
                raise ConnectionError("The request body ended early.")
            size -= len(chunk)
            rate = self.server.media._receive_rate
            if rate:
                time.sleep(len(chunk) / rate)
            yield chunk

    def _line(self) -> bytes:
        line = self.rfile.readline(CHUNK_SIZE)
        if not line:
            raise ConnectionError("The request body ended early.")
        return line

    def _send_file(self, name: str) -> None:
        media = self.server.media
        with media._lock:
            found = media._store.open(name)
        if found is None:
            self._respond(404, name)
            return
        fileobj, size, mtime = found
        headers = {
            "Content-Type": content_type(name),
            "Last-Modified": formatdate(mtime, usegmt=True),
            "ETag": f'"{int(mtime):x}-{size:x}"',  # nginx's format
        }
        with fileobj:
            self._respond(200, name, headers, fileobj, size)

    def _respond(
        self, status: int, name: str, headers: Mapping[str, str] | None = None, fileobj: IO[bytes] | None = None,
        length: int = 0,
    ) -> None:
        """Record the request, then answer it; the connection stays usable."""
        self.server.media._record(self.command, name, status, self.headers.get("Content-Type"))
        self.send_response(status)
        for header, value in (headers or {}).items():
            self.send_header(header, value)
        if status != 204:  # a 204 must not carry a Content-Length (RFC 9110)
            self.send_header("Content-Length", str(length))
        self.end_headers()
        if fileobj is not None and self.command == "GET":
            shutil.copyfileobj(fileobj, self.wfile, CHUNK_SIZE)


def content_type(name: str) -> str:
    """The type a GET or HEAD of ``name`` answers with, by its extension, as nginx does
    (whatever the PUT sent): nginx's own table (``nginx_mime_types.conf``), matched without
    regard to case; ``application/octet-stream`` (nginx's ``default_type``) otherwise."""
    base = name.rsplit("/", 1)[-1]
    dot = base.rfind(".")
    if dot <= 0:  # no extension; nor is a leading dot one (".png"), for nginx
        return "application/octet-stream"
    return _nginx_types().get(base[dot + 1 :].lower(), "application/octet-stream")


@functools.cache
def _nginx_types() -> dict[str, str]:
    """``{extension: type}`` from nginx's mime.types, shipped beside this module."""
    text = (Path(__file__).with_name("nginx_mime_types.conf")).read_text()
    text = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    body = text[text.index("{") + 1 : text.rindex("}")]
    types: dict[str, str] = {}
    for statement in body.split(";"):
        mime, *extensions = statement.split() or [""]
        for extension in extensions:
            types.setdefault(extension.lower(), mime)  # the first one wins, as in nginx
    return types


def _size(text: str | bytes, base: int = 10) -> int:
    """Parse a Content-Length or chunk size; malformed ones drop the connection."""
    try:
        size = int(text, base)
    except ValueError:
        size = -1
    if size < 0:
        raise ConnectionError(f"Malformed request body size {text!r}.")
    return size
