"""Plain HTTP hosts served by nginx list their folders as JSON, and resto_resync lists them.

Real nginx (``NginxMediaServer``, whose folder URLs answer nginx's JSON autoindex); the
requests a resync makes are counted in nginx's own access log, not by mocking.
"""
import os
import re
import time
from collections import Counter
from io import StringIO
from urllib.parse import quote, unquote

import pytest
import requests
from django.core.management import call_command

from resto_celery import resync
from resto_celery.exceptions import MissingFile, UnexpectedStatus
from resto_celery.testing.nginx import LISTING_CONF, MEDIA_CONF, NginxMediaServer, _quote
from resto_celery.transport import HostTransport
from tests.conftest import set_storages

pytestmark = [pytest.mark.nginx, pytest.mark.django_db]

TIMEOUT = 5
#: Names nginx's JSON gives back unescaped: spaces, unicode, percent signs, quotes, a backslash.
ODD_NAMES = [
    "a b.txt",
    "é ü %25 #1 ?.txt",
    'quote " and \\ backslash.txt',
    "100%.txt",
    "dir with space/ü/deep %41.bin",
]
REQUEST_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+" (?P<status>\d{3})')


def _put(server, name, data):
    response = requests.put(server.url + quote(name), data=data, timeout=TIMEOUT)
    assert response.status_code in (201, 204), (name, response.status_code)


def _master(media_root, name, data):
    path = media_root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _access_log(server):
    """``[(method, path, status)]`` of every request nginx logged, in order (path unquoted).

    nginx logs a request once its answer is sent, so the client may see the answer first:
    read until the log stops growing (0.2 s without a new line, at most 5 s).
    """
    log = server.workdir / "access.log"
    entries, deadline = None, time.monotonic() + 5
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        current = [(m["method"], unquote(m["path"]), int(m["status"])) for m in REQUEST_LINE.finditer(text)]
        if current == entries or time.monotonic() > deadline:
            return current
        entries = current
        time.sleep(0.2)


def _clear_access_log(server):
    (server.workdir / "access.log").write_text("")  # nginx appends to the same open file


def _resync(*args):
    out, err = StringIO(), StringIO()
    call_command("resto_resync", *args, stdout=out, stderr=err)
    return out.getvalue() + err.getvalue()


def _hybrid(settings, hosts):
    set_storages(settings, {
        "default": {
            "BACKEND": "resto_celery.storage.HybridStorage",
            "OPTIONS": {"hosts": [host.url for host in hosts], "fatal_exceptions": False},
        },
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    })
    from django.core.files.storage import storages

    return storages["default"]


# The transport ----------------------------------------------------------------------------


def test_a_folder_url_answers_json_and_files_are_served_and_written_as_before(make_nginx):
    server = make_nginx()
    _put(server, "sub/a.txt", b"abc")
    listing = requests.get(server.url + "sub/", timeout=TIMEOUT)
    assert listing.headers["Content-Type"].startswith("application/json")
    assert [(e["name"], e["type"], e["size"]) for e in listing.json()] == [("a.txt", "file", 3)]
    assert requests.get(server.url + "sub/a.txt", timeout=TIMEOUT).content == b"abc"
    assert requests.put(server.url + "sub/", data=b"x", timeout=TIMEOUT).status_code == 409  # not a file
    assert requests.delete(server.url + "sub/a.txt", timeout=TIMEOUT).status_code == 204
    assert server.files() == {}


def test_the_listing_shows_odd_names_unescaped_with_sizes_and_times(make_nginx):
    server = make_nginx()
    for index, name in enumerate(ODD_NAMES):
        _put(server, name, b"x" * (index + 1))
    transport = HostTransport(server.url)
    assert transport.lists_folders() == (True, None)
    walked = dict(transport.walk())
    assert {name: remote.size for name, remote in walked.items()} == {
        name: index + 1 for index, name in enumerate(ODD_NAMES)
    }
    assert all(remote.modified is not None and remote.modified.tzinfo for remote in walked.values())
    assert transport.list_directory("dir with space") == (["ü"], {})
    assert transport.listdir("dir with space/ü") == ([], ["deep %41.bin"])


def test_missing_folders_are_404_and_an_empty_root_lists_nothing(make_nginx):
    server = make_nginx()
    transport = HostTransport(server.url)
    assert transport.list_directory("") == ([], {})
    assert list(transport.walk()) == []
    with pytest.raises(MissingFile):
        transport.list_directory("no/such/folder")
    assert resync._walk(transport, workers=4) == {}


def test_dot_files_are_not_listed_so_the_transport_says_they_are_hidden(make_nginx):
    server = make_nginx()
    _put(server, ".hidden", b"h")
    _put(server, ".well-known/x.txt", b"x")
    _put(server, "shown.txt", b"s")
    transport = HostTransport(server.url)
    assert {name for name, _ in transport.walk()} == {"shown.txt"}
    assert transport.listing_hides(".hidden") and transport.listing_hides(".well-known/x.txt")
    assert not transport.listing_hides("shown.txt")


def test_a_host_without_listings_says_why_and_is_asked_once(make_nginx):
    server = make_nginx(listing=False)
    transport = HostTransport(server.url)
    assert transport.lists_folders() == (False, "GET of its root folder: 403 Forbidden")
    assert transport.lists_folders() == (False, "GET of its root folder: 403 Forbidden")
    assert [entry[:2] for entry in _access_log(server)] == [("GET", "/media/")]
    with pytest.raises(UnexpectedStatus, match="403"):
        transport.list_directory("")


def test_a_host_that_is_down_is_asked_again_later(make_nginx):
    server = make_nginx()
    transport = HostTransport(server.url, timeout=1)
    server.go_down()
    listable, reason = transport.lists_folders()
    assert not listable and "connection failed" in reason
    server.come_back()
    assert transport.lists_folders() == (True, None)


def test_an_index_page_instead_of_a_listing_is_refused(tmp_path):
    """nginx serves a folder's index.html unless the listing location names another index."""
    server = _nginx_without_index_override(tmp_path)
    try:
        _put(server, "site/index.html", b"<html></html>")
        transport = HostTransport(server.url)
        assert transport.lists_folders() == (True, None)  # the root has no index.html
        with pytest.raises(UnexpectedStatus, match="not a JSON listing"):
            transport.list_directory("site")
    finally:
        server.stop()


def _nginx_without_index_override(tmp_path):
    """nginx listing folders as JSON but with the default ``index index.html``."""
    server = NginxMediaServer(tmp_path / "plain-index-root", workdir=tmp_path / "plain-index-nginx")
    server.server_config = f"""
    server {{
        listen {server.address};
        location /media/ {{
            alias {_quote(str(server.root) + "/")};
            include {_quote(MEDIA_CONF)};
            location ~ /$ {{
                autoindex on;
                autoindex_format json;
            }}
        }}
    }}"""
    return server.start()


def test_the_listing_include_restricts_nothing_itself_and_the_test_server_allows_loopback_only(make_nginx):
    assert "autoindex_format json;" in LISTING_CONF.read_text()
    config = make_nginx().config()
    assert "location ~ /$" in config and "allow 127.0.0.1;" in config and str(LISTING_CONF) in config


# resto_resync -----------------------------------------------------------------------------


def test_resync_of_a_host_in_sync_lists_folders_and_sends_no_head_per_file(settings, make_nginx, media_root):
    server = make_nginx()
    names = [f"photos/{folder}/f{index}.jpg" for folder in ("a", "b", "c") for index in range(20)] + ODD_NAMES
    for name in names:
        _master(media_root, name, name.encode())
    _hybrid(settings, [server])
    assert "0 failed" in _resync()
    assert {name: server.files()[name] for name in names} == {name: name.encode() for name in names}

    _clear_access_log(server)
    output = _resync()

    assert f"{len(names)} file(s) checked: {len(names)} identical, 0 to upload" in output
    methods = Counter(method for method, _, _ in _access_log(server))
    folders = {"", "photos", "photos/a", "photos/b", "photos/c", "dir with space", "dir with space/ü"}
    # One HEAD (the probe that the host is up), then every folder once: no HEAD per file.
    # (The first run asked the root once more, to see that the host lists; the transport remembers.)
    assert methods == {"HEAD": 1, "GET": len(folders)}
    listed = {path for method, path, _ in _access_log(server) if method == "GET"}
    assert listed == {f"/media/{folder}/" if folder else "/media/" for folder in folders}
    assert "does not list its folders" not in output


def test_resync_uploads_what_the_listing_shows_missing_or_different_and_sees_extra_files(
        settings, make_nginx, media_root):
    server = make_nginx()
    _master(media_root, "same.txt", b"same")
    _master(media_root, "different.txt", b"new and longer")
    _master(media_root, "missing/deep é.txt", b"missing")
    _master(media_root, "odd %25 name.txt", b"odd")
    _put(server, "same.txt", b"same")
    _put(server, "different.txt", b"old")
    _put(server, "odd %25 name.txt", b"odd")
    _put(server, "stale/extra ü.txt", b"only on the host")
    _put(server, "extra %41.txt", b"only on the host too")
    _hybrid(settings, [server])
    _clear_access_log(server)

    output = _resync("--dry-run")
    assert "4 file(s) checked: 2 identical, 2 to upload" in output
    assert "would upload different.txt (14 B): size 3 on the host, 14 in the master" in output
    assert "would upload missing/deep é.txt (7 B): missing" in output
    assert "2 file(s) only on the host, not in the master" in output
    assert "only on the host: extra %41.txt (20 B)" in output
    assert "only on the host: stale/extra ü.txt (16 B)" in output
    assert [m for m, _, _ in _access_log(server)].count("HEAD") == 1  # the probe only

    output = _resync("--delete-extra")
    assert "2 uploaded" in output and "2 deleted" in output
    assert server.files() == {
        "same.txt": b"same", "different.txt": b"new and longer", "missing/deep é.txt": b"missing",
        "odd %25 name.txt": b"odd",
    }


def test_dot_files_the_listing_hides_are_checked_with_a_head(settings, make_nginx, media_root):
    server = make_nginx()
    _master(media_root, ".config", b"c")
    _master(media_root, "a/.hidden/x.txt", b"x")
    _master(media_root, "a/shown.txt", b"s")
    _hybrid(settings, [server])
    _resync()
    _clear_access_log(server)

    output = _resync()

    assert "3 file(s) checked: 3 identical, 0 to upload" in output
    heads = [path for method, path, _ in _access_log(server) if method == "HEAD"]
    assert sorted(heads[1:]) == ["/media/.config", "/media/a/.hidden/x.txt"]  # after the probe


def test_a_host_without_listings_gets_a_head_per_file_and_says_why(settings, make_nginx, media_root):
    server = make_nginx(listing=False)
    for index in range(5):
        _master(media_root, f"f{index}.txt", b"x")
    _hybrid(settings, [server])
    _clear_access_log(server)

    output = _resync()

    assert "This host does not list its folders (GET of its root folder: 403 Forbidden)" in output
    assert "files that exist only on it cannot be seen" in output
    methods = Counter(method for method, _, _ in _access_log(server))
    assert methods == {"HEAD": 1 + 5, "GET": 1, "PUT": 5}


def test_a_folder_that_stops_listing_falls_back_to_a_head_per_file(tmp_path, settings, media_root):
    server = _nginx_without_index_override(tmp_path)
    try:
        _put(server, "site/index.html", b"<html></html>")
        _master(media_root, "site/index.html", b"<html></html>")
        _master(media_root, "top.txt", b"t")
        _hybrid(settings, [server])
        output = _resync()
        assert "does not list its folders (its listing failed: the folder's answer is not a JSON listing" in output
        assert "2 file(s) checked: 1 identical, 1 to upload" in output
        assert server.files()["top.txt"] == b"t"
    finally:
        server.stop()


def test_make_plan_walks_folders_in_parallel_and_counts_the_listing(settings, make_nginx, media_root):
    server = make_nginx()
    for folder in range(12):
        _put(server, f"d{folder}/f.txt", b"f")
        _master(media_root, f"d{folder}/f.txt", b"f")
    storage = _hybrid(settings, [server])
    plan = resync.make_plan(storage, server.url, workers=4)
    assert (plan.can_list, plan.listed, plan.unchanged, plan.upload, plan.extra, plan.unlisted) == (
        True, 12, 12, [], [], None,
    )
    assert os.path.isdir(server.root / "d0")
