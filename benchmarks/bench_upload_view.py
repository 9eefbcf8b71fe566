"""An upload through a real Django view: multipart POST, ``ModelForm``, model save with a ``FileField``.

What a user waits for when a site stores an upload, seen from an HTTP client. The site is
``benchmarks/uploads``: one model per storage under test (a title and a ``FileField``), a
view that validates a ``ModelForm`` over ``request.POST``/``request.FILES``, saves the model
(the file through the storage, then the row: PostgreSQL when it answers) and answers 201
with the file's name and URL. It runs in its own process under a real WSGI server (cheroot,
HTTP/1.1 keep-alive; ``wsgiref`` without it), on 127.0.0.1, with no middleware and a
persistent database connection (``CONN_MAX_AGE``): a site's own middleware, or a new
database connection per request (Django's default), would cost both sides the same, several
milliseconds, and only lower the ratios. The client, in
this process, POSTs with a ``requests`` session (the multipart body is built before the
timer starts).

Django's ``FileSystemStorage`` is the baseline (ratio 1.0); against it ``AsyncStorage``
with no hosts (the atomic master write alone) and with 1 and 3 hosts (master write, then
one Celery message per save to a private Redis, sent as the storage's ``publish`` option
says; no worker runs: the queue fills and is emptied between rounds). 10 KB and 1 MB files (both below Django's 2.5 MB
``FILE_UPLOAD_MAX_MEMORY_SIZE``: the upload stays in memory, as by default).

Warm-up, then rounds; within a round the configurations take turns every 20 requests (the
order rotates from round to round). Reported: the median over rounds of each round's
median latency, its range, and the ratio to ``FileSystemStorage`` of the same size in the
same round; the same for the time the server spent in Django (``X-Bench-App-Ns``).

    python -m benchmarks.bench_upload_view [--quick] [--requests 200] [--rounds 5] [--profile] [--output FILE]

``--profile`` prints a cProfile of the 3-host view, called in this process through
Django's test ``Client`` (no server).
"""
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from benchmarks import common

SIZES = {"10 KB": 10 * 1024, "1 MB": 1024 * 1024}
GOAL_RATIO = 1.2  # issue 11: an upload through a view with AsyncStorage within 1.2x of FileSystemStorage
BLOCK = 20  # requests in a row for one configuration before the next takes its turn
START_TIMEOUT = 30  # seconds for the server process to answer
STORAGES_ENV = "RESTO_BENCH_UPLOAD_STORAGES"
APP_TIME_HEADER = "X-Bench-App-Ns"
QUEUE_WAIT = 10  # seconds the messages of a round may take to reach the queue after its last answer


@dataclass
class Config:
    """One storage configuration: its URL name, label, STORAGES alias and host count."""

    name: str
    label: str
    alias: str
    hosts: int  # None for FileSystemStorage

    @property
    def backend(self):
        return "fs" if self.hosts is None else "async"


CONFIGS = [
    Config("fs", "FileSystemStorage (baseline)", "upload_fs", None),
    Config("async-0", "AsyncStorage, no hosts (master write only)", "upload_async_0", 0),
    Config("async-1", "AsyncStorage, 1 host", "upload_async_1", 1),
    Config("async-3", "AsyncStorage, 3 hosts", "upload_async_3", 3),
]


def storages_setting(workdir, servers):
    """The ``STORAGES`` entries of the upload models: each its own master folder under ``workdir``.

    The 1-host and 3-host storages replicate to different hosts (a host belongs to one master).
    """
    hosts = {0: [], 1: [servers[3].url], 3: [server.url for server in servers[:3]]}
    setting = {}
    for config in CONFIGS:
        location = str(workdir / config.name)
        if config.hosts is None:
            setting[config.alias] = {"BACKEND": "django.core.files.storage.FileSystemStorage",
                                     "OPTIONS": {"location": location}}
        else:
            setting[config.alias] = {"BACKEND": "resto_celery.storage.AsyncStorage",
                                     "OPTIONS": {"location": location, "hosts": hosts[config.hosts]}}
    return setting


class Site:
    """The upload app served by ``benchmarks.uploads.serve`` in a child process."""

    def __init__(self, workdir):
        from resto_celery.testing._support import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = workdir / "server.log"
        self.process = None
        self.server = None

    def start(self):
        import requests

        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.uploads.serve", str(self.port)],
                cwd=common.ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if requests.get(self.url + "ping/", timeout=1).status_code == 200:
                    self.server = "cheroot" if "cheroot" in self.log.read_text() else "wsgiref"
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the upload site did not start; its log:\n{self.log.read_text()[-3000:]}")

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def multipart(data):
    """``(body, content type)`` of a form with a title and a fresh file name."""
    from urllib3 import encode_multipart_formdata

    filename = f"{uuid.uuid4().hex}.bin"
    return encode_multipart_formdata({
        "title": f"upload {filename}",
        "file": (filename, data, "application/octet-stream"),
    })


def time_uploads(session, site, config, data, count, names=None):
    """POST ``count`` uploads of ``data`` to ``config``'s view; ``[(latency ns, app ns)]``.

    The names the view saved are appended to ``names`` when given.
    """
    timings = []
    url = f"{site.url}upload/{config.name}/"
    for _ in range(count):
        body, content_type = multipart(data)
        start = time.perf_counter_ns()
        response = session.post(url, data=body, headers={"Content-Type": content_type})
        latency = time.perf_counter_ns() - start
        if response.status_code != 201:
            raise AssertionError(f"{config.label}: {response.status_code} {response.text[:500]}")
        timings.append((latency, int(response.headers[APP_TIME_HEADER])))
        if names is not None:
            names.append(response.json()["name"])
    return timings


def empty_master(location):
    """Delete every file and folder of a master folder but its marker (the site's identity)."""
    import shutil

    from resto_celery.master import MARKER_NAME

    location.mkdir(parents=True, exist_ok=True)
    for entry in os.scandir(location):
        if entry.name == MARKER_NAME:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


def master_files(location):
    """How many files a master folder holds, its marker left out."""
    from resto_celery.master import MARKER_NAME

    return sum(
        1 for folder, _, names in os.walk(location) for name in names
        if not (name == MARKER_NAME and os.path.samefile(folder, location))
    )


def reset(workdir, broker_url):
    """Empty the master folders, the models' tables and the queue; flush dirty pages to disk."""
    from benchmarks.uploads.models import MODELS

    for config in CONFIGS:
        empty_master(workdir / config.name)
        common.empty_table(MODELS[config.name])
    common.flush_redis(broker_url)
    os.sync()


def queued_text(broker_url, queue="resto"):
    """The bodies of the messages waiting in ``queue``, decoded, as one text."""
    import base64

    import redis

    with redis.Redis.from_url(broker_url) as client:
        raw = client.lrange(queue, 0, -1)
    bodies = []
    for item in raw:
        envelope = json.loads(item)
        body = envelope.get("body", "")
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body).decode("utf-8", "replace")
        bodies.append(body)
    return "\n".join(bodies)


def check_round(workdir, count, broker_url, names):
    """Fail unless the round did its work: every row saved, every file in its master, every change queued.

    ``AsyncStorage`` logs and goes on when the broker refuses a message, which would look
    fast; a benchmark of that would be wrong. A change is found by its file's name in the
    queued messages, however many changes a message carries.
    """
    from benchmarks.uploads.models import MODELS

    for config in CONFIGS:
        rows = MODELS[config.name].objects.count()
        files = master_files(workdir / config.name)
        if rows != count or files != count:
            raise AssertionError(f"{config.label}: {rows} rows and {files} files, expected {count} of each")
    expected = [name for config in CONFIGS if config.hosts for name in names[config.name]]
    # A storage that publishes from a background thread may still be sending the last ones.
    deadline = time.monotonic() + QUEUE_WAIT
    while True:
        text = queued_text(broker_url)
        missing = [name for name in expected if json.dumps(name)[1:-1] not in text]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if missing:
        raise AssertionError(f"{len(missing)} of {len(expected)} changes are not in the queue, e.g. {missing[0]}")


def run_round(session, site, workdir, data, count, broker_url, rotation):
    """One round: blocks of ``BLOCK`` requests, the configurations taking turns; medians by name."""
    reset(workdir, broker_url)
    gc.collect()
    order = CONFIGS[rotation:] + CONFIGS[:rotation]
    timings = {config.name: [] for config in CONFIGS}
    names = {config.name: [] for config in CONFIGS}
    for done in range(0, count, BLOCK):
        for config in order:
            timings[config.name] += time_uploads(
                session, site, config, data, min(BLOCK, count - done), names[config.name],
            )
    check_round(workdir, count, broker_url, names)
    return {
        name: (statistics.median(t[0] for t in values), statistics.median(t[1] for t in values))
        for name, values in timings.items()
    }


def measure(session, site, workdir, size, count, rounds, warmup, broker_url):
    """Warm up, then ``rounds`` rounds for one size: ``{name: {"latency": [...], "app": [...]}}``."""
    data = os.urandom(size)
    reset(workdir, broker_url)
    for config in CONFIGS:
        time_uploads(session, site, config, data, warmup)
    per_round = {config.name: {"latency": [], "app": []} for config in CONFIGS}
    for number in range(rounds):
        medians = run_round(session, site, workdir, data, count, broker_url, rotation=number % len(CONFIGS))
        for name, (latency, app) in medians.items():
            per_round[name]["latency"].append(latency)
            per_round[name]["app"].append(app)
        print(f"  {size} bytes, round {number + 1}/{rounds}: "
              + ", ".join(f"{name} {common.micros(latency)} µs" for name, (latency, _) in medians.items()), flush=True)
    return per_round


def summarize_size(per_round):
    """Per configuration: latency and app time (ns), and their ratios to the baseline, round by round."""
    baseline = per_round[CONFIGS[0].name]
    summary = {}
    for config in CONFIGS:
        entry = {"label": config.label, "hosts": config.hosts}
        for key in ("latency", "app"):
            values = per_round[config.name][key]
            entry[f"{key}_ns"] = common.summarize(values)
            entry[f"{key}_round_medians_ns"] = values
            entry[f"{key}_ratio"] = common.summarize([v / b for v, b in zip(values, baseline[key], strict=True)])
        summary[config.name] = entry
    return summary


def table_rows(results, key):
    rows = []
    for size, configs in results.items():
        for entry in configs.values():
            value, ratio = entry[f"{key}_ns"], entry[f"{key}_ratio"]
            rows.append([
                size, entry["label"], common.micros(value["median"]),
                f"{common.micros(value['min'])} – {common.micros(value['max'])}",
                common.ratio(ratio["median"]), f"{common.ratio(ratio['min'])} – {common.ratio(ratio['max'])}",
            ])
    return rows


def goals(results):
    verdicts = []
    for size, configs in results.items():
        for entry in configs.values():
            if not entry["hosts"]:
                continue
            ratio, app = entry["latency_ratio"], entry["app_ratio"]
            verdicts.append({
                "goal": f"{entry['label']}, {size}: an upload through the view within {GOAL_RATIO:g}x of "
                        f"FileSystemStorage's (client latency)",
                "met": ratio["median"] <= GOAL_RATIO,
                "detail": f"median ratio {common.ratio(ratio['median'])}, rounds {common.ratio(ratio['min'])} – "
                          f"{common.ratio(ratio['max'])}; time in Django {common.ratio(app['median'])}",
            })
    return verdicts


def profile_view(count):
    """cProfile ``count`` 10 KB uploads to the 3-host view through Django's test ``Client`` (in this process)."""
    from django.core.files.uploadedfile import SimpleUploadedFile
    from django.test import Client

    client = Client()
    data = os.urandom(10 * 1024)

    def uploads():
        for index in range(count):
            upload = SimpleUploadedFile(f"{uuid.uuid4().hex}.bin", data, "application/octet-stream")
            response = client.post("/upload/async-3/", {"title": f"profile {index}", "file": upload})
            assert response.status_code == 201, response.content

    common.print_profile(f"{count} uploads through the view, AsyncStorage 3 hosts, 10 KB (test Client)", uploads)


def main(argv=None):
    parser = common.argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, help="uploads per configuration per round (default 200)")
    parser.add_argument("--rounds", type=int, help="rounds (default 5)")
    args = parser.parse_args(argv)
    count = args.requests or (20 if args.quick else 200)
    rounds = args.rounds or (2 if args.quick else 5)
    warmup = 5 if args.quick else 50

    import requests

    from resto_celery.testing import MediaServer

    with common.private_redis() as redis_server, tempfile.TemporaryDirectory(prefix="resto-bench-upload-") as temp:
        workdir = Path(temp)
        servers = [MediaServer().start() for _ in range(4)]  # no worker runs: they receive nothing
        site = None
        try:
            os.environ[STORAGES_ENV] = json.dumps(storages_setting(workdir / "masters", servers))
            from django.conf import settings

            common.setup_django()
            # The server process must use the database this one set up.
            os.environ["RESTO_BENCH_DATABASE"] = (
                "postgres" if settings.DATABASES["default"]["ENGINE"].endswith("postgresql") else "sqlite"
            )
            app = common.celery_app()  # noqa: F841 - the current app, for --profile's in-process saves
            environment = common.environment()
            from django.core.files.storage import storages

            publish = getattr(storages["upload_async_1"].options, "publish", "inline")
            site = Site(workdir).start()
            print(f"site at {site.url} ({site.server}), database {environment['database']}", flush=True)
            results = {}
            with requests.Session() as session:
                session.trust_env = False
                for size_label, size in SIZES.items():
                    per_round = measure(session, site, workdir / "masters", size, count, rounds, warmup,
                                        redis_server.url)
                    results[size_label] = summarize_size(per_round)
            if args.profile:
                reset(workdir / "masters", redis_server.url)
                profile_view(count)
        finally:
            if site is not None:
                site.stop()
            for server in servers:
                server.stop()
            os.environ.pop(STORAGES_ENV, None)

    headers = ["size", "storage", "median µs", "round medians µs (min – max)", "ratio", "ratio (min – max)"]
    return common.write_result(
        args, "bench_upload_view", "An upload through a Django view",
        (
            f"A multipart POST (a title and a file, fresh names) to a Django view that validates a `ModelForm` and "
            f"saves the model (the file through its `FileField`'s storage, then the row in the bench database) and "
            f"answers 201 with the file's URL. The site runs in its own process under {site.server if site else '?'} "
            f"on 127.0.0.1, no middleware, a persistent database connection (`CONN_MAX_AGE`); the client is a "
            f"`requests` session in the benchmark's process (the body "
            f"is built before the timer starts). {count} uploads per configuration per round, {rounds} rounds "
            f"(configurations take turns every {BLOCK} requests), after {warmup} warm-up uploads each. Latency: "
            f"median over rounds of each round's median, and the range of the round medians. Ratio: to "
            f"FileSystemStorage of the same size in the same round (median and range over rounds). AsyncStorage "
            f"publishes to a private Redis (option `publish={publish!r}`; no worker runs). Time in Django: from "
            f"the request reaching Django's WSGI handler to the start of its response (body read, form, model "
            f"save), as the server reports it."
        ),
        parameters={"requests_per_round": count, "rounds": rounds, "warmup": warmup, "sizes": SIZES,
                    "server": site.server if site else None, "publish": publish},
        environment=environment,
        results=results,
        tables=[
            {"title": "Upload latency seen by the client (µs)", "headers": headers,
             "rows": table_rows(results, "latency")},
            {"title": "Time in Django, as the server reports it (µs)", "headers": headers,
             "rows": table_rows(results, "app")},
        ],
        goals=goals(results),
        notes=[
            "Both uploads sizes stay in memory (Django's `FILE_UPLOAD_MAX_MEMORY_SIZE` is 2.5 MB): the storage "
            "writes them from memory. Each configuration has its own master folder; between rounds the folders, "
            "the tables and the queue are emptied and dirty pages flushed (`os.sync()`).",
            "The difference between the configurations is the storage's `save()` inside the view: compare with "
            "`bench_save`, which times `save()` alone.",
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
