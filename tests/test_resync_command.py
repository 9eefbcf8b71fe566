"""manage.py resto_resync against real hosts: missing, different, identical and extra files."""
import os
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from resto_celery import lanes
from resto_celery.models import Replica
from tests.conftest import set_storages

pytestmark = pytest.mark.django_db


@pytest.fixture
def hybrid_settings(settings, make_media_server, media_root):
    hosts = [make_media_server(), make_media_server()]
    set_storages(settings, {
        "default": {
            "BACKEND": "resto_celery.storage.HybridStorage",
            "OPTIONS": {"hosts": [h.url for h in hosts], "fatal_exceptions": False},
        },
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    })
    return hosts


def _master(media_root, name, data):
    path = media_root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _resync(*args):
    out, err = StringIO(), StringIO()
    try:
        call_command("resto_resync", *args, stdout=out, stderr=err)
    finally:
        _resync.out, _resync.err = out.getvalue(), err.getvalue()
    return out.getvalue()


def test_missing_and_different_files_are_uploaded_identical_ones_untouched(hybrid_settings, media_root):
    host = hybrid_settings[0]
    _master(media_root, "same.txt", b"same")
    _master(media_root, "missing/deep.txt", b"missing")
    _master(media_root, "different.txt", b"new and longer")
    host.seed("same.txt", b"same")
    host.seed("different.txt", b"old")
    host.seed("extra.txt", b"only on the host")
    host.clear_requests()

    output = _resync("--host", host.url)

    assert host.files() == {
        "same.txt": b"same", "missing/deep.txt": b"missing", "different.txt": b"new and longer",
        "extra.txt": b"only on the host",
    }
    assert [r.name for r in host.requests if r.method == "PUT"].count("same.txt") == 0
    assert "3 file(s) checked: 1 identical, 2 to upload" in output
    assert "files that exist only on it cannot be seen" in output
    assert "2 uploaded" in output


def test_verify_finds_same_size_files_with_other_contents(hybrid_settings, media_root):
    host = hybrid_settings[0]
    _master(media_root, "a.txt", b"AAAA")
    host.seed("a.txt", b"BBBB")
    assert "0 to upload" in _resync("--host", host.url)
    assert "1 to upload" in _resync("--host", host.url, "--verify")
    assert host.read("a.txt") == b"AAAA"


def test_dry_run_prints_the_plan_and_changes_nothing(hybrid_settings, media_root):
    host = hybrid_settings[0]
    _master(media_root, "a.txt", b"A")
    output = _resync("--host", host.url, "--dry-run")
    assert "would upload a.txt (1 B): missing" in output
    assert host.files() == {}


def test_every_host_by_default(hybrid_settings, media_root):
    _master(media_root, "a.txt", b"A")
    _resync()
    assert all(host.files() == {"a.txt": b"A"} for host in hybrid_settings)


def test_a_host_that_is_down_fails_with_a_clear_message(hybrid_settings, media_root):
    _master(media_root, "a.txt", b"A")
    hybrid_settings[1].go_down()
    with pytest.raises(CommandError, match="Resync incomplete for " + hybrid_settings[1].url) as raised:
        _resync()
    assert raised.value.returncode == 1
    assert "does not answer: connection failed: Connection refused" in _resync.err
    assert hybrid_settings[0].files() == {"a.txt": b"A"}


def test_failed_uploads_give_a_non_zero_exit(hybrid_settings, media_root):
    _master(media_root, "a.txt", b"A")
    hybrid_settings[0].read_only = True
    with pytest.raises(CommandError):
        _resync("--host", hybrid_settings[0].url)
    assert "failed: a.txt: PUT a.txt on" in _resync.err and "403 Forbidden" in _resync.err


def test_an_unknown_host_is_refused(hybrid_settings):
    with pytest.raises(CommandError, match="Unknown media host"):
        _resync("--host", "http://nope/")


def test_via_queue_sends_tasks_and_forgets_stale_fingerprints(async_settings, async_hosts, media_root, redis_url):
    import redis

    host = async_hosts[0].url
    _master(media_root, "a.txt", b"A")
    Replica.objects.create(host=host, path="a.txt", state="synced", fingerprint="1:2:3")
    output = _resync("--host", host, "--via-queue")
    assert "1 task(s) queued" in output
    assert Replica.objects.get(host=host).fingerprint == ""
    client = redis.Redis.from_url(redis_url)
    assert client.llen("resto") == 0  # the live lane: saves only
    assert client.llen(lanes.queue_keys("resto")[-1]) == 1  # the bulk lane


@pytest.mark.django_db(transaction=True)  # the copying threads write rows on their own connections
def test_async_storage_copies_in_process_and_records_rows(async_settings, async_hosts, media_root):
    host = async_hosts[0]
    _master(media_root, "a.txt", b"A")
    _resync("--host", host.url)
    assert host.files() == {"a.txt": b"A"}
    assert Replica.objects.get(host=host.url).state == "synced"


def test_restore_rebuilds_a_lost_master_from_a_host(hybrid_settings, media_root):
    host = hybrid_settings[0]
    host.seed("photos/a.jpg", b"jpeg bytes")
    host.seed("b.txt", b"b")
    for name in ("photos/a.jpg", "b.txt"):
        Replica.objects.create(host=host.url, path=name, state="synced")
    output = _resync("--restore-from", host.url)
    assert (media_root / "photos" / "a.jpg").read_bytes() == b"jpeg bytes"
    assert (media_root / "b.txt").read_bytes() == b"b"
    assert "2 restored, 0 kept, 0 failed." in output


def test_restore_keeps_newer_master_files_unless_forced(hybrid_settings, media_root):
    host = hybrid_settings[0]
    host.seed("a.txt", b"host version")
    Replica.objects.create(host=host.url, path="a.txt", state="synced")
    _master(media_root, "a.txt", b"newer master version")
    future = os.stat(media_root / "a.txt").st_mtime + 3600
    os.utime(media_root / "a.txt", (future, future))
    assert "0 restored, 1 kept" in _resync("--restore-from", host.url)
    assert (media_root / "a.txt").read_bytes() == b"newer master version"
    _resync("--restore-from", host.url, "--force")
    assert (media_root / "a.txt").read_bytes() == b"host version"
