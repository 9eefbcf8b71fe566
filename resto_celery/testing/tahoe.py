"""A real local Tahoe-LAFS grid for tests: an introducer and one node, on 127.0.0.1.

The node is both the storage server and the client whose web API a ``"kind": "tahoe"``
media host talks to (shares needed, happy and total all 1). ``tahoe-lafs`` is not a
dependency of the project: ``make tahoe`` installs it into ``.venv-tahoe``, which
:func:`find_tahoe` finds (or ``$RESTO_TAHOE``, or ``tahoe`` on PATH)::

    with TahoeGrid(tmp_path / "grid") as grid:
        dircap = grid.make_directory()
        storage = HybridStorage(hosts=[grid.host_entry(dircap)])

Observed with tahoe-lafs 1.20: PUT of a new file 201, of an existing one 200; DELETE 200,
of a missing name 404; writes before the node is connected to a storage server answer
``500 NoServersError``; files of 55 bytes or less live inside their cap (no server
needed), so readiness is judged by the node's own report of a connected server.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from ._support import die_with_parent, free_port

__all__ = ["TahoeDirectory", "TahoeGrid", "TahoeNotFound", "find_tahoe"]

START_TIMEOUT = 90.0
STOP_TIMEOUT = 10.0


class TahoeNotFound(RuntimeError):
    """No ``tahoe`` command: ``make tahoe`` installs one into ``.venv-tahoe``."""


def _project_root() -> Path | None:
    here = Path(__file__).resolve()
    for folder in here.parents:
        if (folder / "pyproject.toml").exists():
            return folder
    return None


def find_tahoe() -> str | None:
    """The ``tahoe`` command: ``$RESTO_TAHOE``, ``.venv-tahoe/bin/tahoe`` (project or cwd), PATH."""
    candidates: list[str | None] = [os.environ.get("RESTO_TAHOE")]
    for folder in (_project_root(), Path.cwd()):
        if folder is not None:
            candidates.append(str(folder / ".venv-tahoe" / "bin" / "tahoe"))
    candidates.append(shutil.which("tahoe"))
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


class TahoeGrid:
    """An introducer and one storage+client node under ``workdir``, started by :meth:`start`."""

    def __init__(self, workdir: str | os.PathLike[str], *, tahoe: str | None = None) -> None:
        found = tahoe or find_tahoe()
        if found is None:
            raise TahoeNotFound("tahoe-lafs is not installed: run `make tahoe` (or set RESTO_TAHOE)")
        self.tahoe = found
        self.workdir = Path(workdir).resolve()
        self.introducer_dir = self.workdir / "introducer"
        self.node_dir = self.workdir / "node"
        self.web_port = free_port()
        self._introducer: subprocess.Popen[bytes] | None = None
        self._node: subprocess.Popen[bytes] | None = None

    @property
    def node_url(self) -> str:
        """The node's web API, e.g. ``http://127.0.0.1:PORT/``."""
        return f"http://127.0.0.1:{self.web_port}/"

    def host_entry(self, dircap: str, **extra: Any) -> dict[str, Any]:
        """A ``RESTO_MEDIA_HOSTS`` entry for the directory ``dircap`` on this grid."""
        return {"url": self.node_url, "kind": "tahoe", "dircap": dircap, **extra}

    # Life cycle

    def start(self) -> TahoeGrid:
        """Create the nodes (first time), run them, return once a storage server is connected."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.introducer_dir.exists():
            port = free_port()
            self._run_tahoe(
                "create-introducer", f"--port=tcp:{port}:interface=127.0.0.1",
                f"--location=tcp:127.0.0.1:{port}", str(self.introducer_dir),
            )
        if self._introducer is None:
            self._introducer = self._spawn(self.introducer_dir)
        furl_file = self.introducer_dir / "private" / "introducer.furl"
        self._wait(furl_file.exists, f"the introducer to write {furl_file}", self.introducer_dir)
        if not self.node_dir.exists():
            port = free_port()
            self._run_tahoe(
                "create-node", f"--introducer={furl_file.read_text().strip()}", "--nickname=resto-test",
                "--shares-needed=1", "--shares-happy=1", "--shares-total=1",
                f"--webport=tcp:{self.web_port}:interface=127.0.0.1",
                f"--port=tcp:{port}:interface=127.0.0.1", f"--location=tcp:127.0.0.1:{port}",
                str(self.node_dir),
            )
        return self._start_node()

    def _start_node(self) -> TahoeGrid:
        if self._node is None:
            self._node = self._spawn(self.node_dir)
        self._wait(self.connected, "the node to connect to its storage server", self.node_dir)
        return self

    @property
    def running(self) -> bool:
        """Whether the node process is alive (see :meth:`go_down`)."""
        return self._node is not None and self._node.poll() is None

    def connected(self) -> bool:
        """Whether the node reports a connected storage server."""
        try:
            status = requests.get(self.node_url, params={"t": "json"}, timeout=2).json()
        except (requests.RequestException, ValueError):
            return False
        return any(
            str(server.get("connection_status", "")).lower().startswith("connected")
            for server in status.get("servers", [])
        )

    def go_down(self) -> None:
        """Stop the node (its web API refuses connections); keep its state and port."""
        self._terminate(self._node)
        self._node = None

    def come_back(self) -> TahoeGrid:
        """Run the node again on the same port; return once it is connected."""
        return self._start_node()

    def stop(self) -> None:
        """Stop the node and the introducer. Idempotent."""
        self._terminate(self._node)
        self._node = None
        self._terminate(self._introducer)
        self._introducer = None

    def __enter__(self) -> TahoeGrid:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # Content

    def make_directory(self) -> str:
        """A new, empty mutable directory: its read-write cap."""
        response = requests.post(self.node_url + "uri", params={"t": "mkdir"}, timeout=30)
        response.raise_for_status()
        return response.text.strip()

    def readonly_cap(self, dircap: str) -> str:
        """The read-only cap of directory ``dircap``."""
        return self._json(dircap, "")[1]["ro_uri"]

    def files(self, dircap: str) -> dict[str, bytes]:
        """Every file under ``dircap``, by '/'-separated path: ``{path: bytes}``."""
        found: dict[str, bytes] = {}
        pending = [""]
        while pending:
            path = pending.pop()
            try:
                _, info = self._json(dircap, path)
            except FileNotFoundError:
                continue
            for name, (child_kind, _) in info.get("children", {}).items():
                child = f"{path}/{name}" if path else name
                if child_kind == "dirnode":
                    pending.append(child)
                elif child_kind == "filenode":
                    response = requests.get(self._url(dircap, child), timeout=30)
                    if response.status_code == 404:
                        continue  # deleted while we listed
                    response.raise_for_status()
                    found[child] = response.content
        return found

    def _url(self, dircap: str, path: str) -> str:
        return f"{self.node_url}uri/{quote(dircap, safe=':')}/{quote(path, safe='/')}"

    def _json(self, dircap: str, path: str) -> Any:
        response = requests.get(self._url(dircap, path), params={"t": "json"}, timeout=30)
        if response.status_code == 404:
            raise FileNotFoundError(path)
        response.raise_for_status()
        return response.json()

    # Processes

    def _run_tahoe(self, *args: str) -> None:
        completed = subprocess.run(
            [self.tahoe, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
        )
        if completed.returncode != 0:
            raise RuntimeError(f"tahoe {args[0]} failed:\n{completed.stdout}\n{completed.stderr}")

    def _spawn(self, node_dir: Path) -> subprocess.Popen[bytes]:
        log = open(node_dir / "resto-run.log", "ab")
        try:
            return subprocess.Popen(
                [self.tahoe, "run", "--allow-stdin-close", str(node_dir)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                preexec_fn=die_with_parent,
            )
        finally:
            log.close()

    def _terminate(self, process: subprocess.Popen[bytes] | None) -> None:
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def _wait(self, predicate: Callable[[], bool], what: str, node_dir: Path) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if predicate():
                return
            for process in (self._introducer, self._node):
                if process is not None and process.poll() is not None:
                    break
            time.sleep(0.2)
        log = node_dir / "resto-run.log"
        tail = log.read_text(errors="replace").strip().splitlines()[-20:] if log.exists() else []
        self.stop()
        raise RuntimeError(f"timed out after {START_TIMEOUT:.0f}s waiting for {what}; {log}:\n" + "\n".join(tail))

    def __repr__(self) -> str:
        return f"<TahoeGrid {self.node_url} {self.workdir}>"


class TahoeDirectory:
    """One directory of a :class:`TahoeGrid` seen as a media host, for tests.

    Has what tests use of other media servers: ``url``, ``host_entry``, ``files()``, and
    ``go_down()``/``come_back()`` (they stop and restart the grid's node).
    """

    def __init__(self, grid: TahoeGrid, dircap: str | None = None, **entry: Any) -> None:
        self.grid = grid
        self.dircap = dircap or grid.make_directory()
        self.entry = entry

    @property
    def url(self) -> str:
        return self.grid.node_url

    @property
    def host_entry(self) -> dict[str, Any]:
        return self.grid.host_entry(self.dircap, **self.entry)

    def files(self) -> dict[str, bytes]:
        return self.grid.files(self.dircap)

    def go_down(self) -> None:
        self.grid.go_down()

    def come_back(self) -> TahoeDirectory:
        self.grid.come_back()
        return self

    def __repr__(self) -> str:
        return f"<TahoeDirectory on {self.grid.node_url}>"
