"""A media host that goes down costs the others nothing, and is caught up as soon as it is back.

While a host's circuit breaker is open, the changes for it wait in their ``Replica`` rows
(state ``waiting``) with no message of their own; one probe task per host tries it every
few seconds, and the probe that succeeds sends every waiting change at once. Real worker
processes, real media servers (our MediaServer, and nginx) on 127.0.0.1.
"""
import re
import statistics
import time

import pytest
from django.core.files.base import ContentFile
from django.utils import timezone

from resto_celery.broker import coordinator_for
from resto_celery.models import Replica
from resto_celery.status import host_statuses
from tests.site import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

#: The breaker opens after this many failures in a row; the host is then probed every
#: min(5 s, cooldown): the cooldown here is 2 s.
OUTAGE_OPTIONS = {"breaker_threshold": 2, "breaker_cooldown": 2, "max_retries": 6, "failed_retry_after": 300}


def _received(site, task):
    return len(re.findall(rf"Task resto_celery\.{task}\[[^\]]+\] received", site.logs()))


def _waiting(host):
    return Replica.objects.filter(host=host.url, state="waiting").count()


def test_changes_for_a_down_host_wait_in_their_rows_without_a_message_each(make_site):
    site = make_site(host_count=2, **OUTAGE_OPTIONS)
    broken = site.hosts[1]
    broken.go_down()
    site.start_worker()
    for index in range(3):
        site.storage.save(f"first-{index}.txt", ContentFile(b"x"))
    wait_until(lambda: _waiting(broken) == 3, message="the first changes to wait for the host")
    retries_before = _received(site, "upload")

    for index in range(30):
        site.storage.save(f"more-{index}.txt", ContentFile(b"y"))
    wait_until(lambda: _waiting(broken) == 33, message="every change to wait for the host")
    time.sleep(1)  # time for any message the 30 changes would cause

    assert retries_before <= OUTAGE_OPTIONS["breaker_threshold"] + 1  # tries until the breaker opened
    assert _received(site, "upload") == retries_before  # 30 more changes: not one more message
    assert Replica.objects.filter(host=site.hosts[0].url, state="synced").count() == 33
    assert "is down" in site.logs()


def test_a_host_that_comes_back_gets_every_waiting_change_from_its_probe_within_seconds(make_site):
    site = make_site(host_count=2, **OUTAGE_OPTIONS)
    broken = site.hosts[1]
    broken.go_down()
    site.start_worker()
    for index in range(20):
        site.storage.save(f"{index}.txt", ContentFile(str(index).encode()))
    wait_until(lambda: _waiting(broken) == 20, message="the changes to wait for the host")
    status = {s.host: s for s in host_statuses()}[broken.url]
    assert status.down and status.waiting == 20 and status.down_since <= timezone.now()
    assert "Connection refused" in status.down_cause, status.down_cause

    broken.come_back()
    returned = time.monotonic()
    site.wait_until_converged(timeout=20)  # no reconcile: the probe alone
    caught_up = time.monotonic() - returned

    assert caught_up < 10, f"caught up {caught_up:.1f}s after the host came back"
    assert "answers again: sent the" in site.logs()
    assert _received(site, "probe") >= 1
    wait_until(lambda: _waiting(broken) == 0, message="no change left waiting")
    status = {s.host: s for s in host_statuses()}[broken.url]
    assert not status.down and status.back_at <= timezone.now()


def test_while_a_host_is_down_one_probe_per_interval_tries_it(make_site):
    site = make_site(host_count=2, **OUTAGE_OPTIONS)
    broken = site.hosts[1]
    broken.go_down()
    site.start_worker()
    for index in range(10):
        site.storage.save(f"{index}.txt", ContentFile(b"z"))
    wait_until(lambda: _waiting(broken) == 10, message="the changes to wait for the host")
    started = time.monotonic()
    time.sleep(6)
    probes = _received(site, "probe")
    elapsed = time.monotonic() - started + 2  # the first probe was scheduled just before
    assert 1 <= probes <= elapsed / 2 + 1, f"{probes} probes in {elapsed:.0f}s"


def test_the_probe_tries_the_host_even_while_its_breaker_is_open(make_site):
    """A cooldown longer than the probe interval does not delay the return: the probe is the
    breaker's half-open attempt."""
    site = make_site(host_count=1, **{**OUTAGE_OPTIONS, "breaker_cooldown": 30})
    broken = site.hosts[0]
    broken.go_down()
    site.start_worker()
    site.storage.save("a.txt", ContentFile(b"a"))
    site.storage.save("b.txt", ContentFile(b"b"))
    wait_until(lambda: _waiting(broken) >= 1, message="a change waiting for the host")
    breaker = coordinator_for(site.storage.options).breaker(broken.url)
    assert breaker.open_for() > 0
    broken.come_back()
    site.wait_until_converged(timeout=20)  # the probe ignores the open breaker: it is the half-open try
    assert breaker.open_for() == 0


@pytest.mark.nginx
def test_a_stopped_nginx_host_does_not_slow_the_others_under_steady_load(make_site, make_nginx):
    hosts = [make_nginx() for _ in range(3)]
    site = make_site(hosts=hosts, **{**OUTAGE_OPTIONS, "breaker_threshold": 3, "breaker_cooldown": 30})
    site.start_worker(pool="threads", concurrency=8)
    down = hosts[2]
    saved = {}

    def save_for(seconds, prefix, rate=8):
        end = time.monotonic() + seconds
        index = 0
        while time.monotonic() < end:
            name = f"{prefix}/{index}.bin"
            saved[name] = time.time()
            site.storage.save(name, ContentFile(b"x" * 10_240))
            index += 1
            time.sleep(1 / rate)

    save_for(4, "steady")
    down.go_down()
    save_for(8, "outage")
    down.come_back()
    back = time.time()
    save_for(2, "after")
    wait_until(lambda: all(name in down.files() for name in saved if not name.startswith("after")),
               timeout=30, message="the returned host to hold every change made before its return")
    caught_up = time.time() - back
    site.wait_until_converged(timeout=30)

    def lags(prefix, host_list):
        rows = Replica.objects.filter(host__in=[h.url for h in host_list], path__startswith=prefix + "/")
        return sorted(row.last_success_at.timestamp() - saved[row.path] for row in rows)

    steady = lags("steady", hosts[:2])
    outage = lags("outage", hosts[:2])
    steady_p99 = statistics.quantiles(steady, n=100)[98]
    outage_p99 = statistics.quantiles(outage, n=100)[98]
    print(f"reachable hosts' lag p99: steady {steady_p99 * 1000:.0f} ms, during the outage "
          f"{outage_p99 * 1000:.0f} ms; the returned host caught up {caught_up:.1f}s after its return")
    # Loose bounds (a shared 2-CPU CI machine): before the fix, p99 during the outage was seconds.
    assert outage_p99 <= max(3 * steady_p99, 1.0)
    assert caught_up <= 15
