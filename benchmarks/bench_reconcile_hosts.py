"""Reconcile with real workers: a tree of files to three empty nginx hosts, then in sync.

The master tree is written straight to disk (10,000 files of 1-4 KB; no ``save()``, no
message), as after a migration from django-resto or a lost queue. One reconcile (as the
periodic ``resto_celery.reconcile`` task runs it: batched publishing) enqueues an upload per
file and host; the timer stops when every host holds every file and every ``Replica`` row is
synced. Then a second reconcile, everything in sync: it reads the rows and sends nothing.
The floor, in the same round: ``rsync -a`` of the tree into three empty local folders, then
again in sync. The worker: threads pool, concurrency 8 (the recommended default).

    python -m benchmarks.bench_reconcile_hosts [--quick] [--files N] [--output FILE]
"""
import shutil
import statistics
import subprocess
import sys
import time

from benchmarks import common
from benchmarks.bench_resync import make_tree
from benchmarks.nginx_site import running_site

POOL, CONCURRENCY = "threads", 8


def reconcile_once(bench):
    """Run one reconcile as the task does; return (seconds to enqueue, counts)."""
    from celery import current_app

    from resto_celery.reconcile import reconcile
    from resto_celery.tasks import BulkPages

    storage = bench.storage
    start = time.perf_counter()
    with current_app.producer_or_acquire() as producer:
        pages = BulkPages(storage, producer)  # as the reconcile task publishes: paged, a message per path
        counts = reconcile(storage, pages.enqueue)
        pages.flush()
    return time.perf_counter() - start, counts


def wait_replicated(bench, names_sizes, timeout=3600):
    """Wait until the workers recorded every file on every host (a count query every 50 ms:
    statting 30,000 files that often would take the CPU the worker needs), then check that
    every file really is on every host. Returns when the last row was written."""
    from resto_celery.models import Replica

    expected = len(names_sizes) * len(bench.hosts)
    deadline = time.monotonic() + timeout
    while Replica.objects.filter(state="synced").count() < expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"files not replicated after {timeout}s")
        time.sleep(0.05)
    done = time.perf_counter()
    missing = [name for name, size in names_sizes.items() if bench.landed(name, size) < len(bench.hosts)]
    if missing:
        raise AssertionError(f"{len(missing)} file(s) recorded but not on every host: {missing[:3]}")
    return done


def rsync_to(source, targets):
    start = time.perf_counter()
    for target in targets:
        subprocess.run(["rsync", "-a", f"{source}/", f"{target}/"], check=True)
    return time.perf_counter() - start


def main(argv=None):
    parser = common.argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, help="files in the master tree (default 10,000; --quick 300)")
    args = parser.parse_args(argv)
    files = args.files or (300 if args.quick else 10_000)
    from resto_celery.testing.nginx import find_nginx

    if find_nginx() is None or shutil.which("rsync") is None:
        print("nginx or rsync is not installed: nothing measured")
        return 0
    with running_site("resto-bench-rh-") as (bench, environment):
        bench.reset()
        make_tree(bench.master, files)
        from resto_celery import marker
        from resto_celery.replication import walk_master

        marker.verify(str(bench.master), create=True)  # the site's master: reconcile decides from it
        names_sizes = {
            name: int(fingerprint.split(":", 1)[0]) for name, fingerprint in walk_master(str(bench.master))
        }
        bench.start_worker(POOL, CONCURRENCY)
        start = time.perf_counter()
        enqueue_seconds, first_counts = reconcile_once(bench)
        done = wait_replicated(bench, names_sizes)
        bench.check_synced(files)
        first = done - start
        second, second_counts = reconcile_once(bench)
        if second_counts["upload"] or second_counts["delete"]:
            raise AssertionError(f"the in-sync reconcile enqueued {second_counts}")
        bench.stop_worker()
        targets = [bench.workdir / f"rsync-{index}" for index in range(3)]
        rsync_first = rsync_to(bench.master, targets)
        rsync_second = rsync_to(bench.master, targets)

    rows = [
        ["reconcile + worker, 3 empty hosts", f"{first:.1f}", f"{files / first:,.0f}", f"{first / rsync_first:.0f}x"],
        ["  of which the reconcile pass (walk, rows, publishing)", f"{enqueue_seconds:.1f}", "", ""],
        ["reconcile, hosts in sync (sends nothing)", f"{second:.2f}", f"{files / second:,.0f}",
         f"{second / rsync_second:.1f}x"],
        ["rsync -a to 3 empty local folders (floor)", f"{rsync_first:.2f}", f"{files / rsync_first:,.0f}", "1.0x"],
        ["rsync -a, in sync (floor)", f"{rsync_second:.2f}", f"{files / rsync_second:,.0f}", "1.0x"],
    ]
    return common.write_result(
        args, "bench_reconcile_hosts", "Reconcile with workers: a tree to three empty hosts, then in sync",
        (
            f"{files:,} files of 1-4 KB written to the master directly; one reconcile (batched publishing, "
            f"{first_counts['upload']:,} uploads enqueued) and one worker ({POOL}, concurrency {CONCURRENCY}) "
            f"until all 3 nginx hosts hold every file and every row is synced; then a reconcile with "
            f"everything in sync. Floor: rsync -a of the tree into 3 local folders, same run. One round "
            f"(the first part takes minutes): read it as an order of magnitude."
        ),
        parameters={"files": files, "pool": POOL, "concurrency": CONCURRENCY},
        environment=environment,
        results={"first_s": first, "enqueue_s": enqueue_seconds, "second_s": second,
                 "rsync_first_s": rsync_first, "rsync_second_s": rsync_second, "counts": first_counts},
        tables=[{"title": "Time", "headers": ["run", "seconds", "files/s", "ratio to rsync"], "rows": rows}],
        goals=[{
            "goal": "a reconcile with every host in sync is much faster than the first (at most 0.5x)",
            "met": second <= 0.5 * first,
            "detail": f"{second:.2f} s vs {first:.1f} s ({statistics.mean([second / first]):.3f}x)",
        }],
    )


if __name__ == "__main__":
    sys.exit(main())
