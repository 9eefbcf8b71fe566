"""``CeleryWorker``: a real ``celery worker`` process, started and killed by tests and the demo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from ._support import die_with_parent


def end_children_with_the_worker() -> None:
    """On Linux, have a worker's pool processes and embedded beat (``--beat``) end with it.

    Call it in the Celery app module of a worker that :class:`CeleryWorker` starts: its
    SIGKILL then leaves nothing behind. Celery asks Linux to kill pool processes with their
    worker once they run, and embedded beat not at all; a worker killed while it forks them
    would leave them behind. Here each asks, and ends at once if its worker is already gone.
    """
    from celery.signals import beat_init, worker_process_init

    beat_init.connect(_embedded_beat_ends_with_its_worker, dispatch_uid=__name__ + ".beat")
    worker_process_init.connect(_child_ends_with_its_worker, dispatch_uid=__name__ + ".pool")


def _embedded_beat_ends_with_its_worker(**kwargs: object) -> None:
    from billiard.process import current_process

    if current_process().name == "Beat":  # `celery worker --beat`, not a `celery beat` of its own
        _child_ends_with_its_worker()


def _child_ends_with_its_worker(**kwargs: object) -> None:
    from billiard.process import current_process

    parent_pid = current_process()._parent_pid
    if parent_pid is None:  # the worker's own process (the solo pool): its parent is no worker
        return
    die_with_parent(parent_pid=parent_pid)


class CeleryWorker:
    """Runs ``python -m celery -A APP worker`` in its own process group.

    ``env`` is added to the current environment (settings module, broker URL...).
    ``wrapper`` is a command line the worker runs inside (e.g. ``["unshare", "--mount", ...]``
    to give it a view of the filesystem of its own).
    ``start()`` returns once the worker logged that it is ready; ``kill()`` sends SIGKILL
    to the whole group (the main process and its pool children), as a crash would.
    """

    def __init__(
        self, app: str, *, queues: Iterable[str] = ("resto",), pool: str = "prefork", concurrency: int = 2,
        env: Mapping[str, str] | None = None, logfile: str | os.PathLike[str] | None = None,
        extra_args: Iterable[str] = (), hostname: str | None = None, wrapper: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.queues = queues
        self.pool = pool
        self.concurrency = concurrency
        self.env = dict(env or {})
        if logfile is None:
            handle, logfile = tempfile.mkstemp(prefix="resto-worker-", suffix=".log")
            os.close(handle)
        self.logfile = Path(logfile)
        self.extra_args = list(extra_args)
        self.wrapper = list(wrapper)
        self.hostname = hostname or f"resto-test-{os.getpid()}-{id(self):x}@%h"
        self._process: subprocess.Popen[bytes] | None = None
        self._offset = 0

    def command(self) -> list[str]:
        return [
            *self.wrapper,
            sys.executable, "-m", "celery", "-A", self.app, "worker",
            "--pool", self.pool, "--concurrency", str(self.concurrency),
            "--queues", ",".join(self.queues), "--hostname", self.hostname,
            "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat",
            *self.extra_args,
        ]

    def start(self, timeout: float = 60) -> CeleryWorker:
        """Start the worker; wait until it is ready to consume."""
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        self._offset = self.logfile.stat().st_size if self.logfile.exists() else 0
        log = open(self.logfile, "ab")
        self._process = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env}, start_new_session=True, preexec_fn=die_with_parent,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"celery worker exited with {self._process.returncode}:\n{self.log()[-4000:]}")
            if " ready." in self.log():
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"celery worker not ready within {timeout}s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        """What the worker printed since it was last started."""
        try:
            with open(self.logfile, "rb") as handle:
                handle.seek(self._offset)
                return handle.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int | None:
        """The worker's main process id (None before :meth:`start`)."""
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self, timeout: float = 20) -> None:
        """Warm shutdown (SIGTERM: finish the current tasks), then SIGKILL if it takes too long."""
        process = self._process
        if process is None or not self.running:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._reap_group()

    def kill(self) -> None:
        """SIGKILL the worker and its pool children at once, like a crash."""
        if self._process is None:
            return
        try:
            os.killpg(self._process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._process.wait(timeout=10)
        self._reap_group()

    def _reap_group(self) -> None:
        assert self._process is not None  # called once the worker was started
        try:
            os.killpg(self._process.pid, signal.SIGKILL)  # stray pool children
        except ProcessLookupError:
            pass

    def __enter__(self) -> CeleryWorker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
