"""A real nginx media server for tests: serves a folder by GET and accepts PUT/DELETE.

It runs the system's nginx binary (Debian package ``nginx``, which has the dav module)
with its own prefix folder, on a loopback port, using the same ``nginx_media.conf`` that
production configurations include, and ``nginx_listing.conf`` for folder URLs (a GET of
a folder answers nginx's JSON autoindex, which ``resto_resync`` lists hosts with)::

    with NginxMediaServer(tmp_path / "media") as server:
        requests.put(server.url + "a/b.txt", data=b"hi")
        assert server.files() == {"a/b.txt": b"hi"}
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from ._support import folder_files, free_port

__all__ = ["LISTING_CONF", "MEDIA_CONF", "NginxMediaServer", "NginxNotFound", "find_nginx"]

#: The location body shared by the tests and the deployment configurations.
MEDIA_CONF = Path(__file__).with_name("nginx_media.conf")
#: The body of the nested location for folder URLs: JSON folder listings (autoindex).
LISTING_CONF = Path(__file__).with_name("nginx_listing.conf")
#: nginx's own ``mime.types``: files are served with the type of their extension.
MIME_TYPES_CONF = Path(__file__).with_name("nginx_mime_types.conf")

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def _stop_with_parent() -> None:
    """In nginx's master (``preexec_fn``): have Linux send it SIGTERM, a fast shutdown that
    takes its workers along, when the thread that started it ends. SIGKILL would leave the
    workers running, orphaned, on the port."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class NginxNotFound(RuntimeError):
    """The nginx binary is not installed."""


def find_nginx() -> str | None:
    """Return the nginx binary to use: ``$NGINX``, then ``nginx`` on PATH, then /usr/sbin/nginx."""
    candidates = [os.environ.get("NGINX"), shutil.which("nginx"), "/usr/sbin/nginx"]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _quote(path: str | os.PathLike[str]) -> str:
    """Quote a path for nginx.conf."""
    text = str(path).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


class NginxMediaServer:
    """An nginx process serving ``root`` under ``prefix``, writable by PUT/DELETE from 127.0.0.1.

    ``root`` is the folder whose file ``root/x/y`` is served at ``url + "x/y"``; ``prefix``
    is the URL path of the location (it must start and end with '/'). ``port=0`` picks a
    free port once: it is kept across :meth:`go_down`/:meth:`come_back`. ``tls`` is None or
    a ``(certfile, keyfile)`` pair to serve HTTPS. ``workdir`` is nginx's prefix folder
    (configuration, logs, temporary files, pid); by default a new temporary folder, which
    :meth:`stop` removes. ``nginx`` is the binary, by default :func:`find_nginx`.

    ``user`` gives the arguments of nginx's ``user`` directive: the account its workers run
    as when the master runs as root (e.g. ``"nobody nogroup"``, as the official image's
    ``user nginx;``). By default they run as root when the tests do, so that they can
    write into any ``root``. With a ``user``, the worker must be able to reach ``root``
    and ``workdir`` (every parent folder searchable) and to write into ``root``: nginx
    gives it the temporary folders it creates, and a default ``workdir`` is made
    searchable.

    ``server_config`` is the text of the ``server`` block(s) to run instead of the one
    built from ``prefix``, ``port``, ``tls`` and ``root`` (e.g. a deployment's
    ``conf.d`` file with its port and paths adapted); it should listen on
    :attr:`address` for :meth:`start` to see nginx come up.

    ``listing`` (default True) lists folders: a GET of a folder URL (ending in '/') from
    127.0.0.1 answers nginx's JSON autoindex (``LISTING_CONF``); files are served and
    written as without it. ``listing=False`` gives a host that cannot list (GET of a
    folder: 403), as nginx's default.

    Requests are logged in ``workdir/access.log``, in nginx's ``combined`` format followed
    by ``$msec``: when the request ended, in seconds since the epoch, to the millisecond.
    """

    def __init__(
        self, root: str | os.PathLike[str], *, prefix: str = "/media/", port: int = 0,
        tls: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None, nginx: str | None = None,
        workdir: str | os.PathLike[str] | None = None, user: str | None = None, server_config: str | None = None,
        listing: bool = True,
    ) -> None:
        if not (prefix.startswith("/") and prefix.endswith("/")):
            raise ValueError(f"prefix must start and end with '/', not {prefix!r}")
        found = nginx or find_nginx()
        if found is None:
            raise NginxNotFound(
                "nginx is not installed: run `apt-get install nginx` (Debian/Ubuntu), "
                "or set the NGINX environment variable to the binary."
            )
        self.nginx = found
        self.root = Path(root).resolve()
        self.prefix = prefix
        self.port = port or free_port()
        self.tls = tuple(Path(p).resolve() for p in tls) if tls else None
        self._owns_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="resto-nginx-")).resolve()
        if user and self._owns_workdir:
            self.workdir.chmod(0o755)  # mkdtemp makes it 0700: the workers need its temp folders
        self.user = user
        self.server_config = server_config
        self.listing = listing
        self._process: subprocess.Popen[bytes] | None = None

    # Addresses -------------------------------------------------------------------------

    @property
    def scheme(self) -> str:
        """``"https"`` with tls, else ``"http"``."""
        return "https" if self.tls else "http"

    @property
    def address(self) -> str:
        """``"127.0.0.1:PORT"``."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The URL of the media root, ending in '/', e.g. ``http://127.0.0.1:PORT/media/``."""
        return f"{self.scheme}://{self.address}{self.prefix}"

    @property
    def error_log(self) -> Path:
        """nginx's error log (the place to look when a request fails with 500)."""
        return self.workdir / "error.log"

    @property
    def _pid_file(self) -> Path:
        return self.workdir / "nginx.pid"

    @property
    def pid(self) -> int | None:
        """The process id of the nginx master (its workers are its children), or None."""
        return self._process.pid if self._process is not None and self.running else None

    @property
    def running(self) -> bool:
        """Whether the nginx master process is alive."""
        return self._process is not None and self._process.poll() is None

    # Life cycle ------------------------------------------------------------------------

    def config(self) -> str:
        """The text of nginx.conf for this server."""
        w = self.workdir
        if self.user:
            user = f"user {self.user};"
        else:
            # As root, workers would otherwise run as nobody and fail to write into root.
            user = "user root;" if os.geteuid() == 0 else ""
        return f"""\
{user}
worker_processes 1;
pid {_quote(self._pid_file)};
error_log {_quote(self.error_log)} warn;

events {{
    worker_connections 256;
}}

http {{
    include {_quote(MIME_TYPES_CONF)};
    default_type application/octet-stream;
    log_format resto_combined_msec '$remote_addr - $remote_user [$time_local] "$request" $status '
                                   '$body_bytes_sent "$http_referer" "$http_user_agent" $msec';
    access_log {_quote(w / "access.log")} resto_combined_msec;
    client_body_temp_path {_quote(w / "temp" / "client_body")};
    proxy_temp_path {_quote(w / "temp" / "proxy")};
    fastcgi_temp_path {_quote(w / "temp" / "fastcgi")};
    uwsgi_temp_path {_quote(w / "temp" / "uwsgi")};
    scgi_temp_path {_quote(w / "temp" / "scgi")};

{self.server_config if self.server_config is not None else self._server_block()}
}}
"""

    def _server_block(self) -> str:
        listen = f"listen {self.address} ssl;" if self.tls else f"listen {self.address};"
        tls = ""
        if self.tls:
            cert, key = self.tls
            tls = f"ssl_certificate {_quote(cert)};\n        ssl_certificate_key {_quote(key)};"
        listing = ""
        if self.listing:
            listing = f"""
            # Folder URLs: a JSON listing, to trusted addresses only (see the include).
            location ~ /$ {{
                allow 127.0.0.1;
                deny all;
                include {_quote(LISTING_CONF)};
            }}"""
        return f"""\
    server {{
        {listen}
        server_name localhost;
        {tls}

        location {self.prefix} {{
            alias {_quote(str(self.root) + "/")};
            # Writes only from trusted addresses (see the SECURITY note in the include).
            limit_except GET {{
                allow 127.0.0.1;
                deny all;
            }}
            include {_quote(MEDIA_CONF)};{listing}
        }}
    }}"""

    def start(self) -> NginxMediaServer:
        """Write nginx.conf and run nginx in the foreground; return once the port accepts TCP.

        Raise RuntimeError, with the end of nginx's error log, if it does not come up
        within 10 seconds.
        """
        if self.running:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        (self.workdir / "temp").mkdir(parents=True, exist_ok=True)
        (self.workdir / "nginx.conf").write_text(self.config())
        self._pid_file.unlink(missing_ok=True)
        command = [
            self.nginx, "-p", str(self.workdir), "-c", "nginx.conf",
            "-e", str(self.error_log), "-g", "daemon off;",
        ]
        with open(self.workdir / "stdout.log", "ab") as out, \
                open(self.workdir / "stderr.log", "ab") as err:
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                cwd=self.workdir, start_new_session=True, preexec_fn=_stop_with_parent,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            if self._listening():
                return self
            time.sleep(0.02)
        self._terminate()
        raise RuntimeError(
            f"nginx did not start on {self.address}; end of {self.error_log}:\n{self._log_tail()}"
        )

    def stop(self) -> None:
        """Stop nginx (gracefully if it can) and remove a temporary workdir. Idempotent."""
        self._terminate()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def go_down(self) -> None:
        """Stop serving (connections are refused) but keep the files, port and workdir."""
        self._terminate()

    def come_back(self) -> NginxMediaServer:
        """Serve again, on the same port, the same files."""
        return self.start()

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        # QUIT is a graceful shutdown, TERM a fast one; KILL the whole group (the workers too).
        for sig in (signal.SIGQUIT, signal.SIGTERM):
            if process.poll() is not None:
                break
            process.send_signal(sig)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def _listening(self) -> bool:
        # nginx writes its pid file once its sockets are bound: a connection before that
        # could reach another program on the port (nginx retries a busy port for ~2.5 s).
        try:
            if self._process is None or self._pid_file.read_text().strip() != str(self._process.pid):
                return False
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def _log_tail(self, lines: int = 20) -> str:
        for log in (self.error_log, self.workdir / "stderr.log"):
            try:
                text = log.read_text(errors="replace").strip()
            except OSError:
                continue
            if text:
                return "\n".join(text.splitlines()[-lines:])
        return "(empty)"

    def __enter__(self) -> NginxMediaServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<NginxMediaServer {self.url} root={self.root} {state}>"

    # Content ---------------------------------------------------------------------------

    def files(self) -> dict[str, bytes]:
        """Every file under root, by '/'-separated path relative to root (see :func:`folder_files`)."""
        return folder_files(self.root)
