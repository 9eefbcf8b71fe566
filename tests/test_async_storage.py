"""AsyncStorage with real Celery workers, real Redis and real media servers."""
import json
import logging
import time

import pytest
import redis
from django.core.files.base import ContentFile
from django.utils import timezone
from django_celery_results.models import TaskResult

from resto_celery import lanes, publisher
from resto_celery.models import Replica
from tests.site import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def test_save_returns_before_replication_and_touches_no_database(make_site, django_assert_num_queries):
    site = make_site()
    with django_assert_num_queries(0):  # the first save of a new site also makes the master's marker
        assert site.storage.save("a.txt", ContentFile(b"hello")) == "a.txt"
        assert site.storage.save("b.txt", ContentFile(b"hello")) == "b.txt"
    assert (site.media_root / "a.txt").read_bytes() == b"hello"
    assert (site.media_root / ".resto-master").is_file()
    assert all(host.files() == {} for host in site.hosts)  # no worker yet


def test_a_save_sends_one_message_with_the_path_and_the_hosts_only(make_site):
    site = make_site(host_count=3)
    site.storage.save("secret/report.pdf", ContentFile(b"%PDF- secret bytes"))
    assert publisher.flush(timeout=10)
    [raw] = redis.Redis.from_url(site.redis_url).lrange("resto", 0, -1)
    message = json.loads(raw)
    assert message["headers"]["task"] == "resto_celery.replicate"
    args, kwargs, _ = json.loads(__import__("base64").b64decode(message["body"]))
    assert (args, kwargs) == (["secret/report.pdf", [host.url for host in site.hosts], "upload"], {})
    assert b"secret bytes" not in raw


def test_a_worker_replicates_saves_and_deletes_to_every_host(make_site, broker_url):
    site = make_site(broker_url=broker_url, host_count=3)
    site.start_worker()
    site.storage.save("a.txt", ContentFile(b"hello"))
    site.storage.save("dir/b.bin", ContentFile(b"\x00" * 1000))
    site.wait_until_converged()
    assert site.hosts[0].files() == {"a.txt": b"hello", "dir/b.bin": b"\x00" * 1000}
    wait_until(lambda: Replica.objects.filter(state="synced").count() == 6, message="6 synced rows")

    site.storage.delete("a.txt")
    wait_until(lambda: all(not h.has("a.txt") for h in site.hosts), message="the delete to reach every host")
    wait_until(lambda: not Replica.objects.filter(path="a.txt").exists(), message="a.txt rows to go")


def test_a_successful_transfer_writes_its_replica_row_and_no_task_result(make_site):
    site = make_site(host_count=1)
    site.start_worker()
    site.storage.save("a.txt", ContentFile(b"hello"))
    wait_until(lambda: Replica.objects.filter(state="synced").exists(), message="the synced row")
    site.wait_until_drained_and_converged()
    assert not TaskResult.objects.exists()  # the result backend records failures only


def test_a_broker_outage_at_save_time_keeps_the_master_write_and_logs(make_site, redis_server, caplog):
    site = make_site(host_count=2)
    redis_server.stop()
    try:
        with caplog.at_level(logging.ERROR, logger="resto_celery.storage"):
            assert site.storage.save("a.txt", ContentFile(b"kept")) == "a.txt"
            assert publisher.flush(timeout=10)  # the publisher thread sends, and fails, after save()
    finally:
        redis_server.start()
    assert (site.media_root / "a.txt").read_bytes() == b"kept"
    lines = [r.getMessage() for r in caplog.records if r.name == "resto_celery.storage"]
    assert len(lines) == 2
    assert lines[0].startswith(f"Failed to enqueue upload of a.txt for {site.hosts[0].url}: ")
    assert lines[0].endswith("reconcile will repair it.")


def test_a_save_just_after_a_broker_restart_still_queues_its_message(make_site, redis_server):
    site = make_site(host_count=3)
    site.storage.save("before.txt", ContentFile(b"sent on a connection that the restart kills"))
    assert publisher.flush(timeout=10)
    redis_server.restart()  # the queue is gone with it, and the pooled connection is stale
    site.storage.save("after.txt", ContentFile(b"after the restart"))
    assert publisher.flush(timeout=10)
    [raw] = redis.Redis.from_url(site.redis_url).lrange("resto", 0, -1)
    assert json.loads(raw)["headers"]["argsrepr"] == repr(("after.txt", [host.url for host in site.hosts], "upload"))


def test_a_message_of_the_previous_release_one_per_host_is_still_handled(make_site):
    """Messages outlive releases: the per-host tasks that release sent are still run."""
    site = make_site(host_count=2)
    site.storage.save("old.txt", ContentFile(b"queued before the upgrade"))
    assert publisher.flush(timeout=10)
    redis.Redis.from_url(site.redis_url).delete("resto")  # only the previous release's messages remain
    for host in site.hosts:
        site.storage.enqueue("upload", host.url, "old.txt")  # the shape that release sent
    site.start_worker()
    site.wait_until_drained_and_converged()


def _publish(site, operation, name):
    """Publish a task by hand, as a late or duplicated delivery would."""
    for host in site.hosts:
        site.storage.enqueue(operation, host.url, name, bulk=False)


def test_a_slow_first_put_never_leaves_older_bytes_or_a_resurrected_file(make_site, broker_url):
    site = make_site(broker_url=broker_url, host_count=2)
    site.hosts[0].set_delay(1.5, methods=["PUT"], count=1)  # the first PUT lands late
    site.start_worker(concurrency=2)
    site.start_worker(concurrency=2)
    site.storage.save("a.txt", ContentFile(b"version 1"))
    site.storage.delete("a.txt")
    site.storage.save("a.txt", ContentFile(b"version 2"))
    site.storage.delete("a.txt")
    site.storage.save("b.txt", ContentFile(b"b version 1"))
    site.storage.delete("b.txt")
    site.storage.save("b.txt", ContentFile(b"b version 2"))
    site.wait_until_drained_and_converged()
    assert site.hosts[0].files() == {"b.txt": b"b version 2"}
    assert site.hosts[1].files() == {"b.txt": b"b version 2"}


def test_a_put_that_times_out_but_lands_later_cannot_resurrect_a_deleted_file(make_site, broker_url):
    """The host applies the timed-out PUT after the client gave up: the lease fences it off."""
    site = make_site(broker_url=broker_url, host_count=1, timeout=0.5, lease_ttl=4)
    site.hosts[0].set_delay(2, methods=["PUT"], count=1)
    site.start_worker(concurrency=2)
    site.storage.save("a.txt", ContentFile(b"version 1"))
    wait_until(lambda: "Will retry to upload a.txt" in site.logs(), message="the PUT to time out")
    site.storage.delete("a.txt")
    site.wait_until_drained_and_converged(timeout=60)
    assert site.hosts[0].files() == {}


def test_tasks_run_in_reverse_order_still_converge_to_the_master(make_site):
    site = make_site(host_count=2, publish="inline")  # a message per change, to reverse
    site.storage.save("a.txt", ContentFile(b"one"))
    site.storage.delete("a.txt")
    site.storage.save("a.txt", ContentFile(b"two"))
    queue = redis.Redis.from_url(site.redis_url)
    messages = queue.lrange("resto", 0, -1)
    queue.delete("resto")
    queue.rpush("resto", *messages)  # the worker pops from the right: now the newest runs first
    _publish(site, "upload", "a.txt")  # and a late duplicate of the first save on top
    site.start_worker(concurrency=1)
    site.wait_until_converged()
    assert site.hosts[0].files() == {"a.txt": b"two"}


def test_a_host_failing_its_first_requests_ends_in_sync(make_site, broker_url):
    site = make_site(broker_url=broker_url, host_count=2)
    site.hosts[1].fail_next(count=3, status=503)
    site.start_worker()
    site.storage.save("a.txt", ContentFile(b"hello"))
    site.wait_until_converged()
    wait_until(lambda: Replica.objects.filter(state="synced").count() == 2, message="both rows synced")
    assert Replica.objects.get(host=site.hosts[1].url).attempts == 0
    assert "Will retry to upload a.txt on" in site.logs()


def test_a_host_down_past_the_retry_budget_fails_visibly_then_reconcile_repairs_it(make_site, broker_url):
    site = make_site(broker_url=broker_url, host_count=2, max_retries=2)
    broken = site.hosts[1]
    broken.go_down()
    site.start_worker()
    site.storage.save("a.txt", ContentFile(b"hello"))
    wait_until(lambda: Replica.objects.filter(host=broken.url, state="failed").exists(), message="a failed row")

    row = Replica.objects.get(host=broken.url)
    assert row.attempts == 3
    assert "Connection refused" in row.last_error and row.last_error_at is not None
    wait_until(lambda: TaskResult.objects.filter(status="FAILURE").exists(), message="a failed task result")
    failed = TaskResult.objects.get(status="FAILURE")
    assert failed.task_name == "resto_celery.upload"
    assert broken.url in failed.task_args and "a.txt" in failed.task_args
    assert "HostUnreachable" in failed.traceback

    broken.come_back()
    from resto_celery.tasks import reconcile

    wait_until(lambda: Replica.objects.get(host=broken.url).retry_at <= timezone.now(), message="the retry time")
    reconcile.apply_async(queue=site.queue)
    site.wait_until_converged()
    wait_until(lambda: Replica.objects.get(host=broken.url).state == "synced", message="the row to be synced")


def test_a_host_that_comes_back_is_caught_up_by_the_next_reconcile_not_after_failed_retry_after(make_site):
    site = make_site(host_count=2, max_retries=1, failed_retry_after=300)
    broken = site.hosts[1]
    broken.go_down()
    site.start_worker()
    for name in ("a.txt", "b.txt", "c.txt"):
        site.storage.save(name, ContentFile(name.encode()))
    wait_until(lambda: Replica.objects.filter(host=broken.url, state="failed").count() == 3, message="failed rows")
    broken.come_back()
    from resto_celery.tasks import reconcile

    # It probes the host with one failed change; the host answers, so the others are re-sent at once.
    reconcile.apply_async(queue=site.queue)
    site.wait_until_drained_and_converged(timeout=20)
    assert "answers again: sent" in site.logs()


def test_a_worker_killed_mid_transfer_is_replaced_and_the_host_converges(make_site, broker_url):
    site = make_site(broker_url=broker_url, host_count=1, lease_ttl=4, timeout=2)
    host = site.hosts[0]
    host.set_receive_rate(16 * 1024 * 1024)  # 64 MiB take 4 s to arrive
    worker = site.start_worker(concurrency=1, visibility_timeout=4)
    big = b"0123456789abcdef" * (4 * 1024 * 1024)  # 64 MiB
    site.storage.save("big.bin", ContentFile(big))
    wait_until(lambda: "resto_celery.replicate" in worker.log(), message="the worker to take the task")
    time.sleep(1.5)  # about a third of the body is sent
    worker.kill()
    host.reset_faults()
    assert not host.has("big.bin")  # the torn upload was not stored
    site.start_worker(concurrency=1, visibility_timeout=4)
    site.wait_until_converged(timeout=60)
    assert host.read("big.bin") == big
    wait_until(lambda: Replica.objects.filter(state="synced").exists(), message="the row to be synced")


def test_reconcile_repairs_a_lost_message_and_a_missed_delete(make_site):
    site = make_site(host_count=2)
    site.storage.save("lost.txt", ContentFile(b"never announced"))
    redis.Redis.from_url(site.redis_url).delete("resto")  # the messages are lost
    site.start_worker()
    site.storage.save("gone.txt", ContentFile(b"soon gone"))
    wait_until(lambda: Replica.objects.filter(path="gone.txt", state="synced").count() == 2, message="gone.txt synced")
    (site.media_root / "gone.txt").unlink()  # removed behind the storage's back: no task

    from resto_celery.tasks import reconcile

    reconcile.apply_async(queue=site.queue)
    site.wait_until_converged()
    assert site.hosts[0].files() == {"lost.txt": b"never announced"}
    wait_until(lambda: not Replica.objects.filter(path="gone.txt").exists(), message="gone.txt rows to go")


def test_a_save_during_a_broker_outage_reaches_every_host_after_reconcile(make_site, redis_server):
    site = make_site(host_count=2)
    redis_server.stop()
    try:
        site.storage.save("a.txt", ContentFile(b"saved while redis was down"))
    finally:
        redis_server.start()
    site.start_worker()
    from resto_celery.tasks import reconcile

    reconcile.apply_async(queue=site.queue)
    site.wait_until_converged()
    assert site.hosts[1].files() == {"a.txt": b"saved while redis was down"}


def test_queue_option_routes_each_hosts_tasks_to_its_own_queue(make_site):
    site = make_site(host_count=2, queue="resto-{host}")
    site.storage.save("a.txt", ContentFile(b"x"))
    assert publisher.flush(timeout=10)
    client = redis.Redis.from_url(site.redis_url)
    for host in site.hosts:
        [raw] = client.lrange(f"resto-{host.url}", 0, -1)
        assert json.loads(raw)["headers"]["argsrepr"] == repr(("a.txt", [host.url], "upload"))
    assert client.llen("resto") == 0


def test_a_reconcile_pass_is_skipped_while_another_one_runs(make_site):
    from resto_celery import registry
    from resto_celery.tasks import coordinator_for, reconcile

    site = make_site(host_count=2)
    registry.clear()
    registry.register(site.storage)  # this test's storage only, not earlier tests' ones
    site.storage.save("a.txt", ContentFile(b"x"))  # one message, and the master's marker
    assert publisher.flush(timeout=10)
    client = redis.Redis.from_url(site.redis_url)

    def queued(queue):  # both lanes
        return sum(client.llen(key) for key in lanes.queue_keys(queue))

    running = coordinator_for(site.storage.options).pass_lock(f"reconcile:{site.storage.location}", 60)
    assert running.acquire()
    try:
        assert reconcile.run().get("skipped", 0) >= 1
        assert queued("resto") == 1  # nothing enqueued again
    finally:
        running.release()
    reconcile.run()
    assert queued("resto") == 2  # a pass of its own: a.txt has no rows yet, so one message for both hosts
