"""The publisher thread: save() hands its change over and returns; bursts go out as few messages."""
import base64
import json
import time

import pytest
import redis
from django.core.files.base import ContentFile
from django.core.signals import request_finished, request_started

from resto_celery import publisher
from tests.site import wait_until
from tests.test_broker_clients import sync_redis_clients_made

pytestmark = pytest.mark.django_db(transaction=True)


def _messages(redis_url, queue="resto"):
    """``(task name, arguments)`` of every message waiting in ``queue``, oldest first."""
    found = []
    for raw in reversed(redis.Redis.from_url(redis_url).lrange(queue, 0, -1)):
        message = json.loads(raw)
        found.append((message["headers"]["task"], json.loads(base64.b64decode(message["body"]))[0]))
    return found


def test_save_returns_before_the_message_is_sent_and_flush_waits_for_it(make_site):
    site = make_site(host_count=2)
    site.storage.save("a.txt", ContentFile(b"a"))
    assert publisher.flush(timeout=10)
    hosts = [host.url for host in site.hosts]
    assert _messages(site.redis_url) == [("resto_celery.replicate", ["a.txt", hosts, "upload"])]


def test_a_burst_of_changes_goes_out_as_one_message(make_site):
    site = make_site(host_count=2)
    hosts = [host.url for host in site.hosts]
    with publisher._publisher.condition:  # the thread cannot take anything until the burst is queued
        for index in range(20):
            site.storage.save(f"{index}.txt", ContentFile(b"x"))
        site.storage.delete("3.txt")
    assert publisher.flush(timeout=10)
    [(task, [changes])] = _messages(site.redis_url)
    assert task == "resto_celery.replicate_batch"
    assert changes == [[f"{index}.txt", hosts, "upload"] for index in range(20)] + [["3.txt", hosts, "delete"]]


def test_a_burst_larger_than_a_message_holds_is_split(make_site):
    site = make_site(host_count=1)
    count = publisher.MAX_CHANGES_PER_MESSAGE + 5
    with publisher._publisher.condition:
        for index in range(count):
            site.storage.save(f"{index}.txt", ContentFile(b"x"))
    assert publisher.flush(timeout=10)
    sizes = [len(arguments[0]) for _, arguments in _messages(site.redis_url)]
    assert sizes == [publisher.MAX_CHANGES_PER_MESSAGE, 5]


def test_a_worker_applies_every_change_of_a_batch_message(make_site):
    site = make_site(host_count=2)
    with publisher._publisher.condition:
        for index in range(10):
            site.storage.save(f"{index}.txt", ContentFile(str(index).encode()))
        site.storage.delete("4.txt")
    assert publisher.flush(timeout=10)
    assert _messages(site.redis_url)[0][0] == "resto_celery.replicate_batch"
    site.start_worker()
    site.wait_until_drained_and_converged()
    assert "4.txt" not in site.hosts[0].files()


@pytest.fixture
def in_a_request():
    """This thread handles a request, as Django's handlers signal it, until the test ends it."""
    request_started.send(sender=None)
    yield lambda: request_finished.send(sender=None)
    request_finished.send(sender=None)


def test_a_change_made_during_a_request_is_sent_once_the_request_ends(make_site, in_a_request, monkeypatch):
    monkeypatch.setattr(publisher, "REQUEST_HOLD_MAX", 30)
    site = make_site(host_count=1)
    site.storage.save("a.txt", ContentFile(b"a"))
    time.sleep(0.2)  # the publisher thread had ample time to send it, were it not held
    assert _messages(site.redis_url) == []
    in_a_request()  # the response has gone out: request_finished
    wait_until(lambda: _messages(site.redis_url), timeout=10, message="the change to be sent")
    assert _messages(site.redis_url) == [("resto_celery.replicate", ["a.txt", [site.hosts[0].url], "upload"])]


def test_a_change_made_during_a_request_that_does_not_end_is_sent_after_the_hold_max(make_site, in_a_request,
                                                                                     monkeypatch):
    monkeypatch.setattr(publisher, "REQUEST_HOLD_MAX", 0.3)
    site = make_site(host_count=1)
    site.storage.save("a.txt", ContentFile(b"a"))
    wait_until(lambda: _messages(site.redis_url), timeout=10, message="the change to be sent while the request runs")
    assert publisher._publisher.held == {}


def test_a_request_that_ends_on_another_thread_releases_its_changes(make_site, in_a_request, monkeypatch):
    """Django's AsyncClient sends request_finished from another thread than the view's."""
    import threading

    monkeypatch.setattr(publisher, "REQUEST_HOLD_MAX", 30)
    site = make_site(host_count=1)
    site.storage.save("a.txt", ContentFile(b"a"))
    closer = threading.Thread(target=in_a_request)
    closer.start()
    closer.join()
    wait_until(lambda: _messages(site.redis_url), timeout=10, message="the held change to be sent")
    site.storage.save("b.txt", ContentFile(b"b"))  # this thread is no longer taken for a request's
    wait_until(lambda: len(_messages(site.redis_url)) == 2, timeout=10, message="a later change to go at once")


def test_flush_sends_the_changes_held_for_a_request_at_once(make_site, in_a_request, monkeypatch):
    monkeypatch.setattr(publisher, "REQUEST_HOLD_MAX", 30)
    site = make_site(host_count=1)
    site.storage.save("a.txt", ContentFile(b"a"))
    assert publisher.flush(timeout=10)
    assert [task for task, _ in _messages(site.redis_url)] == ["resto_celery.replicate"]


def test_the_inline_option_sends_before_save_returns(make_site):
    site = make_site(host_count=1, publish="inline")
    with publisher._publisher.condition:  # the thread is held: only an inline send gets through
        site.storage.save("a.txt", ContentFile(b"a"))
        assert _messages(site.redis_url) == [("resto_celery.replicate", ["a.txt", [site.hosts[0].url], "upload"])]


def test_a_forked_child_has_none_of_its_parents_changes_nor_its_lock(make_site):
    """A prefork pool process is forked from a worker: its publisher starts empty, so its
    flush at shutdown does not wait for changes its parent holds (or for the parent's lock)."""
    import os

    site = make_site(host_count=1)
    with publisher._publisher.condition:  # the parent holds its lock and a queued change
        site.storage.save("a.txt", ContentFile(b"a"))
        pid = os.fork()
        if pid == 0:  # the child
            os._exit(0 if publisher.flush(timeout=2) and not publisher._publisher.pending else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert publisher.flush(timeout=10)
    assert len(_messages(site.redis_url)) == 1


def test_a_producer_sends_every_message_through_one_redis_client(make_site, project_celery_app, monkeypatch):
    """kombu's Redis transport would make a redis.Redis client per message; one is enough."""
    made = sync_redis_clients_made(monkeypatch)
    site = make_site(host_count=1)
    for index in range(7):
        if index == 2:  # the first send opened the producer's channel, the second gave it its client
            made.clear()
        publisher.send_now(project_celery_app, "resto", [(f"{index}.txt", [site.hosts[0].url], "upload")],
                           failed=pytest.fail)
    assert len(_messages(site.redis_url)) == 7
    assert made == []


def test_a_message_sent_without_a_producer_goes_through_one_redis_client(make_site, project_celery_app,
                                                                        monkeypatch):
    """AsyncStorage.enqueue() and other callers that give no producer take one of the app's
    pool, whose channel keeps one client as a producer given by the caller does."""
    made = sync_redis_clients_made(monkeypatch)
    site = make_site(host_count=1)
    for index in range(7):
        if index == 2:
            made.clear()
        site.storage.enqueue("upload", site.hosts[0].url, f"{index}.txt", bulk=False)
    assert len(_messages(site.redis_url)) == 7
    assert made == []


def test_the_one_redis_client_follows_the_channel_to_a_new_pool(make_site, project_celery_app):
    """After a fork kombu gives the channel a new connection pool; the client goes with it."""
    site = make_site(host_count=1)
    with project_celery_app.producer_or_acquire() as producer:
        publisher.send(project_celery_app, "resto_celery.replicate", ("a.txt", [site.hosts[0].url], "upload"),
                       "resto", producer)
        old_pool = producer.channel.pool
        producer.channel._after_fork()  # what kombu does in a forked child: drop the pools
        publisher.send(project_celery_app, "resto_celery.replicate", ("b.txt", [site.hosts[0].url], "upload"),
                       "resto", producer)
        with producer.channel.conn_or_acquire() as client:
            assert client.connection_pool is producer.channel.pool is not old_pool
    assert [arguments[0] for _, arguments in _messages(site.redis_url)] == ["a.txt", "b.txt"]
