"""Every backend keeps the promises of Django's Storage API, on 1 and 3 real hosts.

Django's own storage tests run against HybridStorage and AsyncStorage too:
see test_django_storage_suite.py.
"""
import base64
import json
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from django.core.exceptions import SuspiciousFileOperation
from django.core.files.base import ContentFile
from django.urls import NoReverseMatch, reverse_lazy

from resto_celery import publisher
from resto_celery.storage import DistributedStorage, HybridStorage

BACKENDS = {"hybrid": HybridStorage, "distributed": DistributedStorage}

#: Names Django can store that a naive URL builder gets wrong.
ODD_NAMES = [
    "plain.txt",
    "with space.txt",
    "literally%20encoded.txt",
    "percent%.txt",
    "hash#tag.txt",
    "question?mark.txt",
    "plus+sign.txt",
    "ampersand&equals=.txt",
    "semi;colon,comma.txt",
    "quote'and\"double.txt",
    "unicodé-文件-файл.txt",
    "emoji-📷.jpg",
    "deep/er/and/deeper/folders/file.bin",
    "folder with space/and#hash/file?.txt",
    "empty-file.txt",
    "tilde~brackets[1](2).txt",
    "..leading-dots..txt",
    "UPPER-lower.TXT",
]


@pytest.fixture(params=["hybrid", "distributed"])
def backend(request):
    return request.param


@pytest.fixture(params=[1, 3], ids=["1host", "3hosts"])
def hosts(request, make_host):
    return [make_host() for _ in range(request.param)]


@pytest.fixture
def storage(backend, hosts, media_root):
    return BACKENDS[backend](hosts=[host.url for host in hosts])


def _content(name):
    return b"" if name.startswith("empty") else f"bytes of {name}\n".encode() * 50


def test_save_puts_the_same_bytes_on_every_host(storage, hosts, backend, media_root):
    name = storage.save("docs/report.pdf", ContentFile(b"%PDF-1.7 report"))
    assert name == "docs/report.pdf"
    for host in hosts:
        assert host.files() == {"docs/report.pdf": b"%PDF-1.7 report"}
    if backend == "hybrid":
        assert (media_root / "docs" / "report.pdf").read_bytes() == b"%PDF-1.7 report"


def test_open_reads_back_the_saved_bytes(storage):
    storage.save("a.txt", ContentFile(b"hello"))
    with storage.open("a.txt") as handle:
        assert handle.read() == b"hello"


def test_open_of_a_missing_file_raises_file_not_found(storage):
    with pytest.raises(FileNotFoundError):
        storage.open("missing.txt")


def test_exists_follows_save_and_delete(storage):
    assert not storage.exists("a.txt")
    storage.save("a.txt", ContentFile(b"x"))
    assert storage.exists("a.txt")
    storage.delete("a.txt")
    assert not storage.exists("a.txt")


def test_size_is_the_byte_count(storage):
    storage.save("a.bin", ContentFile(b"\x00" * 1234))
    assert storage.size("a.bin") == 1234


def test_url_is_media_url_plus_the_quoted_name(storage):
    assert storage.url("dir/a b#c.txt") == "/media/dir/a%20b%23c.txt"


def test_delete_removes_the_file_everywhere(storage, hosts, media_root):
    storage.save("gone.txt", ContentFile(b"x"))
    storage.delete("gone.txt")
    for host in hosts:
        assert host.files() == {}
    assert not (media_root / "gone.txt").exists()


def test_delete_of_a_missing_file_is_not_an_error(storage):
    storage.delete("never-saved.txt")


def test_saving_an_existing_name_gets_an_alternative_name(storage, hosts):
    first = storage.save("dup.txt", ContentFile(b"one"))
    second = storage.save("dup.txt", ContentFile(b"two"))
    assert first == "dup.txt" and second != first and second.startswith("dup_")
    for host in hosts:
        assert host.files() == {"dup.txt": b"one", second: b"two"}


def test_get_modified_time_is_recent_and_aware(storage):
    storage.save("t.txt", ContentFile(b"x"))
    modified = storage.get_modified_time("t.txt")
    assert modified.tzinfo is not None
    assert abs(datetime.now(timezone.utc) - modified) < timedelta(minutes=1)


def test_listdir_lists_the_master_copy(media_root, hosts):
    storage = HybridStorage(hosts=[host.url for host in hosts])
    storage.save("top.txt", ContentFile(b"x"))
    storage.save("sub/inner.txt", ContentFile(b"y"))
    assert storage.listdir("") == (["sub"], ["top.txt"])


def test_listdir_is_not_available_without_a_master(hosts):
    with pytest.raises(NotImplementedError, match="cannot list"):
        DistributedStorage(hosts=[host.url for host in hosts]).listdir("")


@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_names_round_trip_on_every_host(storage, hosts, name):
    content = _content(name)
    saved = storage.save(name, ContentFile(content))
    assert saved == name
    for host in hosts:
        assert host.files() == {name: content}
    assert storage.exists(name)
    assert storage.size(name) == len(content)
    with storage.open(name) as handle:
        assert handle.read() == content
    assert storage.url(name) == "/media/" + quote(name, safe="/~!*()'")
    storage.delete(name)
    for host in hosts:
        assert host.files() == {}


@pytest.mark.parametrize("name", ["../escape.txt", "a/../../escape.txt", "/etc/passwd", "nul\x00byte.txt"])
def test_unsafe_names_are_refused_before_anything_is_written(storage, hosts, media_root, name):
    with pytest.raises(SuspiciousFileOperation):
        storage.save(name, ContentFile(b"x"))
    with pytest.raises(SuspiciousFileOperation):
        storage.delete(name)
    for host in hosts:
        assert host.files() == {}
        assert [r for r in getattr(host, "requests", []) if r.method in ("PUT", "DELETE")] == []
    assert list(media_root.iterdir()) == []


def test_storage_still_works_after_pickling(storage, hosts):
    import pickle

    clone = pickle.loads(pickle.dumps(storage))
    clone.save("pickled.txt", ContentFile(b"p"))
    for host in hosts:
        assert host.files() == {"pickled.txt": b"p"}


def test_path_like_names_work_as_strings(storage, hosts):
    assert storage.save(Path("docs") / "a.txt", ContentFile(b"x")) == "docs/a.txt"
    assert storage.exists(Path("docs/a.txt")) and storage.size(Path("docs/a.txt")) == 1
    with storage.open(Path("docs/a.txt")) as handle:
        assert handle.read() == b"x"
    storage.delete(Path("docs/a.txt"))
    for host in hosts:
        assert host.files() == {}


@pytest.mark.parametrize("name", [None, ""])
def test_delete_without_a_name_is_a_value_error(storage, hosts, name):
    with pytest.raises(ValueError, match=r"^The name must be given to delete\(\)\.$"):
        storage.delete(name)
    for host in hosts:
        assert [r for r in getattr(host, "requests", []) if r.method == "DELETE"] == []


def test_hybrid_storage_takes_file_system_storage_arguments_by_position(media_root, hosts):
    storage = HybridStorage(str(media_root), "/files/", 0o640, 0o750, True, hosts=[host.url for host in hosts])
    assert (storage.location, storage.base_url) == (str(media_root), "/files/")
    assert (storage.file_permissions_mode, storage.directory_permissions_mode) == (0o640, 0o750)
    storage.save("f.txt", ContentFile(b"one"))
    assert storage.save("f.txt", ContentFile(b"two")) == "f.txt"
    for host in hosts:
        assert host.files() == {"f.txt": b"two"}


def test_a_lazy_base_url_is_read_on_first_use_not_when_built(backend, hosts, media_root):
    storage = BACKENDS[backend](base_url=reverse_lazy("no-such-view"), hosts=[host.url for host in hosts])
    with pytest.raises(NoReverseMatch):
        storage.url("a.txt")


@pytest.mark.parametrize("base_url", ["/media/?version=2", "/media/#top"])
def test_a_base_url_with_a_query_or_a_fragment_is_refused(backend, hosts, media_root, base_url):
    with pytest.raises(ValueError, match="base_url may not contain a query or fragment"):
        BACKENDS[backend](base_url=base_url, hosts=[host.url for host in hosts])


def test_absolute_names_inside_the_location_reach_the_hosts_as_relative_names(media_root, hosts):
    storage = HybridStorage(hosts=[host.url for host in hosts])
    storage.save("docs/a.txt", ContentFile(b"x"))
    with storage.open("docs/a.txt") as handle:
        absolute = handle.name  # Django names the File by its absolute path; apps hand it back
    assert absolute == str(media_root / "docs" / "a.txt")
    assert storage.exists(absolute) and storage.size(absolute) == 1
    storage.delete(absolute)
    for host in hosts:
        assert host.files() == {}
    assert not storage.exists("docs/a.txt")


def test_absolute_names_outside_the_location_are_refused(media_root, hosts):
    storage = HybridStorage(hosts=[host.url for host in hosts])
    outside = f"{media_root}-sibling/a.txt"
    with pytest.raises(SuspiciousFileOperation):
        storage.exists(outside)
    with pytest.raises(SuspiciousFileOperation):
        storage.delete(outside)
    for host in hosts:
        assert [r for r in getattr(host, "requests", []) if r.method == "DELETE"] == []


def test_a_file_written_through_open_is_replicated_when_closed(media_root, hosts):
    storage = HybridStorage(hosts=[host.url for host in hosts])
    storage.save("a.txt", ContentFile(b"old"))
    with storage.open("a.txt", "wb") as handle:
        handle.write(b"new bytes")
        assert [host.files() for host in hosts] == [{"a.txt": b"old"}] * len(hosts)
    for host in hosts:
        assert host.files() == {"a.txt": b"new bytes"}
    assert (media_root / "a.txt").read_bytes() == b"new bytes"


def _queued(redis_url):
    messages = [json.loads(raw) for raw in redis.Redis.from_url(redis_url).lrange("resto", 0, -1)]
    return sorted(
        (message["headers"]["task"], *json.loads(base64.b64decode(message["body"]))[0]) for message in messages
    )


@pytest.mark.django_db(transaction=True)
def test_async_storage_enqueues_an_upload_when_a_file_written_through_open_is_closed(make_site):
    site = make_site()
    with site.storage.open("w.txt", "wb") as handle:
        handle.write(b"bytes")
        assert publisher.flush(timeout=10)
        assert _queued(site.redis_url) == []
    assert publisher.flush(timeout=10)  # close() hands the change to the publisher thread
    assert _queued(site.redis_url) == [("resto_celery.replicate", "w.txt", [host.url for host in site.hosts], "upload")]
    assert (site.media_root / "w.txt").read_bytes() == b"bytes"


def test_distributed_storage_refuses_writes_through_open(hosts):
    storage = DistributedStorage(hosts=[host.url for host in hosts])
    with pytest.raises(ValueError, match="reading only"):
        storage.open("a.txt", "wb")


READS = {
    "open": (lambda storage: storage.open("a.txt").read(), "Failed to download a.txt from {host}: "),
    "exists": (lambda storage: storage.exists("a.txt"), "Failed to check if a.txt exists on {host}: "),
    "size": (lambda storage: storage.size("a.txt"), "Failed to get the size of a.txt from {host}: "),
    "modified": (
        lambda storage: storage.get_modified_time("a.txt"), "Failed to get the modified time of a.txt from {host}: "
    ),
}


@pytest.mark.parametrize("read", READS)
def test_a_host_that_fails_a_read_is_logged_at_error_and_the_next_host_answers(make_media_server, caplog, read):
    first, second = make_media_server(), make_media_server()
    storage = DistributedStorage(hosts=[first.url, second.url])
    storage.save("a.txt", ContentFile(b"x"))
    first.fail_next(status=500)
    function, message = READS[read]
    message = message.format(host=first.url)
    with caplog.at_level(logging.WARNING, logger="resto_celery"):
        assert function(storage)
    logged = [(record.levelname, record.getMessage()[: len(message)]) for record in caplog.records]
    assert logged == [("ERROR", message)]


class OverwritingDistributedStorage(DistributedStorage):
    """The usual recipe to keep a name: offer it as available whatever the hosts hold."""

    def get_available_name(self, name, max_length=None):
        return name


def test_an_upload_that_replaces_a_file_is_logged_at_warning(hosts, caplog):
    storage = OverwritingDistributedStorage(hosts=[host.url for host in hosts])
    storage.save("a.txt", ContentFile(b"one"))
    assert [record for record in caplog.records if record.name.startswith("resto_celery")] == []
    with caplog.at_level(logging.WARNING, logger="resto_celery"):
        storage.save("a.txt", ContentFile(b"two"))
    assert sorted(record.getMessage() for record in caplog.records) == sorted(
        f"PUT on existing file a.txt on {host.url}." for host in hosts
    )
    for host in hosts:
        assert host.files() == {"a.txt": b"two"}
