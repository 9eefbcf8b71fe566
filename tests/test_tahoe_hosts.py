"""Tahoe-LAFS hosts ("kind": "tahoe") against a real local grid (tahoe-lafs from PyPI).

An introducer and one node that is both storage server and client, on 127.0.0.1, started
once for the session (``make tahoe`` installs the ``tahoe`` command; CI runs these).
"""
import io
import logging
import threading

import pytest
from django.core.files.base import ContentFile

from resto_celery import replication
from resto_celery.exceptions import HostUnreachable, UnexpectedStatus
from resto_celery.storage import DistributedStorage, HybridStorage
from resto_celery.tahoe import TahoeTransport
from resto_celery.tasks import coordinator_for
from tests.conftest import set_storages
from tests.site import wait_until
from tests.test_resync_command import _master, _resync

pytestmark = pytest.mark.tahoe

ODD = "odd names/é ü %25 #1 ?.txt"
BIG = b"more than 55 bytes, so the file is stored on the grid, not inside its cap. " * 4


def _transport(host):
    return TahoeTransport(host.grid.node_url, dircap=host.dircap)


def _put(transport, name, data):
    return transport.put(name, io.BytesIO(data), len(data))


def test_the_grid_reports_a_connected_storage_server(tahoe_grid):
    assert tahoe_grid.connected()


def test_put_overwrite_and_delete_answer_as_tahoe_does(make_tahoe_host):
    host = make_tahoe_host()
    transport = _transport(host)
    assert _put(transport, "a/b/c.bin", BIG) == 201
    assert _put(transport, "a/b/c.bin", BIG + b"!") == 200
    assert host.files() == {"a/b/c.bin": BIG + b"!"}
    assert transport.head("a/b/c.bin").size == len(BIG) + 1
    assert transport.delete("a/b/c.bin") is True
    assert transport.delete("a/b/c.bin") is False
    assert transport.head("a/b/c.bin") is None


def test_odd_names_round_trip_and_are_listed(make_tahoe_host):
    host = make_tahoe_host()
    transport = _transport(host)
    _put(transport, ODD, BIG)
    _put(transport, "top.txt", b"1" * 60)
    assert host.files() == {ODD: BIG, "top.txt": b"1" * 60}
    assert {name: remote.size for name, remote in transport.walk()} == {ODD: len(BIG), "top.txt": 60}
    assert transport.listdir("") == (["odd names"], ["top.txt"])


def test_parallel_uploads_into_one_new_directory_all_survive(make_tahoe_host):
    """The trap: parallel PUTs that create the same directory each make their own, and all
    but one file vanish. One transport makes the directory once, then the PUTs run."""
    host = make_tahoe_host()
    transport = _transport(host)
    names = [f"new/folder/{index}.bin" for index in range(8)]
    errors = []

    def upload(name):
        try:
            _put(transport, name, BIG + name.encode())
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=upload, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert host.files() == {name: BIG + name.encode() for name in names}


@pytest.mark.django_db(transaction=True)
def test_workers_with_their_own_transports_make_each_directory_under_a_lease(make_tahoe_host, redis_url, tmp_path):
    """As separate worker processes do: no shared memory, a Redis lease per directory."""
    from resto_celery import conf

    host = make_tahoe_host()
    coordinator = coordinator_for(conf.resolve({"redis_url": redis_url, "hosts": []}))
    names = [f"shared/dir/{index}.bin" for index in range(6)]
    for name in names:
        (tmp_path / name.replace("/", "_")).write_bytes(BIG + name.encode())
    errors = []

    def worker(name):
        from django.db import connection

        try:
            attempt(name)
        finally:
            connection.close()

    def attempt(name):
        for _ in range(200):  # LeaseBusy: another worker is making the directory; try again
            try:
                replication.sync(host.url, name, tmp_path / name.replace("/", "_"), _transport(host), coordinator)
                return
            except replication.LeaseBusy:
                threading.Event().wait(0.05)
            except Exception as error:  # noqa: BLE001
                errors.append(error)
                return
        errors.append(f"{name}: lease never free")

    threads = [threading.Thread(target=worker, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert host.files() == {name: BIG + name.encode() for name in names}


def test_download_links_use_the_read_only_cap(make_tahoe_host):
    import requests

    host = make_tahoe_host()
    storage = DistributedStorage(hosts=[host.host_entry])
    storage.save("photos/cat.jpg", ContentFile(BIG))
    url = storage.url("photos/cat.jpg")
    assert "URI:DIR2-RO:" in url and host.dircap not in url
    assert url.startswith(host.grid.node_url + "uri/") and url.endswith("/photos/cat.jpg")
    assert requests.get(url, timeout=30).content == BIG


def test_the_write_cap_is_in_no_error_and_no_log_line(make_tahoe_host, caplog):
    host = make_tahoe_host()
    transport = _transport(host)
    with caplog.at_level(logging.DEBUG, logger="urllib3"):
        _put(transport, "logged.bin", BIG)
        assert transport.exists("logged.bin")  # urllib3 logs the request line of its t=json GET
    assert "GET /uri/URI:<write cap redacted>/logged.bin?t=json" in caplog.text
    dead = TahoeTransport("http://127.0.0.1:9/", dircap=host.dircap)  # nothing listens on port 9
    with pytest.raises(HostUnreachable) as raised:
        _put(dead, "x.bin", BIG)
    assert host.dircap not in str(raised.value) + caplog.text
    with pytest.raises(UnexpectedStatus) as raised:  # a read-only cap cannot write: the error says so
        _put(TahoeTransport(host.grid.node_url, dircap=host.grid.readonly_cap(host.dircap)), "y.bin", BIG)
    assert not raised.value.retryable or raised.value.status >= 500


def test_a_node_that_is_down_is_a_retryable_failure_and_comes_back(make_tahoe_host):
    host = make_tahoe_host()
    transport = _transport(host)
    host.go_down()
    with pytest.raises(HostUnreachable) as raised:
        _put(transport, "later.bin", BIG)
    assert raised.value.retryable
    host.come_back()
    assert _put(transport, "later.bin", BIG) == 201


def test_hybrid_storage_saves_lists_and_deletes_on_a_tahoe_host(make_tahoe_host, media_root):
    host = make_tahoe_host()
    storage = HybridStorage(location=str(media_root), hosts=[host.host_entry])
    storage.save(ODD, ContentFile(BIG))
    storage.save("a/b/c.txt", ContentFile(BIG))
    storage.delete("a/b/c.txt")
    assert host.files() == {ODD: BIG}
    assert DistributedStorage(hosts=[host.host_entry]).listdir("odd names") == ([], ["é ü %25 #1 ?.txt"])


@pytest.mark.django_db(transaction=True)
def test_async_storage_workers_replicate_to_a_tahoe_host(make_site, make_tahoe_host, make_media_server):
    site = make_site(hosts=[make_tahoe_host(), make_media_server()])
    site.start_worker()
    for index in range(6):
        site.storage.save(f"gallery/{index}.bin", ContentFile(BIG + bytes([index])))
    site.storage.delete("gallery/0.bin")
    site.wait_until_drained_and_converged(timeout=120)
    assert sorted(site.hosts[0].files()) == [f"gallery/{index}.bin" for index in range(1, 6)]


@pytest.mark.django_db
def test_resync_lists_a_tahoe_host_and_deletes_extra_files_when_asked(settings, make_tahoe_host, media_root):
    host = make_tahoe_host()
    set_storages(settings, {
        "default": {"BACKEND": "resto_celery.storage.HybridStorage", "OPTIONS": {"hosts": [host.host_entry]}},
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    })
    _master(media_root, "kept.bin", BIG)
    _put(_transport(host), "stale/extra.bin", BIG)

    output = _resync("--delete-extra")

    assert "1 file(s) only on the host, not in the master: to delete." in output
    assert host.files() == {"kept.bin": BIG}


@pytest.mark.django_db(transaction=True)
def test_the_admin_dashboard_shows_webdav_and_tahoe_hosts_by_name_never_the_cap(
    make_site, make_tahoe_host, make_dav_server, settings
):
    from django.contrib.auth.models import User
    from django.test import Client
    from django.urls import reverse

    tahoe = make_tahoe_host(name="tahoe-grid")
    site = make_site(hosts=[tahoe, make_dav_server("wsgidav")])
    set_storages(settings, {
        "default": {"BACKEND": "resto_celery.storage.AsyncStorage", "OPTIONS": site.storage.deconstruct()[2]},
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    })
    site.start_worker()
    site.storage.save("shown/in/admin.bin", ContentFile(BIG))
    site.wait_until_drained_and_converged(timeout=120)
    admin = Client()
    admin.force_login(User.objects.create_superuser("admin", password="pw"))

    dashboard = admin.get(reverse("admin:resto_celery_replicationdashboard_changelist"))
    rows = admin.get(reverse("admin:resto_celery_replica_changelist"))

    by_host = {status.host: status for status in dashboard.context["statuses"]}
    assert by_host["tahoe-grid"].synced == 1 and by_host[site.hosts[1].url].synced == 1
    for page in (dashboard, rows):
        assert tahoe.dircap.encode() not in page.content
    from django_celery_results.models import TaskResult

    tahoe.go_down()  # a failed task: the result backend keeps failures, with their traceback
    site.storage.save("failed/while/down.bin", ContentFile(BIG))
    wait_until(lambda: TaskResult.objects.filter(status="FAILURE").exists(), timeout=60, message="a failed task")
    tahoe.come_back()
    stored = [f"{r.task_args} {r.task_kwargs} {r.result} {r.traceback}" for r in TaskResult.objects.all()]
    assert stored and not any(tahoe.dircap in text for text in stored)
    assert tahoe.dircap not in site.logs()


def test_a_node_that_reaches_no_storage_server_fails_retryably_naming_the_tahoe_error(tahoe_grid, tmp_path):
    """A client node whose introducer is nowhere: it never connects to a storage server."""
    import subprocess
    import time

    import requests

    from resto_celery.tahoe import TahoeUnavailable
    from resto_celery.testing._support import free_port

    port = free_port()
    node = tmp_path / "lonely"
    subprocess.run(
        [tahoe_grid.tahoe, "create-client", "--introducer=pb://aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa@tcp:127.0.0.1:9/x",
         "--shares-needed=1", "--shares-happy=1", "--shares-total=1",
         f"--webport=tcp:{port}:interface=127.0.0.1", str(node)],
        check=True, capture_output=True, timeout=120,
    )
    process = subprocess.Popen([tahoe_grid.tahoe, "run", "--allow-stdin-close", str(node)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 60
        while True:
            try:
                mkdir = requests.post(url + "uri", params={"t": "mkdir"}, timeout=5)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "the lonely node's web API never answered"
                time.sleep(0.2)
        assert mkdir.status_code == 500 and "NotEnoughServersError" in mkdir.text
        dircap = tahoe_grid.make_directory()  # on the grid: the lonely node cannot reach its shares
        with pytest.raises(TahoeUnavailable) as raised:
            _put(TahoeTransport(url, dircap=dircap), "nowhere.bin", BIG)
        assert raised.value.retryable and raised.value.status == 410
        assert raised.value.reason == "410 Gone: UnrecoverableFileError"
        assert dircap not in str(raised.value)
    finally:
        process.terminate()
        process.wait(10)
