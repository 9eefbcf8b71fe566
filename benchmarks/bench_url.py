"""What read-your-writes URLs cost a page: 100 ``url()`` calls of replicated files.

A page that lists 100 uploads calls ``storage.url()`` 100 times. The baseline is
``FileSystemStorage.url()``; against it, ``AsyncStorage`` without ``master_url`` (``base_url``
+ name, as Django) and with ``master_url`` (each call asks the process's snapshot of the
paths still on their way, read from Redis at most once a second), with none, 10% and all
of the 100 files still on their way. The snapshot is refreshed before each page, so every
page pays one ``HKEYS`` round trip: the worst case, where the staleness bound of one
second has just run out.

    python -m benchmarks.bench_url [--quick]
"""
import statistics
import tempfile
import time

from benchmarks import common

PAGE = 100
ROUNDS = 7
PAGES_PER_ROUND = 200
GOAL_EXTRA_SECONDS = 0.001


def page_time(storage, names, refresh=None):
    """Median seconds of rendering the ``url()`` of every name, over ``PAGES_PER_ROUND`` pages."""
    times = []
    for _ in range(PAGES_PER_ROUND):
        if refresh is not None:
            refresh()
        started = time.perf_counter()
        for name in names:
            storage.url(name)
        times.append(time.perf_counter() - started)
    times.sort()
    return times[len(times) // 2]


def main(argv=None):
    parser = common.argument_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    rounds = 2 if args.quick else ROUNDS
    with common.private_redis() as redis_server:
        common.setup_django()
        common.celery_app().set_current()
        from django.core.files.storage import FileSystemStorage

        from resto_celery import freshness
        from resto_celery.storage import AsyncStorage

        location = tempfile.mkdtemp(prefix="resto-bench-url-")
        names = [f"photos/2026/11/{index:04d}.jpg" for index in range(PAGE)]
        hosts = ["http://media-1.bench/media/", "http://media-2.bench/media/"]
        options = {"location": location, "base_url": "https://media.example.com/media/", "hosts": hosts,
                   "redis_url": redis_server.url}
        baseline = FileSystemStorage(location=location, base_url="https://media.example.com/media/")
        plain = AsyncStorage(**options)
        fresh = AsyncStorage(**options, master_url="/master-media/")
        unconfirmed = fresh._unconfirmed

        def expire_snapshot():
            unconfirmed.view.read_at = -freshness.STALENESS  # the next url() reads Redis again

        configurations = [
            ("FileSystemStorage (baseline)", baseline, None, 0),
            ("AsyncStorage, no master_url", plain, None, 0),
            ("AsyncStorage + master_url, none pending", fresh, expire_snapshot, 0),
            ("AsyncStorage + master_url, 10 of 100 pending", fresh, expire_snapshot, 10),
            ("AsyncStorage + master_url, all 100 pending", fresh, expire_snapshot, 100),
        ]
        measured = {label: [] for label, *_ in configurations}
        for _ in range(rounds):
            for label, storage, refresh, pending in configurations:
                unconfirmed.client.delete(unconfirmed.key)
                unconfirmed.view.own.clear()
                for name in names[:pending]:
                    unconfirmed.client.hset(unconfirmed.key, name, "1:2:3")  # marked by another process
                expire_snapshot()
                if pending:
                    assert fresh.url(names[0]).startswith("/master-media/"), "the pending file must point at the master"
                measured[label].append(page_time(storage, names, refresh))

    base = measured["FileSystemStorage (baseline)"]
    rows, goals = [], []
    for label, *_ in configurations:
        summary = common.summarize(measured[label])
        extra = [value - reference for value, reference in zip(measured[label], base, strict=True)]
        rows.append([
            label, f"{summary['median'] * 1e6:,.0f}", f"{summary['min'] * 1e6:,.0f} – {summary['max'] * 1e6:,.0f}",
            f"{statistics.median(extra) * 1e6:+,.0f}",
            common.ratio(statistics.median(
                [value / reference for value, reference in zip(measured[label], base, strict=True)]
            )),
        ])
        if "master_url" in label and "no master_url" not in label:
            goals.append({
                "goal": f"{label}: at most 1 ms more per page of {PAGE} url() calls than FileSystemStorage",
                "met": statistics.median(extra) <= GOAL_EXTRA_SECONDS,
                "detail": f"{statistics.median(extra) * 1e6:+,.0f} µs per page (median of {rounds} rounds)",
            })
    return common.write_result(
        args, "bench_url", "url() on a page of 100 files (read-your-writes URLs)",
        (
            f"Median time of {PAGE} `url()` calls (one page), over {PAGES_PER_ROUND} pages per round, "
            f"{rounds} rounds; with `master_url` the process's snapshot of pending paths is expired before "
            f"every page, so each page pays one `HKEYS` (the worst case: at most once a second in production). "
            f"Ratio and extra time are to `FileSystemStorage.url()` in the same round."
        ),
        environment=common.environment(),
        tables=[{
            "title": "One page",
            "headers": ["storage", "median µs", "min – max µs", "extra µs vs baseline", "ratio to baseline"],
            "rows": rows,
        }],
        goals=goals,
        with_measured_note=False,
    )


if __name__ == "__main__":
    main()
