"""What the tests and the demo start ends with them (issue 12, point 6).

A child Python process starts a server, prints the ids of its processes and waits; the test
then ends that parent (SIGTERM with Python's default action, SIGINT, or SIGKILL, which no
cleanup code sees) and the server must be gone within seconds: Linux's PR_SET_PDEATHSIG,
set in the server's ``preexec_fn``, ends it. The demo itself: tests/test_demo.py.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")


def alive(pid):
    """Whether ``pid`` runs (a zombie has ended: it only waits for its parent to read it)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def descendants(pid):
    """Every process below ``pid`` now (children, their children...), by /proc's parent ids."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def command_line(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError):
        return "(gone)"


def assert_all_end(pids, timeout=15):
    """Wait until none of ``pids`` runs; fail naming those that outlived ``timeout``, and end them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.1)
    survivors = {pid: command_line(pid) for pid in pids if alive(pid)}
    for pid in survivors:  # leave nothing behind, even when failing
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"outlived their parent: {survivors}"


def _run_parent(tmp_path, code):
    """A child Python that runs ``code`` (which prints a line when ready), then sleeps."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(code) + "\nprint('ready', flush=True)\nimport time\ntime.sleep(120)\n")
    process = subprocess.Popen(
        [sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.strip() == "ready":
            return process
    process.wait()
    pytest.fail("the parent process did not start its server:\n" + "".join(lines))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_a_redis_server_ends_with_its_parent(tmp_path, signum):
    parent = _run_parent(tmp_path, f"""
        from resto_celery.testing.redis_server import RedisServer
        server = RedisServer(workdir={str(tmp_path / "redis")!r}).start()
    """)
    servers = descendants(parent.pid)
    assert [command_line(pid).split()[0].rsplit("/", 1)[-1] for pid in servers] == ["redis-server"]
    parent.send_signal(signum)
    parent.wait(timeout=10)
    assert_all_end(servers, timeout=5)


@pytest.mark.nginx
def test_nginx_and_its_workers_end_with_their_parent(tmp_path):
    parent = _run_parent(tmp_path, f"""
        from resto_celery.testing.nginx import NginxMediaServer
        server = NginxMediaServer({str(tmp_path / "root")!r}, workdir={str(tmp_path / "nginx")!r}).start()
    """)
    processes = descendants(parent.pid)
    deadline = time.monotonic() + 5
    while len(processes) < 2 and time.monotonic() < deadline:  # the master, then its worker
        time.sleep(0.05)
        processes = descendants(parent.pid)
    assert len(processes) == 2, [command_line(pid) for pid in processes]
    parent.kill()  # SIGKILL: no cleanup code runs in the parent
    parent.wait(timeout=10)
    assert_all_end(processes, timeout=10)


def test_a_celery_worker_and_its_pool_end_with_their_parent(tmp_path, redis_url):
    parent = _run_parent(tmp_path, f"""
        from resto_celery.testing.worker import CeleryWorker
        worker = CeleryWorker(
            "tests.celery_app", concurrency=2, logfile={str(tmp_path / "worker.log")!r},
            env={{"RESTO_TEST_BROKER_URL": {redis_url!r}, "RESTO_TEST_DATABASE": "sqlite",
                 "RESTO_TEST_DB_NAME": {str(tmp_path / "db.sqlite3")!r}, "DJANGO_SETTINGS_MODULE": "tests.settings"}},
        ).start()
    """)
    processes = descendants(parent.pid)
    assert len(processes) >= 3, [command_line(pid) for pid in processes]  # the worker and its pool
    parent.kill()
    parent.wait(timeout=10)
    assert_all_end(processes, timeout=10)


def test_a_child_whose_parent_died_before_it_asked_to_die_with_it_ends_when_it_asks(tmp_path):
    """Celery's pool processes and embedded beat ask only once they run: a worker killed in
    between must not leave them behind (the demo passes the worker's pid)."""
    parent = _run_parent(tmp_path, """
        import os, sys, time
        from resto_celery.testing._support import die_with_parent
        parent = os.getpid()
        if os.fork() == 0:
            os.dup2(os.open(os.devnull, os.O_RDWR), 1)  # let the test's pipe close with the parent
            for _ in range(1000):  # until the test has killed the parent
                if os.getppid() != parent:
                    break
                time.sleep(0.01)
            die_with_parent(parent_pid=parent)
            time.sleep(120)
            os._exit(0)
    """)
    [child] = descendants(parent.pid)
    parent.kill()
    parent.wait(timeout=10)
    assert_all_end([child], timeout=10)


def test_a_solo_worker_is_not_tied_to_the_process_that_launched_it():
    """The solo pool sends worker_process_init in the worker's own process: a worker started
    by hand (``nohup celery ... -P solo &``) must outlive its shell."""
    code = textwrap.dedent("""
        import ctypes
        from resto_celery.testing.worker import end_children_with_the_worker
        from celery.signals import worker_process_init
        end_children_with_the_worker()
        worker_process_init.send(sender=None)
        signal = ctypes.c_int()
        ctypes.CDLL("libc.so.6").prctl(2, ctypes.byref(signal))  # PR_GET_PDEATHSIG
        print(signal.value)
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"
