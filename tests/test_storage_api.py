"""Every backend keeps the promises of Django's Storage API, on 1 and 3 real hosts."""
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import pytest
from django.core.exceptions import SuspiciousFileOperation
from django.core.files.base import ContentFile

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
