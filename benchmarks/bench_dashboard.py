"""The admin dashboard's figures (``status.host_statuses()``) over many ``Replica`` rows.

The dashboard and ``resto_status`` run one grouped count plus three index lookups per host;
this measures their time and query count at a small baseline table and at a large one
(default 1,000,000 rows over 3 hosts), so the ratio shows whether the cost grows with rows.

    python -m benchmarks.bench_dashboard [--rows N] [--quick]
"""
import time
from datetime import timedelta

from benchmarks import common

HOSTS = ["http://media-1.bench/media/", "http://media-2.bench/media/", "http://media-3.bench/media/"]
ROUNDS = 7
BASELINE_ROWS = 1_000


def fill(rows):
    """Insert ``rows`` Replica rows over the hosts: mostly synced, some pending and failed."""
    from django.utils import timezone

    from resto_celery.models import Replica

    common.empty_table(Replica)
    now = timezone.now()
    batch = []
    for index in range(rows):
        host = HOSTS[index % len(HOSTS)]
        kind = index % 100
        if kind == 0:
            fields = {"state": "failed", "last_error": "PUT x failed: 503",
                      "last_error_at": now - timedelta(seconds=index),
                      "pending_since": now - timedelta(seconds=2 * index), "attempts": 7}
        elif kind < 3:
            fields = {"state": "pending", "pending_since": now - timedelta(seconds=index), "attempts": 1}
        else:
            fields = {"state": "synced", "last_success_at": now - timedelta(seconds=index),
                      "fingerprint": f"{index}:1:2"}
        batch.append(Replica(host=host, path=f"d{index % 997}/f{index}.jpg", **fields))
        if len(batch) == 5000:
            Replica.objects.bulk_create(batch)
            batch = []
    Replica.objects.bulk_create(batch)
    from django.db import connection

    if connection.vendor == "postgresql":
        # What autovacuum does on a live table: statistics, and the visibility map that
        # lets the grouped count read the (host, state) index alone.
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE resto_celery_replica")


def measure():
    """Median seconds and the query count of one ``host_statuses()`` + ``totals()``."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from resto_celery import status

    times, queries = [], 0
    for _ in range(ROUNDS):
        with CaptureQueriesContext(connection) as captured:
            started = time.perf_counter()
            statuses = status.host_statuses()
            status.totals(statuses)
            times.append(time.perf_counter() - started)
        queries = len(captured.captured_queries)
    return common.summarize(times), queries, statuses


def main(argv=None):
    parser = common.argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the large table (default 1,000,000)")
    args = parser.parse_args(argv)
    rows = 20_000 if args.quick else args.rows

    with common.private_redis() as redis:
        common.setup_django()
        from django.conf import settings

        settings.STORAGES = {
            "default": {
                "BACKEND": "resto_celery.storage.AsyncStorage", "OPTIONS": {"hosts": HOSTS, "redis_url": redis.url},
            },
        }
        results = {}
        for label, count in (("baseline", BASELINE_ROWS), ("large", rows)):
            started = time.monotonic()
            fill(count)
            print(f"{count:,} rows inserted in {time.monotonic() - started:.0f} s", flush=True)
            results[label] = (count, *measure())

    base_count, base_time, base_queries, _ = results["baseline"]
    count, _, large_queries, statuses = results["large"]
    rows_table = [
        [f"{n:,}", queries, f"{summary['median'] * 1000:,.1f}",
         f"{summary['min'] * 1000:,.1f} – {summary['max'] * 1000:,.1f}",
         common.ratio(summary["median"] / base_time["median"])]
        for n, summary, queries, *_ in (results["baseline"], results["large"])
    ]
    checked = sum(s.synced + s.pending + s.failed for s in statuses)
    return common.write_result(
        args, "bench_dashboard", "Admin dashboard figures",
        (
            f"`status.host_statuses()` and `totals()` (what the dashboard and `resto_status` run) for "
            f"{len(HOSTS)} hosts, over a {base_count:,}-row table (the baseline) and a {count:,}-row one "
            f"(1% failed, 2% pending, the rest synced). {ROUNDS} runs each: median and range; ratio to the baseline."
        ),
        environment=common.environment(),
        results={label: {"rows": n, "queries": q, "seconds": t} for label, (n, t, q, _) in results.items()},
        tables=[
            {"title": "Time and queries",
             "headers": ["rows", "queries", "median ms", "min – max ms", "ratio to baseline"],
             "rows": rows_table},
        ],
        goals=[
            {"goal": "the query count does not grow with the rows", "met": base_queries == large_queries,
             "detail": f"{base_queries} queries at {base_count:,} rows, {large_queries} at {count:,}"},
        ],
        notes=[f"The figures counted {checked:,} rows, as inserted."],
        with_measured_note=False,
    )


if __name__ == "__main__":
    main()
