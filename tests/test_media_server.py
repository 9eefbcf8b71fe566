"""MediaServer: the HTTP media server shipped as test tooling."""
import email.utils
import http.client
import os
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import pytest
import requests

from resto_celery.testing.media_server import CHUNK_SIZE, MediaServer, RequestRecord

TIMEOUT = 5


@pytest.fixture(params=["disk", "memory"])
def server(request, tmp_path):
    root = tmp_path / "root" if request.param == "disk" else None
    with MediaServer(root) as server:
        yield server


@pytest.fixture
def disk_server(tmp_path):
    with MediaServer(tmp_path / "root") as server:
        yield server


def url(server, name):
    return server.url + quote(name)


def put(server, name, data=b"data", timeout=TIMEOUT):
    return requests.put(url(server, name), data=data, timeout=timeout)


def get(server, name):
    return requests.get(url(server, name), timeout=TIMEOUT)


def delete(server, name):
    return requests.delete(url(server, name), timeout=TIMEOUT)


def raw_request(server, method, path, body=None):
    """Send ``path`` exactly as written (requests would normalize dot segments); return the status."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT)
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def sizes(folder):
    return sorted(entry.stat().st_size for entry in os.scandir(folder))


def wait_until(condition):
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "condition still false after the timeout"
        time.sleep(0.01)


# Lifecycle


def test_start_picks_a_free_port_and_exposes_address_and_url():
    with MediaServer() as server:
        assert server.port > 0
        assert server.address == f"127.0.0.1:{server.port}"
        assert server.url == f"http://127.0.0.1:{server.port}/media/"
        assert put(server, "a.txt").status_code == 201


def test_stop_refuses_connections_keeps_files_and_is_idempotent(server):
    put(server, "a.txt", b"kept")
    server.stop()
    server.stop()
    with pytest.raises(requests.ConnectionError):
        get(server, "a.txt")
    assert server.files() == {"a.txt": b"kept"}


def test_stop_ends_every_server_thread():
    before = set(threading.enumerate())
    server = MediaServer().start()
    with requests.Session() as session:  # keeps its connection open
        for _ in range(3):
            session.put(server.url + "a.txt", data=b"x", timeout=TIMEOUT)
        server.stop()
    wait_until(lambda: set(threading.enumerate()) <= before)


def test_custom_prefix_serves_files_under_it_only():
    with MediaServer(prefix="static") as server:
        assert server.url.endswith("/static/")
        assert put(server, "a.txt").status_code == 201
        assert requests.get(f"http://{server.address}/media/a.txt", timeout=TIMEOUT).status_code == 404


# PUT


def test_put_new_file_answers_201_and_stores_it(server):
    assert put(server, "a.txt", b"hello").status_code == 201
    assert server.files() == {"a.txt": b"hello"}


def test_put_over_existing_file_answers_204_and_replaces_it(server):
    put(server, "a.txt", b"old")
    response = put(server, "a.txt", b"new")
    assert response.status_code == 204
    assert "Content-Length" not in response.headers
    assert server.read("a.txt") == b"new"


def test_put_into_missing_folder_creates_parents(server):
    assert put(server, "a/b/c/d.txt", b"deep").status_code == 201
    assert server.files() == {"a/b/c/d.txt": b"deep"}


def test_put_chunked_body_is_stored(server):
    response = put(server, "a.txt", iter([b"one ", b"two ", b"three"]))
    assert response.request.headers["Transfer-Encoding"] == "chunked"
    assert response.status_code == 201
    assert server.read("a.txt") == b"one two three"


def test_put_below_a_file_answers_409(server):
    put(server, "a", b"file")
    assert put(server, "a/b.txt").status_code == 409
    assert server.files() == {"a": b"file"}


def test_put_onto_a_folder_answers_409(server):
    put(server, "a/b.txt")
    assert put(server, "a").status_code == 409
    assert server.files() == {"a/b.txt": b"data"}


def test_upload_in_progress_is_invisible_until_complete(server):
    server.seed("a.txt", b"old")
    halfway, finish = threading.Event(), threading.Event()

    def body():
        yield b"x" * CHUNK_SIZE
        halfway.set()
        finish.wait(TIMEOUT)
        yield b"y"

    with ThreadPoolExecutor(1) as pool:
        upload = pool.submit(put, server, "a.txt", body())
        assert halfway.wait(TIMEOUT)
        assert get(server, "a.txt").content == b"old"
        assert server.files() == {"a.txt": b"old"}
        finish.set()
        assert upload.result(TIMEOUT).status_code == 204
    assert server.read("a.txt") == b"x" * CHUNK_SIZE + b"y"


def test_disk_upload_streams_into_a_temp_file_beside_the_target(disk_server):
    folder = os.path.join(disk_server.root, "f")
    finish = threading.Event()

    def body():
        yield b"x" * CHUNK_SIZE
        finish.wait(TIMEOUT)
        yield b"y"

    disk_server.seed("f/a.txt", b"old")
    with ThreadPoolExecutor(1) as pool:
        upload = pool.submit(put, disk_server, "f/a.txt", body())
        wait_until(lambda: sizes(folder) == [3, CHUNK_SIZE])  # "old", and the first chunk beside it
        finish.set()
        assert upload.result(TIMEOUT).status_code == 204
    assert os.listdir(folder) == ["a.txt"]


def test_large_file_round_trips(server):
    data = os.urandom(3 * CHUNK_SIZE + 17)
    assert put(server, "big.bin", data).status_code == 201
    assert get(server, "big.bin").content == data


# DELETE


def test_delete_existing_file_answers_204_and_leaves_its_folder(server):
    put(server, "a/b.txt")
    assert delete(server, "a/b.txt").status_code == 204
    assert server.files() == {}
    assert put(server, "a").status_code == 409  # "a" is still a folder


def test_delete_missing_file_answers_404(server):
    assert delete(server, "missing.txt").status_code == 404


def test_delete_folder_answers_409(server):
    put(server, "a/b.txt")
    assert delete(server, "a").status_code == 409
    assert server.files() == {"a/b.txt": b"data"}


# GET and HEAD


def test_get_returns_bytes_with_length_last_modified_and_etag(server):
    put(server, "a.txt", b"hello")
    response = get(server, "a.txt")
    assert response.status_code == 200
    assert response.content == b"hello"
    assert response.headers["Content-Length"] == "5"
    modified = email.utils.parsedate_to_datetime(response.headers["Last-Modified"]).timestamp()
    assert abs(modified - time.time()) < 60
    mtime, size = re.fullmatch(r'"([0-9a-f]+)-([0-9a-f]+)"', response.headers["ETag"]).groups()
    assert (int(mtime, 16), int(size, 16)) == (int(modified), 5)


def test_etag_changes_when_the_file_changes(server):
    put(server, "a.txt", b"one")
    first = get(server, "a.txt").headers["ETag"]
    put(server, "a.txt", b"three")
    assert get(server, "a.txt").headers["ETag"] != first


def test_head_sends_the_get_headers_without_a_body(server):
    put(server, "a.txt", b"hello")
    response = requests.head(url(server, "a.txt"), timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.content == b""
    expected = get(server, "a.txt").headers
    for header in ("Content-Length", "Last-Modified", "ETag"):
        assert response.headers[header] == expected[header]


def test_get_missing_file_answers_404(server):
    assert get(server, "missing.txt").status_code == 404
    assert requests.head(url(server, "missing.txt"), timeout=TIMEOUT).status_code == 404


def test_get_folder_answers_404(server):
    put(server, "a/b.txt")
    assert get(server, "a").status_code == 404


# Names and URLs


@pytest.mark.parametrize(
    "name",
    [
        "héllo wörld.txt",
        "日本語/ファイル.bin",
        "with space/and more.txt",
        "%20literally.txt",
        "hash#tag.txt",
        "what?.txt",
        "a+b=c&d;e,f'g\"h.txt",
        "deep/" * 10 + "leaf.txt",
        ".hidden",
    ],
)
def test_odd_names_round_trip(server, name):
    assert put(server, name, name.encode()).status_code == 201
    assert get(server, name).content == name.encode()
    assert server.files() == {name: name.encode()}
    assert delete(server, name).status_code == 204


def test_empty_file_round_trips(server):
    assert put(server, "empty.txt", b"").status_code == 201
    response = get(server, "empty.txt")
    assert (response.status_code, response.content) == (200, b"")
    assert server.files() == {"empty.txt": b""}


def test_plus_sign_is_not_a_space(server):
    assert requests.put(server.url + "a+b.txt", data=b"x", timeout=TIMEOUT).status_code == 201
    assert server.files() == {"a+b.txt": b"x"}


def test_query_string_is_not_part_of_the_name(server):
    assert requests.put(url(server, "a.txt") + "?v=1&x=%2F", data=b"x", timeout=TIMEOUT).status_code == 201
    assert server.files() == {"a.txt": b"x"}


@pytest.mark.parametrize(
    "path",
    [
        "/media/../escape.txt",
        "/media/a/../../escape.txt",
        "/media/%2e%2e/escape.txt",
        "/media/a%2F..%2F..%2Fescape.txt",
        "/media/%2Fetc%2Fescape.txt",
        "/media/a%00.txt",
    ],
)
def test_traversal_is_refused_and_writes_nothing(server, tmp_path, path):
    assert raw_request(server, "PUT", path, b"evil") == 400
    assert server.files() == {}
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("path", ["/media/", "/media/a//b.txt", "/media/./a.txt", "/media/a/", "/media/%ff.txt"])
def test_malformed_names_are_refused(server, path):
    assert raw_request(server, "PUT", path, b"x") == 400
    assert server.files() == {}


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE", "POST"])
def test_paths_outside_the_prefix_answer_404_whatever_the_method(server, method):
    assert raw_request(server, method, "/elsewhere/a.txt", b"x" if method in ("PUT", "POST") else None) == 404
    assert server.files() == {}


def test_unknown_method_answers_405_with_allow_header(server):
    response = requests.request("POST", url(server, "a.txt"), data=b"x", timeout=TIMEOUT)
    assert response.status_code == 405
    assert set(response.headers["Allow"].split(", ")) == {"GET", "HEAD", "PUT", "DELETE"}
    assert server.files() == {}


# Connections


def test_keep_alive_connection_serves_successive_requests(server):
    connection = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT)
    sockets, statuses = set(), []
    for method, path, body in [
        ("PUT", "/media/a.txt", b"abc"),
        ("PUT", "/media/b.txt", iter([b"chunked ", b"body"])),
        ("GET", "/media/a.txt", None),
        ("PUT", "/media/a.txt/c", b"conflict"),
        ("POST", "/media/a.txt", b"unknown method"),
        ("GET", "/elsewhere", None),
        ("DELETE", "/media/a.txt", None),
        ("HEAD", "/media/b.txt", None),
    ]:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        response.read()
        statuses.append(response.status)
        sockets.add(connection.sock)
    connection.close()
    assert statuses == [201, 201, 200, 409, 405, 404, 204, 200]
    assert len(sockets) == 1
    assert server.files() == {"b.txt": b"chunked body"}


def test_malformed_body_framing_drops_the_connection(server):
    with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as client:
        client.sendall(b"PUT /media/a.txt HTTP/1.1\r\nHost: x\r\nContent-Length: -3\r\n\r\nabc")
        assert client.recv(1024) == b""
    assert server.files() == {}


def test_nothing_is_printed(server, capfd):
    put(server, "a.txt")
    get(server, "missing")
    requests.request("BREW", url(server, "a.txt"), timeout=TIMEOUT)
    raw_request(server, "PUT", "/media/../x", b"x")
    with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as client:
        client.sendall(b"garbage\r\n\r\n")
        client.recv(1024)
    with requests.Session() as session:
        session.get(url(server, "a.txt"), timeout=TIMEOUT)
        server.go_down()  # cuts the session's open connection
    server.come_back()
    assert capfd.readouterr() == ("", "")


# Request log


def test_requests_are_logged_with_unquoted_names(server):
    put(server, "a b/%20.txt", b"x")
    get(server, "missing")
    requests.get(f"http://{server.address}/elsewhere?q=1", timeout=TIMEOUT)
    logged = [(r.method, r.name, r.status) for r in server.requests]
    assert logged == [("PUT", "a b/%20.txt", 201), ("GET", "missing", 404), ("GET", "/elsewhere?q=1", 404)]
    assert all(isinstance(r, RequestRecord) for r in server.requests)
    times = [r.time for r in server.requests]
    assert times == sorted(times) and times[-1] <= time.monotonic()


def test_clear_requests_empties_the_log(server):
    get(server, "missing")
    server.clear_requests()
    assert server.requests == []


def test_seeding_and_inspecting_do_not_log_requests(server):
    server.seed("a.txt", b"x")
    server.read("a.txt")
    server.files()
    assert server.requests == []


# Direct access to the stored files


def test_seeded_file_is_served_over_http(server):
    server.seed("a/b.txt", b"seeded")
    assert get(server, "a/b.txt").content == b"seeded"


def test_read_and_has_report_missing_files(server):
    server.seed("a.txt", b"x")
    assert (server.read("a.txt"), server.has("a.txt")) == (b"x", True)
    assert (server.read("b.txt"), server.has("b.txt")) == (None, False)


def test_remove_deletes_a_file_and_ignores_missing_ones(server):
    server.seed("a.txt", b"x")
    server.remove("a.txt")
    server.remove("a.txt")
    assert get(server, "a.txt").status_code == 404


def test_clear_removes_every_file(server):
    server.seed("a.txt", b"x")
    server.seed("b/c.txt", b"y")
    server.clear()
    assert server.files() == {}


@pytest.mark.parametrize("call", [lambda s: s.seed("../x", b""), lambda s: s.read("/x"), lambda s: s.remove("a/../b")])
def test_direct_calls_refuse_unsafe_names(server, call):
    with pytest.raises(ValueError, match="Unsafe or malformed file name"):
        call(server)


def test_seed_below_a_file_raises_value_error(server):
    server.seed("a", b"file")
    with pytest.raises(ValueError, match="A file is in the way of 'a/b'"):
        server.seed("a/b", b"x")


def test_disk_mode_keeps_files_under_root(disk_server):
    put(disk_server, "a/b.txt", b"on disk")
    with open(os.path.join(disk_server.root, "a", "b.txt"), "rb") as f:
        assert f.read() == b"on disk"
    with open(os.path.join(disk_server.root, "by hand.txt"), "wb") as f:
        f.write(b"hand")
    assert get(disk_server, "by hand.txt").content == b"hand"


# Fault injection


def test_fail_next_answers_status_and_changes_nothing(server):
    server.seed("a.txt", b"old")
    server.fail_next(3, status=503)
    assert put(server, "a.txt", b"new").status_code == 503
    assert delete(server, "a.txt").status_code == 503
    assert put(server, "new/b.txt").status_code == 503
    assert server.files() == {"a.txt": b"old"}
    assert put(server, "new").status_code == 201  # the failed PUT created no "new" folder


def test_fail_next_counts_only_matching_methods(server):
    server.fail_next(methods={"DELETE"})
    assert put(server, "a.txt").status_code == 201
    assert get(server, "a.txt").status_code == 200
    assert delete(server, "a.txt").status_code == 500
    assert delete(server, "a.txt").status_code == 204


def test_fail_next_calls_queue_up(server):
    server.fail_next(status=500)
    server.fail_next(2, status=503)
    assert [get(server, "a.txt").status_code for _ in range(4)] == [500, 503, 503, 404]


def test_fail_next_ignores_requests_refused_for_their_path(server):
    server.fail_next()
    assert raw_request(server, "GET", "/elsewhere") == 404
    assert get(server, "a.txt").status_code == 500


def test_read_only_refuses_put_and_delete_with_403_but_serves_reads(server):
    server.seed("a.txt", b"x")
    server.read_only = True
    assert put(server, "a.txt", b"new").status_code == 403
    assert put(server, "b.txt").status_code == 403
    assert delete(server, "a.txt").status_code == 403
    assert get(server, "a.txt").content == b"x"
    assert server.files() == {"a.txt": b"x"}


def test_delayed_put_is_applied_after_the_delay_even_if_the_client_gave_up(server):
    server.set_delay(0.3, methods={"PUT"})
    with pytest.raises(requests.ReadTimeout):
        put(server, "a.txt", b"late", timeout=(TIMEOUT, 0.1))
    assert not server.has("a.txt")
    wait_until(lambda: server.has("a.txt"))
    assert get(server, "a.txt").status_code == 200  # GET is not delayed


def test_delay_count_limits_how_many_requests_wait(server):
    server.set_delay(0.3, count=1)
    started = time.monotonic()
    get(server, "a.txt")
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    get(server, "a.txt")
    assert time.monotonic() - started < 0.25


def test_delay_is_interrupted_by_stop(server):
    server.set_delay(60)
    sent = threading.Event()

    def body():
        yield b"data"
        sent.set()

    with ThreadPoolExecutor(1) as pool:
        upload = pool.submit(put, server, "a.txt", body())
        assert sent.wait(TIMEOUT)
        time.sleep(0.1)  # the server is waiting now
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 2
        with pytest.raises(requests.ConnectionError):
            upload.result(TIMEOUT)
    assert not server.has("a.txt")


def test_delay_is_interrupted_by_go_down_and_the_change_is_not_applied(server):
    server.seed("a.txt", b"kept")
    server.set_delay(60, methods={"DELETE"})
    with ThreadPoolExecutor(1) as pool:
        deletion = pool.submit(delete, server, "a.txt")
        time.sleep(0.1)
        started = time.monotonic()
        server.go_down()
        assert time.monotonic() - started < 2
        with pytest.raises(requests.ConnectionError):
            deletion.result(TIMEOUT)
    server.come_back()
    assert get(server, "a.txt").content == b"kept"


def test_reset_faults_clears_failures_delays_and_read_only(server):
    server.fail_next(5)
    server.set_delay(60)
    server.read_only = True
    server.reset_faults()
    assert server.read_only is False
    assert put(server, "a.txt", timeout=1).status_code == 201


def test_go_down_refuses_connections_and_come_back_keeps_port_and_files(server):
    put(server, "a.txt", b"kept")
    port = server.port
    server.go_down()
    with pytest.raises(requests.ConnectionError):
        get(server, "a.txt")
    assert server.files() == {"a.txt": b"kept"}
    server.come_back()
    assert server.port == port
    assert get(server, "a.txt").content == b"kept"


def test_go_down_cuts_open_keep_alive_connections(server):
    connection = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT)
    connection.request("PUT", "/media/a.txt", body=b"x")
    connection.getresponse().read()
    server.go_down()
    with pytest.raises((ConnectionError, http.client.HTTPException)):  # noqa: PT012 - either call may fail
        connection.request("GET", "/media/a.txt")
        connection.getresponse()
    connection.close()


def test_down_context_manager_restores_service(server):
    with server.down():
        with pytest.raises(requests.ConnectionError):
            put(server, "a.txt")
    assert put(server, "a.txt").status_code == 201


def test_receive_rate_keeps_a_large_put_in_flight(tmp_path):
    import time as _time

    import requests as _requests

    from resto_celery.testing import MediaServer

    with MediaServer(tmp_path / "root") as server:
        server.set_receive_rate(1024 * 1024)
        started = _time.monotonic()
        response = _requests.put(server.url + "slow.bin", data=b"x" * (512 * 1024), timeout=10)
        assert response.status_code == 201
        assert _time.monotonic() - started >= 0.4
        server.reset_faults()
        started = _time.monotonic()
        _requests.put(server.url + "fast.bin", data=b"x" * (512 * 1024), timeout=10)
        assert _time.monotonic() - started < 0.4
