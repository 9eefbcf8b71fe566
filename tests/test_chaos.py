"""The invariant under random faults.

Hundreds of random saves, overwrites and deletes over a few dozen paths, on three media
hosts (nginx and two MediaServers; then nginx, a lighttpd WebDAV host and a Tahoe-LAFS
grid), while hosts go down, answer 5xx or slowly, a worker is
SIGKILLed and the Redis broker restarts. Then: heal everything, reconcile, drain, and every
host must equal the master byte for byte.

The README promises that a message lost anywhere is repaired within one reconcile period:
after healing, with the default retry settings (RESTO_FAILED_RETRY_AFTER, the grace for
lost retries), while reconcile runs every RECONCILE_PERIOD seconds as beat would run it,
every host must equal the master within two periods, or, when a slow host is still
applying what was sent, once the queue drains with no further pass.

RESTO_CHAOS_OPS (default 300) and RESTO_CHAOS_SEED (default: random, printed) size and
replay a run.
"""
import os
import random
import threading
import time
from collections import Counter

import pytest
from django.core.files.base import ContentFile

from resto_celery.tasks import reconcile
from tests.site import became_true

pytestmark = [pytest.mark.chaos, pytest.mark.nginx, pytest.mark.django_db(transaction=True)]

OPS = int(os.environ.get("RESTO_CHAOS_OPS", "300"))
PATHS = [f"dir{index % 4}/file {index}.bin" for index in range(30)]

# Faults come fast here, so retries do too; failed_retry_after is the default (300 s): a host
# that comes back must not wait for it.
CHAOS_OPTIONS = {
    "timeout": 1,
    "lease_ttl": 3,
    "max_retries": 3,
    "retry_backoff": 0.1,
    "retry_backoff_max": 0.5,
    "breaker_threshold": 5,
    "breaker_cooldown": 1,
    "failed_retry_after": 300,
}

#: How often the test's beat sends resto_celery.reconcile (seconds).
RECONCILE_PERIOD = 10.0
#: How long the queue may take to drain after the last pass was sent (seconds): the time a
#: slow host takes to apply what the passes sent, not a grace for lost changes.
DRAIN_TIMEOUT = 60.0


def _content(rng):
    size = rng.choice([0, 1, 100, 10_000, 100_000, 700_000])
    return rng.randbytes(size)


class Chaos:
    """Injects one random fault at a time and remembers how to undo it."""

    def __init__(self, rng, site, redis_server):
        self.rng = rng
        self.site = site
        self.redis_server = redis_server
        self.faults = Counter()
        self.down = set()

    def strike(self):
        kind = self.rng.choice(["outage", "outage", "5xx", "slow", "recover", "recover"])
        host = self.rng.choice(self.site.hosts)
        if kind == "outage" and host not in self.down:
            host.go_down()
            self.down.add(host)
        elif kind == "recover" and self.down:
            back = self.rng.choice(sorted(self.down, key=id))
            back.come_back()
            self.down.discard(back)
        elif kind == "5xx" and hasattr(host, "fail_next"):
            host.fail_next(count=self.rng.randint(1, 6), status=self.rng.choice([500, 502, 503]))
        elif kind == "slow" and hasattr(host, "set_delay"):
            # Longer than the timeout sometimes: the PUT lands after the client gave up.
            host.set_delay(self.rng.choice([0.2, 0.6, 1.5]), count=self.rng.randint(1, 4))
        else:
            return
        self.faults[kind] += 1

    def kill_a_worker(self):
        running = [worker for worker in self.site.workers if worker.running]
        if running:
            running[0].kill()
            self.faults["worker SIGKILL"] += 1
        self.site.start_worker(concurrency=2, visibility_timeout=4)

    def restart_dead_workers(self):
        """Start a worker when none runs, as systemd or Docker would: kombu 5.7's Redis channel
        can die of a broker restart (``'NoneType' object has no attribute 'hostname'``)."""
        if not any(worker.running for worker in self.site.workers):
            self.site.start_worker(concurrency=2, visibility_timeout=4)
            self.faults["worker restarted after dying"] += 1

    def restart_the_broker(self):
        self.redis_server.restart()
        self.faults["broker restart"] += 1

    def heal(self):
        self.restart_dead_workers()
        for host in self.down:
            host.come_back()
        self.down.clear()
        for host in self.site.hosts:
            if hasattr(host, "reset_faults"):
                host.reset_faults()


def test_random_faults_never_break_the_invariant(make_site, make_media_server, make_nginx, redis_server, capsys):
    hosts = [make_nginx(), make_media_server(), make_media_server()]
    _chaos(make_site(hosts=hosts, **CHAOS_OPTIONS), redis_server, capsys, OPS)


@pytest.mark.lighttpd
@pytest.mark.tahoe
def test_random_faults_with_a_webdav_and_a_tahoe_host_never_break_the_invariant(
    make_site, make_nginx, make_dav_server, make_tahoe_host, redis_server, capsys
):
    hosts = [make_nginx(), make_dav_server("lighttpd"), make_tahoe_host()]
    _chaos(make_site(hosts=hosts, **CHAOS_OPTIONS), redis_server, capsys, max(OPS // 2, 20))


def _chaos(site, redis_server, capsys, operations):
    seed = int(os.environ.get("RESTO_CHAOS_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    site.start_worker(concurrency=2, visibility_timeout=4)
    site.start_worker(concurrency=2, visibility_timeout=4)
    chaos = Chaos(rng, site, redis_server)
    ops = Counter()
    kill_at = {operations // 3, (2 * operations) // 3}
    restart_at = operations // 2

    started = time.monotonic()
    for index in range(operations):
        if rng.random() < 0.08:
            chaos.strike()
        if index in kill_at:
            chaos.kill_a_worker()
        if index == restart_at:
            chaos.restart_the_broker()
        name = rng.choice(PATHS)
        kind = rng.choice(["save", "save", "overwrite", "overwrite", "delete"])
        if kind == "delete" or kind == "overwrite":
            site.storage.delete(name)
        if kind != "delete":
            site.storage.save(name, ContentFile(_content(rng)))
        ops[kind] += 1
        time.sleep(rng.choice([0, 0.005, 0.02]))
    ops_seconds = time.monotonic() - started

    chaos.heal()
    healed = time.monotonic()
    with _beat(site, RECONCILE_PERIOD) as passes:
        in_time = became_true(lambda: site.drained() and site.converged(), 2 * RECONCILE_PERIOD, interval=0.2)
    rounds = passes[0]
    if not in_time:
        # The passes were sent; what they sent may still be running on a slow host (a Tahoe
        # node on a busy machine needs seconds per upload). With no reconcile any more, the
        # queue must drain and leave every host equal to the master: a change that no pass
        # re-sent stays missing.
        became_true(site.drained, DRAIN_TIMEOUT, interval=0.2)
        if not site.converged():
            raise AssertionError(
                f"not repaired by the reconcile passes of two periods ({rounds} sent, seed {seed}): "
                f"{_differences(site)}"
            )
    converge_seconds = time.monotonic() - healed

    logs = site.logs()
    master = site.master_files()
    with capsys.disabled():
        print(
            f"\nchaos seed={seed} hosts={[type(h).__name__ for h in site.hosts]}: "
            f"{sum(ops.values())} ops {dict(ops)} in {ops_seconds:.1f}s, "
            f"{len(master)} files at the end; faults {dict(chaos.faults)}; "
            f"{logs.count('retry: Retry in')} retries, {logs.count('raised unexpected')} final failures; "
            f"converged {converge_seconds:.1f}s after healing{'' if in_time else ' (drained after the last pass)'} "
            f"({rounds} reconcile passes, one every {RECONCILE_PERIOD:.0f}s)"
        )
    for host in site.hosts:
        assert host.files() == master, f"{host!r} differs from the master (seed {seed})"


class _beat:
    """Sends resto_celery.reconcile every ``period`` seconds, as celery beat would, from now on."""

    def __init__(self, site, period):
        self.site, self.period = site, period
        self.stop = threading.Event()
        self.passes = [0]

    def __enter__(self):
        def tick():
            while not self.stop.wait(self.period):
                reconcile.apply_async(queue=self.site.queue, expires=self.period)
                self.passes[0] += 1

        self.thread = threading.Thread(target=tick, daemon=True, name="test-beat")
        self.thread.start()
        return self.passes

    def __exit__(self, *exc_info):
        self.stop.set()
        self.thread.join(timeout=5)


def _differences(site):
    """What differs, for the failure message: per host, the paths and their Replica rows."""
    from resto_celery.models import Replica

    master = site.master_files()
    report = [f"drained={site.drained()}"]
    suspects = set()
    for host in site.hosts:
        files = host.files()
        wrong = sorted(path for path in set(master) | set(files) if master.get(path) != files.get(path))
        rows = {
            row.path: (
                f"{row.state} attempts={row.attempts} retry_at={row.retry_at:%H:%M:%S} error={row.last_error[:600]!r}"
                if row.retry_at else f"{row.state} attempts={row.attempts}"
            )
            for row in Replica.objects.filter(host=getattr(host, "url", None) or str(host), path__in=wrong)
        }
        report.append(f"{host!r}: {[(path, rows.get(path, 'no row')) for path in wrong[:5]]} ({len(wrong)} paths)")
        suspects.update(wrong[:2])
    # What the workers said about those paths, and the reconcile passes: a stranger reading a
    # CI failure needs them to tell a lost change from a slow one.
    said = [
        line[:300] for line in site.logs().splitlines()
        if "Reconcile" in line or any(path in line for path in suspects)
    ]
    return "; ".join(report) + f"; now {time.strftime('%H:%M:%S')}\nworker logs:\n" + "\n".join(said[-40:])
