"""One media host goes down under steady load: the others' lag, the catch-up, the dead host's cost.

An operator's day (issue 19): three nginx hosts, one worker (threads, 8), an app making
changes at a steady rate (10 KB files: new files, overwrites with a new size, deletes),
while host 3 is down for ``DOWN`` seconds of every ``CYCLE``. Measured in one run:

- **steady lag**: for each change, the time from ``save()``/``delete()`` returning to a
  host holding it (the right size, or gone), p50/p99, before any fault;
- **reachable hosts' lag during the outages**: the same, for hosts 1 and 2, for changes
  made while host 3 is down; the goal is a p99 within 1.5x the steady p99;
- **catch-up after each return**: from host 3 answering again to it holding every change
  made before its return; the goal is 10 s plus the time the backlog takes;
- **the dead host's cost**: per-host tasks (retries, probes) the worker received per
  minute of outage: with the breaker open, it should not grow with the changes waiting.

    python -m benchmarks.bench_outage [--quick] [--output FILE]
"""
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

from benchmarks import common
from benchmarks.common import percentile
from benchmarks.nginx_site import Changes, nginx_installed, running_site

RATE = 8.0  # changes per second: about a third of what the worker moves
ISOLATION_GOAL = 1.5  # reachable hosts' p99 during the outage / steady p99
CATCH_UP_GOAL = 10.0  # seconds, plus the backlog at full speed
OPTIONS = {  # the defaults an operator has, with hosts on loopback
    "timeout": 5, "lease_ttl": 30, "breaker_threshold": 5, "breaker_cooldown": 30, "max_retries": 6,
    "retry_backoff": 2, "failed_retry_after": 300,
}


def _tasks_received(logfile, names=("upload", "delete", "probe")):
    """``{task: how many the worker received}`` for the per-host tasks, from its log."""
    text = Path(logfile).read_text(errors="replace")
    return {name: len(re.findall(rf"Task resto_celery\.{name}\[[^\]]+\] received", text)) for name in names}


def _watch_catch_up(changes, dead, back, result, timeout=300):
    """Append the seconds from ``back`` until host ``dead`` held every change made before it."""
    deadline = back + timeout
    while time.perf_counter() < deadline:
        if not changes.waiting_on(dead, back):
            result.append(time.perf_counter() - back)
            return
        time.sleep(0.01)


def run(bench, steady_seconds, cycles, down, cycle):
    changes = Changes(bench, RATE)
    dead = len(bench.hosts) - 1
    try:
        received_start = _tasks_received(bench.worker.logfile)
        changes.run(steady_seconds)
        steady_end = time.perf_counter()
        outages, catch_ups = [], []
        steady_end_received = _tasks_received(bench.worker.logfile)
        steady_received = {name: steady_end_received[name] - received_start[name] for name in received_start}
        received = dict.fromkeys(received_start, 0)
        for _ in range(cycles):
            bench.hosts[dead].go_down()
            went = time.perf_counter()
            before = _tasks_received(bench.worker.logfile)
            changes.run(down)
            after = _tasks_received(bench.worker.logfile)
            for name in received:
                received[name] += after[name] - before[name]
            bench.hosts[dead].come_back()
            back = time.perf_counter()
            outages.append((went, back))
            caught_up = []
            watcher = threading.Thread(target=_watch_catch_up, args=(changes, dead, back, caught_up), daemon=True)
            watcher.start()
            changes.run(cycle - down)  # the site goes on while the host catches up
            watcher.join(300)
            catch_ups.append(caught_up[0] if caught_up else None)
        changes.wait(120)
    finally:
        changes.close()
    steady = [lag for _, _, made, lag in changes.landed if made < steady_end]
    during = [lag for index, _, made, lag in changes.landed
              if index != dead and any(start <= made < end for start, end in outages)]
    return steady, during, catch_ups, steady_received, received, sum(end - start for start, end in outages)


def main(argv=None):
    parser = common.argument_parser(__doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    quick = args.quick
    steady_seconds, cycles, down, cycle = (10, 1, 8, 20) if quick else (60, 3, 10, 40)
    if not nginx_installed():
        return 0
    with running_site("resto-bench-outage-", OPTIONS) as (bench, environment):
        try:
            bench.reset()
            bench.start_worker("threads", 8)
            steady, during, catch_ups, steady_received, received, outage_seconds = run(
                bench, steady_seconds, cycles, down, cycle
            )
        finally:
            if os.environ.get("RESTO_BENCH_KEEP_LOG") and bench.worker is not None:
                shutil.copy(bench.worker.logfile, os.environ["RESTO_BENCH_KEEP_LOG"])

    steady_p99 = percentile(steady, 0.99)
    during_p99 = percentile(during, 0.99) if during else None
    isolation = during_p99 / steady_p99 if during_p99 is not None else None
    per_minute = sum(received.values()) / (outage_seconds / 60)
    steady_per_minute = sum(steady_received.values()) / (steady_seconds / 60)
    done = [value for value in catch_ups if value is not None]
    return common.write_result(
        args, "bench_outage", "A media host down under steady load",
        f"3 nginx hosts on 127.0.0.1, one worker (threads, 8), PostgreSQL rows; {RATE:.0f} changes/s of 10 KB "
        f"(new files, overwrites, deletes). {steady_seconds} s steady, then host 3 is down {down} s of every "
        f"{cycle} s, {cycles} time(s). Lag: from save()/delete() returning to the host holding the change. "
        f"Options: {', '.join(f'{k}={v}' for k, v in OPTIONS.items())}.",
        parameters={"rate": RATE, "steady_s": steady_seconds, "cycles": cycles, "down_s": down, "cycle_s": cycle},
        environment=environment,
        results={
            "steady_ms": {"p50": percentile(steady, .5) * 1000, "p99": steady_p99 * 1000, "count": len(steady)},
            "reachable_during_outage_ms": None if not during else {
                "p50": percentile(during, .5) * 1000, "p99": during_p99 * 1000, "count": len(during)},
            "catch_up_s": catch_ups,
            "per_host_tasks_per_minute": {"steady": steady_per_minute, "outage": per_minute},
            "per_host_tasks": {"steady": steady_received, "outage": received},
        },
        tables=[{
            "title": "Lag and catch-up",
            "headers": ["steady p50 ms", "steady p99 ms", "reachable hosts p99 during the outage ms",
                        "ratio to steady p99", "catch-up after each return s",
                        "per-host tasks per minute: steady / during the outage"],
            "rows": [[
                f"{percentile(steady, .5) * 1000:.0f}", f"{steady_p99 * 1000:.0f}",
                f"{during_p99 * 1000:.0f}" if during_p99 is not None else "n/a",
                common.ratio(isolation) if isolation is not None else "n/a",
                ", ".join("not caught up" if value is None else f"{value:.1f}" for value in catch_ups),
                f"{steady_per_minute:.0f} / {per_minute:.0f} "
                f"({', '.join(f'{name} {count}' for name, count in received.items())})",
            ]],
        }],
        goals=[
            {"goal": f"reachable hosts' lag p99 during the outage within {ISOLATION_GOAL}x the steady p99",
             "met": None if isolation is None else isolation <= ISOLATION_GOAL,
             "detail": "no change during the outage" if isolation is None else f"{isolation:.2f}x"},
            {"goal": f"the returned host holds every earlier change within {CATCH_UP_GOAL:.0f} s (+ the backlog)",
             "met": len(done) == len(catch_ups) and max(done, default=0) <= CATCH_UP_GOAL + 2,
             "detail": f"max {max(done, default=0):.1f} s"},
        ],
        notes=[
            "Per-host tasks: resto_celery.upload/delete/probe messages the worker received, per minute of the "
            "steady phase and of the outages (retries: a busy lease when a path changes twice in a row, a failure; "
            "probes of the down host; the one message per change, resto_celery.replicate, is not counted), while "
            "the host is down (its return and catch-up excluded). What the outage adds is the dead host's cost.",
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
