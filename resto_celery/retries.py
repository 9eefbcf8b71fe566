"""After a failed attempt on one ``(host, path)``: retry it when, wait for the host, or stop.

Celery-free: the tasks (:mod:`resto_celery.tasks`) act on the :class:`Decision`, and the
``Replica`` row says what was decided, for reconcile and the dashboard.
"""
import random
from dataclasses import dataclass
from datetime import timedelta

from django.utils import timezone

from .exceptions import MasterUnavailable
from .models import Replica

#: How often a host whose breaker is open is probed, at most (seconds): a host that comes
#: back is caught up within about this long (or the breaker's cooldown, if shorter).
PROBE_INTERVAL = 5.0

#: What a decision says: send a retry of this (host, path) later; leave it to the host's
#: probe (the host is down); or stop (reconcile tries again at the row's ``retry_at``).
RETRY, WAIT_FOR_HOST, FINAL = "retry", "wait for host", "final"


def jittered(seconds):
    """``seconds`` with +/-25% jitter, so retries of many tasks spread out."""
    return seconds * random.uniform(0.75, 1.25)


def backoff(attempt, base, maximum):
    """Exponential backoff with jitter: base, 2*base, 4*base... capped at ``maximum``."""
    return jittered(min(maximum, base * (2 ** max(attempt - 1, 0))))


#: The first wait for a lease another worker holds (seconds); each wait doubles it, up to
#: 2 ** :data:`LEASE_WAIT_DOUBLINGS` times. Most transfers of a small file end within
#: milliseconds: a delete and a save of one name back to back (an overwrite) found the
#: first change's lease taken, and with a first wait of 0.25 s the lag p99 of such a mix
#: (bench_outage, steady phase) went from 6 ms at the median to 425 ms.
LEASE_WAIT_FIRST = 0.02
LEASE_WAIT_DOUBLINGS = 10


def lease_wait(wait, waits):
    """How long to wait before asking again for a lease another worker holds for ``wait``
    more seconds, after ``waits`` waits: short first (most transfers are quick), doubling
    each time (about 20 s at most), never past the holder's expiry."""
    step = LEASE_WAIT_FIRST * 2 ** min(max(waits, 0), LEASE_WAIT_DOUBLINGS)
    return jittered(min(max(wait, LEASE_WAIT_FIRST), step))


def probe_interval(options):
    """Seconds between two probes of a down host."""
    return min(PROBE_INTERVAL, options.breaker_cooldown)  # the cooldown is > 0 (conf checks it)


@dataclass(frozen=True)
class Decision:
    kind: str
    delay: float = 0.0


def decide(error, failures, options, host_down=False):
    """The :class:`Decision` after ``error``, the ``failures``-th failure in a row before it.

    - The master is not the site's (:class:`MasterUnavailable`): not the host's failure and
      retrying cannot help: final, due at once (reconcile sends it when the master is back).
    - The host is down (its breaker open): wait for the host; its probe sends the change.
    - A retryable error with retries left: retry after the backoff, or after the breaker's
      opening if longer.
    - Anything else: final, due again ``failed_retry_after`` later.
    """
    if isinstance(error, MasterUnavailable):
        return Decision(FINAL, 0.0)
    if host_down and error.retryable:
        return Decision(WAIT_FOR_HOST, options.failed_retry_after)
    if error.retryable and failures < options.max_retries:
        return Decision(RETRY, max(
            backoff(failures + 1, options.retry_backoff, options.retry_backoff_max),
            jittered(getattr(error, "wait", 0)),
        ))
    return Decision(FINAL, options.failed_retry_after)


class FailureRecorder:
    """``on_failure`` for :func:`resto_celery.replication.sync_pairs`: decides and records, in
    each pair's ``Replica`` row (under its lease), what comes after the failure.

    ``decisions`` maps each failed ``(host, path)`` to its :class:`Decision`. ``failures``
    is how many failures in a row came before (a retried task's count).
    """

    def __init__(self, options, task_id, failures=0):
        self.options, self.task_id, self.failures = options, task_id, failures
        self.decisions = {}

    def __call__(self, host, path, error, host_down):
        decision = self.decisions[(host, path)] = decide(error, self.failures, self.options, host_down)
        retry_at = timezone.now() + timedelta(seconds=decision.delay)
        if decision.kind == WAIT_FOR_HOST:
            # The delay is the safety net: reconcile sends it then, should no probe ever succeed.
            Replica.objects.record_waiting(host, path, error, retry_at=retry_at, task_id=self.task_id)
        else:
            Replica.objects.record_failure(
                host, path, error, final=decision.kind == FINAL, retry_at=retry_at, task_id=self.task_id,
            )
