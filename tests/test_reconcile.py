"""resto_celery.reconcile: what the master tree and the Replica rows say must be sent."""
import os
from datetime import timedelta

import pytest
from django.utils import timezone

from resto_celery import marker, replication
from resto_celery.models import Hold, Replica
from resto_celery.reconcile import BRAKE_FLOOR, reconcile
from resto_celery.storage import HybridStorage

pytestmark = pytest.mark.django_db

HOSTS = ["m1", "m2"]


@pytest.fixture
def storage(media_root):
    storage = HybridStorage(hosts=HOSTS)
    marker.verify(storage.location, create=True)  # the site's master, with its marker
    return storage


def _reconcile(storage, **kwargs):
    sent = []
    counts = reconcile(storage, lambda *task: sent.append(task), **kwargs)
    return sorted(sent), counts


def _fingerprint(storage, name):
    return replication.fingerprint(os.stat(storage.path(name)))


def _synced(storage, name, hosts=HOSTS, **fields):
    for host in hosts:
        Replica.objects.create(host=host, path=name, state="synced", fingerprint=_fingerprint(storage, name), **fields)


def _write(storage, name, content=b"x"):
    path = storage.path(name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(content)


def test_a_master_file_without_rows_is_uploaded_to_every_host(storage):
    _write(storage, "a/b.txt")
    sent, counts = _reconcile(storage)
    assert sent == [("upload", "m1", "a/b.txt"), ("upload", "m2", "a/b.txt")]
    assert counts == {"files": 1, "rows": 0, "upload": 2, "delete": 0, "held": 0, "unreadable": 0, "probe": 0}


def test_synced_rows_with_the_master_fingerprint_need_nothing(storage):
    _write(storage, "a.txt")
    _synced(storage, "a.txt")
    assert _reconcile(storage)[0] == []


def test_a_row_with_another_fingerprint_is_uploaded_again(storage):
    _write(storage, "a.txt")
    _synced(storage, "a.txt")
    Replica.objects.filter(host="m2").update(fingerprint="1:2:3")
    assert _reconcile(storage)[0] == [("upload", "m2", "a.txt")]


def test_a_failed_row_is_retried_once_its_retry_time_has_come(storage):
    _write(storage, "a.txt")
    _synced(storage, "a.txt", hosts=["m1"])
    later = timezone.now() + timedelta(minutes=5)
    Replica.objects.create(host="m2", path="a.txt", state="failed", retry_at=later)
    assert _reconcile(storage)[1]["upload"] == 0
    assert _reconcile(storage, now=later)[0] == [("upload", "m2", "a.txt")]


def test_a_host_with_failed_rows_waiting_gets_one_probe_per_pass(storage):
    later = timezone.now() + timedelta(minutes=5)
    for name in ("a.txt", "b.txt", "c.txt"):
        _write(storage, name)
        _synced(storage, name, hosts=["m1"])
        Replica.objects.create(host="m2", path=name, state="failed", retry_at=later)
    sent, counts = _reconcile(storage)
    assert len(sent) == 1 and sent[0][:2] == ("upload", "m2") and counts["probe"] == 1


def test_a_pending_row_is_left_to_its_retry_until_the_retry_is_overdue(storage):
    _write(storage, "a.txt")
    _synced(storage, "a.txt", hosts=["m1"])
    retry_at = timezone.now() + timedelta(seconds=10)
    Replica.objects.create(host="m2", path="a.txt", state="pending", retry_at=retry_at)
    assert _reconcile(storage, grace=30)[0] == []
    assert _reconcile(storage, grace=30, now=retry_at + timedelta(seconds=29))[0] == []
    assert _reconcile(storage, grace=30, now=retry_at + timedelta(seconds=31))[0] == [("upload", "m2", "a.txt")]


def test_a_retry_lost_with_the_broker_is_due_at_the_next_reconcile_not_minutes_later(storage):
    """A broker restart loses the retries waiting for their countdown: their rows stay pending
    with a retry_at in the past. The default grace is short, whatever failed_retry_after says."""
    _write(storage, "a.txt")
    _synced(storage, "a.txt", hosts=["m1"])
    Replica.objects.create(host="m2", path="a.txt", state="pending", attempts=1,
                           retry_at=timezone.now() - timedelta(seconds=10))
    assert _reconcile(storage)[0] == [("upload", "m2", "a.txt")]


def test_a_pending_row_without_a_retry_is_due_once_it_has_not_moved_for_the_grace(storage):
    _write(storage, "a.txt")
    _synced(storage, "a.txt", hosts=["m1"])
    Replica.objects.create(host="m2", path="a.txt", state="pending")  # e.g. "lease lost"
    assert _reconcile(storage, grace=30)[0] == []
    later = timezone.now() + timedelta(seconds=31)
    assert _reconcile(storage, grace=30, now=later)[0] == [("upload", "m2", "a.txt")]


def test_a_row_whose_master_file_is_gone_gets_a_delete(storage):
    _write(storage, "gone.txt")
    _synced(storage, "gone.txt")
    os.remove(storage.path("gone.txt"))
    sent, counts = _reconcile(storage)
    assert sent == [("delete", "m1", "gone.txt"), ("delete", "m2", "gone.txt")]
    assert counts["rows"] == 2


def test_rows_of_other_storages_hosts_are_ignored(storage):
    Replica.objects.create(host="elsewhere", path="x.txt", state="synced")
    assert _reconcile(storage)[0] == []


def test_in_progress_master_writes_are_not_replicated(storage):
    _write(storage, "dir/.resto-abc123.part")
    assert _reconcile(storage)[0] == []


def test_batches_cover_every_file_and_row(storage):
    for index in range(7):
        _write(storage, f"d{index % 3}/f{index}.txt")
    _synced(storage, "d0/f0.txt")
    for index in range(5):
        Replica.objects.create(host="m1", path=f"old/{index}.txt", state="synced")
    sent, counts = _reconcile(storage, batch_size=2)
    assert counts == {"files": 7, "rows": 7, "upload": 12, "delete": 5, "held": 0, "unreadable": 0, "probe": 0}
    assert len(set(sent)) == 17


def test_walk_master_streams_relative_names_with_fingerprints(storage):
    _write(storage, "a/b/c.txt", b"123")
    _write(storage, "top.txt", b"")
    walked = dict(replication.walk_master(storage.location))
    assert set(walked) == {"a/b/c.txt", "top.txt"}
    assert walked["a/b/c.txt"].startswith("3:")


def test_the_marker_is_not_a_file_of_the_site(storage):
    assert os.path.exists(os.path.join(storage.location, marker.MARKER_NAME))
    assert dict(replication.walk_master(storage.location)) == {}
    assert _reconcile(storage)[0] == []


def test_a_master_without_its_marker_is_refused_and_nothing_is_sent(storage):
    _write(storage, "a.txt")
    _synced(storage, "a.txt")
    Replica.objects.create(host="m1", path="gone.txt", state="synced")
    os.remove(os.path.join(storage.location, marker.MARKER_NAME))  # an empty mount point looks like this
    sent, counts = _reconcile(storage)
    assert sent == []
    assert "marker file .resto-master is missing" in counts["refused"]


def test_a_master_with_another_sites_marker_is_refused(storage):
    marker.write(storage.location, "someone-elses-identity", replace=True)
    Replica.objects.create(host="m1", path="gone.txt", state="synced")
    sent, counts = _reconcile(storage)
    assert sent == []
    assert "another master's" in counts["refused"]


def _synced_files(storage, count, host="m1"):
    for index in range(count):
        Replica.objects.create(host=host, path=f"f{index}.txt", state="synced", fingerprint="1:2:3")


def test_deletions_within_the_brakes_share_go_through(storage):
    _synced_files(storage, 50)
    for index in range(30):
        _write(storage, f"f{index}.txt")  # the master lost 20 of the host's 50 files: 40%
    sent, counts = _reconcile(storage, max_delete_share=0.5)
    deletes = sorted(task for task in sent if task[0] == "delete")
    assert deletes == sorted(("delete", "m1", f"f{i}.txt") for i in range(30, 50))
    assert counts["held"] == 0 and not Hold.objects.exists()


def test_a_few_deletions_go_through_whatever_the_share(storage):
    _synced_files(storage, 3)  # a tiny host: its 3 files are 100%, but within the floor
    assert _reconcile(storage, max_delete_share=0.1)[1]["delete"] == 3


def test_the_brake_holds_every_deletion_of_a_host_past_its_share_and_says_how_many(storage):
    _synced_files(storage, 50, host="m1")
    _synced_files(storage, 50, host="m2")
    for index in range(50):
        _write(storage, f"f{index}.txt")
    Replica.objects.filter(host="m2", path__in=[f"f{i}.txt" for i in range(45)]).delete()
    for index in range(45):
        os.remove(storage.path(f"f{index}.txt"))  # the master lost 45 of m1's 50 files
    sent, counts = _reconcile(storage, max_delete_share=0.1)
    assert [task for task in sent if task[0] == "delete" and task[1] == "m1"] == []
    assert counts["held"] == 45
    hold = Hold.objects.get(kind=Hold.Kind.DELETES, subject="m1")
    assert hold.count == 45 and "would delete 45 of the 50 files" in hold.reason
    assert not Hold.objects.filter(subject="m2").exists()  # m2's rows: nothing to delete


def test_an_operators_go_ahead_lets_held_deletions_through_and_clears_the_hold(storage):
    _synced_files(storage, BRAKE_FLOOR + 5)
    assert _reconcile(storage, max_delete_share=0.1)[1]["held"] == BRAKE_FLOOR + 5
    _, counts = _reconcile(storage, max_delete_share=0.1, allow_deletes=("m1",))
    assert counts["delete"] == BRAKE_FLOOR + 5 and counts["held"] == 0
    assert not Hold.objects.exists()


def test_a_master_path_that_cannot_be_read_is_not_taken_for_absent(storage):
    Replica.objects.create(host="m1", path="loop/a.txt", state="synced")
    os.symlink("loop", storage.path("loop"))  # ELOOP: an error that is not "no such file"
    sent, counts = _reconcile(storage)
    assert sent == [] and counts["unreadable"] == 1


@pytest.fixture
def celery_storage(media_root, redis_url):
    from resto_celery.storage import AsyncStorage

    storage = AsyncStorage(hosts=HOSTS, redis_url=redis_url, breaker_threshold=1, breaker_cooldown=60)
    marker.verify(storage.location, create=True)
    return storage


def _waiting(storage, name, host="m2"):
    _write(storage, name)
    _synced(storage, name, hosts=[h for h in HOSTS if h != host])
    Replica.objects.create(host=host, path=name, state="waiting", retry_at=timezone.now() + timedelta(minutes=5))


def test_changes_waiting_for_a_host_that_is_down_wait_for_its_probe(celery_storage):
    from resto_celery.broker import coordinator_for

    _waiting(celery_storage, "a.txt")
    _waiting(celery_storage, "b.txt")
    coordinator_for(celery_storage.options).breaker("m2").record_failure()  # threshold 1: open
    _, counts = _reconcile(celery_storage)
    assert counts["upload"] == 0 and counts["probe"] == 1  # one probe, not one message per change


def test_changes_waiting_for_a_host_whose_breaker_closed_are_sent_at_the_next_reconcile(celery_storage):
    """The host came back while these changes were being recorded as waiting: no timer
    (their retry time, minutes away) stands between them and the host."""
    _waiting(celery_storage, "a.txt")
    _waiting(celery_storage, "b.txt")
    sent, counts = _reconcile(celery_storage)
    assert sent == [("upload", "m2", "a.txt"), ("upload", "m2", "b.txt")]
    assert counts["probe"] == 0
