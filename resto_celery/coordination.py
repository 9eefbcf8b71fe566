"""Coordination between workers through Redis: per-(host, path) leases and per-host breakers.

No Django, no Celery: a :class:`Coordinator` wraps one Redis connection pool.
"""
import hashlib
import os
import random
import threading
import time
import uuid
from contextlib import contextmanager

import redis

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
_ACQUIRE = """
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1, redis.call('pttl', KEYS[2])} end
return {0, redis.call('pttl', KEYS[1])}
"""
_RELEASE_AND_CLOSE = """
local failed = redis.call('del', KEYS[2], KEYS[3])
if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('del', KEYS[1]) end
return failed
"""
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""

#: A host whose last failure is older than this is not "coming back" when it next succeeds.
RECOVERY_WINDOW_MS = 15 * 60 * 1000

#: How long an announced change is remembered, so that it is announced once (seconds).
ANNOUNCED_FOR = 24 * 3600

_clients = {}
_clients_lock = threading.Lock()
os.register_at_fork(after_in_child=_clients.clear)


def redis_client(url):
    """One Redis client (and connection pool) per URL and process."""
    with _clients_lock:
        client = _clients.get(url)
        if client is None:
            client = _clients[url] = redis.Redis.from_url(
                url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=30
            )
        return client


def _key(*parts):
    # Hashing keeps keys short and free of odd bytes whatever the host and path are.
    return hashlib.sha1("\0".join(parts).encode("utf-8", "surrogatepass")).hexdigest()


class Coordinator:
    """Leases and breakers for one storage's options, over one Redis."""

    def __init__(self, url, *, lease_ttl, breaker_threshold, breaker_cooldown):
        self.client = redis_client(url)
        self.lease_ttl = lease_ttl
        self.breaker_threshold = breaker_threshold
        self.breaker_cooldown = breaker_cooldown

    def lease(self, host, path):
        return Lease(self.client, host, path, self.lease_ttl)

    def breaker(self, host):
        return CircuitBreaker(self.client, host, threshold=self.breaker_threshold, cooldown=self.breaker_cooldown)

    def first_to_tell(self, *change):
        """Whether this caller is the first to announce ``change`` (a tuple of strings) in a day."""
        return bool(self.client.set("resto:told:" + _key(*change), 1, nx=True, ex=ANNOUNCED_FOR))

    def pass_lock(self, name, ttl):
        """A non-blocking redis-py ``Lock`` so that one pass of ``name`` runs at a time.

        ``acquire()`` answers at once; the holder keeps it with ``reacquire()`` (a new TTL)
        while it works, and a holder that dies lets it expire after ``ttl`` seconds.
        """
        return self.client.lock("resto:pass:" + _key(name), timeout=ttl, blocking=False)


class Lease:
    """An exclusive, expiring claim on one ``(host, path)``.

    Acquired with ``SET NX PX``; released only by its holder (compare-and-delete). While
    held inside :meth:`kept_alive`, the process's renewer thread renews it every third of
    its TTL, so a long transfer keeps it; a killed worker stops renewing and the lease
    expires.
    """

    def __init__(self, client, host, path, ttl):
        self.client = client
        self.key = "resto:lease:" + _key(host, path)
        self.ttl_ms = int(ttl * 1000)
        self.token = uuid.uuid4().hex
        self.renewed_at = 0.0

    def acquire(self):
        """Take the lease if free; return whether it is now ours."""
        return bool(self.client.set(self.key, self.token, nx=True, px=self.ttl_ms))

    def acquire_unless_open(self, breaker):
        """Take the lease and read ``breaker`` in one round trip.

        Returns ``(acquired, wait)``: with the lease, ``wait`` is how long the breaker stays
        open (0 when closed); without it, how long the current holder's lease lasts.
        """
        acquired, ttl = self.client.eval(_ACQUIRE, 2, self.key, breaker.open_key, self.token, self.ttl_ms)
        if acquired and not breaker.threshold:
            ttl = 0
        return bool(acquired), max(ttl, 0) / 1000

    def remaining(self):
        """Seconds until the current holder's lease expires (0 if free)."""
        ttl = self.client.pttl(self.key)
        return max(ttl, 0) / 1000

    def held(self):
        """Whether the lease is still ours (False if it expired or Redis lost it)."""
        value = self.client.get(self.key)
        return value is not None and value.decode() == self.token

    def release(self, breaker=None):
        """Give the lease back, if it is still ours; with ``breaker``, also close it (a success).

        Returns True when the breaker had counted failures: the host has just come back.
        """
        _renewer.forget(self)
        if breaker is None:
            self.client.eval(_RELEASE, 1, self.key, self.token)
            return False
        return bool(self.client.eval(
            _RELEASE_AND_CLOSE, 3, self.key, breaker.failures_key, breaker.open_key, self.token
        ))

    def abandon(self):
        """Stop renewing but keep the lease until it expires.

        For an outcome in doubt (a timeout: the host may still apply the request), the
        lease fences off the path on that host until whatever was sent has landed.
        """
        _renewer.forget(self)

    @contextmanager
    def kept_alive(self):
        """Context manager: the process's renewer thread renews the lease while the block runs."""
        _renewer.keep(self)
        try:
            yield self
        finally:
            _renewer.forget(self)


class _Renewer:
    """One thread per process renews every lease held in :meth:`Lease.kept_alive`.

    A thread per transfer cost a thread start per task; this one wakes a few times a
    second and renews, in one pipeline per Redis, the leases due (a third of their TTL).
    """

    TICK = 0.25

    def __init__(self):
        self.leases = set()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.thread = None

    def keep(self, lease):
        lease.renewed_at = time.monotonic()
        with self.lock:
            self.leases.add(lease)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, daemon=True, name="resto-lease-renewer")
                self.thread.start()

    def forget(self, lease):
        with self.lock:
            self.leases.discard(lease)

    def reset(self):
        """After a fork: the child has no thread and holds none of its parent's leases."""
        self.leases, self.lock, self.thread = set(), threading.Lock(), None

    def _run(self):
        while True:
            self.wake.wait(self.TICK)
            now = time.monotonic()
            with self.lock:
                due = [lease for lease in self.leases if now - lease.renewed_at >= lease.ttl_ms / 3000]
            by_client = {}
            for lease in due:
                by_client.setdefault(lease.client, []).append(lease)
            for client, leases in by_client.items():
                self._renew(client, leases, now)

    def _renew(self, client, leases, now):
        pipe = client.pipeline(transaction=False)
        for lease in leases:
            pipe.eval(_RENEW, 1, lease.key, lease.token, lease.ttl_ms)
        try:
            results = pipe.execute()
        except redis.RedisError:
            return  # Redis blipped; try again next tick, the TTL still covers us for a while
        for lease, renewed in zip(leases, results):
            if renewed:
                lease.renewed_at = now
            else:
                self.forget(lease)  # lost (expired): nothing more to do


_renewer = _Renewer()
os.register_at_fork(after_in_child=_renewer.reset)


class CircuitBreaker:
    """Per-host failure counter that opens (short-circuits the host) past a threshold.

    ``threshold`` consecutive retryable failures within ``cooldown`` seconds open the
    breaker for ``cooldown`` seconds; tasks for the host then wait instead of spending a
    worker slot on a timeout. The first attempt after that is the probe: one more failure
    re-opens it at once, a success closes it (:meth:`Lease.release`, in the same round trip
    as the lease).
    """

    def __init__(self, client, host, *, threshold, cooldown):
        self.client = client
        base = "resto:breaker:" + _key(host)
        self.failures_key = base + ":failures"
        self.open_key = base + ":open"
        self.threshold = threshold
        self.cooldown_ms = int(cooldown * 1000)

    def open_for(self):
        """Seconds the breaker stays open; 0 when closed. Always 0 with threshold 0 (disabled)."""
        if not self.threshold:
            return 0
        return max(self.client.pttl(self.open_key), 0) / 1000

    def record_failure(self):
        """Count a retryable failure; return True if the breaker is now open.

        Failures are counted even with the breaker disabled (threshold 0): the count is how
        a success (:meth:`Lease.release` with the breaker) knows that the host has just come back.
        """
        pipe = self.client.pipeline()
        pipe.incr(self.failures_key)
        pipe.pexpire(self.failures_key, max(self.cooldown_ms * 2, RECOVERY_WINDOW_MS))
        failures, _ = pipe.execute()
        if self.threshold and failures >= self.threshold:
            self.client.set(self.open_key, failures, px=self.cooldown_ms)
            return True
        return False


def jittered(seconds):
    """``seconds`` with +/-25% jitter, so retries of many tasks spread out."""
    return seconds * random.uniform(0.75, 1.25)


def backoff(attempt, base, maximum):
    """Exponential backoff with jitter: base, 2*base, 4*base... capped at ``maximum``."""
    return jittered(min(maximum, base * (2 ** max(attempt - 1, 0))))
