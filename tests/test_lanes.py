"""Fresh uploads first: live changes overtake a bulk backlog in the same queue (issue 16).

The lanes are message priorities (see resto_celery.lanes): the same worker, consuming the
same queue, takes a live message before any bulk one. Real worker, real media server.
"""
import base64
import json
import os
import time

import pytest
import redis
from django.core.files.base import ContentFile

from resto_celery import lanes, marker, publisher, registry
from resto_celery.models import Replica
from resto_celery.tasks import reconcile
from tests.site import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

BACKLOG = 1000


def _changes_in(raw_message):
    message = json.loads(raw_message)
    args = json.loads(base64.b64decode(message["body"]))[0]
    return len(args[0]) if message["headers"]["task"] == "resto_celery.replicate_batch" else 1


def _bulk_backlog(site):
    """How many changes wait in the bulk lane (a message may carry many)."""
    client = redis.Redis.from_url(site.redis_url)
    return sum(
        _changes_in(raw) for key in lanes.queue_keys(site.queue)[1:] for raw in client.lrange(key, 0, -1)
    )


def _site_with_master_files(make_site, count, **options):
    """A one-host site that workers can find (registered), with ``count`` files in its master."""
    site = make_site(host_count=1, **options)
    registry.clear()
    registry.register(site.storage)
    marker.verify(site.storage.location, create=True)
    _master_files(site, count)
    return site


def _master_files(site, count):
    for index in range(count):
        path = site.media_root / "old" / f"{index}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"old file")


def test_reconcile_sends_its_work_in_the_bulk_lane_and_saves_in_the_live_lane(make_site):
    site = _site_with_master_files(make_site, 5)
    reconcile.run()
    site.storage.save("new.txt", ContentFile(b"new"))
    assert publisher.flush(timeout=10)
    client = redis.Redis.from_url(site.redis_url)
    assert client.llen(site.queue) == 1  # the save, live
    assert _bulk_backlog(site) == 5  # reconcile's five uploads


def test_a_saves_message_is_sent_at_once_and_a_bulk_one_skips_what_the_host_holds(make_site):
    from celery import current_app

    site = _site_with_master_files(make_site, 0)
    site.storage.save("a.txt", ContentFile(b"saved once"))
    site.start_worker(concurrency=1)
    site.wait_until_drained_and_converged()
    host, server = site.storage.hosts[0], site.hosts[0]
    puts = lambda: sum(1 for r in server.requests if r.method == "PUT")  # noqa: E731
    assert puts() == 1

    publisher.publish(current_app, site.queue, [("a.txt", [host], "upload")], bulk=True)  # reconcile's
    site.wait_until_drained_and_converged()
    assert puts() == 1  # its row says the host holds these bytes
    publisher.publish(current_app, site.queue, [("a.txt", [host], "upload")])  # a save's, redelivered
    site.wait_until_drained_and_converged()
    assert puts() == 2  # sent without reading the row


def test_a_save_made_during_a_catch_up_overtakes_the_backlog(make_site):
    host_delay = 0.05  # a slow host: the backlog takes seconds
    site = _site_with_master_files(make_site, BACKLOG)
    reconcile.run()  # BACKLOG uploads in the bulk lane
    assert _bulk_backlog(site) == BACKLOG
    site.hosts[0].set_delay(host_delay, count=10 * BACKLOG)
    site.start_worker(concurrency=2)
    wait_until(lambda: Replica.objects.filter(state="synced").count() >= 10, message="the catch-up to start")

    site.storage.save("fresh.txt", ContentFile(b"a fresh upload"))
    saved = time.monotonic()
    wait_until(lambda: "fresh.txt" in site.hosts[0].files(), timeout=30, message="the fresh upload")
    lag = time.monotonic() - saved
    left = BACKLOG - Replica.objects.filter(path__startswith="old/", state="synced").count()

    print(f"fresh upload on the host {lag:.2f}s after save(), {left} of the {BACKLOG} old files not there yet")
    assert left > BACKLOG // 4  # it did not wait for the backlog
    site.wait_until_drained_and_converged(timeout=120)
    assert os.path.exists(site.media_root / "fresh.txt")


def test_a_large_catch_up_is_published_a_page_at_a_time_as_the_workers_drain_it(make_site):
    """A million-file reconcile must not hold a million messages in Redis: pages of `page`
    messages, and none while more than `high_water` wait."""
    from celery import current_app

    from resto_celery.tasks import BulkPages

    site = _site_with_master_files(make_site, 120)
    site.start_worker(concurrency=2)
    seen = []
    with current_app.producer_or_acquire() as producer:
        pages = BulkPages(site.storage, producer, page=10, high_water=20)
        pages.POLL = 0.05
        for index in range(120):
            pages.enqueue("upload", site.hosts[0].url, f"old/{index}.txt")
            seen.append(_bulk_backlog(site))
        pages.flush()
    site.wait_until_drained_and_converged(timeout=60)
    assert max(seen) <= 20 + 10
    assert pages.waited > 0  # it did wait for the workers at least once


def test_the_dashboard_follows_a_hosts_catch_up_from_its_last_bulk_pass(make_site):
    from resto_celery.status import host_statuses

    site = _site_with_master_files(make_site, 30)
    reconcile.run()
    [status] = [s for s in host_statuses() if s.host == site.hosts[0].url]
    assert status.catching_up and (status.catch_up["sent"], status.catch_up["done"]) == (30, 0)

    site.start_worker()
    site.wait_until_drained_and_converged()
    [status] = [s for s in host_statuses() if s.host == site.hosts[0].url]
    assert not status.catching_up and status.catch_up["done"] == 30
    assert status.as_dict()["catch_up"]["left"] == 0


def test_with_a_bulk_queue_of_its_own_reconcile_goes_there_and_saves_stay_live(make_site):
    """``bulk_queue``: the bulk lane in a queue of its own, for a worker of its own (which an
    operator can run at a lower CPU priority); a worker on each queue, and everything converges."""
    site = _site_with_master_files(make_site, 5, bulk_queue="resto-bulk")
    reconcile.run()
    site.storage.save("new.txt", ContentFile(b"new"))
    assert publisher.flush(timeout=10)
    client = redis.Redis.from_url(site.redis_url)
    bulk_changes = sum(_changes_in(raw) for key in lanes.queue_keys("resto-bulk") for raw in client.lrange(key, 0, -1))
    assert (client.llen(site.queue), _bulk_backlog(site), bulk_changes) == (1, 0, 5)

    site.start_worker(queues=[site.queue])
    site.start_worker(queues=["resto-bulk"], wrapper=["nice", "-n", "19"])
    site.wait_until_drained_and_converged()
    assert Replica.objects.filter(state="synced").count() == 6
