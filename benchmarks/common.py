"""What the benchmarks share: their own Redis and database, statistics, and the report.

Every benchmark starts what it needs (a private ``RedisServer``, the bench database,
migrated) and measures on loopback only. Results are medians over rounds with their
spread, and ratios to a baseline measured in the same run: the machine may be shared
and noisy, so no absolute number is comparable from one run to the next.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS_MODULE = "benchmarks.settings"
BROKER_ENV = "RESTO_BENCH_BROKER_URL"


# Command line


def argument_parser(description):
    """An ``ArgumentParser`` with the options every benchmark takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds (numbers mean little)")
    parser.add_argument("--output", type=Path, help="write the results as JSON to this file")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of the code under test")
    return parser


# Services


@contextmanager
def private_redis():
    """Start a private redis-server on 127.0.0.1, make it the Celery broker, yield it."""
    from resto_celery.testing.redis_server import RedisServer

    with tempfile.TemporaryDirectory(prefix="resto-bench-redis-") as workdir:
        server = RedisServer(workdir=workdir).start()
        os.environ[BROKER_ENV] = server.url
        try:
            yield server
        finally:
            server.stop()


def flush_redis(url):
    """Empty the Redis database at ``url`` (the queues filled by a round)."""
    import redis

    with redis.Redis.from_url(url) as client:
        client.flushdb()


def queue_length(url, queue="resto"):
    """How many messages wait in ``queue`` on the Redis broker at ``url`` (both lanes)."""
    import redis

    from resto_celery import lanes

    with redis.Redis.from_url(url) as client:
        return sum(client.llen(key) for key in lanes.queue_keys(queue))


def queued_changes(url, queue="resto"):
    """How many changes the messages waiting in ``queue`` carry (a ``replicate_batch`` carries
    several; any other message one)."""
    import base64

    import redis

    from resto_celery import lanes

    changes = 0
    with redis.Redis.from_url(url) as client:
        for key in lanes.queue_keys(queue):
            for raw in client.lrange(key, 0, -1):
                message = json.loads(raw)
                if message["headers"]["task"] == "resto_celery.replicate_batch":
                    changes += len(json.loads(base64.b64decode(message["body"]))[0][0])
                else:
                    changes += 1
    return changes


def setup_django():
    """Set Django up with the bench settings on a new, empty database, migrated.

    The bench database is dropped and made again each run, so a migration edited in place
    (before a release) or rows left by an interrupted run cannot skew the numbers.
    """
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", SETTINGS_MODULE)
    from django.conf import settings

    database = settings.DATABASES["default"]
    if database["ENGINE"].endswith("postgresql"):
        _recreate_postgres_database(database)
    elif os.path.exists(database["NAME"]):
        os.unlink(database["NAME"])
    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


def _recreate_postgres_database(database):
    """Drop the bench database if it exists and create it (outside a transaction: autocommit)."""
    import psycopg

    with psycopg.connect(
        host=database["HOST"], port=database["PORT"], user=database["USER"], dbname="postgres", autocommit=True
    ) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{database["NAME"]}"')
        connection.execute(f'CREATE DATABASE "{database["NAME"]}"')


def celery_app():
    """A Celery app configured from the bench settings, as a project's ``proj/celery.py``.

    It becomes the current app, so ``resto_celery``'s shared tasks publish through it.
    """
    from celery import Celery

    app = Celery("resto_bench")
    app.config_from_object("django.conf:settings", namespace="CELERY")
    return app


def celery_worker(pool, concurrency, logfile, queues=("resto",), wrapper=()):
    """A real ``celery worker`` process of the bench app (``celery_app.py``), started, with this
    process's ``RESTO_BENCH_*`` settings (broker, storage options, database)."""
    from resto_celery.testing.worker import CeleryWorker

    env = {key: os.environ[key] for key in os.environ if key.startswith("RESTO_BENCH_")}
    env.update({"DJANGO_SETTINGS_MODULE": SETTINGS_MODULE, "PYTHONPATH": str(ROOT)})
    return CeleryWorker(
        "benchmarks.celery_app", queues=queues, pool=pool, concurrency=concurrency, env=env, logfile=logfile,
        wrapper=wrapper,
    ).start()


def empty_table(model):
    """Delete every row of ``model``'s table quickly (``TRUNCATE`` where the database has it)."""
    from django.core.management.color import no_style
    from django.db import connection

    with connection.cursor() as cursor:
        for statement in connection.ops.sql_flush(no_style(), [model._meta.db_table]):
            cursor.execute(statement)


# Measuring


def summarize(values):
    """``{"median", "min", "max", "n"}`` of a list of numbers."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def percentile(values, fraction):
    """The value at ``fraction`` (0 to 1) of ``values`` sorted (the nearest rank, no interpolation)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


class PeakRSS:
    """The growth of the resident set size of this process while the block runs.

    Linux only: the kernel's high-water mark (``VmHWM``) is reset by writing ``5`` to
    ``/proc/self/clear_refs`` before the block and read after it. ``delta`` is the peak
    minus the RSS at the start, in bytes, or None where that cannot be measured.
    """

    def __init__(self):
        self.delta = None

    def __enter__(self):
        self._start = None
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self._start = _proc_status("VmRSS")
        except OSError:
            pass
        return self

    def __exit__(self, *exc_info):
        if self._start is not None:
            self.delta = _proc_status("VmHWM") - self._start


def _proc_status(field):
    """A memory field of ``/proc/self/status``, in bytes."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def print_profile(label, function, *args, limit=20):
    """Run ``function(*args)`` under cProfile and print where the time goes; return its result."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    result = profiler.runcall(function, *args)
    print(f"\n--- cProfile: {label} (sorted by own time) ---")
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(limit)
    return result


# Report


def environment():
    """Where and when the numbers were measured: versions, machine, load."""
    import celery
    import django
    import kombu
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT version()" if connection.vendor == "postgresql" else "SELECT sqlite_version()")
        database = f"{connection.vendor} {cursor.fetchone()[0].split(' on ')[0]}"
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git_commit(),
        "python": platform.python_version(),
        "django": django.get_version(),
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "database": database,
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_at_start": [round(load, 2) for load in os.getloadavg()],
    }


def measured_note(environment):
    """The note that says where, when and under which load a result was measured."""
    return (
        f"Measured {environment['date']} on {environment['machine']}, commit {environment['commit']}, "
        f"{environment['database']}; load average (1, 5, 15 min) at start {environment['load_average_at_start']}, "
        f"at end {[round(load, 2) for load in os.getloadavg()]} (this benchmark itself keeps about 1-2 CPUs busy)."
    )


def _git_commit():
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        # The results a run writes as it goes do not make the code it measures uncommitted.
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"],
            cwd=ROOT, capture_output=True, text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+uncommitted changes" if dirty else "")


def markdown_table(headers, rows):
    """A Markdown table (also readable as plain text)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def render(result):
    """The Markdown text of one benchmark's result: its tables, goals and notes."""
    parts = [f"## {result['title']}", "", result["description"], ""]
    for table in result["tables"]:
        parts += [f"**{table['title']}**", "", markdown_table(table["headers"], table["rows"]), ""]
    for title, image in result.get("plots", []):
        parts += [f"![{title}]({image})", ""]
    if result["goals"]:
        parts += ["**Goals**", ""]
        parts += [f"- {_verdict(goal['met'])}: {goal['goal']} ({goal['detail']})" for goal in result["goals"]]
        parts.append("")
    parts += [f"- {note}" for note in result["notes"]]
    return "\n".join(parts).rstrip() + "\n"


def _verdict(met):
    return {True: "MET", False: "NOT MET", None: "NOT EVALUATED"}[met]


def write_result(args, benchmark, title, description, *, environment, parameters=None, notes=(),
                 with_measured_note=True, **fields):
    """Print one benchmark's result and write it to ``args.output`` (see :func:`report`); return 0,
    the exit status of its ``main()``.

    The result holds, in this order: ``benchmark``, ``title``, ``description``, ``quick``,
    ``parameters`` (when given), ``environment``, then ``fields`` in the order given
    (``results``, ``tables``, ``plots``, ``goals``: what :func:`render` and ``run.write_summary``
    read), and last ``notes``, which ends with the :func:`measured_note` of ``environment``
    unless ``with_measured_note`` is false.
    """
    result = {"benchmark": benchmark, "title": title, "description": description, "quick": args.quick}
    if parameters is not None:
        result["parameters"] = parameters
    result["environment"] = environment
    result.update(fields)
    result["notes"] = [*notes, measured_note(environment)] if with_measured_note else list(notes)
    report(result, args.output)
    return 0


def results_folder(output):
    """The folder of the plots: ``output``'s, or ``benchmarks/results`` without one; made if missing."""
    folder = output.parent if output else ROOT / "benchmarks" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def report(result, output=None):
    """Print ``result`` and write it as JSON to ``output`` when given."""
    print()
    print(render(result))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"Results written to {output}")


def micros(nanoseconds):
    """``1234.5`` ns -> ``"1.2"`` (µs), for tables."""
    return f"{nanoseconds / 1000:,.1f}"


def ratio(value):
    """``2.345`` -> ``"2.35x"``, for tables."""
    return f"{value:.2f}x"


def mebibytes(size):
    """Bytes -> ``"1.2 MiB"`` (``"340 KiB"`` under 1 MiB), or ``"n/a"`` for None."""
    if size is None:
        return "n/a"
    return f"{size / 2**20:,.1f} MiB" if size >= 2**20 else f"{size / 2**10:,.0f} KiB"
