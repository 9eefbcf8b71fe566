"""``reconcile.reconcile()`` over a large master tree with 3 media hosts.

Two master trees of small files in nested folders (100 per folder) are made once: the
full one (``--files``) and one ten times smaller, each with its own 3 host names. Then,
round after round, each mode in turn:

- the baseline: ``walk_master()`` alone, no database;
- with no ``Replica`` row (a new site, or after the table was lost): every file must be
  enqueued for every host, once with an ``enqueue`` that only counts, once with one that
  publishes to a private Redis through one producer, as the ``resto_celery.reconcile``
  task does (the queue is emptied after each run). Publishing costs about a millisecond
  per message here, so it runs over the small tree unless ``--publish-full`` is given;
- the steady state, every row synced with the master's fingerprint (bulk-created from
  ``walk_master()``, then ``ANALYZE``d as autovacuum would): nothing to enqueue, which is
  what a periodic reconcile does all day.

Reported: seconds (median and range over rounds), files per second, the time per file as
a ratio to the walk's in the same round, and memory: the RSS growth during each timed
run, and the peak of Python allocations (tracemalloc, separate untimed runs) over the
small and the full tree, which should be about equal if memory stays flat.

Run alone: ``.venv/bin/python -m benchmarks.bench_reconcile [--quick] [--files N]``.
"""
import collections
import itertools
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from benchmarks import common

HOSTS = ["media-1:8080", "media-2:8080", "media-3:8080"]
SMALL_HOSTS = ["small-1:8080", "small-2:8080", "small-3:8080"]  # the small tree's own rows
FILES_PER_FOLDER = 100
FILE_BYTES = b"x" * 64
BATCH_SIZE = 1000  # reconcile()'s default
GOAL_FILES = 100_000
GOAL_SECONDS = 30  # "well under a minute" for 100,000 files, taken as half a minute
FLAT_FACTOR = 2  # "flat": the peak over N files is at most this many times the peak over N/10

MODES = {
    "walk": "walk_master() alone (baseline, no database)",
    "walk_small": "walk_master() alone, the small tree (baseline of the publishing run)",
    "no_rows_count": "reconcile, no Replica rows, enqueue only counts",
    "no_rows_publish": "reconcile, no Replica rows, enqueue publishes to Redis",
    "steady": "reconcile, every row synced (steady state)",
}


# The master trees and the rows


def build_tree(root, files):
    """Write ``files`` small files under ``root``: ``dNN/dNN/fNNNNNN.txt``, 100 per folder."""
    for index in range(files):
        folder = root / f"d{index // 10_000:02d}" / f"d{index // FILES_PER_FOLDER % 100:02d}"
        if index % FILES_PER_FOLDER == 0:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{index:06d}.txt").write_bytes(FILE_BYTES)


def batched(iterable, size):
    """Lists of ``size`` items from ``iterable`` (the last one shorter)."""
    iterator = iter(iterable)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def populate_rows(storage, batch_size=5000):
    """Bulk-create a synced ``Replica`` row per file and host, with the master's fingerprint."""
    from django.utils import timezone

    from resto_celery.models import Replica
    from resto_celery.replication import walk_master

    now = timezone.now()
    rows = (
        Replica(host=host, path=name, state=Replica.State.SYNCED, fingerprint=fingerprint, last_success_at=now)
        for name, fingerprint in walk_master(storage.location)
        for host in storage.hosts
    )
    for batch in batched(rows, batch_size):
        Replica.objects.bulk_create(batch)


def analyze(model):
    """Refresh the planner's statistics of ``model``'s table, as autovacuum does on a live site."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {connection.ops.quote_name(model._meta.db_table)}")


# What is measured


def walk(storage):
    """The baseline: list the master tree with fingerprints; return counts like reconcile."""
    from resto_celery.replication import walk_master

    return {"files": sum(1 for _ in walk_master(storage.location))}


def reconcile_counting(storage):
    """``reconcile()`` with an ``enqueue`` that only counts; return its counts."""
    from resto_celery.reconcile import reconcile

    enqueued = collections.Counter()

    def enqueue(operation, host, name):
        enqueued[operation] += 1

    counts = reconcile(storage, enqueue)
    if dict(enqueued) != {key: counts[key] for key in ("upload", "delete") if counts[key]}:
        raise AssertionError(f"reconcile counted {counts}, enqueue saw {dict(enqueued)}")
    return counts


def reconcile_publishing(storage):
    """``reconcile()`` publishing real messages through one producer, in publish batches
    (one Redis pipeline per 1,000 messages with kombu >= 5.7), as the task does."""
    from celery import current_app

    from resto_celery.reconcile import reconcile
    from resto_celery.tasks import publish_batch

    with current_app.producer_or_acquire() as producer, publish_batch(producer):
        return reconcile(
            storage, lambda operation, host, path: storage.enqueue(operation, host, path, producer=producer)
        )


FUNCTIONS = {
    "walk": walk,
    "walk_small": walk,
    "no_rows_count": reconcile_counting,
    "no_rows_publish": reconcile_publishing,
    "steady": reconcile_counting,
}


def timed(function, storage):
    """Run ``function(storage)``; return ``(seconds, counts, RSS growth in bytes or None)``."""
    with common.PeakRSS() as rss:
        start = time.perf_counter()
        counts = function(storage)
        seconds = time.perf_counter() - start
    return seconds, counts, rss.delta


def traced_peak(function, storage):
    """The peak of Python allocations (bytes) while ``function(storage)`` runs, under tracemalloc."""
    tracemalloc.start()
    try:
        function(storage)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def expect(mode, counts, files, hosts, broker_url):
    """Fail unless a run did all the work it should have: the benchmark must be honest."""
    expected = {
        "walk": {"files": files},
        "walk_small": {"files": files},
        "no_rows_count": {"files": files, "rows": 0, "upload": files * hosts, "delete": 0},
        "no_rows_publish": {"files": files, "rows": 0, "upload": files * hosts, "delete": 0},
        "steady": {"files": files, "rows": files * hosts, "upload": 0, "delete": 0},
    }[mode]
    # Reconcile's other counters (held deletes, unreadable files, probes) must stay at zero.
    expected.update((key, 0) for key in counts if key not in expected)
    if counts != expected:
        raise AssertionError(f"{mode}: got {counts}, expected {expected}")
    queued = common.queue_length(broker_url)
    if mode == "no_rows_publish" and queued != files * hosts:
        raise AssertionError(f"{mode}: {queued} messages in Redis, expected {files * hosts}")


# Rounds


def run_rounds(plan, rounds, broker_url, samples):
    """Run ``plan`` (``(mode, storage, files)``) ``rounds`` times; each tree's walk comes first.

    Appends to ``samples[mode]`` one dict per run: ``seconds``, ``rss``, ``files`` and
    ``ratio``, the time per file over the time per file of the walk of the same tree in
    the same round.
    """
    for number in range(rounds):
        line = []
        walk_per_file = {}
        for mode, storage, files in plan:
            common.flush_redis(broker_url)
            seconds, counts, rss = timed(FUNCTIONS[mode], storage)
            expect(mode, counts, files, len(storage.hosts), broker_url)
            if mode.startswith("walk"):
                walk_per_file[storage.location] = seconds / files
            ratio = seconds / files / walk_per_file[storage.location]
            run = {"seconds": seconds, "rss": rss, "files": files, "ratio": ratio}
            samples.setdefault(mode, []).append(run)
            line.append(f"{mode} {seconds:.2f}s")
        common.flush_redis(broker_url)
        print(f"  round {number + 1}/{rounds}: " + ", ".join(line), flush=True)


def memory_peaks(storages, modes):
    """tracemalloc peaks ``{mode: {"small": bytes, "full": bytes}}``."""
    return {mode: {size: traced_peak(FUNCTIONS[mode], storage) for size, storage in storages.items()}
            for mode in modes}


def summarize(samples):
    """Per mode: files, seconds, files/s at the median, ratio to the walk, RSS growth."""
    summary = {}
    for mode, runs in samples.items():
        seconds = common.summarize([run["seconds"] for run in runs])
        rss = [run["rss"] for run in runs if run["rss"] is not None]
        summary[mode] = {
            "files": runs[0]["files"],
            "seconds": seconds,
            "files_per_second": runs[0]["files"] / seconds["median"],
            "ratio_to_walk": common.summarize([run["ratio"] for run in runs]),
            "rss_growth_bytes": common.summarize(rss) if rss else None,
        }
    return summary


# Report


def time_rows(summary, hosts):
    rows = []
    for mode, entry in summary.items():
        seconds, ratio, files = entry["seconds"], entry["ratio_to_walk"], entry["files"]
        enqueued = {"walk": "–", "walk_small": "–", "steady": "0"}.get(mode, f"{files * hosts:,}")
        rows.append([
            MODES[mode], f"{files:,}", enqueued, f"{seconds['median']:.2f}",
            f"{seconds['min']:.2f} – {seconds['max']:.2f}", f"{entry['files_per_second']:,.0f}",
            common.ratio(ratio["median"]), f"{common.ratio(ratio['min'])} – {common.ratio(ratio['max'])}",
        ])
    return rows


def memory_rows(summary, peaks):
    rows = []
    for mode, rss in ((mode, entry["rss_growth_bytes"]) for mode, entry in summary.items() if mode != "walk_small"):
        small, full = peaks.get(mode, {}).get("small"), peaks.get(mode, {}).get("full")
        rows.append([
            MODES[mode], common.mebibytes(small), common.mebibytes(full),
            f"{full / small:.2f}x" if small and full else "–",
            common.mebibytes(rss["median"]) if rss else "n/a",
            f"{common.mebibytes(rss['min'])} – {common.mebibytes(rss['max'])}" if rss else "n/a",
        ])
    return rows


def goals(summary, peaks, files):
    """The time goal (100,000 files well under a minute) and memory staying flat."""
    verdicts = []
    for mode in ("steady", "no_rows_count", "no_rows_publish"):
        entry = summary[mode]
        measured = entry["files"]
        detail = f"median {entry['seconds']['median']:.2f} s over {measured:,} files"
        if mode == "no_rows_publish":
            detail += f", {entry['files_per_second'] * len(HOSTS):,.0f} messages/s"
        if measured < GOAL_FILES:
            detail += f"; needs a run over {GOAL_FILES:,} files" + (
                " (--publish-full)" if mode == "no_rows_publish" and files >= GOAL_FILES else "")
        verdicts.append({
            "goal": f"{GOAL_FILES:,} files, {MODES[mode]}, well under a minute (taken as ≤ {GOAL_SECONDS} s)",
            "met": None if measured < GOAL_FILES else entry["seconds"]["median"] <= GOAL_SECONDS,
            "detail": detail,
        })
    for mode, by_size in peaks.items():
        small_files = files // 10
        verdicts.append({
            "goal": f"memory stays flat, {MODES[mode]}: tracemalloc peak over {files:,} files ≤ {FLAT_FACTOR}x "
                    f"the peak over {small_files:,}",
            "met": None if small_files < 10 * BATCH_SIZE else by_size["full"] <= FLAT_FACTOR * by_size["small"],
            "detail": f"{common.mebibytes(by_size['full'])} vs {common.mebibytes(by_size['small'])}"
                      + ("" if small_files >= 10 * BATCH_SIZE else
                         f"; the small tree must hold ≥ 10 batches ({10 * BATCH_SIZE:,} files)"),
        })
    return verdicts


# Main


def measure(work, files, rounds, broker_url, publish_full=False, profile=False):
    """Make the trees, run every mode, and return the result's tables, goals and numbers."""
    from resto_celery.models import Replica
    from resto_celery.storage import AsyncStorage

    start = time.perf_counter()
    build_tree(work / "full", files)
    build_tree(work / "small", files // 10)
    print(f"  made {files:,} + {files // 10:,} files in {time.perf_counter() - start:.1f}s", flush=True)
    storages = {
        "small": AsyncStorage(location=str(work / "small"), hosts=SMALL_HOSTS),
        "full": AsyncStorage(location=str(work / "full"), hosts=HOSTS),
    }
    from resto_celery import marker

    for storage in storages.values():
        marker.verify(storage.location, create=True)  # the site's master: reconcile decides from it
    full = storages["full"]
    publish_on = "full" if publish_full else "small"
    publish_files = files if publish_full else files // 10

    common.empty_table(Replica)
    try:
        samples = {}
        plan = [("walk", full, files), ("no_rows_count", full, files)]
        if not publish_full:
            plan.append(("walk_small", storages["small"], publish_files))
        plan.append(("no_rows_publish", storages[publish_on], publish_files))
        run_rounds(plan, rounds, broker_url, samples)
        peaks = memory_peaks(storages, ["walk", "no_rows_count"])

        start = time.perf_counter()
        for storage in storages.values():
            populate_rows(storage)
        analyze(Replica)
        populating = time.perf_counter() - start
        print(f"  created {Replica.objects.count():,} synced rows in {populating:.1f}s", flush=True)

        run_rounds([("walk", full, files), ("steady", full, files)], rounds, broker_url, samples)
        peaks.update(memory_peaks(storages, ["steady"]))
        if profile:
            common.print_profile(f"reconcile, steady state, {files:,} files", reconcile_counting, full)
            common.empty_table(Replica)
            common.print_profile(f"reconcile, no rows, {files:,} files", reconcile_counting, full)
    finally:
        common.empty_table(Replica)

    summary = summarize(samples)
    return {
        "description": (
            f"`reconcile.reconcile(storage, enqueue)` with {len(HOSTS)} hosts over a master tree of "
            f"{files:,} files of {len(FILE_BYTES)} bytes ({FILES_PER_FOLDER} per folder, 2 levels of folders), "
            f"default batch size ({BATCH_SIZE}). {rounds} rounds, the modes in turn within each. Seconds: median "
            f"and range over rounds. Ratio to walk: time per file over the walk's time per file (same tree) "
            f"in the same round."
        ),
        "results": {"time": summary, "tracemalloc_peak_bytes": peaks, "populate_rows_seconds": populating},
        "tables": [
            {
                "title": "Time",
                "headers": ["what", "files", "enqueued", "median s", "min – max s", "files/s",
                            "ratio to walk", "ratio (min – max)"],
                "rows": time_rows(summary, len(HOSTS)),
            },
            {
                "title": "Memory",
                "headers": ["what", f"tracemalloc peak, {files // 10:,} files",
                            f"tracemalloc peak, {files:,} files", "full / small",
                            "RSS growth, timed runs (median)", "RSS growth (min – max)"],
                "rows": memory_rows(summary, peaks),
            },
        ],
        "goals": goals(summary, peaks, files),
        "notes": [
            f"Publishing ran over the {publish_on} tree ({publish_files:,} files, "
            f"{publish_files * len(HOSTS):,} messages per run).",
            f"Creating the synced rows ({(files + files // 10) * len(HOSTS):,}) with bulk_create and "
            f"ANALYZE took {populating:.1f} s (not part of any measure).",
            "tracemalloc peaks come from separate, untimed runs; RSS growth is the rise of the process's "
            "peak RSS (Linux VmHWM, reset before each timed run) over its RSS at the start of the run. "
            "Redis's own memory is not counted.",
        ],
    }


def main(argv=None):
    parser = common.argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, help=f"files in the master tree (default {GOAL_FILES:,}; --quick: 2,000)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3; --quick: 2)")
    parser.add_argument("--publish-full", action="store_true",
                        help="publish over the full tree, not the one ten times smaller (slow)")
    args = parser.parse_args(argv)
    files = args.files or (2_000 if args.quick else GOAL_FILES)
    rounds = args.rounds or (2 if args.quick else 3)
    if files < 10 * FILES_PER_FOLDER:
        parser.error(f"--files must be at least {10 * FILES_PER_FOLDER:,}")

    with common.private_redis() as redis_server, tempfile.TemporaryDirectory(prefix="resto-bench-reconcile-") as work:
        common.setup_django()
        common.celery_app()
        environment = common.environment()
        result = measure(Path(work), files, rounds, redis_server.url, args.publish_full, args.profile)

    return common.write_result(
        args, "bench_reconcile", "reconcile() over a large master tree",
        parameters={"files": files, "rounds": rounds, "hosts": len(HOSTS), "files_per_folder": FILES_PER_FOLDER,
                    "publish_full": args.publish_full},
        environment=environment, **result,
    )


if __name__ == "__main__":
    sys.exit(main())
