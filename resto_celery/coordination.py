"""Coordination between workers through Redis: per-(host, path) leases and per-host breakers.

No Django, no Celery: a :class:`Coordinator` wraps one Redis connection pool.

The leases are Lua scripts, not redis-py's ``Lock``: a message's pairs are all leased, and
their hosts' breakers read, in one round trip, and given back (or kept, when in doubt) in
another, where ``Lock`` takes one key per call. A pass lock, one key, is redis-py's ``Lock``
(:meth:`Coordinator.pass_lock`). No library has the breaker: it is written here.
"""
import hashlib
import os
import threading
import time
import uuid
from contextlib import contextmanager

import redis

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
# KEYS: the pairs' leases, their hosts' breakers' open keys, then their causes. Returns per
# pair {1, how long the breaker stays open, and why when it is open} with the lease, or
# {0, how long the holder keeps it}.
_ACQUIRE_MANY = """
local n = #KEYS / 3
local out = {}
for i = 1, n do
  if redis.call('set', KEYS[i], ARGV[i], 'NX', 'PX', ARGV[n + 1]) then
    local open = redis.call('pttl', KEYS[n + i])
    if open > 0 then
      out[i] = {1, open, redis.call('get', KEYS[2 * n + i]) or ''}
    else
      out[i] = {1, open}
    end
  else
    out[i] = {0, redis.call('pttl', KEYS[i])}
  end
end
return out
"""
# KEYS, six per (host, path) pair: its lease, then its host's breaker keys (failures, open,
# down-since, back-at, cause). ARGV: the tokens ("" for a lease to keep), then per pair "1" to
# close the breaker (a success) or "0", then the time and how long to remember it. Returns
# per pair 1 when it closed a breaker that had counted failures: the host has just come back.
_RELEASE_MANY = """
local n = #KEYS / 6
local now = ARGV[2 * n + 1]
local out = {}
for i = 1, n do
  local base = (i - 1) * 6
  out[i] = 0
  if ARGV[n + i] == '1' then
    if redis.call('del', KEYS[base + 2], KEYS[base + 3]) > 0 then
      out[i] = 1
      redis.call('del', KEYS[base + 4], KEYS[base + 6])
      redis.call('set', KEYS[base + 5], now, 'PX', ARGV[2 * n + 2])
    end
  end
  if ARGV[i] ~= '' and redis.call('get', KEYS[base + 1]) == ARGV[i] then redis.call('del', KEYS[base + 1]) end
end
return out
"""
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""

#: A host whose last failure is older than this is not "coming back" when it next succeeds.
RECOVERY_WINDOW_MS = 15 * 60 * 1000

#: A probe that was scheduled but never ran (its message lost) lets another be scheduled
#: this long after it was due (milliseconds).
PROBE_SLACK_MS = 30_000

#: How long "came back at" is remembered for the dashboard (seconds).
BACK_AT_KEPT = 24 * 3600

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

    def leases(self, pairs):
        """The leases on ``(host, path)`` pairs, with the hosts' breakers (:class:`Leases`)."""
        return Leases(self, pairs)

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
    held inside :meth:`Leases.kept_alive`, the process's renewer thread renews it every
    third of its TTL, so a long transfer keeps it; a killed worker stops renewing and the
    lease expires.
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

    def remaining(self):
        """Seconds until the current holder's lease expires (0 if free)."""
        ttl = self.client.pttl(self.key)
        return max(ttl, 0) / 1000

    def release(self):
        """Give the lease back, if it is still ours."""
        _renewer.forget(self)
        self.client.eval(_RELEASE, 1, self.key, self.token)


class Leases:
    """The leases on several ``(host, path)`` pairs, with their hosts' breakers: taken, checked
    and given back in one round trip each, whatever the number of pairs (a task syncs a
    path on several hosts, or a batch of paths, together)."""

    def __init__(self, coordinator, pairs):
        self.client = coordinator.client
        self.leases = {pair: coordinator.lease(*pair) for pair in pairs}
        self.breakers = {host: coordinator.breaker(host) for host, _ in self.leases}
        self.ours = set()
        #: Why each host's breaker is open, as read by :meth:`acquire` (hosts whose breaker is open).
        self.causes = {}

    def acquire(self):
        """Take every free lease and read every host's breaker in one round trip.

        Returns ``{pair: (acquired, wait)}``: with the lease, ``wait`` is how long the host's
        breaker stays open (0 when closed; why it is open is in :attr:`causes`); without it,
        how long the holder's lease lasts.
        """
        pairs = list(self.leases)
        if not pairs:
            return {}
        breakers = [self.breakers[host] for host, _ in pairs]
        keys = [self.leases[pair].key for pair in pairs]
        keys += [breaker.open_key for breaker in breakers] + [breaker.cause_key for breaker in breakers]
        tokens = [self.leases[pair].token for pair in pairs]
        ttl_ms = self.leases[pairs[0]].ttl_ms
        answers = self.client.eval(_ACQUIRE_MANY, len(keys), *keys, *tokens, ttl_ms)
        states = {}
        for pair, (acquired, ttl, *cause) in zip(pairs, answers, strict=True):
            if acquired:
                self.ours.add(pair)
                if not self.breakers[pair[0]].threshold:
                    ttl = 0
                elif ttl > 0:
                    self.causes[pair[0]] = _text(cause[0]) if cause else ""
            states[pair] = (bool(acquired), max(ttl, 0) / 1000)
        return states

    @contextmanager
    def kept_alive(self, pairs):
        """Context manager: the leases of ``pairs`` are renewed while the block runs."""
        for pair in pairs:
            _renewer.keep(self.leases[pair])
        try:
            yield self
        finally:
            for pair in pairs:
                _renewer.forget(self.leases[pair])

    def held(self, pairs):
        """The pairs among ``pairs`` whose lease is still ours (one ``MGET``)."""
        pairs = list(pairs)
        if not pairs:
            return set()
        values = self.client.mget([self.leases[pair].key for pair in pairs])
        return {
            pair for pair, value in zip(pairs, values, strict=True)
            if value is not None and value.decode() == self.leases[pair].token
        }

    def release(self, succeeded=(), keep=()):
        """Give back every lease we took, except those of ``keep`` (outcomes in doubt: they
        expire), and close the breakers of the hosts of the pairs that ``succeeded``: one
        round trip.

        Returns the hosts whose breaker had counted failures and is closed now: they have
        just come back.
        """
        pairs = sorted(self.ours)
        self.ours = set()
        if not pairs:
            return set()
        keys, tokens, closes = [], [], []
        for pair in pairs:
            lease, breaker = self.leases[pair], self.breakers[pair[0]]
            _renewer.forget(lease)
            keys += [
                lease.key, breaker.failures_key, breaker.open_key, breaker.down_since_key, breaker.back_at_key,
                breaker.cause_key,
            ]
            tokens.append("" if pair in keep else lease.token)
            closes.append("1" if pair in succeeded else "0")
        answers = self.client.eval(
            _RELEASE_MANY, len(keys), *keys, *tokens, *closes, f"{time.time():.3f}", BACK_AT_KEPT * 1000
        )
        return {host for (host, _), came_back in zip(pairs, answers, strict=True) if came_back}


class _Renewer:
    """One thread per process renews every lease held in :meth:`Leases.kept_alive`.

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
        for lease, renewed in zip(leases, results, strict=True):
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
    re-opens it at once, a success closes it (:meth:`Leases.release`, in the same round trip
    as the lease).
    """

    def __init__(self, client, host, *, threshold, cooldown):
        self.client = client
        base = "resto:breaker:" + _key(host)
        self.failures_key = base + ":failures"
        self.open_key = base + ":open"
        self.down_since_key = base + ":down-since"
        self.back_at_key = base + ":back-at"
        self.cause_key = base + ":cause"
        self.probe_key = base + ":probe"
        self.threshold = threshold
        self.cooldown_ms = int(cooldown * 1000)

    def open_for(self):
        """Seconds the breaker stays open; 0 when closed. Always 0 with threshold 0 (disabled)."""
        if not self.threshold:
            return 0
        return max(self.client.pttl(self.open_key), 0) / 1000

    def record_failure(self, cause=""):
        """Count a retryable failure, ``cause`` its error as an operator reads it (the
        dashboard shows the last one beside "down since"); return True if the breaker is now
        open.

        Failures are counted even with the breaker disabled (threshold 0): the count is how
        a success (:meth:`Leases.release`) knows that the host has just come back.
        """
        remembered = max(self.cooldown_ms * 2, RECOVERY_WINDOW_MS)
        pipe = self.client.pipeline()
        pipe.incr(self.failures_key)
        pipe.pexpire(self.failures_key, remembered)
        pipe.set(self.cause_key, str(cause)[:500], px=remembered)
        failures, *_ = pipe.execute()
        if self.threshold and failures >= self.threshold:
            pipe = self.client.pipeline()
            pipe.set(self.open_key, failures, px=self.cooldown_ms)
            pipe.set(self.down_since_key, f"{time.time():.3f}", nx=True)
            pipe.pexpire(self.down_since_key, remembered)
            pipe.execute()
            return True
        return False

    def schedule_probe(self, every):
        """Whether the caller should send the probe of this host, due in ``every`` seconds: True
        for one caller at a time (the probe's run, :meth:`probe_started`, lets the next through;
        a probe whose message was lost does so :data:`PROBE_SLACK_MS` after it was due)."""
        return bool(self.client.set(self.probe_key, 1, nx=True, px=int(every * 1000) + PROBE_SLACK_MS))

    def probe_started(self):
        """The probe runs: a failure of it may schedule the next one."""
        self.client.delete(self.probe_key)

    def health(self):
        """``(open_for, down_since, back_at, cause)``: seconds the breaker stays open (0:
        closed), the Unix times when the host went down (None: it is not) and last came back
        (None: not within a day), and the last failure's error while it is down ("" when it
        is up). One round trip."""
        pipe = self.client.pipeline(transaction=False)
        pipe.pttl(self.open_key)
        pipe.get(self.down_since_key)
        pipe.get(self.back_at_key)
        pipe.get(self.cause_key)
        open_ms, down_since, back_at, cause = pipe.execute()
        open_for = max(open_ms, 0) / 1000 if self.threshold else 0
        cause = _text(cause) if down_since is not None or open_for else ""
        return open_for, _float(down_since), _float(back_at), cause


def _float(value):
    return float(value) if value is not None else None


def _text(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else (value or "")
