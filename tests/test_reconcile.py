"""replication.reconcile: what the master tree and the Replica rows say must be sent."""
import os
from datetime import timedelta

import pytest
from django.utils import timezone

from resto_celery import replication
from resto_celery.models import Replica
from resto_celery.storage import HybridStorage

pytestmark = pytest.mark.django_db

HOSTS = ["m1", "m2"]


@pytest.fixture
def storage(media_root):
    return HybridStorage(hosts=HOSTS)


def _reconcile(storage, **kwargs):
    sent = []
    counts = replication.reconcile(storage, lambda *task: sent.append(task), **kwargs)
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
    assert counts == {"files": 1, "rows": 0, "upload": 2, "delete": 0}


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
    assert _reconcile(storage)[0] == []
    assert _reconcile(storage, now=later)[0] == [("upload", "m2", "a.txt")]


def test_a_pending_row_is_left_to_its_task_until_it_goes_stale(storage):
    _write(storage, "a.txt")
    _synced(storage, "a.txt", hosts=["m1"])
    Replica.objects.create(host="m2", path="a.txt", state="pending")
    assert _reconcile(storage, stale_after=600)[0] == []
    later = timezone.now() + timedelta(seconds=601)
    assert _reconcile(storage, stale_after=600, now=later)[0] == [("upload", "m2", "a.txt")]


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
    assert counts == {"files": 7, "rows": 7, "upload": 12, "delete": 5}
    assert len(set(sent)) == 17


def test_walk_master_streams_relative_names_with_fingerprints(storage):
    _write(storage, "a/b/c.txt", b"123")
    _write(storage, "top.txt", b"")
    walked = dict(replication.walk_master(storage.location))
    assert set(walked) == {"a/b/c.txt", "top.txt"}
    assert walked["a/b/c.txt"].startswith("3:")
