"""Real WebDAV media servers for tests: lighttpd's ``mod_webdav`` and wsgidav in-process.

Both refuse a ``PUT`` into a missing collection (409) until it is made with ``MKCOL``,
answer ``MKCOL`` of an existing collection with 405 and list with ``PROPFIND`` (207), as
a WebDAV host declared with ``"kind": "webdav"`` expects. Observed with lighttpd 1.4.69
and WsgiDAV 4.4: PUT new 201, PUT existing 204, DELETE 204, DELETE missing 404. Both have
the API of :class:`~resto_celery.testing.nginx.NginxMediaServer` (``url``, ``root``,
``files()``, ``go_down()``/``come_back()`` on the same port) plus ``host_entry``, the
``RESTO_MEDIA_HOSTS`` entry that declares them::

    with WsgiDAVServer(tmp_path / "dav") as server:
        storage = HybridStorage(hosts=[server.host_entry])
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ._support import folder_files, free_port

__all__ = ["LighttpdNotFound", "LighttpdWebDAVServer", "WsgiDAVServer", "find_lighttpd"]

_Server = TypeVar("_Server", bound="_DAVServer")

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


class LighttpdNotFound(RuntimeError):
    """lighttpd or its WebDAV module is not installed."""


def find_lighttpd() -> str | None:
    """The lighttpd binary (``$LIGHTTPD``, PATH, /usr/sbin/lighttpd) when mod_webdav is installed too."""
    for candidate in (os.environ.get("LIGHTTPD"), shutil.which("lighttpd"), "/usr/sbin/lighttpd"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            if Path("/usr/lib/lighttpd/mod_webdav.so").exists() or os.environ.get("LIGHTTPD"):
                return candidate
    return None


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


class _DAVServer:
    """What both servers share: addresses, the host entry, a snapshot of the files."""

    prefix = "/media/"
    root: Path
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}{self.prefix}"

    @property
    def host_entry(self) -> dict[str, Any]:
        """This server as a ``RESTO_MEDIA_HOSTS`` entry: ``{"url": ..., "kind": "webdav"}``."""
        return {"url": self.url, "kind": "webdav"}

    def files(self) -> dict[str, bytes]:
        """Every file under root, by '/'-separated path (see :func:`folder_files`)."""
        return folder_files(self.root)

    if TYPE_CHECKING:  # each server has its own (declared for type checkers only)

        def start(self: _Server) -> _Server:
            raise NotImplementedError

        def stop(self) -> None:
            raise NotImplementedError

    def come_back(self: _Server) -> _Server:
        """Serve again, on the same port, the same files."""
        return self.start()

    def __enter__(self: _Server) -> _Server:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class LighttpdWebDAVServer(_DAVServer):
    """A lighttpd process with ``mod_webdav`` serving ``root`` under ``/media/``, read-write.

    ``workdir`` holds the configuration, logs and upload temp files (by default a new
    temporary folder, removed by :meth:`stop`).
    """

    def __init__(
        self, root: str | os.PathLike[str], *, port: int = 0, workdir: str | os.PathLike[str] | None = None,
        lighttpd: str | None = None,
    ) -> None:
        found = lighttpd or find_lighttpd()
        if found is None:
            raise LighttpdNotFound(
                "lighttpd with mod_webdav is not installed: apt-get install lighttpd lighttpd-mod-webdav"
            )
        self.lighttpd = found
        self.root = Path(root).resolve()
        self.port = port or free_port()
        self._owns_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="resto-lighttpd-")).resolve()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def error_log(self) -> Path:
        return self.workdir / "error.log"

    def config(self) -> str:
        """The text of lighttpd.conf for this server."""
        w = self.workdir
        return f"""\
server.modules = ("mod_alias", "mod_webdav")
server.document-root = "{w / 'docroot'}"
server.bind = "127.0.0.1"
server.port = {self.port}
server.errorlog = "{self.error_log}"
server.upload-dirs = ("{w / 'uploads'}")
alias.url = ("{self.prefix}" => "{self.root}/")
$HTTP["url"] =~ "^{self.prefix}" {{
    webdav.activate = "enable"
    webdav.is-readonly = "disable"
}}
"""

    def start(self) -> LighttpdWebDAVServer:
        """Run lighttpd in the foreground; return once the port accepts connections."""
        if self.running:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in ("docroot", "uploads"):
            (self.workdir / folder).mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "lighttpd.conf"
        conf.write_text(self.config())
        with open(self.workdir / "stderr.log", "ab") as err:
            self._process = subprocess.Popen(
                [self.lighttpd, "-D", "-f", str(conf)], stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                cwd=self.workdir, start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and self._process.poll() is None:
            if _accepts(self.port):
                return self
            time.sleep(0.02)
        self.go_down()
        raise RuntimeError(f"lighttpd did not start on {self.address}:\n{self._log_tail()}")

    def go_down(self) -> None:
        """Stop serving (connections are refused) but keep the files, port and workdir."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def stop(self) -> None:
        """Stop lighttpd and remove a temporary workdir. Idempotent."""
        self.go_down()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _log_tail(self, lines: int = 20) -> str:
        text = ""
        for log in (self.error_log, self.workdir / "stderr.log"):
            try:
                text += log.read_text(errors="replace")
            except OSError:
                pass
        return "\n".join(text.strip().splitlines()[-lines:]) or "(empty)"

    def __repr__(self) -> str:
        return f"<LighttpdWebDAVServer {self.url} root={self.root}>"


class WsgiDAVServer(_DAVServer):
    """WsgiDAV (pure Python) serving ``root`` under ``/media/``, in this process (cheroot threads)."""

    def __init__(self, root: str | os.PathLike[str], *, port: int = 0) -> None:
        self.root = Path(root).resolve()
        self.port = port or free_port()
        self._server: Any = None  # a cheroot.wsgi.Server while serving
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> WsgiDAVServer:
        """Serve in a background thread; return once the port accepts connections."""
        if self.running:
            return self
        from cheroot import wsgi
        from wsgidav.wsgidav_app import WsgiDAVApp

        self.root.mkdir(parents=True, exist_ok=True)
        logging.getLogger("wsgidav").setLevel(logging.ERROR)  # its start-up warnings are about this set-up
        app = WsgiDAVApp({
            "host": "127.0.0.1",
            "port": self.port,
            "provider_mapping": {self.prefix.rstrip("/"): str(self.root)},
            "simple_dc": {"user_mapping": {"*": True}},  # anonymous read-write
            "verbose": 0,
            "logging": {"enable": False},
        })
        server = wsgi.Server(("127.0.0.1", self.port), app, numthreads=8)
        server.prepare()
        self._server = server
        self._thread = threading.Thread(target=server.serve, daemon=True, name=f"wsgidav-{self.port}")
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if _accepts(self.port):
                return self
            time.sleep(0.02)
        self.go_down()
        raise RuntimeError(f"wsgidav did not start on {self.address}")

    def go_down(self) -> None:
        """Stop listening (connections are refused); keep the files and the port number."""
        server, self._server = self._server, None
        if server is not None:
            server.stop()
            if self._thread is not None:
                self._thread.join(STOP_TIMEOUT)

    def stop(self) -> None:
        """Stop serving. Idempotent."""
        self.go_down()

    def __repr__(self) -> str:
        return f"<WsgiDAVServer {self.url} root={self.root}>"
