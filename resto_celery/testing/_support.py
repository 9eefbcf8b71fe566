"""What the test servers share: free ports, children that die with us, a folder's files."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def die_with_parent(parent_pid: int | None = None) -> None:
    """In a child process (``preexec_fn``): ask Linux to SIGKILL it when the process that
    started it dies, so a killed test run leaves no server or worker behind.

    Linux only watches from this call on. A child that asks some time after it was forked
    (a Celery pool process, embedded beat) passes the pid of the process that forked it:
    if that one is already gone, the child ends here instead of living on as an orphan.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def folder_files(root: str | os.PathLike[str]) -> dict[str, bytes]:
    """Every file under ``root``, by '/'-separated relative path: ``{path: bytes}``.

    A file deleted between listing and reading is left out: the snapshot is what was
    there, never an error while a server is deleting files.
    """
    found: dict[str, bytes] = {}
    for folder, _dirs, names in os.walk(root):
        for name in names:
            path = Path(folder, name)
            try:
                found[path.relative_to(root).as_posix()] = path.read_bytes()
            except FileNotFoundError:
                continue
    return found
