"""The demo as a new user runs it (issue 12): `make demo-serve`, then the site, the commands.

One served demo (example/demo.py --serve, on a free port, its state under tmp_path) for the
module: the user takes a media host down from the demo's hosts page, uploads, brings the host
back and watches it heal; the example project's commands, run as the demo prints them, see
the demo's hosts. Then every process the demo started must end with it, however it ends.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from resto_celery.testing._support import free_port
from tests.site import wait_until
from tests.test_process_lifetime import assert_all_end, command_line, descendants

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "example" / "demo.py"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the process checks read /proc")


def _clean_env():
    """The user's environment: no test settings module, no RESTO_DEMO_* variables."""
    return {
        name: value for name, value in os.environ.items()
        if name != "DJANGO_SETTINGS_MODULE" and not name.startswith("RESTO_DEMO_")
    }


class Demo:
    def __init__(self, var, *args):
        self.var = var
        self.output = var.parent / "demo-output.txt"
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, str(DEMO), "--var", str(var), "--port", str(self.port), *args],
            stdout=open(self.output, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=_clean_env(), cwd=ROOT,
        )

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def text(self):
        return self.output.read_text(errors="replace")

    def wait_for(self, needle, timeout=180):
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the demo never printed {needle!r}:\n{self.text()[-4000:]}")
            time.sleep(0.1)

    def hosts(self):
        return json.loads(json.loads((self.var / "demo-env.json").read_text())["RESTO_DEMO_HOSTS"])

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    demo = Demo(tmp_path_factory.mktemp("demo") / "var", "--serve")
    demo.wait_for("Quit the server with CONTROL-C.")
    wait_until(lambda: _answers(demo.url), timeout=30, message="the demo's site to answer")
    yield demo
    demo.stop()


def _answers(url):
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def _logged_in(demo):
    session = requests.Session()
    session.get(f"{demo.url}/admin/login/")
    response = session.post(f"{demo.url}/admin/login/", data={
        "username": "admin", "password": "admin", "next": "/admin/",
        "csrfmiddlewaretoken": session.cookies["csrftoken"],
    })
    assert response.url.endswith("/admin/"), "could not log in as admin/admin"
    return session


def _post(session, url, **data):
    response = session.post(url, data={"csrfmiddlewaretoken": session.cookies["csrftoken"], **data})
    assert response.status_code == 200, response.text[:2000]
    return response


def test_serving_the_demo_says_what_to_try_and_not_to_run_itself(served):
    output = served.text()
    assert "make demo-serve" not in output  # it is what runs (point 7)
    assert f"{served.url}/demo/hosts/" in output and "replicationdashboard" in output
    assert "Celery worker with beat" in output


def test_beat_runs_reconcile_in_the_served_demo(served):
    log = served.var / "worker.log"
    wait_until(lambda: "resto_celery.reconcile[" in log.read_text(errors="replace"), timeout=40,
               message="beat to send a reconcile that the worker runs")


def test_the_example_projects_commands_see_the_demos_hosts(served):
    output = served.text()
    lines = output.split("commands see this demo's Redis and hosts", 1)[1].splitlines()[1:3]
    commands = [line.strip() for line in lines]
    assert commands[0].endswith("manage.py resto_status") and commands[1].endswith("manage.py resto_resync --dry-run")
    for command in commands:  # as printed, from another folder, in the user's environment
        result = subprocess.run(command, shell=True, cwd="/", env=_clean_env(), capture_output=True, text=True,
                                timeout=60)
        assert result.returncode in (0, 1), result.stderr[-3000:]  # 1: resto_status saw a problem
        for host in served.hosts():
            assert host in result.stdout, (command, result.stdout, result.stderr[-2000:])


def test_a_host_taken_down_from_the_demo_fails_then_heals_when_it_is_back(served):
    session = _logged_in(served)
    host_2 = served.hosts()[1]
    page = _post(session, f"{served.url}/demo/hosts/", host="2", action="down").text
    assert "Media host 2 is down" in page and "Bring it back" in page
    with pytest.raises(requests.ConnectionError):
        requests.get(host_2, timeout=2)

    content = b"uploaded while media host 2 was down\n"
    response = session.post(
        f"{served.url}/", data={"title": "Outage", "csrfmiddlewaretoken": session.cookies["csrftoken"]},
        files={"file": ("outage-by-hand.txt", content, "text/plain")},
    )
    assert response.status_code == 200
    [name] = re.findall(r"\((documents/outage-by-hand[^)]*\.txt)\)", response.text)
    on_host = {index: served.var / f"media-{index}" / name for index in (1, 2)}
    wait_until(lambda: on_host[1].exists(), timeout=30, message="host 1 to have the upload")

    def dashboard():
        return session.get(f"{served.url}/admin/resto_celery/replicationdashboard/").text

    wait_until(lambda: "down since" in dashboard(), timeout=60, interval=0.5,
               message="the dashboard to show host 2 down")
    assert "Connection refused" in dashboard()
    assert not on_host[2].exists()

    page = _post(session, f"{served.url}/demo/hosts/", host="2", action="up").text
    assert "Media host 2 is back" in page
    wait_until(lambda: on_host[2].exists() and on_host[2].read_bytes() == content, timeout=90, interval=0.5,
               message="host 2 to catch up by itself")


def test_sigterm_ends_the_served_demo_and_everything_it_started(served):
    started = descendants(served.process.pid)
    names = " ".join(command_line(pid) for pid in started)
    assert "redis-server" in names and "celery" in names and "--beat" in names
    served.process.send_signal(signal.SIGTERM)
    served.process.wait(timeout=60)
    assert_all_end(started)
    assert not (served.var / "demo-env.json").exists()


def _children(pid):
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
@pytest.mark.parametrize("serve", [False, True], ids=["scripted", "served"])
def test_the_demo_ends_everything_it_started_on_ctrl_c_and_when_killed(tmp_path, signum, serve):
    demo = Demo(tmp_path / "var", *(["--serve"] if serve else []))
    # Redis, the worker and its pool (and beat, serving) run once the worker is ready.
    demo.wait_for("with beat (reconcile every 10 s): ready" if serve else "Celery worker: ready")
    if serve:  # the worker's children: its pool of 2, and beat
        [worker] = [pid for pid in _children(demo.process.pid) if "celery" in command_line(pid)]
        wait_until(lambda: len(_children(worker)) >= 3, message="beat's own process")
    started = descendants(demo.process.pid)
    assert len(started) >= 3, [command_line(pid) for pid in started]
    demo.process.send_signal(signum)
    demo.process.wait(timeout=60)
    assert_all_end(started)
