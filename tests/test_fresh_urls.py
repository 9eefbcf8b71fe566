"""Read-your-writes URLs: a fresh upload's url() serves the new bytes at once (issue 18)."""
import os
import time

import pytest
import redis
import requests
from django.core.files.base import ContentFile

from resto_celery import freshness
from resto_celery.freshness import Unconfirmed
from tests.conftest import set_storages
from tests.site import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def fresh_site(make_site, settings):
    site = make_site(host_count=2, master_url="/master-media/")
    site.storage = type(site.storage)(**{**site.storage.deconstruct()[2], "base_url": site.hosts[0].url})
    set_storages(settings, {
        "default": {"BACKEND": "resto_celery.storage.AsyncStorage", "OPTIONS": site.storage.deconstruct()[2]},
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    })
    settings.DEBUG = True  # the package's view streams the master copy (development mode)
    return site


def _get(client, url):
    if url.startswith("/"):
        response = client.get(url)
        return response.status_code, b"".join(response.streaming_content) if response.status_code == 200 else b""
    response = requests.get(url, timeout=5)
    return response.status_code, response.content


def test_a_fresh_upload_and_an_overwrite_are_served_from_the_master_until_every_host_has_them(fresh_site, client):
    site = fresh_site
    site.storage.save("a.txt", ContentFile(b"version 1"))  # no worker yet: no host has it
    url = site.storage.url("a.txt")
    assert url == "/master-media/a.txt"
    assert _get(client, url) == (200, b"version 1")

    site.start_worker()
    site.wait_until_drained_and_converged()
    wait_until(lambda: site.storage.url("a.txt").startswith(site.hosts[0].url), timeout=3 * freshness.STALENESS,
               message="the url to point at the hosts")
    assert _get(client, site.storage.url("a.txt")) == (200, b"version 1")
    site.stop()

    site.storage.delete("a.txt")
    site.storage.save("a.txt", ContentFile(b"version 2"))  # the hosts hold version 1
    assert _get(client, site.storage.url("a.txt")) == (200, b"version 2")
    site.start_worker()
    site.wait_until_drained_and_converged()
    wait_until(lambda: site.storage.url("a.txt").startswith(site.hosts[0].url), timeout=3 * freshness.STALENESS,
               message="the url to point at the hosts again")
    assert _get(client, site.storage.url("a.txt")) == (200, b"version 2")
    assert redis.Redis.from_url(site.redis_url).keys("resto:unconfirmed:*") == []  # nothing left marked


def test_a_change_on_its_way_to_a_host_that_is_down_keeps_the_master_url(fresh_site):
    site = fresh_site
    site.hosts[1].go_down()
    site.start_worker()
    site.storage.save("a.txt", ContentFile(b"x"))
    wait_until(lambda: site.hosts[0].files() == {"a.txt": b"x"}, message="the first host")
    time.sleep(2 * freshness.STALENESS)
    assert site.storage.url("a.txt") == "/master-media/a.txt"


def test_a_change_marked_by_another_process_is_seen_within_the_staleness_bound(redis_url, tmp_path):
    client = redis.Redis.from_url(redis_url)
    here = Unconfirmed(client, str(tmp_path))
    assert not here.pending("a.txt")
    client.hset(here.key, "a.txt", "1:2:3")  # another app server saved it
    time.sleep(freshness.STALENESS)
    assert here.pending("a.txt")
    assert Unconfirmed(client, str(tmp_path)).confirm("a.txt", "1:2:3")
    time.sleep(freshness.STALENESS)
    assert not here.pending("a.txt")


def test_a_confirmation_of_an_older_version_leaves_a_newer_change_marked(redis_url, tmp_path):
    here = Unconfirmed(redis.Redis.from_url(redis_url), str(tmp_path))
    here.mark("a.txt", "1:1:1")
    here.mark("a.txt", "2:2:2")  # overwritten before the first version arrived
    assert not here.confirm("a.txt", "1:1:1")
    assert here.confirm("a.txt", "2:2:2")


def test_without_master_url_the_url_is_the_hosts_as_before(make_site):
    site = make_site(host_count=1)
    site.storage.save("a.txt", ContentFile(b"x"))
    assert site.storage.url("a.txt") == "/media/a.txt"


@pytest.mark.parametrize("mode, header, value", [
    ("x-accel-redirect", "X-Accel-Redirect", "/_resto_master/dir/caf%C3%A9.txt"),
    ("x-sendfile", "X-Sendfile", None),
])
def test_the_master_view_hands_the_file_to_the_web_server_in_production(
    fresh_site, client, settings, mode, header, value
):
    settings.DEBUG = False
    settings.RESTO_MASTER_SENDFILE = mode
    fresh_site.storage.save("dir/café.txt", ContentFile(b"x"))
    response = client.get("/master-media/dir/caf%C3%A9.txt")
    assert response.status_code == 200
    assert response[header] == (value or os.path.join(str(fresh_site.media_root), "dir", "café.txt"))
    assert response["Content-Type"] == "text/plain"


def test_the_master_view_serves_no_marker_no_traversal_and_no_missing_file(fresh_site, client):
    fresh_site.storage.save("a.txt", ContentFile(b"x"))  # makes the marker
    assert client.get("/master-media/.resto-master").status_code == 404
    assert client.get("/master-media/../settings.py").status_code == 404
    assert client.get("/master-media/missing.txt").status_code == 404
    assert client.post("/master-media/a.txt").status_code == 405
