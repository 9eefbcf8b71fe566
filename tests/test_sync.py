"""replication.sync: the state-based transfer of one (host, path), under a Redis lease."""
import io
import time

import pytest
from django.core.files.base import ContentFile

from resto_celery import replication
from resto_celery.coordination import Coordinator
from resto_celery.exceptions import HostShortCircuited, HostTimeout, HostUnreachable, UnexpectedStatus
from resto_celery.master import MasterStorage
from resto_celery.models import Replica
from resto_celery.transport import HostTransport
from tests.site import UnansweringHost

pytestmark = pytest.mark.django_db


@pytest.fixture
def master(media_root):
    return MasterStorage(location=str(media_root))


@pytest.fixture
def host(make_media_server):
    return make_media_server()


@pytest.fixture
def coordinator(redis_url):
    return Coordinator(redis_url, lease_ttl=2, breaker_threshold=3, breaker_cooldown=30)


def _sync(master, host, coordinator, name, **kwargs):
    transport = HostTransport(host.url, name="h1", timeout=kwargs.pop("timeout", 2))
    return replication.sync("h1", name, master.path(name), transport, coordinator, **kwargs)


def _puts(host):
    return [r for r in host.requests if r.method == "PUT"]


def test_present_master_is_put_and_recorded_as_synced(master, host, coordinator):
    master.save("a.txt", ContentFile(b"v1"))
    assert _sync(master, host, coordinator, "a.txt", task_id="t-1") == "upload"
    assert host.files() == {"a.txt": b"v1"}
    row = Replica.objects.get(host="h1", path="a.txt")
    assert (row.state, row.attempts, row.task_id) == ("synced", 0, "t-1")
    assert row.fingerprint.startswith("2:")


def test_same_fingerprint_skips_the_transfer(master, host, coordinator):
    master.save("a.txt", ContentFile(b"v1"))
    _sync(master, host, coordinator, "a.txt")
    assert _sync(master, host, coordinator, "a.txt") == "skip"
    assert len(_puts(host)) == 1


def test_a_changed_master_file_is_sent_again(master, host, coordinator):
    master.save("a.txt", ContentFile(b"v1"))
    _sync(master, host, coordinator, "a.txt")
    master.delete("a.txt")
    master.save("a.txt", ContentFile(b"version 2"))
    assert _sync(master, host, coordinator, "a.txt") == "upload"
    assert host.files() == {"a.txt": b"version 2"}


def test_absent_master_file_is_deleted_on_the_host_and_its_row_forgotten(master, host, coordinator):
    master.save("a.txt", ContentFile(b"v1"))
    _sync(master, host, coordinator, "a.txt")
    master.delete("a.txt")
    assert _sync(master, host, coordinator, "a.txt") == "delete"
    assert host.files() == {}
    assert not Replica.objects.exists()


def test_a_late_task_for_an_old_save_sends_the_newest_state(master, host, coordinator):
    master.save("a.txt", ContentFile(b"old"))
    master.delete("a.txt")
    master.save("a.txt", ContentFile(b"newest"))
    # The task of the first save runs only now: it sends what the master has now.
    _sync(master, host, coordinator, "a.txt")
    assert host.files() == {"a.txt": b"newest"}


def test_a_held_lease_makes_the_task_wait_and_send_nothing(master, host, coordinator):
    master.save("a.txt", ContentFile(b"v1"))
    other = coordinator.lease("h1", "a.txt")
    assert other.acquire()
    with pytest.raises(replication.LeaseBusy) as busy:
        _sync(master, host, coordinator, "a.txt")
    assert 0 < busy.value.wait <= 2
    assert host.requests == []
    other.release()
    assert _sync(master, host, coordinator, "a.txt") == "upload"


def test_the_lease_is_released_after_a_success(master, host, coordinator):
    master.save("a.txt", ContentFile(b"v1"))
    _sync(master, host, coordinator, "a.txt")
    assert coordinator.lease("h1", "a.txt").acquire()


def test_a_refused_connection_releases_the_lease_and_reports_the_failure(master, host, coordinator):
    master.save("a.txt", ContentFile(b"v1"))
    host.go_down()
    failures = []
    with pytest.raises(HostUnreachable) as raised:
        _sync(master, host, coordinator, "a.txt", on_failure=failures.append)
    assert failures == [raised.value]
    assert not raised.value.in_doubt
    assert coordinator.lease("h1", "a.txt").acquire()


def test_a_timeout_keeps_the_lease_until_it_expires(master, host, coordinator):
    """The host may still apply the timed-out PUT: nothing else may touch the path until then."""
    master.save("a.txt", ContentFile(b"v1"))
    host.set_delay(1.0, count=1)
    with pytest.raises(HostTimeout) as raised:
        _sync(master, host, coordinator, "a.txt", timeout=0.2)
    assert raised.value.in_doubt
    lease = coordinator.lease("h1", "a.txt")
    assert not lease.acquire()
    assert 0 < lease.remaining() <= 2


def test_a_long_transfer_keeps_its_lease_alive(master, host, redis_url):
    coordinator = Coordinator(redis_url, lease_ttl=0.6, breaker_threshold=3, breaker_cooldown=30)
    master.save("a.txt", ContentFile(b"v1"))
    host.set_delay(1.5, count=1)
    started = time.monotonic()
    assert _sync(master, host, coordinator, "a.txt", timeout=5) == "upload"
    assert time.monotonic() - started >= 1.5  # longer than the TTL, yet nobody could take it


def test_the_breaker_opens_after_repeated_failures_and_spares_the_host(master, host, coordinator):
    master.save("a.txt", ContentFile(b"v1"))
    host.fail_next(count=3, status=503)
    for _ in range(3):
        with pytest.raises(UnexpectedStatus):
            _sync(master, host, coordinator, "a.txt")
    host.clear_requests()
    with pytest.raises(HostShortCircuited, match="circuit breaker open") as raised:
        _sync(master, host, coordinator, "a.txt")
    assert raised.value.retryable
    assert host.requests == []


def test_a_short_circuited_transfer_says_what_opened_the_breaker(master, host, coordinator):
    master.save("a.txt", ContentFile(b"v1"))
    host.go_down()
    for _ in range(3):
        with pytest.raises(HostUnreachable):
            _sync(master, host, coordinator, "a.txt")
    with pytest.raises(HostShortCircuited, match=r"circuit breaker open .*\(connection failed: .*Connection refused"):
        _sync(master, host, coordinator, "a.txt")


def test_the_breaker_keeps_the_last_failure_while_the_host_is_down_and_forgets_it_once_back(
    master, host, coordinator,
):
    master.save("a.txt", ContentFile(b"v1"))
    host.fail_next(count=3, status=503)
    for _ in range(3):
        with pytest.raises(UnexpectedStatus):
            _sync(master, host, coordinator, "a.txt")
    open_for, down_since, _, cause = coordinator.breaker("h1").health()
    assert open_for > 0 and down_since is not None and "503" in cause
    _sync(master, host, coordinator, "a.txt", probe=True)
    _, down_since, back_at, cause = coordinator.breaker("h1").health()
    assert (down_since, cause) == (None, "") and back_at is not None


def test_a_success_closes_the_breaker(master, host, coordinator):
    master.save("a.txt", ContentFile(b"v1"))
    host.fail_next(count=2, status=503)
    for _ in range(2):
        with pytest.raises(UnexpectedStatus):
            _sync(master, host, coordinator, "a.txt")
    _sync(master, host, coordinator, "a.txt")
    assert coordinator.breaker("h1").open_for() == 0
    host.fail_next(count=2, status=503)
    for _ in range(2):
        with pytest.raises(UnexpectedStatus):
            _sync(master, host, coordinator, "b.txt")
    assert coordinator.breaker("h1").open_for() == 0  # 2 failures since the success: still closed


def test_client_errors_do_not_count_for_the_breaker(master, host, coordinator):
    master.save("a.txt", ContentFile(b"v1"))
    host.read_only = True
    for _ in range(4):
        with pytest.raises(UnexpectedStatus):
            _sync(master, host, coordinator, "a.txt")
    assert coordinator.breaker("h1").open_for() == 0


def test_a_lease_lost_during_the_transfer_leaves_the_row_pending_for_reconcile(master, host, coordinator, redis_url):
    import threading

    import redis

    master.save("a.txt", ContentFile(b"v1"))
    host.set_delay(0.6, count=1)
    lease_key = coordinator.lease("h1", "a.txt").key
    wipe = threading.Timer(0.2, lambda: redis.Redis.from_url(redis_url).delete(lease_key))  # a Redis restart
    wipe.start()
    assert _sync(master, host, coordinator, "a.txt") == "upload"
    wipe.join()
    row = Replica.objects.get(host="h1", path="a.txt")
    assert row.state == "pending" and "lease lost" in row.last_error


# A batch: several paths (and hosts) synced together by one task (replicate_batch).


def _sync_pairs(master, servers, coordinator, pairs, **kwargs):
    transports = {name: HostTransport(server.url, name=name, timeout=2) for name, server in servers.items()}
    return replication.sync_pairs(pairs, master.path, transports, coordinator, **kwargs)


def test_a_batch_brings_every_path_in_line_on_every_host(master, make_media_server, coordinator):
    servers = {"h1": make_media_server(), "h2": make_media_server()}
    for index in range(20):
        master.save(f"b/{index}.txt", ContentFile(f"file {index}".encode()))
    HostTransport(servers["h1"].url).put("gone.txt", io.BytesIO(b"deleted from the master"), 23)
    pairs = [(host, f"b/{index}.txt") for index in range(20) for host in servers] + [("h1", "gone.txt")]

    outcomes = _sync_pairs(master, servers, coordinator, pairs, task_id="batch")

    assert [(o.host, o.name) for o in outcomes] == pairs  # one outcome per pair, in order
    assert {o.action for o in outcomes} == {"upload", "delete"} and not any(o.error for o in outcomes)
    for server in servers.values():
        assert server.files() == {f"b/{index}.txt": f"file {index}".encode() for index in range(20)}
    assert Replica.objects.filter(state="synced", task_id="batch").count() == 40


def test_a_batch_costs_the_same_queries_whatever_its_size(master, make_media_server, coordinator):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    servers = {"h1": make_media_server(), "h2": make_media_server()}
    for index in range(60):
        master.save(f"q/{index}.txt", ContentFile(b"x"))
    counts = []
    for names in (range(5), range(5, 60)):
        with CaptureQueriesContext(connection) as queries:
            _sync_pairs(master, servers, coordinator, [(host, f"q/{i}.txt") for i in names for host in servers])
        counts.append(len(queries))
    assert counts[0] == counts[1]  # a fingerprint query and one row write, for 10 pairs or 110


def test_a_fresh_change_is_sent_without_reading_the_hosts_rows(master, make_media_server, coordinator):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    servers = {"h1": make_media_server(), "h2": make_media_server()}
    master.save("new.txt", ContentFile(b"just saved"))
    with CaptureQueriesContext(connection) as queries:
        outcomes = _sync_pairs(master, servers, coordinator, [("h1", "new.txt"), ("h2", "new.txt")], fresh=True)

    assert [o.action for o in outcomes] == ["upload", "upload"]
    assert [q["sql"].split()[0] for q in queries] == ["INSERT"]  # the rows are written, never read
    assert Replica.objects.filter(path="new.txt", state="synced").count() == 2


def test_a_fresh_change_the_host_holds_already_is_sent_again_where_a_bulk_one_is_skipped(
    master, host, coordinator
):
    master.save("a.txt", ContentFile(b"v1"))
    _sync_pairs(master, {"h1": host}, coordinator, [("h1", "a.txt")])  # the host holds these bytes now

    (bulk,) = _sync_pairs(master, {"h1": host}, coordinator, [("h1", "a.txt")], bulk=True)
    (fresh,) = _sync_pairs(master, {"h1": host}, coordinator, [("h1", "a.txt")], fresh=True)

    assert (bulk.action, fresh.action) == ("skip", "upload")  # a redelivered save's message: one PUT more
    assert len(_puts(host)) == 2 and host.files() == {"a.txt": b"v1"}


def test_a_batch_to_plain_http_hosts_is_sent_from_the_tasks_thread(master, make_media_server, coordinator, monkeypatch):
    pools = {}
    monkeypatch.setattr(replication, "_pools", pools)
    servers = {"h1": make_media_server(), "h2": make_media_server(), "h3": make_media_server()}
    for index in range(40):  # more pairs than one round of TRANSFER_THREADS
        master.save(f"p/{index}.txt", ContentFile(f"file {index}".encode()))
    pairs = [(host, f"p/{index}.txt") for index in range(40) for host in servers]

    outcomes = _sync_pairs(master, servers, coordinator, pairs)

    assert pools == {}  # no transfer thread: every request begun, then every answer read, here
    assert all(o.action == "upload" and o.error is None for o in outcomes)
    for server in servers.values():
        assert server.files() == {f"p/{index}.txt": f"file {index}".encode() for index in range(40)}


def test_a_batch_stops_trying_a_host_once_it_is_unreachable(master, make_media_server, coordinator):
    up, down = make_media_server(), make_media_server()
    down.stop()
    for index in range(200):
        master.save(f"u/{index}.txt", ContentFile(b"x"))
    pairs = [(host, f"u/{index}.txt") for index in range(200) for host in ("up", "down")]

    outcomes = _sync_pairs(master, {"up": up, "down": down}, coordinator, pairs)

    failed = [o for o in outcomes if o.host == "down"]
    assert all(isinstance(o.error, HostUnreachable) for o in failed), {type(o.error) for o in failed}
    tried = len({id(o.error) for o in failed})
    assert tried < 100, f"{tried} of 200 tried"  # the host's first refusal answered for the others
    assert len(up.files()) == 200 and all(o.error is None for o in outcomes if o.host == "up")


@pytest.mark.parametrize(("error", "cut_off"), [
    (HostUnreachable("h", "PUT", "a", "connection refused", in_doubt=False), True),
    (HostTimeout("h", "PUT", "a", "timed out connecting", in_doubt=False), True),
    (HostUnreachable("h", "PUT", "a", "closed without an answer", in_doubt=True), False),
    (HostTimeout("h", "PUT", "a", "timed out waiting for an answer", in_doubt=True), False),
], ids=["refused", "connect timeout", "dropped after sending", "answer timeout"])
def test_only_a_host_that_took_nothing_has_its_other_pairs_failed_at_once(error, cut_off):
    """A host that got the request is there: one connection's trouble says nothing of the next."""
    assert replication._unreachable(error) is cut_off


def test_each_pairs_transfer_time_is_its_own_hosts_not_the_slowest_hosts(master, make_media_server, coordinator):
    slow, quick = make_media_server(), make_media_server()
    slow.set_delay(0.5, methods="PUT")
    master.save("a.txt", ContentFile(b"a"))

    outcomes = {o.host: o for o in _sync_pairs(master, {"slow": slow, "quick": quick}, coordinator,
                                               [("slow", "a.txt"), ("quick", "a.txt")], fresh=True)}

    assert outcomes["slow"].seconds >= 0.5
    assert outcomes["quick"].seconds < outcomes["slow"].seconds / 2  # what the metrics report per host


def test_a_busy_pair_in_a_batch_waits_and_the_others_go_on(master, host, coordinator):
    master.save("a.txt", ContentFile(b"a"))
    master.save("b.txt", ContentFile(b"b"))
    other_worker = coordinator.lease("h1", "a.txt")
    assert other_worker.acquire()

    busy, free = _sync_pairs(master, {"h1": host}, coordinator, [("h1", "a.txt"), ("h1", "b.txt")])

    assert isinstance(busy.error, replication.LeaseBusy) and busy.action == ""
    assert free.action == "upload" and host.files() == {"b.txt": b"b"}


def test_a_failures_row_keeps_its_reason_without_repeating_the_host(master, host, coordinator):
    from resto_celery.conf import resolve
    from resto_celery.retries import FailureRecorder

    master.save("a.txt", ContentFile(b"v1"))
    host.fail_next(status=403, methods=["PUT"])
    with pytest.raises(UnexpectedStatus):
        _sync(master, host, coordinator, "a.txt",
              on_failure=lambda error: FailureRecorder(resolve(), "t-1")("h1", "a.txt", error, False))
    row = Replica.objects.get(host="h1", path="a.txt")
    assert row.last_error == "PUT a.txt failed: 403 Forbidden"  # the row names the host already


def test_hosts_that_never_answer_a_connect_hold_back_neither_the_others_nor_the_task_by_more_than_one_timeout(
    master, make_media_server, coordinator,
):
    unanswering = {"dark-1": UnansweringHost(), "dark-2": UnansweringHost()}
    up = make_media_server()
    transports = {host: HostTransport(server.url, name=host, timeout=1) for host, server in unanswering.items()}
    transports["up"] = HostTransport(up.url, name="up", timeout=1)
    names = ["a.txt", "b.txt"]
    for name in names:
        master.save(name, ContentFile(b"v1"))
    pairs = [(host, name) for name in names for host in transports]  # the silent hosts first
    started = time.monotonic()
    try:
        outcomes = {o.pair: o for o in replication.sync_pairs(pairs, master.path, transports, coordinator)}
    finally:
        for server in unanswering.values():
            server.close()
    waited = time.monotonic() - started

    assert up.files() == {"a.txt": b"v1", "b.txt": b"v1"}
    assert all(outcomes[("up", name)].error is None for name in names)
    assert max(r.time for r in up.requests if r.method == "PUT") - started < 0.9, "the PUTs waited for a timeout"
    for host in unanswering:
        for name in names:
            error = outcomes[(host, name)].error
            assert isinstance(error, HostTimeout) and "timed out connecting" in str(error) and not error.in_doubt
    assert waited < 1.8, f"{waited:.2f} s: the silent hosts were connected to one after another (2 x 1 s)"


def test_a_change_for_a_down_host_is_recorded_after_the_answering_hosts_got_it(master, make_media_server, coordinator):
    up, down = make_media_server(), make_media_server()
    transports = {"up": HostTransport(up.url, name="up", timeout=2), "down": HostTransport(down.url, name="down")}
    for _ in range(3):  # the breaker's threshold: "down" is short-circuited
        coordinator.breaker("down").record_failure("connection failed: Connection refused")
    master.save("a.txt", ContentFile(b"v1"))
    recorded = {}

    def on_failure(host, name, error, host_down):
        recorded[(host, name)] = (time.monotonic(), type(error).__name__, host_down)

    replication.sync_pairs([("down", "a.txt"), ("up", "a.txt")], master.path, transports, coordinator,
                           on_failure=on_failure)

    [put] = [r for r in up.requests if r.method == "PUT"]
    at, kind, host_down = recorded[("down", "a.txt")]
    assert (kind, host_down) == ("HostShortCircuited", True)
    assert put.time < at, "the answering host's PUT waited for the down host's row"
    assert down.requests == []
