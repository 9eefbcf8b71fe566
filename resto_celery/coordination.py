"""Coordination between workers through Redis: per-(host, path) leases and per-host breakers.

No Django, no Celery: a :class:`Coordinator` wraps one Redis connection pool.
"""
import hashlib
import os
import random
import threading
import uuid

import redis

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""

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


class Lease:
    """An exclusive, expiring claim on one ``(host, path)``.

    Acquired with ``SET NX PX``; released only by its holder (compare-and-delete). While
    held inside :meth:`kept_alive`, a thread renews it every third of its TTL, so a long
    transfer keeps it; a killed worker stops renewing and the lease expires.
    """

    def __init__(self, client, host, path, ttl):
        self.client = client
        self.key = "resto:lease:" + _key(host, path)
        self.ttl_ms = int(ttl * 1000)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._renewer = None

    def acquire(self):
        """Take the lease if free; return whether it is now ours."""
        return bool(self.client.set(self.key, self.token, nx=True, px=self.ttl_ms))

    def remaining(self):
        """Seconds until the current holder's lease expires (0 if free)."""
        ttl = self.client.pttl(self.key)
        return max(ttl, 0) / 1000

    def held(self):
        """Whether the lease is still ours (False if it expired or Redis lost it)."""
        value = self.client.get(self.key)
        return value is not None and value.decode() == self.token

    def release(self):
        """Give the lease back, if it is still ours."""
        self._stop_renewing()
        self.client.eval(_RELEASE, 1, self.key, self.token)

    def abandon(self):
        """Stop renewing but keep the lease until it expires.

        For an outcome in doubt (a timeout: the host may still apply the request), the
        lease fences off the path on that host until whatever was sent has landed.
        """
        self._stop_renewing()

    def kept_alive(self):
        """Context manager renewing the lease in the background while the block runs."""
        return _Renewing(self)

    def _renew_forever(self):
        interval = self.ttl_ms / 3000
        while not self._stop.wait(interval):
            try:
                if not self.client.eval(_RENEW, 1, self.key, self.token, self.ttl_ms):
                    return  # lost (expired): nothing more to do
            except redis.RedisError:
                continue  # Redis blipped; try again, the TTL still covers us for a while

    def _stop_renewing(self):
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
            self._renewer = None


class _Renewing:
    def __init__(self, lease):
        self.lease = lease

    def __enter__(self):
        self.lease._stop.clear()
        self.lease._renewer = threading.Thread(target=self.lease._renew_forever, daemon=True, name="resto-lease")
        self.lease._renewer.start()
        return self.lease

    def __exit__(self, *exc_info):
        self.lease._stop_renewing()


class CircuitBreaker:
    """Per-host failure counter that opens (short-circuits the host) past a threshold.

    ``threshold`` consecutive retryable failures within ``cooldown`` seconds open the
    breaker for ``cooldown`` seconds; tasks for the host then wait instead of spending a
    worker slot on a timeout. The first attempt after that is the probe: one more failure
    re-opens it at once, a success closes it.
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
        """Count a retryable failure; return True if the breaker is now open."""
        if not self.threshold:
            return False
        pipe = self.client.pipeline()
        pipe.incr(self.failures_key)
        pipe.pexpire(self.failures_key, self.cooldown_ms * 2)
        failures, _ = pipe.execute()
        if failures >= self.threshold:
            self.client.set(self.open_key, failures, px=self.cooldown_ms)
            return True
        return False

    def record_success(self):
        """Close the breaker and reset the count."""
        if self.threshold:
            self.client.delete(self.failures_key, self.open_key)


def jittered(seconds):
    """``seconds`` with +/-25% jitter, so retries of many tasks spread out."""
    return seconds * random.uniform(0.75, 1.25)


def backoff(attempt, base, maximum):
    """Exponential backoff with jitter: base, 2*base, 4*base... capped at ``maximum``."""
    return jittered(min(maximum, base * (2 ** max(attempt - 1, 0))))
