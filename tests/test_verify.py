"""``resto_resync --verify``: contents compared by the hash a host keeps, or by a download.

An S3 bucket (moto's server, resto_celery.testing.s3) keeps the MD5 of each object as its
ETag (the MD5 of the parts' MD5s for a multipart upload): comparing it with the master
costs no download. nginx keeps nothing of the kind (its ETag is the file's mtime and
size): each file is downloaded and SHA-256s compared. Either way a flipped byte (same size,
same date) is found and repaired, and the command says how many bytes it downloaded.
"""
import os

import pytest
from boto3.s3.transfer import TransferConfig
from django.core.files.base import ContentFile
from django.core.files.storage import storages

from tests.conftest import set_storages
from tests.test_resync_command import _resync

pytestmark = pytest.mark.django_db

FILES = {"a.txt": b"alpha " * 100, "photos/cat.jpg": b"\xff\xd8 jpeg bytes " * 300, "docs/é ü.pdf": b"%PDF " * 50}
MiB = 1024 * 1024


def _use(settings, hosts, **options):
    set_storages(settings, {
        "default": {
            "BACKEND": "resto_celery.storage.HybridStorage",
            "OPTIONS": {"hosts": [getattr(h, "host_entry", None) or h.url for h in hosts], **options},
        },
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    })
    return storages["default"]


def _save(storage, files):
    for name, data in files.items():
        assert storage.save(name, ContentFile(data)) == name


def _flip_in_place(path, offset=0):
    """Flip one byte of the file at ``path``; same size, same modification time."""
    stat = os.stat(path)
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _object_gets(bucket):
    """GETs of objects (a listing is a GET of the bucket itself)."""
    return [r.path for r in bucket.server.requests if r.method == "GET" and r.path.strip("/") != bucket.bucket]


@pytest.mark.nginx
def test_verify_finds_and_repairs_flipped_bytes_on_nginx_and_in_the_bucket(
    settings, media_root, make_nginx, make_s3_host
):
    nginx, bucket = make_nginx(), make_s3_host()
    storage = _use(settings, [nginx, bucket])
    _save(storage, FILES)
    _flip_in_place(nginx.root / "photos/cat.jpg", offset=10)
    bucket.corrupt("docs/é ü.pdf", offset=3)
    assert "0 to upload" in _resync()  # sizes and dates cannot see it

    output = _resync("--verify")

    assert output.count("3 file(s) checked: 2 identical, 1 to upload") == 2
    assert sum(len(data) for data in FILES.values()) == 5050  # 4.9 KB
    assert "0 by the host's checksums (nothing downloaded), 3 by download (4.9 KB downloaded)" in output
    assert "3 by the host's checksums (nothing downloaded), 0 by download (0 B downloaded)" in output
    assert nginx.files() == FILES
    assert bucket.files() == FILES


def test_verify_compares_bucket_objects_by_their_etag_without_a_download(settings, media_root, make_s3_host):
    bucket = make_s3_host()
    _save(_use(settings, [bucket]), FILES)
    bucket.server.requests.clear()

    output = _resync("--verify")

    assert "3 file(s) checked: 3 identical, 0 to upload" in output
    assert "3 by the host's checksums (nothing downloaded)" in output
    assert _object_gets(bucket) == []


def test_verify_of_a_multipart_object_compares_the_md5_of_its_parts(settings, media_root, make_s3_host):
    parts = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    bucket = make_s3_host(options={"transfer_config": parts})
    big = os.urandom(11 * MiB)
    _save(_use(settings, [bucket]), {"big.bin": big})
    assert bucket.head("big.bin")["ETag"].endswith('-3"')  # three parts
    bucket.server.requests.clear()
    assert "1 identical" in _resync("--verify") and _object_gets(bucket) == []

    bucket.corrupt("big.bin", offset=7 * MiB)
    output = _resync("--verify")

    assert "1 to upload" in output and "1 by the host's checksums (nothing downloaded)" in output
    assert bucket.read("big.bin") == big


def test_a_listing_etag_that_may_not_be_an_md5_is_settled_by_a_download(settings, media_root, make_s3_host):
    """Under SSE-KMS an ETag is not the MD5 of the bytes: a mismatch is checked with a HEAD,
    which says so, and the file is downloaded rather than taken for different."""
    bucket = make_s3_host(options={"object_parameters": {"ServerSideEncryption": "aws:kms"}})
    _save(_use(settings, [bucket]), {"a.txt": b"encrypted at rest"})
    bucket.corrupt("a.txt")

    output = _resync("--verify")

    assert "1 to upload" in output and "0 by the host's checksums (nothing downloaded), 1 by download (17 B" in output
    assert bucket.read("a.txt") == b"encrypted at rest"


def test_verify_downloads_from_a_plain_http_host_and_says_how_much(settings, media_root, make_media_server):
    host = make_media_server()
    _save(_use(settings, [host]), FILES)
    output = _resync("--verify")
    assert "0 by the host's checksums (nothing downloaded), 3 by download (4.9 KB downloaded)" in output


def test_verify_uses_the_stored_full_object_checksum_when_the_etag_says_nothing(settings, media_root, make_s3_host):
    """Uploaded in 5 MiB parts, compared by a storage whose parts are 8 MiB: the ETag cannot be
    recomputed, but the CRC32 sent with the upload is kept by the store and compared instead."""
    parts = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    bucket = make_s3_host(options={"transfer_config": parts})
    big = os.urandom(11 * MiB)
    _save(_use(settings, [bucket]), {"big.bin": big})
    bucket.options.pop("transfer_config")
    _use(settings, [bucket])
    bucket.server.requests.clear()

    output = _resync("--verify")

    assert "1 identical" in output and "1 by the host's checksums (nothing downloaded)" in output
    assert _object_gets(bucket) == [] and [r.method for r in bucket.server.requests].count("HEAD") == 2  # probe, check
