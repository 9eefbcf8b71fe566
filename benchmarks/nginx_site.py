"""The site the worker benchmarks run: three nginx media hosts, AsyncStorage, Celery workers.

:func:`running_site` sets it up for one run (a private Redis as the broker, a temporary
folder, the hosts, the bench database, the Celery app) and takes it down; :class:`Bench`
is the site itself; :class:`Changes` is its app, changing files at a steady rate while a
watcher times each change's arrival on each host (the convergence lag).
``bench_replication``, ``bench_reconcile_hosts``, ``bench_outage`` and ``bench_catchup`` use
them.
"""
import json
import os
import random
import re
import shutil
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from benchmarks import arrivals, common

CONVERGE_TIMEOUT = 600

#: A successful PUT in an nginx host's access log (``resto_celery.testing.nginx``'s format:
#: combined, then ``$msec``).
_PUT_LOGGED = re.compile(r'"PUT (?P<path>\S+) [^"]*" (?:200|201|204) .* (?P<msec>\d+\.\d{3})$', re.MULTILINE)
CHANGE_SIZE = 10 * 1024  # the app's files


def nginx_installed():
    """Whether nginx is installed; if not, say that nothing is measured."""
    from resto_celery.testing.nginx import find_nginx

    if find_nginx() is None:
        print("nginx is not installed (apt-get install nginx): nothing measured")
        return False
    return True


@contextmanager
def running_site(prefix, options=None):
    """Yield ``(bench, environment)``: a :class:`Bench` in a new temporary folder (``prefix``)
    with a private Redis as the broker and ``options`` over its storage's, Django set up on
    a new bench database, the Celery app, and the :func:`common.environment` at the start.
    The workers and the hosts are stopped at the end."""
    with common.private_redis() as redis_server, tempfile.TemporaryDirectory(prefix=prefix) as workdir:
        bench = Bench(Path(workdir), redis_server, options)
        try:
            common.setup_django()
            common.celery_app()
            yield bench, common.environment()
        finally:
            bench.close()


def storage_options(master, hosts, redis_url):
    return {
        "location": str(master), "hosts": [host.url for host in hosts], "redis_url": redis_url,
        "timeout": 60, "lease_ttl": 180, "breaker_threshold": 0,
    }


class Bench:
    """The hosts, the master folder, the storage and the workers of one run."""

    def __init__(self, workdir, redis_server, options=None):
        from resto_celery.testing.nginx import NginxMediaServer

        self.workdir = workdir
        self.redis = redis_server
        self.master = workdir / "master"
        self.master.mkdir()
        self.hosts = []
        for index in range(3):
            root = workdir / f"host-{index}"
            root.mkdir()
            self.hosts.append(NginxMediaServer(root, workdir=workdir / f"nginx-{index}").start())
        self.options = {**storage_options(self.master, self.hosts, redis_server.url), **(options or {})}
        os.environ["RESTO_BENCH_STORAGE_OPTIONS"] = json.dumps(self.options)
        self.worker = None

    @property
    def storage(self):
        from django.core.files.storage import storages

        return storages["default"]

    def start_worker(self, pool, concurrency):
        self.stop_worker()
        self.worker = common.celery_worker(
            pool, concurrency, self.workdir / f"worker-{pool}-{concurrency}-{uuid.uuid4().hex[:6]}.log"
        )
        return self.worker

    def stop_worker(self):
        if self.worker is not None:
            self.worker.stop()
            self.worker = None

    def reset(self):
        """Empty the master, the hosts, the queue and the Replica table; flush to disk."""
        from resto_celery.master import MARKER_NAME
        from resto_celery.models import Replica

        for folder in [self.master] + [host.root for host in self.hosts]:
            for entry in os.scandir(folder):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                elif entry.name != MARKER_NAME:  # the master stays the site's master
                    os.unlink(entry.path)
        common.flush_redis(self.redis.url)
        common.empty_table(Replica)
        os.sync()

    def landed(self, name, size):
        """How many hosts hold ``name`` with ``size`` bytes."""
        count = 0
        for host in self.hosts:
            try:
                count += os.stat(host.root / name).st_size == size
            except FileNotFoundError:
                pass
        return count

    def wait_all(self, names, size, timeout=CONVERGE_TIMEOUT):
        """Wait until every host holds every name (bounded); return the time it happened."""
        pending = set(names)
        deadline = time.monotonic() + timeout
        while pending:
            pending = {name for name in pending if self.landed(name, size) < len(self.hosts)}
            if not pending:
                break
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{len(pending)} file(s) not on every host after {timeout}s: {sorted(pending)[:3]}"
                )
            time.sleep(0.005)
        return time.perf_counter()

    def check_synced(self, count):
        """Fail unless the workers recorded ``count`` synced rows per host and nothing failed."""
        from resto_celery.models import Replica

        deadline = time.monotonic() + 60  # a row is written just after its PUT is answered
        while True:
            failed = Replica.objects.exclude(state="synced").count()
            synced = Replica.objects.filter(state="synced").count()
            if failed or synced >= count * len(self.hosts) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        if failed or synced != count * len(self.hosts):
            raise AssertionError(f"{synced} synced rows (expected {count * len(self.hosts)}), {failed} other")

    def close(self):
        self.stop_worker()
        for host in self.hosts:
            host.stop()


class Changes:
    """The app: changes at ``rate`` per second through the bench's storage, and a watcher that
    records when each change reaches each host (a thread stats the hosts' folders every 2 ms:
    nginx renames a finished upload into place, so a file of the right size is complete).

    With ``mixed``, the changes are new files, overwrites (a new size) and deletes; without,
    new files only. ``landed`` holds ``(host index, name, made at, lag seconds)`` per change
    and host. Without ``watch`` there is no watcher (its stat() calls every 2 ms cost the
    saving process CPU): new files only, their lags read from inotify's stamps of their
    arrival in the hosts' folders (:meth:`lags_from_arrivals`, :mod:`benchmarks.arrivals`)
    or from the hosts' logs (:meth:`lags_from_host_logs`).
    """

    def __init__(self, bench, rate, prefix="outage", mixed=True, watch=True):
        self.bench, self.rate, self.prefix, self.mixed = bench, rate, prefix, mixed
        self.names = []
        self.serial = 0
        self.pending = {}  # (host index, name) -> (expected size or None, made at)
        self.landed = []  # (host index, name, made at, lag seconds)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.watcher = threading.Thread(target=self._watch, daemon=True) if watch else None
        if self.watcher is not None:
            self.watcher.start()
        self.arrivals = None
        if not watch and arrivals.available():
            self.folders = [host.root / prefix for host in bench.hosts]
            for folder in self.folders:
                folder.mkdir(parents=True, exist_ok=True)  # watched before the first file arrives
            self.arrivals = arrivals.Arrivals(self.folders)
        self.random = random.Random(19)
        self.made_at = {}  # name: time.time() when its last change was made

    def run(self, seconds=None, count=None):
        """Make changes for ``seconds``, or ``count`` changes."""
        from django.core.files.base import ContentFile

        storage = self.bench.storage
        next_at = time.perf_counter()
        end = None if seconds is None else next_at + seconds
        made = 0
        while (end is None or time.perf_counter() < end) and (count is None or made < count):
            roll = self.random.random() if self.mixed else 1.0
            if self.names and roll < 0.2:
                name = self.names.pop(self.random.randrange(len(self.names)))
                storage.delete(name)
                self._expect(name, None)
            elif self.names and roll < 0.5:
                name = self.random.choice(self.names)
                size = CHANGE_SIZE + self.random.randrange(1, 4096)
                storage.delete(name)  # save() would pick another name; an overwrite replaces the bytes
                storage.save(name, ContentFile(os.urandom(size)))
                self._expect(name, size)
            else:
                name = f"{self.prefix}/{self.serial:06d}.bin"
                self.serial += 1
                storage.save(name, ContentFile(os.urandom(CHANGE_SIZE)))
                self.names.append(name)
                self._expect(name, CHANGE_SIZE)
            made += 1
            next_at += 1 / self.rate
            time.sleep(max(0.0, next_at - time.perf_counter()))

    def _expect(self, name, size):
        made = time.perf_counter()
        self.made_at[name] = time.time()  # to compare with the hosts' logs and inotify's stamps
        with self.lock:
            for index in range(len(self.bench.hosts)):
                self.pending[(index, name)] = (size, made)  # a newer change supersedes an older one

    def _watch(self):
        while not self.stop.is_set():
            with self.lock:
                items = list(self.pending.items())
            now = time.perf_counter()
            for (index, name), (size, made) in items:
                try:
                    current = os.stat(self.bench.hosts[index].root / name).st_size
                except FileNotFoundError:
                    current = None
                if current == size:
                    with self.lock:
                        if self.pending.get((index, name)) == (size, made):
                            del self.pending[(index, name)]
                            self.landed.append((index, name, made, now - made))
            time.sleep(0.002)

    def waiting_on(self, index, before):
        """How many changes made before ``before`` host ``index`` does not hold yet."""
        with self.lock:
            return sum(1 for (host, _), (_, made) in self.pending.items() if host == index and made < before)

    def wait(self, timeout):
        """Wait (at most ``timeout`` seconds) until every host holds every change (without a
        watcher: until every host's log has every new file's PUT, and inotify saw it arrive)."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.watcher is not None and not self.pending:
                return
            if self.watcher is None and len(self.lags_from_host_logs()) == len(self.made_at) and (
                    self.arrivals is None or len(self.lags_from_arrivals()) == len(self.made_at)):
                return
            time.sleep(0.05)

    def lags_to_every_host(self):
        """Per change that reached every host, in the order they were made: the seconds from
        the change to the last host holding it."""
        reached = {}
        for index, name, made, lag in self.landed:
            reached.setdefault((made, name), {})[index] = lag
        return [max(lags.values()) for _, lags in sorted(reached.items()) if len(lags) == len(self.bench.hosts)]

    def lags_from_host_logs(self):
        """Per new file that reached every host, in the order they were made: the seconds from
        its save() returning to the end of the last host's PUT, as that host's nginx logged
        it (``$msec``). For runs of new files only (``mixed=False``).

        ``$msec`` is nginx's event-loop time, cached, to the millisecond: these lags end up
        to a millisecond and more early (:meth:`lags_from_arrivals` does not)."""
        from urllib.parse import unquote, urlsplit

        ended = {}
        for host in self.bench.hosts:
            prefix = urlsplit(host.url).path
            per_host = {}
            for match in _PUT_LOGGED.finditer((host.workdir / "access.log").read_text(errors="replace")):
                path = unquote(match["path"])
                if path.startswith(prefix):
                    per_host.setdefault(path[len(prefix):], float(match["msec"]))
            for name, at in per_host.items():
                ended.setdefault(name, []).append(at)
        return self._lags_to_last_host(lambda name: ended.get(name, []))

    def lags_from_arrivals(self):
        """Per new file that reached every host, in the order they were made: the seconds from
        its save() returning to its arrival in the last host's folder (inotify's stamp, see
        :mod:`benchmarks.arrivals`). Empty without inotify. For runs of new files only."""
        if self.arrivals is None:
            return []

        def stamps(name):
            basename = name.rsplit("/", 1)[-1]
            return [at for at in (self.arrivals.at(folder, basename) for folder in self.folders) if at is not None]

        return self._lags_to_last_host(stamps)

    def _lags_to_last_host(self, times_on_hosts):
        """``max(times_on_hosts(name)) - made`` for each new file, in the order they were made,
        when ``times_on_hosts(name)`` (``time.time()`` values) has one per host."""
        lags = []
        for name, made in sorted(self.made_at.items(), key=lambda item: item[1]):
            times = times_on_hosts(name)
            if len(times) == len(self.bench.hosts):
                lags.append(max(times) - made)
        return lags

    def close(self):
        self.stop.set()
        if self.watcher is not None:
            self.watcher.join(5)
        if self.arrivals is not None:
            self.arrivals.close()
