"""Served files have the right Content-Type (issue 12, point 4).

Every PUT carries the type guessed from the file's name, so hosts that keep the type they
are given (WebDAV, Tahoe, object stores) serve an image as an image; ``MediaServer``, like
nginx, answers GET and HEAD with the type of the name's extension, whatever the PUT said.
"""
import io
from pathlib import Path

import pytest
import requests
from django.core.files.base import ContentFile

from resto_celery.storage import HybridStorage
from resto_celery.tahoe import TahoeTransport
from resto_celery.testing import MediaServer
from resto_celery.testing.media_server import _nginx_types, content_type
from resto_celery.transport import HostTransport
from resto_celery.webdav import WebDAVTransport

GUESSES = {
    "photos/harbour.jpg": "image/jpeg",
    "avatars/ALICE.PNG": "image/png",
    "menus/spring menu.pdf": "application/pdf",
    "logo.svg": "image/svg+xml",
    "notes.txt": "text/plain",
    "backup.tar.gz": "application/gzip",  # what it is, not the tar inside (as Django's FileResponse)
    "data:odd.png": "image/png",  # not taken for a data: URL
    "README": "application/octet-stream",
    "blob.unknown-extension": "application/octet-stream",
}


def _put(transport, name, data=b"bytes"):
    return transport.put(name, io.BytesIO(data), len(data))


def test_put_sends_the_type_guessed_from_the_name(make_media_server):
    server = make_media_server()
    transport = HostTransport(server.url)
    for name in GUESSES:
        _put(transport, name)
    assert {r.name: r.content_type for r in server.requests} == GUESSES


def test_webdav_and_tahoe_transports_send_the_same_type(make_media_server):
    # Both make their folders first, then PUT through HostTransport.put: at the top level,
    # with nothing to make, the PUT is all a MediaServer sees.
    dav = make_media_server()
    _put(WebDAVTransport(dav.url), "scan.png")
    tahoe = make_media_server(prefix="/uri/URI:DIR2:abc:def/")
    _put(TahoeTransport(f"http://{tahoe.address}/", dircap="URI:DIR2:abc:def"), "scan.png")
    assert [(r.method, r.name, r.content_type) for r in dav.requests + tahoe.requests] == [
        ("PUT", "scan.png", "image/png"), ("PUT", "scan.png", "image/png"),
    ]


def test_a_storage_save_puts_the_type_of_the_name(make_media_server, media_root):
    server = make_media_server()
    storage = HybridStorage(hosts=[server.address])
    storage.save("photos/cat.jpg", ContentFile(b"\xff\xd8\xff\xe0cat"))
    [put] = [r for r in server.requests if r.method == "PUT"]
    assert (put.name, put.content_type) == ("photos/cat.jpg", "image/jpeg")


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_media_server_serves_the_type_of_the_extension_as_nginx_does(method, tmp_path):
    served = {
        "photos/cat.JPG": "image/jpeg",
        "a/b c.png": "image/png",
        "site.js": "application/javascript",  # nginx's type, not Python's text/javascript
        "doc.pdf": "application/pdf",
        "README": "application/octet-stream",
        "folder/.png": "application/octet-stream",  # a leading dot starts no extension, for nginx
        "x.unknown": "application/octet-stream",
    }
    with MediaServer(tmp_path / "host") as server:
        for name in served:
            # Whatever type the PUT claims, the server answers by extension.
            response = requests.put(server.url + name, data=b"payload", headers={"Content-Type": "text/plain"})
            assert response.status_code == 201
        for name, expected in served.items():
            response = requests.request(method, server.url + name)
            assert response.status_code == 200
            assert response.headers["Content-Type"] == expected == content_type(name)
            assert response.headers["Content-Length"] == "7"


def test_media_servers_table_is_nginxs():
    system = Path("/etc/nginx/mime.types")
    if not system.exists():
        pytest.skip("nginx's mime.types is not installed")
    text = system.read_text()
    body = text[text.index("{") + 1 : text.rindex("}")]
    nginx = {}
    for statement in body.split(";"):
        mime, *extensions = statement.split() or [""]
        for extension in extensions:
            nginx.setdefault(extension.lower(), mime)
    common = ["html", "css", "js", "json", "txt", "xml", "jpg", "jpeg", "png", "gif", "webp", "svg", "ico",
              "pdf", "zip", "mp3", "mp4", "webm", "woff2", "docx", "xlsx"]
    assert {ext: _nginx_types().get(ext) for ext in common} == {ext: nginx.get(ext) for ext in common}
