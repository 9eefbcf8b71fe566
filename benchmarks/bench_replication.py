"""Replication with real workers and three nginx hosts: throughput, lag, worker memory.

- **Throughput**: ``save()`` N files as fast as the benchmark can, then wait until all
  three nginx hosts hold every file (right size); files/s and MB/s from the first save to
  the last file landing. The limit, measured in the same round: a plain ``requests`` loop
  (a thread pool as wide as the workers' concurrency) PUTting the same files to the same
  hosts, no Celery. Share = ours / limit. Small files (10 KB) for each worker pool and
  concurrency of the sweep, large files (10 MB) for the best one.
- **Convergence lag**: saves of 10 KB at a steady rate below saturation (a quarter of the
  best measured throughput); for each, the time from ``save()`` returning to the file's
  arrival in the last host's folder (inotify: nginx renames a finished upload into place;
  also to the end of the PUT in nginx's log, ``$msec``). p50/p95/p99, and as a
  multiple of one direct ``PUT`` of 10 KB (the median of 200 in the same round, a warm
  session, on the idle site before the round's saves). :data:`LAG_ROUNDS` rounds on a warm
  worker, each against its own direct PUT: the median round and the range. The first
  seconds of saves after the worker starts are reported apart (a pool process's first
  tasks open its connections).
- **Memory**: the workers' peak RSS (``VmHWM`` of every worker process) replicating one
  1 GB file to the three hosts, against the same with a 10 MB file: the transfer streams,
  so it must not grow with the file.

    python -m benchmarks.bench_replication [--quick] [--output FILE]
"""
import os
import shutil
import statistics
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from benchmarks import common
from benchmarks.common import percentile
from benchmarks.nginx_site import CHANGE_SIZE, CONVERGE_TIMEOUT, Changes, nginx_installed, running_site

SMALL, LARGE, HUGE = CHANGE_SIZE, 10 * 1024 * 1024, 1024 * 1024 * 1024
SWEEP = [("prefork", 2), ("prefork", 4), ("threads", 4), ("threads", 8)]
MEMORY_GOAL = 1.5  # peak RSS with 1 GB <= 1.5x the peak with 10 MB
#: The lag is measured on a warm worker, as the direct PUT it is compared with uses a warm
#: session: these seconds of saves at the same rate go first, reported on their own.
WARM_UP_SECONDS = 2.0
#: The lag is compared with the median of this many direct PUTs (a median of 50 ranged
#: from 0.8 to 2.3 ms between runs on this machine).
DIRECT_PUTS = 200
#: Rounds of lag saves, each against a direct PUT timed just before it: one round's p99
#: ranged from 6x to 12x the PUT between runs on this machine (its speed drifts within
#: minutes), so a single one says little.
LAG_ROUNDS = 3


def worker_peak_rss(worker):
    """The largest VmHWM among ``worker``'s processes (main and pool children), bytes."""
    peaks = []
    for pid in _descendants(worker._process.pid):
        try:
            with open(f"/proc/{pid}/status") as handle:
                for line in handle:
                    if line.startswith("VmHWM:"):
                        peaks.append(int(line.split()[1]) * 1024)
        except OSError:
            continue
    return max(peaks)


def _descendants(pid):
    """``pid`` and every process below it (from /proc/*/stat's parent pid)."""
    children = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        pending.extend(children.get(current, []))
    return found


def save_files(storage, count, size, prefix):
    from django.core.files.base import ContentFile

    data = os.urandom(size)
    names = [f"{prefix}/{index:05d}.bin" for index in range(count)]
    for name in names:
        if storage.save(name, ContentFile(data)) != name:
            raise AssertionError(f"{name} was renamed")
    return names


def ours(bench, count, size):
    """Seconds from the first save to every file on every host, with the running worker."""
    bench.reset()
    start = time.perf_counter()
    names = save_files(bench.storage, count, size, f"t{uuid.uuid4().hex[:6]}")
    end = bench.wait_all(names, size)
    bench.check_synced(count)
    return end - start


def limit(bench, count, size, concurrency):
    """Seconds for a plain requests thread pool to PUT the same files to the same hosts."""
    import requests

    bench.reset()
    data = os.urandom(size)
    names = [f"l{uuid.uuid4().hex[:6]}/{index:05d}.bin" for index in range(count)]
    for name in names:  # the same master files: the loop reads them from disk, as workers do
        path = bench.master / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    local = threading.local()

    def put(job):
        host, name = job
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        with open(bench.master / name, "rb") as body:
            response = session.put(host.url + name, data=body, timeout=60)
        if response.status_code not in (200, 201, 204):
            raise AssertionError(f"PUT {name} on {host.url}: {response.status_code}")

    jobs = [(host, name) for name in names for host in bench.hosts]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(put, jobs))
    elapsed = time.perf_counter() - start
    if any(bench.landed(name, size) != len(bench.hosts) for name in names):
        raise AssertionError("the requests loop left files missing")
    return elapsed


def noop_floor(bench, count):
    """Seconds for the running worker to run ``count`` no-op tasks (one per file, as ours), from
    the first publish to the last task done: what Celery itself costs at these settings."""
    import redis

    from benchmarks.celery_app import app

    bench.reset()
    key = f"noop-{uuid.uuid4().hex[:6]}"
    client = redis.Redis.from_url(bench.redis.url)
    start = time.perf_counter()
    for _ in range(count):
        app.send_task("benchmarks.noop", (key,), queue="resto")
    deadline = time.monotonic() + CONVERGE_TIMEOUT
    while int(client.get(key) or 0) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{int(client.get(key) or 0)} of {count} no-op tasks ran")
        time.sleep(0.002)
    return time.perf_counter() - start


def throughput(bench, pool, concurrency, count, size, rounds):
    """Per round: (ours s, limit s, no-op tasks s). The worker runs for ours and the no-op."""
    bench.start_worker(pool, concurrency)
    ours(bench, max(count // 10, 3), size)  # warm-up: connections, imports, first rows
    noop_floor(bench, max(count // 10, 3))
    results = []
    for _ in range(rounds):
        mine = ours(bench, count, size)
        celery_floor = noop_floor(bench, count)
        bench.stop_worker()
        floor = limit(bench, count, size, concurrency)
        bench.start_worker(pool, concurrency)
        results.append((mine, floor, celery_floor))
        print(f"  {pool}/{concurrency}, {count} x {size} B: ours {mine:.2f} s, limit {floor:.2f} s "
              f"(share {floor / mine:.2f}), {count} no-op tasks {celery_floor:.2f} s "
              f"(share {celery_floor / mine:.2f})", flush=True)
    return results


def lag(bench, count, rate, rounds):
    """``(cold lags, [(warm lags, warm lags from the logs, direct PUT seconds)] per round)``:
    seconds from each save returning to its arrival on the last host (:func:`_lags`), at
    ``rate`` saves per second. First the :data:`WARM_UP_SECONDS` of saves a freshly started
    worker takes (each pool process opens its connections on its first tasks: PostgreSQL,
    Redis, the hosts); then ``rounds`` rounds of ``count`` saves on the warm worker, each
    after the median of :data:`DIRECT_PUTS` direct PUTs timed on the idle site (the hosts'
    and the master's writes flushed to disk).

    Not after the saves: the kernel then writes their files back to disk, and a direct PUT
    timed during that took 2.3 ms against 1.25 ms before them (probe by hand)."""
    bench.reset()
    cold, _ = _lags(bench, rate, "cold", max(1, round(rate * WARM_UP_SECONDS)))
    bench.check_synced(len(cold))
    warm_rounds = []
    for number in range(rounds):
        bench.reset()
        put_seconds = statistics.median(direct_put_times(bench, f"direct-{number}", DIRECT_PUTS))
        warm, logged = _lags(bench, rate, f"lag-{number}", count)
        bench.check_synced(count)
        warm_rounds.append((warm, logged, put_seconds))
        print(f"  lag round {number + 1}/{rounds}: {count} saves at {rate:.0f}/s, p50 "
              f"{percentile(warm, .5) * 1000:.1f} ms, p99 {percentile(warm, .99) * 1000:.1f} ms; one direct PUT "
              f"{put_seconds * 1000:.2f} ms: p99 {percentile(warm, .99) / put_seconds:.1f}x", flush=True)
    return cold, warm_rounds


def _lags(bench, rate, prefix, count):
    """``(lags, lags from the hosts' logs)`` of ``count`` new files: to each file's arrival in
    the last host's folder as inotify stamped it (:mod:`benchmarks.arrivals`; the logged
    lags where there is no inotify), and to the end of the last host's PUT as its nginx
    logged it. No watcher polls the hosts' folders meanwhile: its CPU would be taken from
    the site and the worker."""
    changes = Changes(bench, rate, prefix=prefix, mixed=False, watch=False)
    try:
        changes.run(count=count)
        changes.wait(CONVERGE_TIMEOUT)
    finally:
        changes.close()
    arrived, logged = changes.lags_from_arrivals(), changes.lags_from_host_logs()
    if len(logged) != count or len(arrived) not in (0, count):
        raise AssertionError(f"only {len(arrived)} (inotify) / {len(logged)} (log) of {count} files reached every host")
    return arrived or logged, logged


def direct_put_times(bench, prefix, count):
    """Seconds of each of ``count`` requests PUTs of 10 KB to one nginx host (a warm session)."""
    import requests

    data = os.urandom(SMALL)
    session = requests.Session()
    session.put(bench.hosts[0].url + "warm.bin", data=data, timeout=10)
    times = []
    for index in range(count):
        start = time.perf_counter()
        response = session.put(bench.hosts[0].url + f"direct-{prefix}/{index}.bin", data=data, timeout=10)
        times.append(time.perf_counter() - start)
        response.raise_for_status()
    return times


def memory(bench, pool, concurrency, size):
    """Peak RSS of a fresh worker that replicates one file of ``size`` bytes to the 3 hosts."""
    bench.reset()
    bench.start_worker(pool, concurrency)
    name = f"big/{size}.bin"
    path = bench.master / name
    path.parent.mkdir(parents=True)
    chunk = os.urandom(8 * 1024 * 1024)
    with open(path, "wb") as handle:
        remaining = size
        while remaining:
            remaining -= handle.write(chunk[:remaining])
    bench.storage.execute("upload", name)  # the file is in place: send the tasks only
    bench.wait_all([name], size, timeout=CONVERGE_TIMEOUT)
    peak = worker_peak_rss(bench.worker)
    bench.stop_worker()
    bench.reset()
    return peak


def plots(folder, sweep_rows, large, lags, put_seconds):
    """lag.png and throughput.png in ``folder``; return their names."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    ms = sorted(value * 1000 for value in lags)
    figure, axis = pyplot.subplots(figsize=(7, 4))
    axis.hist(ms, bins=40, color="#4477aa")
    for label, fraction, color in (("p50", 0.5, "#228833"), ("p95", 0.95, "#ccbb44"), ("p99", 0.99, "#ee6677")):
        value = percentile(ms, fraction)
        axis.axvline(value, color=color, linestyle="--", label=f"{label} {value:.0f} ms")
    axis.axvline(put_seconds * 1000, color="black", linestyle=":", label=f"one direct PUT {put_seconds * 1000:.1f} ms")
    axis.set_xlabel("save() returned → last of 3 hosts has the file (ms)")
    axis.set_ylabel("saves")
    axis.set_title(f"Convergence lag, {len(ms)} saves of 10 KB at a steady rate")
    axis.legend()
    figure.tight_layout()
    figure.savefig(folder / "lag.png", dpi=110)
    pyplot.close(figure)

    figure, axis = pyplot.subplots(figsize=(8, 4))
    labels = [row["label"] for row in sweep_rows] + [f"10 MB, {large['label']}"]
    mine = [row["ours_files_s"]["median"] for row in sweep_rows] + [large["ours_files_s"]["median"]]
    floor = [row["limit_files_s"]["median"] for row in sweep_rows] + [large["limit_files_s"]["median"]]
    positions = range(len(labels))
    axis.bar([p - 0.2 for p in positions], mine, width=0.4, label="resto_celery (save → all 3 hosts)", color="#4477aa")
    axis.bar([p + 0.2 for p in positions], floor, width=0.4, label="limit: requests loop, same concurrency",
             color="#bbbbbb")
    axis.set_xticks(list(positions), labels, rotation=15)
    axis.set_ylabel("files/s (to all 3 hosts)")
    axis.set_yscale("log")
    axis.set_title("Replication throughput: 10 KB files per pool/concurrency, and 10 MB files")
    axis.legend()
    figure.tight_layout()
    figure.savefig(folder / "throughput.png", dpi=110)
    pyplot.close(figure)
    return [("Convergence lag", "lag.png"), ("Replication throughput", "throughput.png")]


def main(argv=None):
    parser = common.argument_parser(__doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    quick = args.quick
    small_count, large_count, rounds = (60, 3, 1) if quick else (400, 20, 3)
    lag_count = 40 if quick else 300
    lag_rounds = 1 if quick else LAG_ROUNDS
    if not nginx_installed():
        return 0
    huge = 64 * 1024 * 1024 if quick else HUGE
    with running_site("resto-bench-repl-") as (bench, environment):
        sweep = {}
        for pool, concurrency in SWEEP:
            sweep[(pool, concurrency)] = throughput(bench, pool, concurrency, small_count, SMALL, rounds)
        best = max(sweep, key=lambda key: statistics.median(f / o for o, f, _ in sweep[key]))
        large = throughput(bench, *best, large_count, LARGE, rounds)
        bench.start_worker(*best)
        best_files_s = statistics.median(small_count / o for o, _, _ in sweep[best])
        rate = max(1.0, best_files_s / 4)
        cold_lags, lag_results = lag(bench, lag_count, rate, lag_rounds)
        bench.stop_worker()
        peak_small = memory(bench, *best, LARGE)
        free = shutil.disk_usage(bench.workdir).free
        peak_huge = memory(bench, *best, huge) if free > 5 * huge else None

    def summary(rounds_, count, size):
        return {
            "ours_files_s": common.summarize([count / o for o, _, _ in rounds_]),
            "limit_files_s": common.summarize([count / f for _, f, _ in rounds_]),
            "share": common.summarize([f / o for o, f, _ in rounds_]),
            "noop_tasks_s": common.summarize([count / n for _, _, n in rounds_]),
            "share_of_noop": common.summarize([n / o for o, _, n in rounds_]),
            "ours_mb_s": common.summarize([count * size / o / 1e6 for o, _, _ in rounds_]),
            "limit_mb_s": common.summarize([count * size / f / 1e6 for _, f, _ in rounds_]),
            "rounds": rounds_,
        }

    sweep_rows = [
        {"label": f"{pool}, concurrency {c}", **summary(r, small_count, SMALL)} for (pool, c), r in sweep.items()
    ]
    large_row = {"label": f"{best[0]}, concurrency {best[1]}", **summary(large, large_count, LARGE)}
    fractions = (("p50", .5), ("p95", .95), ("p99", .99), ("max", 1))

    def in_ms(values):
        return {name: percentile(values, fraction) * 1000 for name, fraction in fractions}

    lag_rounds_rows = [
        {"lag_ms": in_ms(warm), "logged_lag_ms": in_ms(logged), "direct_put_ms": put * 1000,
         "p50_over_put": percentile(warm, .5) / put, "p99_over_put": percentile(warm, .99) / put,
         "lags_ms": [value * 1000 for value in warm]}
        for warm, logged, put in lag_results
    ]
    p99_ratio = common.summarize([row["p99_over_put"] for row in lag_rounds_rows])
    # The round whose p99 ratio is the median one stands for the run (its figures, its plot).
    median_round = sorted(range(len(lag_rounds_rows)), key=lambda i: lag_rounds_rows[i]["p99_over_put"])[
        (len(lag_rounds_rows) - 1) // 2]
    lags, logged_lags, put_seconds = lag_results[median_round]
    lag_ms, logged_ms, cold_ms = in_ms(lags), in_ms(logged_lags), in_ms(cold_lags)
    plot_files = plots(common.results_folder(args.output), sweep_rows, large_row, lags, put_seconds)

    def rng(entry, fmt="{:,.0f}"):
        return f"{fmt.format(entry['min'])} – {fmt.format(entry['max'])}"

    rows = []
    for row, size in [(r, "10 KB") for r in sweep_rows] + [(large_row, "10 MB")]:
        rows.append([
            size, row["label"], f"{row['ours_files_s']['median']:,.1f}", f"{row['limit_files_s']['median']:,.1f}",
            f"{row['ours_mb_s']['median']:,.1f}", f"{row['limit_mb_s']['median']:,.1f}",
            f"{row['share']['median']:.0%}", rng(row["share"], "{:.0%}"),
            f"{row['noop_tasks_s']['median']:,.0f}", f"{row['share_of_noop']['median']:.0%}",
            rng(row["share_of_noop"], "{:.0%}"),
        ])
    memory_goal = None if peak_huge is None else peak_huge <= MEMORY_GOAL * peak_small
    return common.write_result(
        args, "bench_replication", "Replication: throughput, convergence lag, worker memory",
        (
            f"AsyncStorage with 3 real nginx hosts on 127.0.0.1 and one real Celery worker (private Redis broker, "
            f"PostgreSQL rows). Throughput: {small_count} files of 10 KB per round for each pool/concurrency, "
            f"{large_count} files of 10 MB for the best; from the first save() to every file on every host. "
            f"The limit: a requests thread pool of the same width PUTting the same files, no Celery, in the same "
            f"round. {rounds} round(s): medians and ranges. Lag: {lag_rounds} round(s) of {lag_count} saves of 10 KB "
            f"at {rate:.0f}/s (a quarter of the best throughput), each against its own direct PUT, on a warm worker: "
            f"after {WARM_UP_SECONDS:.0f} s of saves at the same rate on the freshly started worker, reported on "
            f"their own (its pool processes open their connections on their first tasks; the direct PUT it is "
            f"compared with uses a warm session too)."
        ),
        parameters={"small": small_count, "large": large_count, "rounds": rounds, "lag_saves": lag_count,
                    "lag_rounds": lag_rounds, "lag_rate": rate, "huge_bytes": huge},
        environment=environment,
        recommended={"pool": best[0], "concurrency": best[1]},
        results={"sweep": sweep_rows, "large": large_row, "lag_ms": lag_ms, "direct_put_ms": put_seconds * 1000,
                 "lags_ms": [value * 1000 for value in lags], "cold_lag_ms": cold_ms,
                 "cold_lags_ms": [value * 1000 for value in cold_lags], "logged_lag_ms": logged_ms,
                 "lag_rounds": lag_rounds_rows, "lag_p99_over_put": p99_ratio,
                 "peak_rss": {"10 MB": peak_small, "huge": peak_huge}},
        tables=[{
            "title": "Throughput to all 3 hosts (medians)",
            "headers": ["files", "worker", "ours files/s", "limit files/s", "ours MB/s", "limit MB/s", "share of limit",
                        "share (min – max)", "no-op tasks/s", "share of no-op", "share of no-op (min – max)"],
            "rows": rows,
        }, {
            "title": "Convergence lag (save() returned → the file arrived in the last host's folder)",
            "headers": ["worker", "saves", "p50 ms", "p95 ms", "p99 ms", "max ms", "one direct PUT ms", "p50 / PUT",
                        "p99 / PUT"],
            "rows": [[label, str(len(values)), f"{ms['p50']:.1f}", f"{ms['p95']:.1f}", f"{ms['p99']:.1f}",
                      f"{ms['max']:.1f}", f"{put * 1000:.2f}", f"{ms['p50'] / (put * 1000):.1f}x",
                      f"{ms['p99'] / (put * 1000):.1f}x"]
                     for label, values, ms, put in [
                         *[(f"warm, round {number + 1}" + (" (the median round)" if number == median_round else ""),
                            warm, in_ms(warm), put) for number, (warm, _, put) in enumerate(lag_results)],
                         (f"just started: its first {WARM_UP_SECONDS:.0f} s", cold_lags, cold_ms,
                          lag_results[0][2]),
                         ("warm, the median round, to the end of the PUT in nginx's log ($msec)", logged_lags,
                          logged_ms, put_seconds),
                     ]],
        }, {
            "title": "Worker peak RSS (VmHWM, all worker processes)",
            "headers": ["file", "peak RSS", "ratio to 10 MB"],
            "rows": [["10 MB (baseline)", common.mebibytes(peak_small), "1.00x"],
                     [f"{huge // 2**20:,} MiB", common.mebibytes(peak_huge),
                      common.ratio(peak_huge / peak_small) if peak_huge else "n/a"]],
        }],
        plots=plot_files,
        goals=[{
            "goal": f"worker memory does not grow with the file (peak RSS with {huge // 2**20:,} MiB "
                    f"<= {MEMORY_GOAL}x the 10 MB peak)",
            "met": memory_goal,
            "detail": "not enough free disk" if peak_huge is None else
                      f"{common.mebibytes(peak_huge)} vs {common.mebibytes(peak_small)}",
        }],
        notes=[
            f"Best share of the limit with 10 KB files: {best[0]} pool, concurrency {best[1]} (the recommended "
            f"default on this 2-core machine).",
            "Each file goes to 3 hosts: files/s counts files on all three (3 PUTs each).",
            "No-op tasks/s: the same worker running one task per file that only INCRs a Redis key (one message "
            "per file, as a save sends): Celery's own floor at these settings; share of no-op = ours / that.",
            f"Lag p99 / one direct PUT over the {lag_rounds} warm round(s): median {p99_ratio['median']:.1f}x "
            f"({p99_ratio['min']:.1f}x – {p99_ratio['max']:.1f}x). The cold row is compared with the first "
            "round's direct PUT.",
            "Lag: from save() returning (time.time()) to the file's arrival in the last host's folder: nginx "
            "renames the finished upload into place, and a thread blocked on inotify stamps the rename with "
            "time.time() (late by its wake-up). The row from nginx's log ends at $msec, its event loop's cached "
            "time to the millisecond: up to a millisecond and more early. "
            "The direct PUT is timed by its client, answer included: the median of "
            f"{DIRECT_PUTS} on the idle site before each round's saves (a median of 50 ranged from 0.8 to 2.3 ms "
            "between runs here). Nothing else runs in the saving process meanwhile (until 2026-12-03 a "
            "watcher thread looked at the hosts' folders every 2 ms, and took about 1.5 ms of CPU per save).",
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
