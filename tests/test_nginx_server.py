"""The nginx media server (resto_celery.testing.nginx) and the protocol we rely on nginx for."""

import http.client
import os
from urllib.parse import quote

import pytest
import requests

from resto_celery.testing.nginx import NginxMediaServer, find_nginx
from resto_celery.testing.tls import make_test_certificates

pytestmark = pytest.mark.nginx

TIMEOUT = 5


@pytest.fixture(autouse=True)
def nginx_binary():
    """Skip without nginx, except in CI (CI=true), where a missing nginx is a failure."""
    nginx = find_nginx()
    if nginx is None:
        if os.environ.get("CI") == "true":
            pytest.fail("nginx not found, and CI=true requires the nginx tests (.ci/run installs it)")
        pytest.skip("nginx not installed (apt-get install nginx, or set NGINX=/path/to/nginx)")
    return nginx


@pytest.fixture
def server(tmp_path):
    with NginxMediaServer(tmp_path / "root", workdir=tmp_path / "nginx") as server:
        yield server


@pytest.fixture
def certs(tmp_path):
    return make_test_certificates(tmp_path / "certs")


def put(url, data):
    return requests.put(url, data=data, timeout=TIMEOUT)


def test_put_new_file_is_201(server):
    response = put(server.url + "new.txt", b"hello")
    assert response.status_code == 201
    assert server.files() == {"new.txt": b"hello"}


def test_put_existing_file_is_204_and_replaces_content(server):
    put(server.url + "f.txt", b"old content")
    response = put(server.url + "f.txt", b"new")
    assert response.status_code == 204
    assert server.files() == {"f.txt": b"new"}


def test_put_creates_missing_folders(server):
    response = put(server.url + "a/b/c/deep.txt", b"deep")
    assert response.status_code == 201
    assert server.files() == {"a/b/c/deep.txt": b"deep"}


def test_delete_is_204_then_missing_file_is_404(server):
    put(server.url + "gone.txt", b"x")
    assert requests.delete(server.url + "gone.txt", timeout=TIMEOUT).status_code == 204
    assert server.files() == {}
    assert requests.delete(server.url + "gone.txt", timeout=TIMEOUT).status_code == 404


def test_get_and_head_give_content_length(server):
    put(server.url + "data.bin", b"0123456789")
    got = requests.get(server.url + "data.bin", timeout=TIMEOUT)
    head = requests.head(server.url + "data.bin", timeout=TIMEOUT)
    assert got.status_code == head.status_code == 200
    assert got.content == b"0123456789"
    assert got.headers["Content-Length"] == head.headers["Content-Length"] == "10"
    assert head.content == b""
    assert "Last-Modified" in head.headers and "ETag" in head.headers


ODD_NAMES = [
    "with space.txt",
    "ünïcødé/日本語.txt",
    "literal%20percent.txt",
    "hash#mark.txt",
    "question?mark.txt",
    "plus+sign.txt",
    "nested dir/a b/c+d#e?f%25.txt",
]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_names_round_trip(server, name):
    url = server.url + quote(name, safe="/")
    assert put(url, name.encode()).status_code == 201
    assert requests.get(url, timeout=TIMEOUT).content == name.encode()
    assert server.files() == {name: name.encode()}


@pytest.mark.parametrize("path", [
    "../escape",
    "a/../../escape",
    "../../escape",
    "%2e%2e/escape",
    "%2E%2E/%2E%2E/escape",
    "..%2Fescape",
])
def test_dot_dot_traversal_is_refused_and_writes_nothing(server, tmp_path, path):
    # requests would remove literal dot segments before sending: use http.client.
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        connection.request("PUT", server.prefix + path, body=b"evil")
        status = connection.getresponse().status
    finally:
        connection.close()
    assert status in (400, 405)  # 400: above the document root; 405: outside the media location
    assert server.files() == {}
    assert not list(tmp_path.rglob("escape*"))


def test_go_down_refuses_connections_and_come_back_serves_same_files_on_same_port(server):
    put(server.url + "kept.txt", b"kept")
    port = server.port
    server.go_down()
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(server.url + "kept.txt", timeout=TIMEOUT)
    server.come_back()
    assert server.port == port
    assert requests.get(server.url + "kept.txt", timeout=TIMEOUT).content == b"kept"


def test_https_verifies_with_the_test_ca(tmp_path, certs):
    with NginxMediaServer(tmp_path / "root", tls=(certs.cert, certs.key)) as server:
        assert server.url.startswith("https://127.0.0.1:")
        response = requests.put(server.url + "s.txt", data=b"secure", verify=certs.ca_cert, timeout=TIMEOUT)
        assert response.status_code == 201
        got = requests.get(server.url + "s.txt", verify=certs.ca_cert, timeout=TIMEOUT)
        assert got.content == b"secure"


def test_https_with_another_ca_is_an_ssl_error(tmp_path, certs):
    other = make_test_certificates(tmp_path / "other")
    with NginxMediaServer(tmp_path / "root", tls=(certs.cert, certs.key)) as server:
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(server.url, verify=other.ca_cert, timeout=TIMEOUT)
