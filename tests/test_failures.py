"""When a host fails: what is raised, what is logged, and what every host and the master hold."""
import logging

import pytest
from django.core.files.base import ContentFile

from resto_celery.exceptions import HostTimeout, HostUnreachable, ReplicationError, UnexpectedStatus
from resto_celery.storage import DistributedStorage, HybridStorage

TIMEOUT = 0.5


def _go_down(server):
    server.go_down()


def _answer_500(server):
    server.fail_next(count=100, status=500)


def _hang(server):
    server.set_delay(TIMEOUT * 6)


def _read_only(server):
    server.read_only = True


#: fault -> (how to inject it into a MediaServer, the error it raises, words in the log line)
FAULTS = {
    "down": (_go_down, HostUnreachable, "connection failed: Connection refused"),
    "500": (_answer_500, UnexpectedStatus, "500 Internal Server Error"),
    "timeout": (_hang, HostTimeout, "timed out waiting for an answer"),
    "read-only": (_read_only, UnexpectedStatus, "403 Forbidden"),
}


@pytest.fixture(params=list(FAULTS))
def fault(request):
    return request.param


@pytest.fixture
def three_hosts(make_media_server):
    return [make_media_server() for _ in range(3)]


def _failure_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "resto_celery.storage" and r.levelno == logging.ERROR]


def test_fatal_upload_failure_raises_after_every_host_was_tried(three_hosts, media_root, fault, caplog):
    inject, error_type, words = FAULTS[fault]
    broken = three_hosts[1]
    storage = HybridStorage(hosts=[h.url for h in three_hosts], timeout=TIMEOUT, fatal_exceptions=True)
    inject(broken)

    with pytest.raises(ReplicationError) as raised:
        storage.save("f.txt", ContentFile(b"payload"))

    assert list(raised.value.failures) == [broken.url]
    assert isinstance(raised.value.failures[broken.url], error_type)
    assert "Failed to upload f.txt on 1 of 3 media host(s)" in str(raised.value)
    [line] = _failure_lines(caplog)
    assert line.startswith(f"Failed to upload f.txt on {broken.url}: ") and words in line
    assert (media_root / "f.txt").read_bytes() == b"payload"
    assert not broken.has("f.txt")
    for healthy in (three_hosts[0], three_hosts[2]):
        assert healthy.files() == {"f.txt": b"payload"}


def test_non_fatal_upload_failure_is_logged_and_the_save_succeeds(three_hosts, media_root, fault, caplog):
    inject, _, words = FAULTS[fault]
    broken = three_hosts[0]
    storage = HybridStorage(hosts=[h.url for h in three_hosts], timeout=TIMEOUT, fatal_exceptions=False)
    inject(broken)

    assert storage.save("f.txt", ContentFile(b"payload")) == "f.txt"

    [line] = _failure_lines(caplog)
    assert line.startswith(f"Failed to upload f.txt on {broken.url}: ") and words in line
    assert (media_root / "f.txt").read_bytes() == b"payload"
    assert not broken.has("f.txt")
    for healthy in three_hosts[1:]:
        assert healthy.files() == {"f.txt": b"payload"}


@pytest.mark.parametrize("fatal", [True, False], ids=["fatal", "not-fatal"])
def test_delete_failure_removes_the_master_and_the_healthy_copies(three_hosts, media_root, fault, fatal, caplog):
    inject, error_type, words = FAULTS[fault]
    broken = three_hosts[2]
    storage = HybridStorage(hosts=[h.url for h in three_hosts], timeout=TIMEOUT, fatal_exceptions=fatal)
    storage.save("f.txt", ContentFile(b"payload"))
    inject(broken)

    if fatal:
        with pytest.raises(ReplicationError) as raised:
            storage.delete("f.txt")
        assert isinstance(raised.value.failures[broken.url], error_type)
    else:
        storage.delete("f.txt")

    [line] = _failure_lines(caplog)
    assert line.startswith(f"Failed to delete f.txt on {broken.url}: ") and words in line
    assert not (media_root / "f.txt").exists()
    assert broken.files() == {"f.txt": b"payload"}
    for healthy in three_hosts[:2]:
        assert healthy.files() == {}


def test_show_traceback_logs_the_exception(three_hosts, media_root, caplog):
    three_hosts[0].go_down()
    storage = HybridStorage(hosts=[h.url for h in three_hosts], fatal_exceptions=False, show_traceback=True)
    storage.save("f.txt", ContentFile(b"x"))
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.exc_info and record.exc_info[0] is HostUnreachable


def test_without_show_traceback_the_log_line_has_no_traceback(three_hosts, media_root, caplog):
    three_hosts[0].go_down()
    storage = HybridStorage(hosts=[h.url for h in three_hosts], fatal_exceptions=False)
    storage.save("f.txt", ContentFile(b"x"))
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert not record.exc_info


def test_a_host_that_comes_back_serves_new_uploads(three_hosts, media_root):
    storage = HybridStorage(hosts=[h.url for h in three_hosts], fatal_exceptions=False)
    with three_hosts[1].down():
        storage.save("during.txt", ContentFile(b"1"))
    storage.save("after.txt", ContentFile(b"2"))
    assert three_hosts[1].files() == {"after.txt": b"2"}


@pytest.mark.parametrize("fault_name", ["down", "500"])
def test_distributed_upload_failure_keeps_the_copies_that_succeeded(three_hosts, fault_name, caplog):
    inject, error_type, _ = FAULTS[fault_name]
    storage = DistributedStorage(hosts=[h.url for h in three_hosts], timeout=TIMEOUT)
    inject(three_hosts[0])

    with pytest.raises(ReplicationError) as raised:
        storage.save("f.txt", ContentFile(b"payload"))

    assert isinstance(raised.value.failures[three_hosts[0].url], error_type)
    assert not three_hosts[0].has("f.txt")
    for healthy in three_hosts[1:]:
        assert healthy.files() == {"f.txt": b"payload"}


def test_distributed_reads_fall_back_to_the_next_host(three_hosts):
    storage = DistributedStorage(hosts=[h.url for h in three_hosts], timeout=TIMEOUT)
    storage.save("f.txt", ContentFile(b"payload"))
    three_hosts[0].go_down()
    three_hosts[1].fail_next(count=10, status=503)
    assert storage.exists("f.txt")
    assert storage.size("f.txt") == 7
    with storage.open("f.txt") as handle:
        assert handle.read() == b"payload"


def test_distributed_read_with_every_host_down_raises_replication_error(three_hosts):
    storage = DistributedStorage(hosts=[h.url for h in three_hosts], timeout=TIMEOUT)
    for host in three_hosts:
        host.go_down()
    with pytest.raises(ReplicationError, match="3 of 3"):
        storage.exists("f.txt")
