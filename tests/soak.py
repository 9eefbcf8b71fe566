"""The soak: minutes of steady load from several app processes while faults come and go.

:class:`Soak` drives a :class:`tests.site.ReplicationSite` (its media hosts, two real
workers, the private Redis): ``apps`` processes (:mod:`tests.soak_app`) save, overwrite and
delete at a steady rate while, in each cycle, one media host flaps (down, up, down, up),
one of the two workers is SIGKILLed and restarted, and the Redis broker restarts. Beat
sends reconcile every ``reconcile_period`` seconds. It records, over time:

- the lag of every change: from ``save()``/``delete()`` returning in the app process to a
  host holding it (a watcher stats the hosts' folders), and after each fault how long the
  hosts took to hold every change made before the fault ended (``recovery_s``);
- the queue's length (both lanes) and the unacknowledged messages;
- the resident memory of each worker (its process and children), the one never killed
  (``survivor``) and the one killed each cycle (``victim``).

At the end, once the load stops and everything is healed: every host must hold, for every
path, the bytes of the app's last change (``lost``: missing or older bytes; ``resurrected``:
a file the app deleted). ``tests/test_soak.py`` runs it short in CI; ``make soak`` long, with
a plot (:func:`plot`, matplotlib from the ``bench`` extra).
"""
import hashlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.common import queue_length
from resto_celery.testing._support import die_with_parent
from tests.site import ROOT, wait_until
from tests.test_chaos import _beat

#: Faults come fast, so retries do too; the breaker and the worker crash settings are short.
SOAK_OPTIONS = {
    "timeout": 2,
    "lease_ttl": 4,
    "max_retries": 3,
    "retry_backoff": 0.2,
    "retry_backoff_max": 1,
    "breaker_threshold": 5,
    "breaker_cooldown": 1,
    "failed_retry_after": 300,
}
AFTERMATH = 10.0  # seconds after a fault whose changes still count as its own (max_lag_s)
VISIBILITY_TIMEOUT = 4  # seconds before Redis redelivers a killed worker's tasks
WORKER = {"pool": "threads", "concurrency": 4}  # the README's recommended pool


def percentile(values, fraction):
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def process_rss(pid):
    """Resident memory of ``pid`` and its children, in bytes (Linux ``/proc``); None if gone."""
    def rss(one):
        with open(f"/proc/{one}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    try:
        total = rss(pid)
    except OSError:
        return None
    for entry in os.listdir("/proc"):
        if entry.isdigit() and entry != str(pid):
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
                if parent == pid:
                    total += rss(entry)
            except (OSError, ValueError, IndexError):
                continue
    return total


class Watcher(threading.Thread):
    """Reads the apps' journals and stats the hosts' folders: when each change reached each host."""

    def __init__(self, journals, roots):
        super().__init__(daemon=True, name="soak-watcher")
        self.journals = journals
        self.roots = roots
        self.offsets = dict.fromkeys(journals, 0)
        self.pending = {}  # (host index, path) -> [(made, size)], oldest first, not yet seen on the host
        self.landed = []  # (host index, made, lag): changes seen exactly
        self.resolved = []  # (made, resolved at): every change, once the host held it or a newer one
        self.changes = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.poll()
            time.sleep(0.02)

    def poll(self):
        for entry in self._read_journals():
            self.changes += 1
            for index in range(len(self.roots)):
                self.pending.setdefault((index, entry["path"]), []).append((entry["t"], entry["size"]))
        now = time.time()
        with self.lock:
            for key in list(self.pending):
                index, path = key
                try:
                    current = os.stat(self.roots[index] / path).st_size
                except (FileNotFoundError, NotADirectoryError):
                    current = None
                items = self.pending[key]
                match = None
                for position in range(len(items) - 1, -1, -1):
                    # An absent file matches only the newest change: before anything landed, a
                    # new path is absent too, and that says nothing about an earlier delete.
                    if items[position][1] == current and (current is not None or position == len(items) - 1):
                        match = position
                        break
                if match is None:
                    continue
                made, _ = items[match]
                self.landed.append((index, made, now - made))
                self.resolved.extend((older, now) for older, _ in items[: match + 1])
                del items[: match + 1]
                if not items:
                    del self.pending[key]

    def _read_journals(self):
        for journal in self.journals:
            try:
                with open(journal, "rb") as handle:
                    handle.seek(self.offsets[journal])
                    data = handle.read()
            except FileNotFoundError:
                continue
            complete = data.rfind(b"\n") + 1
            self.offsets[journal] += complete
            for line in data[:complete].splitlines():
                yield json.loads(line)

    def waiting(self):
        with self.lock:
            return sum(len(items) for items in self.pending.values())

    def recovery(self, end):
        """Seconds after ``end`` until every change made before it was on every host (None: never)."""
        with self.lock:
            if any(made < end for items in self.pending.values() for made, _ in items):
                return None
            return max([0.0] + [at - end for made, at in self.resolved if made < end])


class Soak:
    """One soak run over ``site`` (its hosts; the workers are started here). See the module."""

    def __init__(self, site, redis_server, folder, *, seconds, apps=3, rate=2.0, paths=20, cycle=None,
                 reconcile_period=5.0, warm_up=30.0, seed=0, faults=True, tracemalloc=False):
        self.site, self.redis_server, self.folder = site, redis_server, Path(folder)
        self.seconds, self.apps, self.rate, self.paths, self.seed = seconds, apps, rate, paths, seed
        self.cycle = cycle or (seconds if seconds < 300 else 150.0)
        self.reconcile_period, self.warm_up, self.with_faults = reconcile_period, warm_up, faults
        self.tracemalloc = tracemalloc
        self.flapping = site.hosts[-1]
        self.faults = []  # {"kind", "start", "end"} (seconds since the start)
        self.samples = []  # {"t", "queue", "unacked", "rss": {role: bytes}, "waiting"}
        self.workers = {}  # role -> CeleryWorker (the current incarnation)
        self.started = {}  # role -> seconds since the start when its current incarnation was ready
        self.worker_lock = threading.Lock()  # the fault injector and the supervisor replace workers
        self.restarts = []  # seconds since the start when the victim came back
        self.deaths = []  # workers that died by themselves: {"t", "role", "reason"}
        self.t0 = None

    # The run

    def run(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.tracemalloc:
            self._trace_worker_memory()
        self.workers["survivor"] = self.site.start_worker(visibility_timeout=VISIBILITY_TIMEOUT, **WORKER)
        self.workers["victim"] = self.site.start_worker(visibility_timeout=VISIBILITY_TIMEOUT, **WORKER)
        self.started = {"survivor": 0.0, "victim": 0.0}
        journals = [self.folder / f"journal-{index}.jsonl" for index in range(self.apps)]
        for journal in journals:
            journal.unlink(missing_ok=True)
        self.watcher = Watcher(journals, [Path(host.root) for host in self.site.hosts])
        self.t0 = time.time()
        processes = [self._start_app(index, journal) for index, journal in enumerate(journals)]
        self.watcher.start()
        sampler_stop = threading.Event()
        sampler = threading.Thread(target=self._sample, args=(sampler_stop,), daemon=True, name="soak-sampler")
        sampler.start()
        with _beat(self.site, self.reconcile_period):
            try:
                if self.tracemalloc:
                    threading.Timer(self.warm_up, self._snapshot).start()
                self._inject_faults()
                for process in processes:
                    process.wait(timeout=max(0.0, self.t0 + self.seconds + 30 - time.time()))
                self.load_end = time.time() - self.t0
                self._snapshot()
                self._heal()
                try:
                    wait_until(
                        lambda: self.site.drained() and self.watcher.waiting() == 0 and self.site.converged(),
                        timeout=3 * self.reconcile_period + 30, interval=0.2,
                        message="every host to hold every change after the load",
                    )
                except AssertionError as error:
                    with self.watcher.lock:
                        waiting = sorted(self.watcher.pending)[:5]
                    raise AssertionError(
                        f"{error}: drained={self.site.drained()}, {self.watcher.waiting()} changes not seen on a host "
                        f"(host index, path): {waiting}...; workers that died: {self.deaths}"
                    ) from None
                self.converged_after = time.time() - self.t0 - self.load_end
            finally:
                for process in processes:
                    if process.poll() is None:
                        process.kill()
                sampler_stop.set()
                sampler.join(5)
                self.watcher.stop.set()
                self.watcher.join(5)
        self.watcher.poll()
        return self.result()

    def _trace_worker_memory(self):
        """Workers with tracemalloc (:mod:`tests.soak_worker_settings`): a snapshot of the
        survivor after its warm-up and at the end of the load, compared in :meth:`result`."""
        snapshots = self.folder / "snapshots"
        snapshots.mkdir(exist_ok=True)
        extra = {"DJANGO_SETTINGS_MODULE": "tests.soak_worker_settings", "PYTHONTRACEMALLOC": "8",
                 "RESTO_SOAK_SNAPSHOTS": str(snapshots)}
        base = self.site.worker_env
        self.site.worker_env = lambda visibility_timeout=5: {**base(visibility_timeout), **extra}

    def _snapshot(self):
        if self.tracemalloc:
            import signal

            os.kill(self.workers["survivor"].pid, signal.SIGUSR2)

    def tracemalloc_top(self, limit=15):
        """What grew most in the survivor between its two snapshots, as text (file:line)."""
        import tracemalloc

        def snapshots():
            return sorted((self.folder / "snapshots").glob("*.snapshot"), key=lambda path: path.stat().st_mtime)

        try:
            wait_until(lambda: len(snapshots()) >= 2, timeout=60, message="the worker's second snapshot")
        except AssertionError as error:
            return str(error)
        paths = snapshots()
        first, last = tracemalloc.Snapshot.load(str(paths[0])), tracemalloc.Snapshot.load(str(paths[-1]))
        ignored = [tracemalloc.Filter(False, tracemalloc.__file__)]
        stats = last.filter_traces(ignored).compare_to(first.filter_traces(ignored), "traceback")
        lines = []
        for stat in stats[:limit]:
            lines.append(f"{stat.size_diff / 1024:+.1f} KiB in {stat.count_diff:+d} blocks")
            lines += [f"    {line}" for line in stat.traceback.format(limit=6)]
        return "\n".join(lines)

    def _start_app(self, index, journal):
        env = {
            **os.environ, **self.site.worker_env(),
            "RESTO_SOAK_APP": str(index), "RESTO_SOAK_RATE": str(self.rate), "RESTO_SOAK_SECONDS": str(self.seconds),
            "RESTO_SOAK_PATHS": str(self.paths), "RESTO_SOAK_SEED": str(self.seed), "RESTO_SOAK_JOURNAL": str(journal),
        }
        env.pop("PYTHONTRACEMALLOC", None)  # the workers' diagnosis only
        log = open(self.folder / f"app-{index}.log", "ab")
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "tests.soak_app"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,
            )
        finally:
            log.close()

    def schedule(self):
        """``[(seconds since the start, fault kind)]``: per cycle a host flap, a worker kill, a broker restart."""
        steps = []
        start = 0.0
        while self.with_faults and start + self.cycle <= self.seconds + 1e-6:
            steps += [(start + 0.12 * self.cycle, "host flap"), (start + 0.4 * self.cycle, "worker SIGKILL"),
                      (start + 0.65 * self.cycle, "broker restart")]
            start += self.cycle
        return steps

    def _inject_faults(self):
        flap = max(3.0, min(8.0, 0.06 * self.cycle))  # seconds down, then up, then down again
        for at, kind in self.schedule():
            self._sleep_until(at)
            started = self._now()
            if kind == "host flap":
                self.flapping.go_down()
                self._sleep_until(started + flap)
                self.flapping.come_back()
                self._sleep_until(started + 2 * flap)
                self.flapping.go_down()
                self._sleep_until(started + 3 * flap)
                self.flapping.come_back()
            elif kind == "worker SIGKILL":
                self._wait_for_work_in_flight(timeout=3.0)  # a kill that finds work to interrupt
                with self.worker_lock:
                    self.workers["victim"].kill()
                    self.workers["victim"] = self.site.start_worker(visibility_timeout=VISIBILITY_TIMEOUT, **WORKER)
                    self.restarts.append(self._now())
                    self.started["victim"] = self._now()
            else:
                self.redis_server.restart()
            self.faults.append({"kind": kind, "start": started, "end": self._now()})

    def _wait_for_work_in_flight(self, timeout):
        import redis

        deadline = time.monotonic() + timeout
        with redis.Redis.from_url(self.site.broker_url, socket_timeout=1) as client:
            while time.monotonic() < deadline:
                try:
                    if client.hlen("unacked"):
                        return
                except redis.RedisError:
                    return
                time.sleep(0.005)

    def _heal(self):
        if hasattr(self.flapping, "come_back"):
            self.flapping.come_back()

    def _now(self):
        return time.time() - self.t0

    def _sleep_until(self, at):
        time.sleep(max(0.0, at - self._now()))

    def _supervise(self):
        """Restart a worker that died by itself, as systemd or Docker would (``Restart=always``),
        and record it: the soak is about the site, which runs its workers supervised."""
        with self.worker_lock:
            for role, worker in list(self.workers.items()):
                if worker.running:
                    continue
                reasons = [line for line in worker.log().splitlines() if "CRITICAL" in line or "Unrecoverable" in line]
                self.deaths.append({"t": self._now(), "role": role, "reason": (reasons or ["?"])[-1][-300:]})
                self.workers[role] = self.site.start_worker(visibility_timeout=VISIBILITY_TIMEOUT, **WORKER)
                self.started[role] = self._now()

    def _sample(self, stop):
        import redis

        while not stop.wait(1.0):
            self._supervise()
            sample = {"t": self._now(), "waiting": self.watcher.waiting(), "queue": None, "unacked": None,
                      "rss": {role: process_rss(worker.pid) for role, worker in self.workers.items()}}
            try:
                sample["queue"] = queue_length(self.site.broker_url, self.site.queue)
                with redis.Redis.from_url(self.site.broker_url, socket_timeout=1) as client:
                    sample["unacked"] = client.hlen("unacked")
            except redis.RedisError:
                pass  # the broker is restarting
            self.samples.append(sample)

    # The figures

    def result(self):
        landed = [(index, made - self.t0, lag) for index, made, lag in self.watcher.landed]
        lags = [lag for _, _, lag in landed]
        in_fault = [lag for _, made, lag in landed if self._during_fault(made)]
        steady = [lag for _, made, lag in landed if not self._during_fault(made)]
        windows = []
        width = 10.0
        for start in range(0, int(self.load_end) + 1, int(width)):
            chunk = [lag for _, made, lag in landed if start <= made < start + width]
            if chunk:
                windows.append({"start": start, "count": len(chunk), "p50": percentile(chunk, 0.5),
                                "p99": percentile(chunk, 0.99), "max": max(chunk)})
        for fault in self.faults:
            fault["recovery_s"] = self.watcher.recovery(self.t0 + fault["end"])
            # What the fault did to changes made while it lasted and just after (a broker restart
            # delays the changes made while the apps reconnect, not the ones before it).
            around = [lag for _, made, lag in landed if fault["start"] <= made <= fault["end"] + AFTERMATH]
            fault["max_lag_s"] = max(around, default=0.0)
        lost, resurrected = self.compare_hosts()
        app_logs = "".join(log.read_text(errors="replace") for log in self.folder.glob("app-*.log"))
        worker_logs = self.site.logs()
        return {
            "seconds": self.seconds, "apps": self.apps, "rate_per_app": self.rate, "paths_per_app": self.paths,
            "cycle": self.cycle, "reconcile_period": self.reconcile_period, "hosts": [repr(h) for h in self.site.hosts],
            "changes": self.watcher.changes, "landed": len(landed),
            "lag_s": _summary(lags), "lag_steady_s": _summary(steady), "lag_during_faults_s": _summary(in_fault),
            "lag_windows": windows, "faults": self.faults, "converged_after_load_s": self.converged_after,
            "memory": self.memory(), "queue_max": max((s["queue"] or 0 for s in self.samples), default=0),
            "lost": lost, "resurrected": resurrected, "samples": self.samples,
            "enqueue_failures": app_logs.count("Failed to enqueue"), "retries": worker_logs.count("Will retry"),
            "workers_started": len(self.restarts) + len(self.deaths) + 2, "worker_deaths": self.deaths,
            "lag_points": [[index, round(made, 3), round(lag, 4)] for index, made, lag in landed],
        }

    def _during_fault(self, made):
        return any(fault["start"] <= made <= fault["end"] for fault in self.faults)

    def memory(self):
        """The survivor's RSS after warm-up: median of its first and last fifth, and the growth.
        Only its last incarnation counts (should it have died and been restarted)."""
        since = self.started["survivor"] + self.warm_up
        series = [(s["t"], s["rss"].get("survivor")) for s in self.samples
                  if s["rss"].get("survivor") and since <= s["t"] <= self.load_end]
        if len(series) < 10:
            return {"samples": len(series), "note": f"the survivor ran for too short a time after {since:.0f}s"}
        fifth = max(len(series) // 5, 3)
        first = statistics.median(rss for _, rss in series[:fifth])
        last = statistics.median(rss for _, rss in series[-fifth:])
        return {"samples": len(series), "first_mib": first / 2**20, "last_mib": last / 2**20,
                "growth_mib": (last - first) / 2**20, "growth_ratio": (last - first) / first,
                "peak_mib": max(rss for _, rss in series) / 2**20}

    def compare_hosts(self):
        """``(lost, resurrected)``: per host, paths whose bytes are not the app's last change."""
        expected = {}
        for journal in self.watcher.journals:
            for line in journal.read_text().splitlines():
                entry = json.loads(line)
                expected[entry["path"]] = entry["sha1"]
        lost, resurrected = [], []
        for host in self.site.hosts:
            files = {path: hashlib.sha1(data).hexdigest() for path, data in host.files().items()}
            for path, digest in expected.items():
                if digest is not None and files.get(path) != digest:
                    lost.append(f"{host!r}: {path}")
                elif digest is None and path in files:
                    resurrected.append(f"{host!r}: {path}")
            resurrected += [f"{host!r}: {path} (never written)" for path in files if path not in expected]
        return lost, resurrected


def _summary(values):
    if not values:
        return {"count": 0}
    return {"count": len(values), "p50": percentile(values, 0.5), "p95": percentile(values, 0.95),
            "p99": percentile(values, 0.99), "max": max(values)}


def report(result):
    """A few lines for people: the numbers the assertions judge."""
    lag = result["lag_s"]
    memory = result["memory"]
    faults = ", ".join(
        f"{fault['kind']} at {fault['start']:.0f}s: recovered in "
        + ("never" if fault["recovery_s"] is None else f"{fault['recovery_s']:.1f}s")
        + f" (max lag {fault['max_lag_s']:.1f}s)"
        for fault in result["faults"]
    ) or "no faults"
    return (
        f"soak {result['seconds']:.0f}s, {result['apps']} apps x {result['rate_per_app']:g} changes/s: "
        f"{result['changes']} changes, lag p50 {lag.get('p50', 0) * 1000:.0f} ms, "
        f"p95 {lag.get('p95', 0) * 1000:.0f} ms, "
        f"p99 {lag.get('p99', 0) * 1000:.0f} ms, max {lag.get('max', 0):.1f} s "
        f"(steady p99 {result['lag_steady_s'].get('p99', 0) * 1000:.0f} ms); {faults}; "
        f"{result['retries']} retries, {result['enqueue_failures']} changes the broker refused (reconcile sent them); "
        f"queue max {result['queue_max']}; "
        + (f"survivor RSS {memory['first_mib']:.1f} -> {memory['last_mib']:.1f} MiB after warm-up "
           f"(peak {memory['peak_mib']:.1f}); " if "growth_mib" in memory
           else f"memory not judged: {memory.get('note')}; ")
        + f"converged {result['converged_after_load_s']:.1f}s after the load; "
        f"workers that died by themselves (restarted as a supervisor would): {result['worker_deaths'] or 'none'}; "
        f"lost {len(result['lost'])}, resurrected {len(result['resurrected'])}"
    )


def plot(result, path):
    """Lag (every change, and p50/p99 per 10 s), queue length and worker RSS over time, faults shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (lag_axis, queue_axis, rss_axis) = plt.subplots(3, 1, sharex=True, figsize=(12, 10))
    colors = ["tab:blue", "tab:green", "tab:purple", "tab:brown"]
    points = result["lag_points"]
    for index in sorted({point[0] for point in points}):
        mine = [point for point in points if point[0] == index]
        lag_axis.scatter([p[1] for p in mine], [p[2] for p in mine], s=3, alpha=0.35, color=colors[index % 4],
                         label=f"host {index + 1}" + (" (flapping)" if index == len(result["hosts"]) - 1 else ""))
    windows = result["lag_windows"]
    middles = [window["start"] + 5 for window in windows]
    lag_axis.plot(middles, [w["p50"] for w in windows], color="black", linewidth=1.5, label="p50 per 10 s")
    lag_axis.plot(middles, [w["p99"] for w in windows], color="red", linewidth=1.5, label="p99 per 10 s")
    lag_axis.set_yscale("log")
    lag_axis.set_ylabel("lag after save()/delete() (s)")
    lag_axis.legend(loc="upper right", fontsize=8, ncol=3)
    samples = result["samples"]
    times = [s["t"] for s in samples]
    queue_axis.plot(times, [s["queue"] if s["queue"] is not None else float("nan") for s in samples],
                    label="queued messages")
    queue_axis.plot(times, [s["unacked"] if s["unacked"] is not None else float("nan") for s in samples],
                    label="unacknowledged (running, retry countdowns)")
    queue_axis.plot(times, [s["waiting"] for s in samples], label="changes not yet on every host", linestyle=":")
    queue_axis.set_ylabel("messages / changes")
    queue_axis.legend(loc="upper right", fontsize=8)
    for role, color in (("survivor", "tab:blue"), ("victim", "tab:orange")):
        rss_axis.plot(times, [s["rss"].get(role) / 2**20 if s["rss"].get(role) else float("nan") for s in samples],
                      color=color, label="worker the soak never kills (survivor)" if role == "survivor"
                      else "worker SIGKILLed and restarted each cycle (victim)")
    for number, death in enumerate(result.get("worker_deaths", [])):
        rss_axis.axvline(death["t"], color="black", linestyle=":", linewidth=1,
                         label=None if number else "a worker died by itself (restarted, as a supervisor would)")
    rss_axis.set_ylabel("worker RSS (MiB)")
    rss_axis.set_xlabel("seconds since the start")
    rss_axis.legend(loc="lower right", fontsize=8)
    shades = {"host flap": "gold", "worker SIGKILL": "salmon", "broker restart": "lightblue"}
    for axis in (lag_axis, queue_axis, rss_axis):
        seen = set()
        for fault in result["faults"]:
            axis.axvspan(fault["start"], max(fault["end"], fault["start"] + 1), color=shades[fault["kind"]], alpha=0.5,
                         label=None if fault["kind"] in seen or axis is not queue_axis else fault["kind"])
            seen.add(fault["kind"])
    queue_axis.legend(loc="upper right", fontsize=8)
    lag = result["lag_s"]
    figure.suptitle(
        f"Soak: {result['apps']} app processes x {result['rate_per_app']:g} changes/s for {result['seconds']:.0f} s, "
        f"{len(result['hosts'])} hosts; lag p50 {lag['p50'] * 1000:.0f} ms, p99 {lag['p99'] * 1000:.0f} ms; "
        f"lost {len(result['lost'])}, resurrected {len(result['resurrected'])}",
        fontsize=10,
    )
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
