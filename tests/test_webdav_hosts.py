"""WebDAV hosts ("kind": "webdav"): collections made with MKCOL, listing with PROPFIND.

Against real servers: wsgidav in-process, and lighttpd's mod_webdav.
"""
import io
import threading

import pytest
from django.core.files.base import ContentFile

from resto_celery.exceptions import UnexpectedStatus
from resto_celery.storage import DistributedStorage, HybridStorage
from resto_celery.webdav import WebDAVTransport
from tests.conftest import set_storages
from tests.test_resync_command import _master, _resync

ODD = "odd names/é ü %25 #1 ?.txt"


def _put(transport, name, data):
    return transport.put(name, io.BytesIO(data), len(data))


def test_a_plain_http_put_into_a_missing_collection_is_refused(make_webdav_host):
    host = make_webdav_host()
    from resto_celery.transport import HostTransport

    with pytest.raises(UnexpectedStatus) as raised:
        _put(HostTransport(host.url), "a/b.txt", b"x")
    assert raised.value.status == 409 and host.files() == {}


def test_missing_parent_collections_are_made_before_the_put(make_webdav_host):
    host = make_webdav_host()
    transport = WebDAVTransport(host.url)
    assert _put(transport, "a/b/c/d.txt", b"deep") == 201
    assert _put(transport, "a/b/other.txt", b"sibling") == 201
    assert host.files() == {"a/b/c/d.txt": b"deep", "a/b/other.txt": b"sibling"}


def test_collections_removed_behind_the_transports_back_are_made_again(make_webdav_host):
    host = make_webdav_host()
    transport = WebDAVTransport(host.url)
    _put(transport, "a/b/first.txt", b"1")
    import shutil

    shutil.rmtree(host.root / "a")  # the transport still believes a/b exists
    assert _put(transport, "a/b/second.txt", b"2") == 201
    assert host.files() == {"a/b/second.txt": b"2"}


def test_workers_racing_to_make_the_same_collection_all_upload(make_webdav_host):
    host = make_webdav_host()
    names = [f"new/folder/{index}.bin" for index in range(8)]
    errors = []

    def upload(name):
        try:
            _put(WebDAVTransport(host.url), name, name.encode() * 10)  # one transport each: no shared cache
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=upload, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert host.files() == {name: name.encode() * 10 for name in names}


def test_walk_lists_every_file_with_its_size_odd_names_included(make_webdav_host):
    host = make_webdav_host()
    transport = WebDAVTransport(host.url)
    for name, data in {"top.txt": b"1", "a/b.txt": b"22", ODD: b"333"}.items():
        _put(transport, name, data)
    listed = {name: remote.size for name, remote in transport.walk()}
    assert listed == {"top.txt": 1, "a/b.txt": 2, ODD: 3}
    assert transport.listdir("") == (["a", "odd names"], ["top.txt"])


def test_hybrid_storage_saves_and_deletes_on_a_webdav_host(make_webdav_host, media_root):
    host = make_webdav_host()
    storage = HybridStorage(location=str(media_root), hosts=[host.host_entry])
    assert storage.save(ODD, ContentFile(b"odd bytes")) == ODD
    assert storage.save("photos/2024/cat.jpg", ContentFile(b"jpeg")) == "photos/2024/cat.jpg"
    assert host.files() == {ODD: b"odd bytes", "photos/2024/cat.jpg": b"jpeg"}
    storage.delete("photos/2024/cat.jpg")
    assert host.files() == {ODD: b"odd bytes"}


def test_distributed_storage_lists_directories_on_a_webdav_host(make_webdav_host, settings):
    host = make_webdav_host()
    storage = DistributedStorage(hosts=[host.host_entry])
    storage.save("docs/a.pdf", ContentFile(b"a"))
    storage.save("docs/sub/b.pdf", ContentFile(b"b"))
    assert storage.listdir("docs") == (["sub"], ["a.pdf"])
    assert storage.listdir("nowhere") == ([], [])
    with storage.open("docs/sub/b.pdf") as handle:
        assert handle.read() == b"b"


@pytest.mark.django_db(transaction=True)
def test_async_storage_workers_replicate_to_webdav_hosts(make_site, make_dav_server):
    site = make_site(hosts=[make_dav_server("wsgidav"), make_dav_server("wsgidav")])
    site.start_worker()
    site.storage.save("a/b/one.txt", ContentFile(b"one"))
    site.storage.save(ODD, ContentFile(b"odd"))
    site.storage.delete("a/b/one.txt")
    site.storage.save("a/b/two.txt", ContentFile(b"two"))
    site.wait_until_drained_and_converged()
    assert site.hosts[1].files() == {ODD: b"odd", "a/b/two.txt": b"two"}


@pytest.fixture
def webdav_settings(settings, make_webdav_host, media_root):
    host = make_webdav_host()
    set_storages(settings, {
        "default": {
            "BACKEND": "resto_celery.storage.HybridStorage",
            "OPTIONS": {"hosts": [host.host_entry], "fatal_exceptions": False},
        },
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    })
    return host


@pytest.mark.django_db
def test_resync_lists_a_webdav_host_once_and_reports_files_only_it_has(webdav_settings, media_root):
    host = webdav_settings
    _master(media_root, "kept.txt", b"kept")
    _master(media_root, "missing/deep.txt", b"missing")
    transport = WebDAVTransport(host.url)
    _put(transport, "kept.txt", b"kept")
    _put(transport, "stale/extra.txt", b"only on the host")

    output = _resync()

    assert "1 file(s) only on the host, not in the master: left alone (--delete-extra deletes them)" in output
    assert host.files() == {"kept.txt": b"kept", "missing/deep.txt": b"missing", "stale/extra.txt": b"only on the host"}


@pytest.mark.django_db
def test_resync_delete_extra_removes_files_the_master_has_not(webdav_settings, media_root):
    host = webdav_settings
    _master(media_root, "kept.txt", b"kept")
    _put(WebDAVTransport(host.url), "stale/extra.txt", b"only on the host")

    output = _resync("--delete-extra")

    assert "1 uploaded (4 B), 1 deleted, 0 failed" in output
    assert host.files() == {"kept.txt": b"kept"}
