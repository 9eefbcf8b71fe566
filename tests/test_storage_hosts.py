"""Any Django storage as a media host (kind "storage"): an S3 bucket through django-storages.

Against a real S3 API: moto's server on 127.0.0.1 (resto_celery.testing.s3), reached over
HTTP by boto3 in this process and in the Celery workers, never a mock of boto3. The
replication tests mix one nginx host and one bucket, as a site moving to (or doubling on)
an object store would.
"""
import base64
import io
import json
import logging
import os
import zlib

import django
import pytest
import redis
from django.contrib.auth.models import User
from django.core.exceptions import ImproperlyConfigured
from django.core.files.base import ContentFile
from django.test import Client
from django.urls import reverse
from django_celery_results.models import TaskResult

from resto_celery import conf, lanes
from resto_celery.exceptions import HostTimeout, HostUnreachable, MissingFile, ReplicationError, UnexpectedStatus
from resto_celery.hosts import make_transport
from resto_celery.models import Replica
from resto_celery.storage import DistributedStorage, HybridStorage
from resto_celery.storage_host import StorageTransport
from resto_celery.testing.s3 import TEST_ACCESS_KEY, TEST_SECRET_KEY
from tests.conftest import set_storages
from tests.site import wait_until
from tests.test_chaos import CHAOS_OPTIONS, OPS, _chaos
from tests.test_resync_command import _master, _resync

ODD = "odd names/é ü %25 #1 ?.txt"
MiB = 1024 * 1024
S3 = "storages.backends.s3.S3Storage"


def _transport(bucket, timeout=2, **entry):
    return make_transport(conf.parse_host({**bucket.host_entry, **entry}), timeout)


def _put(transport, name, data):
    return transport.put(name, io.BytesIO(data), len(data))


def _crc32(data):
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


# The host entry


def test_a_storage_entry_names_a_class_and_its_options_and_hides_them(make_s3_host):
    bucket = make_s3_host()
    host = conf.parse_host(bucket.host_entry)
    assert (host.kind, host.name, host.storage) == ("storage", bucket.name, S3)
    assert host.storage_options["bucket_name"] == bucket.bucket
    assert TEST_SECRET_KEY not in repr(host) and TEST_ACCESS_KEY not in repr(host)


def test_a_storage_entry_may_name_a_storages_alias(make_s3_host, settings):
    bucket = make_s3_host()
    settings.STORAGES = {**settings.STORAGES, "replica": {"BACKEND": S3, "OPTIONS": bucket.options}}
    transport = make_transport(conf.parse_host({"kind": "storage", "alias": "replica"}), 2)
    _put(transport, "a.txt", b"through the alias")
    assert transport.name == "replica"
    assert bucket.files() == {"a.txt": b"through the alias"}


BAD_ENTRIES = {
    "no name": ({"kind": "storage", "storage": S3}, "needs a 'name'"),
    "neither class nor alias": ({"kind": "storage", "name": "s3"}, "needs either 'storage'"),
    "class and alias": ({"kind": "storage", "name": "s3", "storage": S3, "alias": "x"}, "not both"),
    "a URL": ({"kind": "storage", "name": "s3", "storage": S3, "url": "https://x/"}, "cannot have 'url'"),
    "auth": ({"kind": "storage", "name": "s3", "storage": S3, "auth": ("u", "p")}, "cannot have 'auth'"),
    "storage keys on an HTTP host": ({"url": "https://media-1/", "options": {}}, "only apply to kind 'storage'"),
    "not a class path": ({"kind": "storage", "name": "s3", "storage": "storages.nothing.Here"}, "cannot import"),
    "not a storage": ({"kind": "storage", "name": "s3", "storage": "decimal.Decimal"}, "not a Django storage class"),
    "a resto storage": (
        {"kind": "storage", "name": "s3", "storage": "resto_celery.storage.AsyncStorage"}, "cannot be another one's"
    ),
    "unknown option": (
        {"kind": "storage", "name": "s3", "storage": S3, "options": {"bucket": "x", "secret_key": TEST_SECRET_KEY}},
        "Invalid setting 'bucket'",
    ),
    "a storage that renames": (
        {"kind": "storage", "name": "s3", "storage": S3, "options": {"file_overwrite": False}}, "must overwrite"
    ),
    "unknown alias": ({"kind": "storage", "alias": "nowhere"}, "no alias 'nowhere'"),
    "checksum not a bool": ({"kind": "storage", "name": "s3", "storage": S3, "checksum": "yes"}, "True or False"),
}


@pytest.mark.parametrize("case", BAD_ENTRIES)
def test_a_bad_storage_entry_is_refused_with_a_clear_error_and_no_secret(case):
    entry, words = BAD_ENTRIES[case]
    with pytest.raises(ImproperlyConfigured, match=words) as raised:
        conf.parse_host(entry)
    assert TEST_SECRET_KEY not in str(raised.value)


# The transport against moto's S3


def test_put_stores_the_exact_bytes_under_the_exact_name_and_overwrites(make_s3_host):
    bucket = make_s3_host()
    transport = _transport(bucket)
    assert _put(transport, ODD, b"first") == 201
    assert _put(transport, ODD, b"second, longer") == 201
    assert _put(transport, "photos/2024/cat.jpg", b"jpeg") == 201
    assert bucket.files() == {ODD: b"second, longer", "photos/2024/cat.jpg": b"jpeg"}
    assert bucket.head("photos/2024/cat.jpg")["ContentType"] == "image/jpeg"


def test_each_put_carries_a_crc32_of_the_master_bytes_for_the_store_to_check(make_s3_host):
    bucket = make_s3_host()
    _put(_transport(bucket), "a.bin", b"the master's bytes")
    [put] = [r for r in bucket.server.requests if r.method == "PUT" and r.path.endswith("a.bin")]
    assert put.checksums["x-amz-checksum-crc32"] == _crc32(b"the master's bytes")


def test_a_prefix_location_keeps_the_files_under_it(make_s3_host):
    bucket = make_s3_host(options={"location": "site/media"})
    transport = _transport(bucket)
    _put(transport, "a/b.txt", b"b")
    assert bucket.client.list_objects_v2(Bucket=bucket.bucket)["Contents"][0]["Key"] == "site/media/a/b.txt"
    assert [name for name, _ in transport.walk()] == ["a/b.txt"]


def test_delete_removes_the_object_and_a_missing_one_is_no_error(make_s3_host):
    bucket = make_s3_host()
    transport = _transport(bucket)
    _put(transport, "a.txt", b"a")
    assert transport.delete("a.txt") is True
    assert transport.delete("a.txt") is True
    assert bucket.files() == {}


def test_head_tells_size_date_and_the_md5_the_store_keeps(make_s3_host):
    bucket = make_s3_host()
    transport = _transport(bucket)
    _put(transport, "a.txt", b"hello")
    remote = transport.head("a.txt")
    assert remote.size == 5 and remote.modified.tzinfo is not None
    assert transport.digests("a.txt") == {"md5": "5d41402abc4b2a76b9719d911017c592"}
    assert transport.head("missing.txt") is None
    with pytest.raises(MissingFile):
        transport.size("missing.txt")


def test_listings_give_every_file_with_its_size_odd_names_included(make_s3_host):
    bucket = make_s3_host()
    transport = _transport(bucket)
    for name, data in {"top.txt": b"1", "a/b.txt": b"22", ODD: b"333"}.items():
        _put(transport, name, data)
    assert {name: remote.size for name, remote in transport.walk()} == {"top.txt": 1, "a/b.txt": 2, ODD: 3}
    assert transport.listdir("") == (["a", "odd names"], ["top.txt"])
    assert transport.listdir("nowhere") == ([], [])


def test_a_download_streams_the_object(make_s3_host):
    bucket = make_s3_host()
    data = bytes(range(256)) * 1000
    bucket.seed("big.bin", data)
    sink = io.BytesIO()
    assert _transport(bucket).download("big.bin", sink) == len(data)
    assert sink.getvalue() == data


class _ReadSizes(io.FileIO):
    """A real file that remembers the largest read asked of it."""

    largest = 0

    def read(self, size=-1):
        data = super().read(size)
        self.largest = max(self.largest, len(data))
        return data

    def readinto(self, buffer):
        count = super().readinto(buffer)
        self.largest = max(self.largest, count or 0)
        return count


def test_a_large_upload_is_streamed_in_parts_never_read_whole(make_s3_host, tmp_path):
    bucket = make_s3_host()
    path = tmp_path / "big.bin"
    data = os.urandom(20 * MiB)
    path.write_bytes(data)
    with _ReadSizes(path) as source:
        _transport(bucket).put("big.bin", source, len(data))
    assert source.largest <= 8 * MiB  # s3transfer's part size: the file goes up in three parts
    head = bucket.head("big.bin")
    assert head["ETag"].endswith('-3"') and bucket.read("big.bin") == data
    # The CRC32 of the master's bytes went with it, as the object's full-object checksum.
    assert (head["ChecksumType"], head["ChecksumCRC32"]) == ("FULL_OBJECT", _crc32(data))


@pytest.mark.parametrize("status", [500, 503])
def test_a_5xx_from_the_store_is_retryable(make_s3_host, status):
    bucket = make_s3_host()
    bucket.fail_next(status=status)
    with pytest.raises(UnexpectedStatus) as raised:
        _put(_transport(bucket), "a.txt", b"a")
    assert raised.value.retryable and raised.value.status == status


def test_access_denied_is_final_and_says_so(make_s3_host):
    bucket = make_s3_host()
    bucket.fail_next(status=403, code="AccessDenied")
    with pytest.raises(UnexpectedStatus) as raised:
        _put(_transport(bucket), "a.txt", b"a")
    assert not raised.value.retryable
    assert "AccessDenied" in raised.value.reason and "access denied" in raised.value.reason


def test_a_missing_bucket_is_final_and_says_so(make_s3_host):
    bucket = make_s3_host(options={"bucket_name": "no-such-bucket-here"})
    with pytest.raises(UnexpectedStatus, match="the bucket does not exist") as raised:
        _put(_transport(bucket), "a.txt", b"a")
    assert not raised.value.retryable


def test_a_store_that_answers_late_times_out_retryable_and_in_doubt(make_s3_host):
    bucket = make_s3_host()
    bucket.set_delay(1.5, count=1)
    with pytest.raises(HostTimeout) as raised:
        _put(_transport(bucket, timeout=0.5), "a.txt", b"a")
    assert raised.value.retryable and raised.value.in_doubt


def test_a_store_that_is_down_is_unreachable_and_retryable(make_s3_host):
    bucket = make_s3_host()
    transport = _transport(bucket)
    bucket.go_down()
    with pytest.raises(HostUnreachable) as raised:
        _put(transport, "a.txt", b"a")
    assert raised.value.retryable and not raised.value.in_doubt
    bucket.come_back()
    _put(transport, "a.txt", b"a")
    assert bucket.files() == {"a.txt": b"a"}


def test_credentials_are_in_no_error_and_no_debug_log_line(make_s3_host, caplog):
    bucket = make_s3_host()
    transport = _transport(bucket)
    errors = []
    with caplog.at_level(logging.DEBUG):
        _put(transport, "a.txt", b"a")
        for status in (403, 500):
            bucket.fail_next(status=status)
            try:
                _put(transport, "b.txt", b"b")
            except UnexpectedStatus as error:
                errors.append(f"{error!r} {error} {error.reason}")
    assert len(errors) == 2 and "botocore" in caplog.text  # botocore did log its requests
    for secret in (TEST_SECRET_KEY, TEST_ACCESS_KEY):
        assert secret not in caplog.text and secret not in " ".join(errors)


@pytest.mark.skipif(django.VERSION < (5, 1), reason="FileSystemStorage(allow_overwrite=True) is Django 5.1+")
def test_any_storage_that_overwrites_is_a_host_here_a_file_system_storage(tmp_path):
    entry = {
        "kind": "storage", "name": "disk", "storage": "django.core.files.storage.FileSystemStorage",
        "options": {"location": str(tmp_path), "allow_overwrite": True},
    }
    transport = make_transport(conf.parse_host(entry), 2)
    _put(transport, "a/b.txt", b"one")
    _put(transport, "a/b.txt", b"two")
    assert (tmp_path / "a" / "b.txt").read_bytes() == b"two"
    assert {name: remote.size for name, remote in transport.walk()} == {"a/b.txt": 3}
    transport.delete("a/b.txt")
    assert transport.head("a/b.txt") is None


def test_a_file_system_storage_that_renames_is_refused(tmp_path):
    entry = {
        "kind": "storage", "name": "disk", "storage": "django.core.files.storage.FileSystemStorage",
        "options": {"location": str(tmp_path)},
    }
    with pytest.raises(ImproperlyConfigured, match="must overwrite"):
        conf.parse_host(entry)


# The storages over a bucket


def test_hybrid_storage_saves_and_deletes_on_a_bucket(make_s3_host, media_root):
    bucket = make_s3_host()
    storage = HybridStorage(location=str(media_root), hosts=[bucket.host_entry])
    assert storage.save(ODD, ContentFile(b"odd bytes")) == ODD
    storage.save("photos/cat.jpg", ContentFile(b"jpeg"))
    storage.delete("photos/cat.jpg")
    assert bucket.files() == {ODD: b"odd bytes"}


def test_distributed_storage_reads_from_the_bucket_and_lists_it(make_s3_host):
    bucket = make_s3_host()
    storage = DistributedStorage(hosts=[bucket.host_entry])
    storage.save("docs/a.pdf", ContentFile(b"a"))
    storage.save("docs/sub/b.pdf", ContentFile(b"bb"))
    with storage.open("docs/sub/b.pdf") as handle:
        assert handle.read() == b"bb"
    assert storage.exists("docs/a.pdf") and not storage.exists("docs/none.pdf")
    assert storage.size("docs/sub/b.pdf") == 2
    assert storage.listdir("docs") == (["sub"], ["a.pdf"])
    with pytest.raises(FileNotFoundError):
        storage.open("docs/none.pdf")


def test_distributed_storage_reads_the_next_host_when_the_bucket_is_down(make_s3_host, make_media_server, caplog):
    bucket, server = make_s3_host(), make_media_server()
    storage = DistributedStorage(hosts=[bucket.host_entry, server.url], timeout=1)
    storage.save("a.txt", ContentFile(b"payload"))
    bucket.go_down()
    with caplog.at_level(logging.ERROR, logger="resto_celery"):
        with storage.open("a.txt") as handle:
            assert handle.read() == b"payload"
    assert f"Failed to download a.txt from {bucket.name}: connection failed" in caplog.text
    server.go_down()
    with pytest.raises(ReplicationError, match="2 of 2"):
        storage.size("a.txt")


def test_url_names_the_public_url_of_the_bucket_or_its_cdn(make_s3_host):
    bucket = make_s3_host(entry={"public_url": "https://cdn.example.com/media/"})
    storage = DistributedStorage(hosts=[bucket.host_entry])
    assert storage.url("photos/a b.jpg") == "https://cdn.example.com/media/photos/a%20b.jpg"


def test_url_without_a_public_url_is_the_storages_own_a_signed_url_that_serves_the_file(make_s3_host):
    import requests

    bucket = make_s3_host(options={"querystring_auth": True})
    storage = DistributedStorage(hosts=[bucket.host_entry])
    storage.save("photos/cat.jpg", ContentFile(b"jpeg"))
    url = storage.url("photos/cat.jpg")
    assert url.startswith(bucket.url + "photos/cat.jpg?") and "Signature=" in url
    assert TEST_SECRET_KEY not in url
    assert requests.get(url, timeout=10).content == b"jpeg"


# Replication by workers: one nginx host and one bucket

def _site(make_site, make_nginx, make_s3_host, **options):
    return make_site(hosts=[make_nginx(), make_s3_host()], **options)


@pytest.mark.nginx
@pytest.mark.django_db(transaction=True)
def test_workers_replicate_saves_and_deletes_to_nginx_and_a_bucket_byte_for_byte(make_site, make_nginx, make_s3_host):
    site = _site(make_site, make_nginx, make_s3_host)
    site.start_worker()
    site.storage.save("a/b/one.txt", ContentFile(b"one"))
    site.storage.save(ODD, ContentFile(b"odd"))
    site.storage.save("big.bin", ContentFile(bytes(range(256)) * 4096))
    site.storage.delete("a/b/one.txt")
    site.storage.save("a/b/two.txt", ContentFile(b"two"))
    site.wait_until_drained_and_converged()
    bucket = site.hosts[1]
    assert bucket.files() == site.master_files() == site.hosts[0].files()
    assert set(bucket.files()) == {ODD, "a/b/two.txt", "big.bin"}
    wait_until(lambda: Replica.objects.filter(host=bucket.name, state="synced").count() == 3, message="3 rows")


@pytest.mark.nginx
@pytest.mark.django_db(transaction=True)
def test_a_bucket_answering_slowdown_is_retried_until_it_holds_the_file(make_site, make_nginx, make_s3_host):
    site = _site(make_site, make_nginx, make_s3_host)
    bucket = site.hosts[1]
    bucket.fail_next(count=3, status=503, methods=["PUT"])
    site.start_worker()
    site.storage.save("a.txt", ContentFile(b"hello"))
    site.wait_until_drained_and_converged()
    assert bucket.files() == {"a.txt": b"hello"}
    assert f"Will retry to upload a.txt on {bucket.name}" in site.logs() and "SlowDown" in site.logs()


@pytest.mark.nginx
@pytest.mark.django_db(transaction=True)
def test_access_denied_fails_at_once_and_the_row_says_why(make_site, make_nginx, make_s3_host):
    site = _site(make_site, make_nginx, make_s3_host)
    bucket = site.hosts[1]
    bucket.fail_next(count=1, status=403, methods=["PUT"])
    site.start_worker()
    site.storage.save("a.txt", ContentFile(b"hello"))
    wait_until(lambda: Replica.objects.filter(host=bucket.name, state="failed").exists(), message="a failed row")
    row = Replica.objects.get(host=bucket.name)
    assert row.attempts == 1 and "access denied" in row.last_error
    assert site.hosts[0].files() == {"a.txt": b"hello"}


@pytest.mark.nginx
@pytest.mark.django_db(transaction=True)
def test_a_bucket_down_past_the_retry_budget_is_repaired_by_reconcile(make_site, make_nginx, make_s3_host):
    from django.utils import timezone

    from resto_celery.tasks import reconcile

    site = _site(make_site, make_nginx, make_s3_host, max_retries=1)
    bucket = site.hosts[1]
    bucket.go_down()
    site.start_worker()
    site.storage.save("a.txt", ContentFile(b"hello"))
    wait_until(lambda: Replica.objects.filter(host=bucket.name, state="failed").exists(), message="a failed row")
    bucket.come_back()
    wait_until(lambda: Replica.objects.get(host=bucket.name).retry_at <= timezone.now(), message="the retry time")
    reconcile.apply_async(queue=site.queue)
    site.wait_until_drained_and_converged()
    wait_until(lambda: Replica.objects.get(host=bucket.name).state == "synced", message="the row to be synced")


@pytest.mark.nginx
@pytest.mark.django_db(transaction=True)
def test_a_put_to_the_bucket_that_lands_late_cannot_resurrect_a_deleted_file(make_site, make_nginx, make_s3_host):
    site = _site(make_site, make_nginx, make_s3_host, timeout=0.5, lease_ttl=4)
    site.hosts[1].set_delay(2, methods=["PUT"], count=1)
    site.start_worker(concurrency=2)
    site.storage.save("a.txt", ContentFile(b"version 1"))
    wait_until(lambda: "Will retry to upload a.txt" in site.logs(), message="the PUT to time out")
    site.storage.delete("a.txt")
    site.wait_until_drained_and_converged(timeout=60)
    assert site.hosts[1].files() == {}


@pytest.mark.nginx
@pytest.mark.django_db(transaction=True)
def test_credentials_reach_no_message_row_result_log_or_admin_page(make_site, make_nginx, make_s3_host, settings):
    site = _site(make_site, make_nginx, make_s3_host, max_retries=0, publish="inline")
    set_storages(settings, {
        "default": {"BACKEND": "resto_celery.storage.AsyncStorage", "OPTIONS": site.storage.deconstruct()[2]},
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    })
    bucket = site.hosts[1]
    site.storage.save("ok.txt", ContentFile(b"fine"))
    site.storage.save("denied.txt", ContentFile(b"refused"))
    client = redis.Redis.from_url(site.redis_url)
    raw = [json.loads(message) for key in lanes.queue_keys(site.queue) for message in client.lrange(key, 0, -1)]
    assert len(raw) == 2  # publish="inline": a message per save, waiting for the worker
    messages = json.dumps(raw) + " ".join(base64.b64decode(message["body"]).decode() for message in raw)
    assert bucket.name in messages
    bucket.fail_next(count=1, status=403, methods=["PUT"])  # the first PUT to the bucket: a final failure
    site.start_worker()
    wait_until(lambda: Replica.objects.filter(host=bucket.name, state="failed").exists(), message="a failed row")
    wait_until(lambda: TaskResult.objects.filter(status="FAILURE").exists(), message="a failed task result")
    admin = Client()
    admin.force_login(User.objects.create_superuser("admin", password="pw"))
    failed = Replica.objects.get(host=bucket.name, state="failed")
    pages = [
        admin.get(reverse("admin:resto_celery_replicationdashboard_changelist")),
        admin.get(reverse("admin:resto_celery_replica_changelist")),
        admin.get(reverse("admin:resto_celery_replica_change", args=[failed.pk])),
    ]
    assert all(page.status_code == 200 for page in pages)
    assert bucket.name in pages[0].content.decode() and "access denied" in pages[2].content.decode()
    rows = json.dumps([list(row) for row in Replica.objects.values_list()], default=str)
    results = json.dumps([list(row) for row in TaskResult.objects.values_list()], default=str)
    seen = {
        "messages": messages, "rows": rows, "results": results, "worker logs": site.logs(),
        "admin pages": " ".join(page.content.decode() for page in pages),
    }
    for where, text in seen.items():
        for secret in (TEST_SECRET_KEY, TEST_ACCESS_KEY):
            assert secret not in text, f"a credential in the {where}"


@pytest.mark.chaos
@pytest.mark.nginx
@pytest.mark.django_db(transaction=True)
def test_random_faults_with_an_s3_bucket_never_break_the_invariant(
    make_site, make_nginx, make_media_server, make_s3_host, redis_server, capsys
):
    """The chaos test of tests/test_chaos.py, with nginx, a MediaServer and an S3 bucket that
    goes down, answers 5xx (InternalError, SlowDown) and answers late like the others."""
    hosts = [make_nginx(), make_media_server(), make_s3_host()]
    _chaos(make_site(hosts=hosts, **CHAOS_OPTIONS), redis_server, capsys, OPS)


# resto_resync over a bucket


@pytest.fixture
def bucket_settings(settings, make_s3_host, media_root):
    bucket = make_s3_host()
    set_storages(settings, {
        "default": {
            "BACKEND": "resto_celery.storage.HybridStorage",
            "OPTIONS": {"hosts": [bucket.host_entry], "fatal_exceptions": False},
        },
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    })
    return bucket


@pytest.mark.django_db
def test_resync_lists_the_bucket_once_and_uploads_what_it_lacks(bucket_settings, media_root):
    bucket = bucket_settings
    _master(media_root, "kept.txt", b"kept")
    _master(media_root, "missing/deep.txt", b"missing")
    bucket.seed("kept.txt", b"kept")
    bucket.seed("stale/extra.txt", b"only in the bucket")
    bucket.server.requests.clear()

    output = _resync()

    assert "2 file(s) checked: 1 identical, 1 to upload" in output
    assert "1 file(s) only on the host, not in the master: left alone" in output
    # A probe that the host answers, then one listing: no HEAD per file.
    assert [r.method for r in bucket.server.requests if r.method in ("GET", "HEAD")] == ["HEAD", "GET"]
    assert bucket.files() == {
        "kept.txt": b"kept", "missing/deep.txt": b"missing", "stale/extra.txt": b"only in the bucket",
    }


@pytest.mark.django_db
def test_resync_delete_extra_removes_objects_the_master_has_not(bucket_settings, media_root):
    bucket = bucket_settings
    _master(media_root, "kept.txt", b"kept")
    bucket.seed("stale/extra.txt", b"only in the bucket")
    output = _resync("--delete-extra")
    assert "1 uploaded (4 B), 1 deleted, 0 failed" in output
    assert bucket.files() == {"kept.txt": b"kept"}


@pytest.mark.django_db
def test_restore_from_the_bucket_rebuilds_a_lost_master(bucket_settings, media_root):
    bucket = bucket_settings
    for name in ("a.txt", ODD):
        bucket.seed(name, name.encode())
        Replica.objects.create(host=bucket.name, path=name, state="synced", fingerprint="x")
    output = _resync("--restore-from", bucket.name)
    assert "2 restored, 0 kept, 0 failed" in output
    assert (media_root / "a.txt").read_bytes() == b"a.txt" and (media_root / ODD).read_bytes() == ODD.encode()


def test_the_transport_is_shared_per_host_and_built_from_the_entry(make_s3_host):
    from resto_celery.hosts import transport_for

    bucket = make_s3_host()
    host = conf.parse_host(bucket.host_entry)
    assert transport_for(host, 2) is transport_for(conf.parse_host(bucket.host_entry), 2)
    assert isinstance(transport_for(host, 2), StorageTransport)
