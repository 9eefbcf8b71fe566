"""AsyncStorage keeps Django's Storage API promises, and its workers carry odd names intact.

One module-wide site: a worker, Redis, two MediaServers and (where installed) nginx.
"""
import time
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import pytest
from django.core.exceptions import SuspiciousFileOperation
from django.core.files.base import ContentFile

from resto_celery.testing import MediaServer, NginxMediaServer, find_nginx
from tests.conftest import use_broker
from tests.site import ReplicationSite, wait_until
from tests.test_storage_api import ODD_NAMES

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def site(django_db_setup, django_db_blocker, redis_server, tmp_path_factory):
    from tests.celery_app import app

    root = tmp_path_factory.mktemp("async-api")
    (root / "master").mkdir()
    hosts = [MediaServer(root / "ms-0").start(), MediaServer(root / "ms-1").start()]
    if find_nginx():
        (root / "nginx-root").mkdir()
        hosts.append(NginxMediaServer(root / "nginx-root", workdir=root / "nginx").start())
    if not redis_server.answers():
        redis_server.start()
    use_broker(app, redis_server.url)
    with django_db_blocker.unblock():
        site = ReplicationSite(root / "master", hosts, redis_server.url, redis_server.url, root)
        site.start_worker(concurrency=2)
    yield site
    site.stop()
    for host in hosts:
        host.stop()


@pytest.fixture
def storage(site, settings):
    settings.MEDIA_URL = "/media/"
    return site.storage


def _on_every_host(site, name, content):
    wait_until(lambda: all(host.files().get(name) == content for host in site.hosts), message=f"{name!r} everywhere")


def _gone_everywhere(site, name):
    wait_until(lambda: all(name not in host.files() for host in site.hosts), message=f"{name!r} gone everywhere")


@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_names_are_replicated_and_deleted_intact(site, storage, name):
    name = "odd/" + name
    content = b"" if "empty" in name else f"bytes of {name}".encode() * 20
    assert storage.save(name, ContentFile(content)) == name
    assert storage.exists(name) and storage.size(name) == len(content)
    with storage.open(name) as handle:
        assert handle.read() == content
    assert storage.url(name) == "/media/" + quote(name, safe="/~!*()'")
    _on_every_host(site, name, content)
    storage.delete(name)
    assert not storage.exists(name)
    _gone_everywhere(site, name)


def test_an_existing_name_gets_an_alternative_name_everywhere(site, storage):
    first = storage.save("api/dup.txt", ContentFile(b"one"))
    second = storage.save("api/dup.txt", ContentFile(b"two"))
    assert first == "api/dup.txt" and second != first
    _on_every_host(site, first, b"one")
    _on_every_host(site, second, b"two")


def test_listdir_and_modified_time_come_from_the_master(storage):
    storage.save("api/list/a.txt", ContentFile(b"a"))
    storage.save("api/list/sub/b.txt", ContentFile(b"b"))
    assert storage.listdir("api/list") == (["sub"], ["a.txt"])
    assert abs(datetime.now(timezone.utc) - storage.get_modified_time("api/list/a.txt")) < timedelta(minutes=1)


@pytest.mark.parametrize("name", ["../escape.txt", "/etc/passwd", "nul\x00byte.txt"])
def test_unsafe_names_are_refused_and_nothing_is_sent(site, storage, name):
    wait_until(site.drained, message="earlier tests' tasks to finish")
    servers = [host for host in site.hosts if isinstance(host, MediaServer)]
    for server in servers:
        server.clear_requests()
    with pytest.raises(SuspiciousFileOperation):
        storage.save(name, ContentFile(b"x"))
    with pytest.raises(SuspiciousFileOperation):
        storage.delete(name)
    time.sleep(0.3)
    assert site.drained()
    assert [server.requests for server in servers] == [[] for _ in servers]
