"""Request latency of ``save()``: what a web request pays to store an upload.

Django's ``FileSystemStorage.save()`` is the baseline (ratio 1.0). Against it, for 10 KB
and 1 MB files:

- ``AsyncStorage`` with no hosts: the atomic master write alone;
- ``AsyncStorage`` with 1 and 3 hosts: the master write plus one Celery message per save
  (a worker fans it out to the hosts),
  published to a private Redis (no worker runs: the queue fills and is emptied between
  rounds);
- ``HybridStorage`` with 1 and 3 hosts: the master write plus a PUT to every host, within
  the request, to real nginx hosts on 127.0.0.1 whose folders are in memory (``/dev/shm``:
  a media host's disk belongs to another machine, and here its writes would slow the
  master's), or, without nginx, to ``MediaServer``s in this process, whose CPU the clients
  then share.

Each configuration is warmed up, then timed save by save for ``--saves`` saves per round
and ``--rounds`` rounds; within a round the configurations take turns every 20 saves, so
that all see the same noise. What a configuration leaves running after its turn (the
publisher thread's last messages, django-resto's ``AsyncStorage`` threads) ends before
the next one's turn starts, so it is not timed as the next configuration's. Each save has
a fresh name, so no ``get_available_name`` loop runs. Reported: the median over rounds of
each round's median latency, the range of the round medians, and the ratio to
``FileSystemStorage`` of the same size in the same round; and our ``HybridStorage`` against
django-resto 1.3's (installed with ``.[bench]``), round by round (goal: 0.7x with 3 hosts).

Run alone: ``.venv/bin/python -m benchmarks.bench_save [--quick] [--output FILE]``.
"""
import collections
import gc
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from benchmarks import common

SIZES = {"10 KB": 10 * 1024, "1 MB": 1024 * 1024}
GOAL_RATIO = 2.0  # AsyncStorage.save() within 2x of FileSystemStorage.save()
HYBRID_GOAL = 0.7  # our HybridStorage.save(), 3 hosts, within 0.7x of django-resto 1.3's
BLOCK = 20  # saves in a row for one configuration before the next takes its turn


@dataclass
class Case:
    """One storage configuration under test."""

    label: str
    backend: str  # "fs", "async" or "hybrid"
    storage: object
    servers: list = field(default_factory=list)

    @property
    def location(self):
        return Path(self.storage.location)


def build_cases(workdir, servers):
    """The storages to compare, each with its own master folder under ``workdir``."""
    from django.core.files.storage import FileSystemStorage

    from resto_celery.storage import AsyncStorage, HybridStorage

    def where(name):
        return str(workdir / name)

    def urls(count):
        return [server.url for server in servers[:count]]

    cases = [
        Case("FileSystemStorage (baseline)", "fs", FileSystemStorage(location=where("fs"))),
        Case("AsyncStorage, no hosts (master write only)", "async", AsyncStorage(location=where("async-0"), hosts=[])),
        Case("AsyncStorage, 1 host", "async", AsyncStorage(location=where("async-1"), hosts=urls(1)), servers[:1]),
        Case("AsyncStorage, 3 hosts", "async", AsyncStorage(location=where("async-3"), hosts=urls(3)), servers[:3]),
        Case("HybridStorage, 1 host", "hybrid", HybridStorage(location=where("hybrid-1"), hosts=urls(1)), servers[:1]),
        Case("HybridStorage, 3 hosts", "hybrid", HybridStorage(location=where("hybrid-3"), hosts=urls(3)), servers[:3]),
    ]
    return cases + django_resto_cases(where, servers)


def django_resto_cases(where, servers):
    """django-resto 1.3's ``HybridStorage`` and ``AsyncStorage`` (threads), when installed.

    It takes hosts as ``host:port`` and the path from ``base_url``; its ``AsyncStorage``
    starts one thread per host and returns, so its PUTs land after ``save()``.
    """
    try:
        from django_resto import storage as resto13
    except ImportError:
        print("  django-resto is not installed (pip install -e '.[bench]'): its rows are left out")
        return []

    def hosts(count):
        return [server.address for server in servers[:count]]

    cases = []
    for backend, cls in (("resto13-hybrid", resto13.HybridStorage), ("resto13-async", resto13.AsyncStorage)):
        for count in (1, 3):
            storage = cls(hosts=hosts(count), base_url="/media/", location=where(f"{backend}-{count}"))
            label = f"django-resto 1.3 {cls.__name__}, {count} host{'s' if count > 1 else ''}"
            cases.append(Case(label, backend, storage, servers[:count]))
    return cases


def time_saves(storage, data, count):
    """Save ``count`` fresh files of ``data``; return each ``save()``'s latency in ns."""
    from django.core.files.base import ContentFile

    latencies = []
    for _ in range(count):
        name = f"uploads/{uuid.uuid4().hex}.bin"
        content = ContentFile(data)
        start = time.perf_counter_ns()
        saved = storage.save(name, content)
        latencies.append(time.perf_counter_ns() - start)
        if saved != name:
            raise AssertionError(f"{name} was saved as {saved}: the benchmark expected fresh names")
    return latencies


class NginxHost:
    """An nginx media host whose folder is in memory, with the part of ``MediaServer``'s API
    this benchmark uses (``url``, ``address``, ``requests`` read from its access log,
    ``clear``, ``clear_requests``, ``stop``)."""

    LOG_LINE = re.compile(r'"(?P<method>[A-Z]+) [^"]*" (?P<status>\d{3}) ')

    def __init__(self):
        from resto_celery.testing.nginx import NginxMediaServer

        memory = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.folder = Path(tempfile.mkdtemp(prefix="resto-bench-save-host-", dir=memory))
        self.root = self.folder / "media"
        # nginx's request bodies land in its workdir, then move into the root: one file system.
        self.server = NginxMediaServer(self.root, workdir=self.folder / "nginx", listing=False).start()
        self.url, self.address = self.server.url, self.server.address
        self._skip = 0

    def _log_lines(self):
        try:
            return (self.server.workdir / "access.log").read_text().splitlines()
        except FileNotFoundError:
            return []

    @property
    def requests(self):
        found = (self.LOG_LINE.search(line) for line in self._log_lines()[self._skip:])
        return [SimpleNamespace(method=m["method"], status=int(m["status"])) for m in found if m]

    def clear(self):
        for entry in os.scandir(self.root):
            shutil.rmtree(entry.path) if entry.is_dir() else os.unlink(entry.path)

    def clear_requests(self):
        self._skip = len(self._log_lines())  # lines, not the requests parsed from them

    def stop(self):
        self.server.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __repr__(self):
        return f"nginx at {self.url}"


def media_hosts(count=3):
    """``count`` nginx hosts in memory, or ``MediaServer``s in this process without nginx."""
    from resto_celery.testing import MediaServer
    from resto_celery.testing.nginx import find_nginx

    if find_nginx() is None:
        print("  nginx is not installed: HybridStorage PUTs to MediaServers in this process")
        return [MediaServer().start() for _ in range(count)]  # in memory, emptied every round
    return [NginxHost() for _ in range(count)]


def reset(cases, broker_url):
    """Empty the master folders, the media servers and the broker; flush dirty pages to disk.

    ``os.sync()`` keeps the writes of one round from being written back during the next.
    """
    servers = {server for case in cases for server in case.servers}
    wait_for_quiet(servers)
    for case in cases:
        shutil.rmtree(case.location, ignore_errors=True)
        case.location.mkdir(parents=True)
    for server in servers:
        server.clear()
        server.clear_requests()
    common.flush_redis(broker_url)
    os.sync()


def wait_for_quiet(servers, quiet=0.3, limit=30):
    """Wait until no server has received a request for ``quiet`` seconds (at most ``limit``).

    django-resto's ``AsyncStorage`` may still be PUTting from its threads after ``save()``.
    """
    deadline = time.monotonic() + limit
    last = None
    while time.monotonic() < deadline:
        seen = sum(len(server.requests) for server in servers)
        if seen == last:
            return
        last = seen
        time.sleep(quiet)


def check_replicated(cases, saves, broker_url):
    """Fail unless the round really did its work: every message queued, every PUT answered.

    ``AsyncStorage`` logs and goes on when the broker refuses a message, which would look
    fast; a benchmark of that would be wrong.
    """
    # One change per save (a worker fans it out to the hosts), none without hosts; the
    # publisher thread sends a burst of them as one message.
    from resto_celery import publisher

    if not publisher.flush(timeout=60):
        raise AssertionError("the publisher thread did not send the round's changes within 60 s")
    expected = saves * sum(1 for case in cases if case.backend == "async" and case.servers)
    found = common.queued_changes(broker_url)
    if found != expected:
        raise AssertionError(f"{found} changes in the queue, expected {expected}")
    puts = collections.Counter(server for case in cases if case.backend != "async" for server in case.servers)
    for server, count in puts.items():
        # django-resto's AsyncStorage PUTs from threads of its own: give them a moment to land.
        deadline = time.monotonic() + 30
        while True:
            answered = [r for r in server.requests if r.method == "PUT" and r.status in (200, 201, 204)]
            if len(answered) >= count * saves or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if len(answered) != count * saves:
            raise AssertionError(f"{server} answered {len(answered)} PUTs, expected {count * saves}")


def settle(case, threads_before):
    """Let what ``case`` left running after its turn end: the publisher thread's messages,
    django-resto's ``AsyncStorage`` threads (started during the turn; one per host and save)."""
    from resto_celery import publisher

    if case.backend == "async" and not publisher.flush(timeout=60):
        raise AssertionError("the publisher thread did not send a turn's changes within 60 s")
    if case.backend == "resto13-async":
        for thread in set(threading.enumerate()) - threads_before:
            thread.join(timeout=30)


def run_round(cases, data, saves, broker_url, rotation):
    """One round: blocks of ``BLOCK`` saves, the cases taking turns block by block.

    Fine-grained turns make every case see the same disk and CPU noise as the baseline.
    The order starts at ``rotation``. Returns ``{label: median ns}``.
    """
    reset(cases, broker_url)
    gc.collect()
    order = cases[rotation:] + cases[:rotation]
    latencies = {case.label: [] for case in cases}
    for done in range(0, saves, BLOCK):
        for case in order:
            before = set(threading.enumerate())
            latencies[case.label] += time_saves(case.storage, data, min(BLOCK, saves - done))
            settle(case, before)
    check_replicated(cases, saves, broker_url)
    return {case.label: statistics.median(latencies[case.label]) for case in cases}


def measure(cases, size, saves, rounds, warmup, broker_url):
    """Warm up, then ``rounds`` rounds for one file size; return ``{label: [round medians]}``."""
    data = os.urandom(size)
    reset(cases, broker_url)
    for case in cases:
        time_saves(case.storage, data, warmup)
    per_round = {case.label: [] for case in cases}
    for number in range(rounds):
        medians = run_round(cases, data, saves, broker_url, rotation=number % len(cases))
        for label, median in medians.items():
            per_round[label].append(median)
        print(f"  {size} bytes, round {number + 1}/{rounds}: "
              + ", ".join(f"{label.split(' (')[0]} {common.micros(m)} µs" for label, m in medians.items()))
    return per_round


def summarize_size(cases, per_round):
    """Per case: latency summary (ns) and ratio summary to the baseline, round by round."""
    baseline = per_round[cases[0].label]
    summary = {}
    for case in cases:
        medians = per_round[case.label]
        ratios = [value / base for value, base in zip(medians, baseline, strict=True)]
        summary[case.label] = {
            "hosts": len(case.servers),
            "latency_ns": common.summarize(medians),
            "round_medians_ns": medians,
            "ratio": common.summarize(ratios),
        }
    return summary


def hybrid_against_django_resto(results):
    """``{size: {hosts: ratio summary}}``: our HybridStorage's round medians over django-resto 1.3's."""
    compared = {}
    for size, cases in results.items():
        for hosts in (1, 3):
            ours = cases.get(f"HybridStorage, {hosts} host{'s' if hosts > 1 else ''}")
            theirs = cases.get(f"django-resto 1.3 HybridStorage, {hosts} host{'s' if hosts > 1 else ''}")
            if ours and theirs:
                ratios = [a / b for a, b in zip(ours["round_medians_ns"], theirs["round_medians_ns"], strict=True)]
                compared.setdefault(size, {})[hosts] = common.summarize(ratios)
    return compared


def hybrid_rows(compared):
    return [
        [size, hosts, common.ratio(ratio["median"]), f"{common.ratio(ratio['min'])} – {common.ratio(ratio['max'])}"]
        for size, by_hosts in compared.items() for hosts, ratio in by_hosts.items()
    ]


def table_rows(results):
    """Rows of the results table, one per size and case."""
    rows = []
    for size, cases in results.items():
        for label, entry in cases.items():
            latency, ratio = entry["latency_ns"], entry["ratio"]
            rows.append([
                size, label, common.micros(latency["median"]),
                f"{common.micros(latency['min'])} – {common.micros(latency['max'])}",
                common.ratio(ratio["median"]), f"{common.ratio(ratio['min'])} – {common.ratio(ratio['max'])}",
            ])
    return rows


def goals(results, compared):
    """Whether ``AsyncStorage.save()`` stays within 2x of ``FileSystemStorage.save()``, and our
    ``HybridStorage.save()`` with 3 hosts within 0.7x of django-resto 1.3's."""
    verdicts = []
    for size, by_hosts in compared.items():
        if 3 in by_hosts:
            ratio = by_hosts[3]
            verdicts.append({
                "goal": f"HybridStorage, 3 hosts, {size}: save() within {HYBRID_GOAL:g}x of django-resto 1.3's",
                "met": ratio["median"] <= HYBRID_GOAL,
                "detail": f"median ratio {common.ratio(ratio['median'])}, "
                          f"rounds {common.ratio(ratio['min'])} – {common.ratio(ratio['max'])}",
            })
    for size, cases in results.items():
        for label, entry in cases.items():
            if not label.startswith("AsyncStorage") or entry["hosts"] == 0:
                continue
            ratio = entry["ratio"]
            verdicts.append({
                "goal": f"{label}, {size}: save() within {GOAL_RATIO:g}x of FileSystemStorage.save()",
                "met": ratio["median"] <= GOAL_RATIO,
                "detail": f"median ratio {common.ratio(ratio['median'])}, "
                          f"rounds {common.ratio(ratio['min'])} – {common.ratio(ratio['max'])}",
            })
    return verdicts


def time_publishes(publish, count):
    """Call ``publish(index)`` ``count`` times; return the median ns per call."""
    latencies = []
    for index in range(count):
        start = time.perf_counter_ns()
        publish(index)
        latencies.append(time.perf_counter_ns() - start)
    return sorted(latencies)[count // 2]


def publish_ways(app, storage, client):
    """Ways to send one message, from the bare Redis round trip up to ``AsyncStorage.enqueue()``.

    Each is ``run(count) -> median ns per message``.
    """
    host = storage.hosts[0]
    payload = b"x" * 700  # about the size of one resto_celery.upload message

    def lpush(count):
        return time_publishes(lambda index: client.lpush("resto", payload), count)

    def pooled(count):
        return time_publishes(lambda index: storage.enqueue("upload", host, f"pooled/{index}"), count)

    def shared(count):
        with app.producer_or_acquire() as producer:
            return time_publishes(
                lambda index: storage.enqueue("upload", host, f"shared/{index}", producer=producer), count
            )

    return {
        "redis-py LPUSH of a 700-byte message (the floor)": lpush,
        "AsyncStorage.enqueue(), a producer from the pool each time (as save() does)": pooled,
        "AsyncStorage.enqueue(producer=...), one producer for all (as reconcile does)": shared,
    }


def measure_publish(app, storage, broker_url, count, rounds):
    """Median ns per message of each way to publish, per round; ``{label: [medians]}``."""
    import redis

    per_round = {}
    with redis.Redis.from_url(broker_url) as client:
        ways = publish_ways(app, storage, client)
        for run in ways.values():
            run(20)  # warm-up
        for _ in range(rounds):
            for label, run in ways.items():
                common.flush_redis(broker_url)
                per_round.setdefault(label, []).append(run(count))
    common.flush_redis(broker_url)
    return per_round


def publish_rows(per_round):
    """Rows of the publish table: median µs, range, ratio to the raw LPUSH."""
    floor = next(iter(per_round.values()))
    rows = []
    for label, medians in per_round.items():
        latency = common.summarize(medians)
        ratio = common.summarize([value / base for value, base in zip(medians, floor, strict=True)])
        rows.append([
            label, common.micros(latency["median"]),
            f"{common.micros(latency['min'])} – {common.micros(latency['max'])}", common.ratio(ratio["median"]),
        ])
    return rows


def profile_async_save(cases, saves):
    """Print a cProfile of ``AsyncStorage.save()`` with 3 hosts, 10 KB files."""
    case = next(case for case in cases if case.label == "AsyncStorage, 3 hosts")
    data = os.urandom(10 * 1024)
    common.print_profile(f"{saves} x {case.label}.save(), 10 KB", time_saves, case.storage, data, saves)


def main(argv=None):
    parser = common.argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--saves", type=int, help="saves per configuration per round (default 200)")
    parser.add_argument("--rounds", type=int, help="rounds (default 5)")
    args = parser.parse_args(argv)
    saves = args.saves or (20 if args.quick else 200)
    rounds = args.rounds or (2 if args.quick else 5)
    warmup = 5 if args.quick else 50

    with common.private_redis() as redis_server, tempfile.TemporaryDirectory(prefix="resto-bench-save-") as workdir:
        common.setup_django()
        app = common.celery_app()
        environment = common.environment()
        workdir = Path(workdir)
        servers = media_hosts()
        try:
            cases = build_cases(workdir / "masters", servers)
            results = {}
            for size_label, size in SIZES.items():
                per_round = measure(cases, size, saves, rounds, warmup, redis_server.url)
                results[size_label] = summarize_size(cases, per_round)
            publish = measure_publish(app, cases[2].storage, redis_server.url, saves, rounds)
            if args.profile:
                reset(cases, redis_server.url)
                profile_async_save(cases, saves)
        finally:
            for server in servers:
                server.stop()

    compared = hybrid_against_django_resto(results)
    return common.write_result(
        args, "bench_save", "save() latency",
        (
            f"Per-save latency of `storage.save(name, ContentFile(...))`, fresh names, {saves} saves per "
            f"configuration per round, {rounds} rounds (configurations take turns every {BLOCK} saves), after "
            f"{warmup} warm-up saves. Latency: median over rounds of each round's median, and the range of "
            f"the round medians. Ratio: to FileSystemStorage of the same size in the same round "
            f"(median and range over rounds). AsyncStorage publishes to a private Redis (no worker); "
            f"HybridStorage and django-resto PUT to real hosts on 127.0.0.1 whose files are in memory (the hosts' "
            f"disks would otherwise compete with the master's): "
            + ("nginx processes with their folders in /dev/shm." if servers and isinstance(servers[0], NginxHost)
               else "MediaServers in the benchmark's process, whose CPU the clients share.")
        ),
        parameters={"saves_per_round": saves, "rounds": rounds, "warmup": warmup, "sizes": SIZES},
        environment=environment,
        results=results,
        hybrid_against_django_resto={size: {str(h): r for h, r in by.items()} for size, by in compared.items()},
        publish_ns=publish,
        tables=[{
            "title": "save() latency (µs)",
            "headers": ["size", "storage", "median µs", "round medians µs (min – max)", "ratio", "ratio (min – max)"],
            "rows": table_rows(results),
        }, {
            "title": "Our HybridStorage.save() against django-resto 1.3's (ratio of round medians)",
            "headers": ["size", "hosts", "ratio", "ratio (min – max)"],
            "rows": hybrid_rows(compared),
        }, {
            "title": "One message to the private Redis (µs per message; AsyncStorage sends one per host)",
            "headers": ["how", "median µs", "round medians µs (min – max)", "ratio to LPUSH"],
            "rows": publish_rows(publish),
        }],
        goals=goals(results, compared),
    )


if __name__ == "__main__":
    sys.exit(main())
