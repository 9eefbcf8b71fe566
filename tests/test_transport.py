"""HostTransport: URLs, status handling, typed errors, credentials, streaming."""
import base64
import errno
import gzip
import http.server
import logging
import os
import threading
import tracemalloc

import pytest

from resto_celery.exceptions import HostTimeout, HostUnreachable, MissingFile, TLSFailure, UnexpectedStatus
from resto_celery.transport import HostTransport, as_connected


@pytest.fixture
def server(make_media_server):
    return make_media_server()


@pytest.fixture
def transport(server):
    transport = HostTransport(server.url, name="media-test", timeout=1)
    yield transport
    transport.close()


@pytest.mark.parametrize(
    "name, path",
    [
        ("a b.txt", "a%20b.txt"),
        ("literally%20.txt", "literally%2520.txt"),
        ("hash#.txt", "hash%23.txt"),
        ("what?.txt", "what%3F.txt"),
        ("plus+.txt", "plus%2B.txt"),
        ("dir/sub dir/f.txt", "dir/sub%20dir/f.txt"),
        ("été.txt", "%C3%A9t%C3%A9.txt"),
    ],
)
def test_url_quotes_everything_but_slashes(name, path):
    assert HostTransport("http://h/media/").url(name) == "http://h/media/" + path


@pytest.mark.parametrize("name", ["../x", "/abs", "a/../../x", "nul\x00"])
def test_url_refuses_unsafe_names(name):
    with pytest.raises(ValueError, match="Refusing unsafe file name"):
        HostTransport("http://h/media/").url(name)


def test_put_new_then_existing_returns_201_then_204(transport, server, tmp_path):
    source = tmp_path / "src"
    source.write_bytes(b"v1")
    with source.open("rb") as f:
        assert transport.put("x/f.txt", f) == 201
    source.write_bytes(b"version 2")
    with source.open("rb") as f:
        assert transport.put("x/f.txt", f) == 204
    assert server.read("x/f.txt") == b"version 2"


def test_put_of_an_empty_file_sends_content_length_zero(transport, server, tmp_path):
    source = tmp_path / "empty"
    source.write_bytes(b"")
    with source.open("rb") as f:
        transport.put("empty", f)
    assert server.read("empty") == b""


def test_delete_reports_whether_the_file_was_there(transport, server):
    server.seed("f.txt", b"x")
    assert transport.delete("f.txt") is True
    assert transport.delete("f.txt") is False
    assert not server.has("f.txt")


def test_delete_answered_200_counts_as_deleted(transport, server):
    server.fail_next(status=200, methods={"DELETE"})
    assert transport.delete("f.txt") is True


def test_delete_answered_202_is_a_failure_as_for_a_put(transport, server):
    """202 Accepted would only queue the deletion: django-resto refuses it, and so do we."""
    server.seed("f.txt", b"x")
    server.fail_next(status=202, methods={"DELETE"})
    with pytest.raises(UnexpectedStatus) as raised:
        transport.delete("f.txt")
    error = raised.value
    assert (error.method, error.status, error.retryable) == ("DELETE", 202, False)
    assert str(error) == "DELETE f.txt on media-test failed: 202 Accepted"


def test_only_a_delete_of_a_missing_file_logs_a_warning_in_django_resto_words(server, caplog):
    transport = HostTransport(server.url, name="media-1", auth=("user", "s3cret"), headers={"X-Token": "t0ken"})
    server.seed("f.txt", b"x")
    caplog.set_level(logging.DEBUG, logger="resto_celery.transport")
    transport.delete("f.txt")
    transport.delete("f.txt")
    transport.close()
    logged = [(r.name, r.levelname, r.getMessage()) for r in caplog.records if r.name.startswith("resto_celery")]
    assert logged == [("resto_celery.transport", "WARNING", "DELETE on missing file f.txt on media-1.")]


def test_head_exists_size_and_modified_time(transport, server):
    server.seed("f.txt", b"12345")
    assert transport.exists("f.txt")
    assert transport.size("f.txt") == 5
    assert transport.modified_time("f.txt").tzinfo is not None
    assert transport.head("missing") is None
    assert not transport.exists("missing")


def test_size_of_a_missing_file_is_file_not_found(transport):
    with pytest.raises(FileNotFoundError):
        transport.size("missing")
    with pytest.raises(MissingFile):
        transport.size("missing")


def test_download_streams_the_bytes(transport, server, tmp_path):
    server.seed("big.bin", bytes(range(256)) * 4096)
    target = tmp_path / "copy"
    with target.open("wb") as f:
        assert transport.download("big.bin", f) == 256 * 4096
    assert target.read_bytes() == bytes(range(256)) * 4096


def test_unexpected_4xx_is_a_typed_error_that_is_not_retryable(transport, server):
    server.read_only = True
    with pytest.raises(UnexpectedStatus) as raised:
        transport.delete("f.txt")
    error = raised.value
    assert (error.host, error.method, error.name, error.status) == ("media-test", "DELETE", "f.txt", 403)
    assert not error.retryable
    assert str(error) == "DELETE f.txt on media-test failed: 403 Forbidden"


def test_5xx_is_a_typed_error_that_is_retryable(transport, server):
    server.fail_next(status=503)
    with pytest.raises(UnexpectedStatus) as raised:
        transport.exists("f.txt")
    assert raised.value.status == 503 and raised.value.retryable


def test_connection_refused_is_host_unreachable(transport, server):
    server.go_down()
    with pytest.raises(HostUnreachable, match="Connection refused") as raised:
        transport.exists("f.txt")
    assert raised.value.retryable and raised.value.status is None


def test_slow_answer_is_a_timeout(server):
    server.set_delay(3)
    transport = HostTransport(server.url, timeout=0.3)
    with pytest.raises(HostTimeout, match="timed out waiting for an answer") as raised:
        transport.exists("f.txt")
    assert raised.value.retryable


def test_keep_alive_reuses_one_connection(transport, caplog):
    caplog.set_level(logging.DEBUG, logger="urllib3.connectionpool")
    for index in range(5):
        transport.exists(f"f{index}")
    opened = [r for r in caplog.records if r.getMessage().startswith("Starting new HTTP connection")]
    assert len(opened) == 1


class _RecordingHandler(http.server.BaseHTTPRequestHandler):
    seen = []

    def do_HEAD(self):
        type(self).seen.append(dict(self.headers))
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def recording_server():
    _RecordingHandler.seen = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RecordingHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_basic_auth_and_headers_are_sent_but_never_shown(recording_server):
    port = recording_server.server_address[1]
    transport = HostTransport(
        f"http://127.0.0.1:{port}/media/", name="secure-host", auth=("user", "s3cret"), headers={"X-Token": "t0ken"}
    )
    transport.exists("f.txt")
    [headers] = _RecordingHandler.seen
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"user:s3cret").decode()
    assert headers["X-Token"] == "t0ken"
    recording_server.shutdown()
    recording_server.server_close()
    with pytest.raises(HostUnreachable) as raised:
        transport.exists("f.txt")
    assert "s3cret" not in str(raised.value) and "t0ken" not in str(raised.value)
    assert "s3cret" not in repr(transport)


def test_tls_failure_is_not_retryable():
    assert not TLSFailure("h", "PUT", "f", "certificate verify failed").retryable


def _peak_memory_of_put(transport, path, name):
    tracemalloc.start()
    try:
        with path.open("rb") as f:
            transport.put(name, f)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_put_memory_does_not_grow_with_the_file_size(make_media_server, tmp_path):
    """Streams 16 MB then 320 MB: the peak of Python allocations stays a few chunks."""
    server = make_media_server()
    transport = HostTransport(server.url, timeout=30)
    peaks = {}
    for size_mb in (16, 320):
        source = tmp_path / f"{size_mb}.bin"
        with source.open("wb") as f:
            f.truncate(size_mb * 1024 * 1024)  # sparse: no disk needed to read it
        peaks[size_mb] = _peak_memory_of_put(transport, source, f"{size_mb}.bin")
        assert transport.size(f"{size_mb}.bin") == size_mb * 1024 * 1024
        server.remove(f"{size_mb}.bin")
        source.unlink()
    print(f"peak traced memory during PUT: 16 MB file {peaks[16] / 1024:.0f} KiB, "
          f"320 MB file {peaks[320] / 1024:.0f} KiB")
    assert peaks[320] < 4 * 1024 * 1024
    assert peaks[320] < peaks[16] + 1024 * 1024


class _RawServer:
    """A loopback TCP server whose every connection is handled by ``handle(socket, index)``
    (``index``: the connection's number, from 0), each in a thread of its own."""

    def __init__(self, handle):
        import socket

        self.handle, self.connections = handle, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/media/"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            index, self.connections = self.connections, self.connections + 1
            threading.Thread(target=self._serve, args=(connection, index), daemon=True).start()

    def _serve(self, connection, index):
        with connection:
            self.handle(connection, index)

    def close(self):
        self.listener.close()


def _read_request(connection):
    """Read one request's head and its ``Content-Length`` body; b"" if the client sent nothing."""
    return _read_head_and_body(connection)[0]


def _read_body(connection):
    """Read one request; its body (b"" if the client sent nothing)."""
    return _read_head_and_body(connection)[1]


def _read_head_and_body(connection):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            return b"", b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lengths = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    length = lengths[0] if lengths else 0
    while len(body) < length:
        body += connection.recv(65536)
    return head, body


def test_a_kept_connection_the_host_drops_as_a_put_goes_out_is_replaced_and_the_put_sent_again(tmp_path):
    """The host answers the first request of a connection, and closes it unanswered at the
    second (as a server whose keep-alive timer fired just then): no failure is reported."""

    def first_request_only(connection, index):
        _read_request(connection)
        connection.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        _read_request(connection)  # then closes without an answer

    server = _RawServer(first_request_only)
    transport = HostTransport(server.url, timeout=2)
    try:
        for name in ("a.txt", "b.txt", "c.txt"):
            assert transport.put(name, _file(tmp_path, name, b"bytes")) == 201
    finally:
        transport.close()
        server.close()
    assert server.connections == 3


def test_a_kept_connection_the_host_drops_as_a_large_put_goes_out_is_replaced_and_the_whole_file_sent_again(tmp_path):
    """As above, with a body streamed from the file (over 64 KiB): it goes again from its start."""
    bodies = []

    def first_request_only(connection, index):
        bodies.append(_read_body(connection))
        connection.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        _read_body(connection)  # then closes without an answer

    data = bytes(range(256)) * 1024  # 256 KiB
    server = _RawServer(first_request_only)
    transport = HostTransport(server.url, timeout=2)
    try:
        for name in ("a.bin", "b.bin", "c.bin"):
            assert transport.put(name, _file(tmp_path, name, data)) == 201
    finally:
        transport.close()
        server.close()
    assert server.connections == 3
    assert bodies == [data, data, data]


def test_a_host_that_refuses_a_body_before_taking_it_is_heard_not_reported_unreachable(tmp_path):
    """nginx answers 413 as soon as it reads a Content-Length over client_max_body_size."""

    def too_large(connection, index):
        data = b""
        while b"\r\n\r\n" not in data:
            data += connection.recv(65536)
        connection.sendall(b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    server = _RawServer(too_large)
    transport = HostTransport(server.url, timeout=5)
    big = tmp_path / "big.bin"
    with big.open("wb") as f:
        f.truncate(64 * 1024 * 1024)
    try:
        with pytest.raises(UnexpectedStatus, match="413") as raised:
            with big.open("rb") as f:
                transport.put("big.bin", f)
    finally:
        transport.close()
        server.close()
    assert not raised.value.retryable


def _file(folder, name, content):
    path = folder / name
    path.write_bytes(content)
    return path.open("rb")


def test_hosts_are_connected_to_at_once_and_one_whose_connect_fails_comes_with_its_error(make_media_server):
    up, refusing, broken = make_media_server(), make_media_server(), make_media_server()
    refusing.stop()
    transports = {server.url: HostTransport(server.url, timeout=2) for server in (up, refusing, broken)}

    def not_a_socket_error():
        raise ValueError("not a socket error")

    transports[broken.url].connect_ahead = not_a_socket_error  # still yielded, with its error: nobody waits forever
    came = dict(as_connected(transports))

    assert came[up.url] is None and not transports[up.url].needs_connection()  # a connection waits for the request
    assert isinstance(came[refusing.url], ConnectionRefusedError)
    assert isinstance(came[broken.url], ValueError)
    error = transports[refusing.url].failed_to_connect(came[refusing.url], "PUT", "a.txt")
    assert isinstance(error, HostUnreachable) and not error.in_doubt and "Connection refused" in str(error)


def test_a_lone_host_without_a_connection_connects_in_the_requesting_thread(make_media_server):
    server = make_media_server()
    transports = {server.url: HostTransport(server.url, timeout=2)}
    assert list(as_connected(transports)) == [(server.url, None)]
    assert transports[server.url].needs_connection()  # no thread connected ahead: the request will


class _SendfileSpy:
    """``os.sendfile`` as it is, counting its calls (``failing``: each call raises that
    instead, as for a file sendfile() cannot read)."""

    def __init__(self, failing=None):
        self.calls, self.failing, self.real = 0, failing, os.sendfile

    def __call__(self, *args):
        self.calls += 1
        if self.failing is not None:
            raise self.failing
        return self.real(*args)


def _put_from_a_file(server, tmp_path, data):
    """PUT ``data`` to ``server`` as ``a.bin``, from a file on disk; the answer's status."""
    transport = HostTransport(server.url, timeout=5)
    try:
        with _file(tmp_path, "a.bin", data) as source:
            return transport.put("a.bin", source)
    finally:
        transport.close()


def test_a_large_file_goes_to_a_plain_http_host_by_sendfile_and_arrives_whole(make_media_server, tmp_path, monkeypatch):
    server, data = make_media_server(), os.urandom(1024 * 1024)
    spy = _SendfileSpy()
    monkeypatch.setattr(os, "sendfile", spy)
    assert _put_from_a_file(server, tmp_path, data) == 201
    assert spy.calls >= 1 and server.files() == {"a.bin": data}


def test_a_file_sendfile_cannot_send_is_read_and_sent_in_blocks_instead(make_media_server, tmp_path, monkeypatch):
    server, data = make_media_server(), os.urandom(512 * 1024)
    spy = _SendfileSpy(failing=OSError(errno.EINVAL, os.strerror(errno.EINVAL)))
    monkeypatch.setattr(os, "sendfile", spy)
    assert _put_from_a_file(server, tmp_path, data) == 201
    assert spy.calls == 1 and server.files() == {"a.bin": data}  # tried once, then blocks


def test_when_sendfile_fails_part_way_the_rest_is_read_from_where_it_stopped(make_media_server, tmp_path, monkeypatch):
    server, data = make_media_server(), os.urandom(1024 * 1024)
    real, calls = os.sendfile, []

    def sends_a_little_then_fails(out, source, offset, count):
        calls.append(offset)
        if len(calls) > 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(out, source, offset, min(count, 100_000))

    monkeypatch.setattr(os, "sendfile", sends_a_little_then_fails)
    assert _put_from_a_file(server, tmp_path, data) == 201
    assert calls == [0, 100_000] and server.files() == {"a.bin": data}


def test_a_compressed_file_is_sent_as_the_bytes_it_reads_not_as_its_file_on_disk(make_media_server, tmp_path):
    """A gzip file's descriptor holds the compressed bytes: sendfile() must not send those."""
    server, data = make_media_server(), os.urandom(300 * 1024)
    with gzip.open(tmp_path / "a.gz", "wb") as compressed:
        compressed.write(data)
    transport = HostTransport(server.url, timeout=5)
    try:
        with gzip.open(tmp_path / "a.gz", "rb") as source:
            assert transport.put("a.bin", source, length=len(data)) == 201
    finally:
        transport.close()
    assert server.files() == {"a.bin": data}


@pytest.mark.parametrize("by_sendfile", [True, False], ids=["sendfile", "blocks"])
def test_a_file_shorter_than_its_content_length_fails_as_a_timeout_in_doubt(
    make_media_server, tmp_path, monkeypatch, by_sendfile,
):
    """The file shrank after its size was taken: the host waits for bytes that never come."""
    if not by_sendfile:
        monkeypatch.setattr(os, "sendfile", _SendfileSpy(failing=OSError(errno.EINVAL, "no sendfile")))
    server = make_media_server()
    transport = HostTransport(server.url, timeout=0.5)
    try:
        with _file(tmp_path, "a.bin", b"x" * 100_000) as source, pytest.raises(HostTimeout) as raised:
            transport.put("a.bin", source, length=150_000)
    finally:
        transport.close()
    assert raised.value.in_doubt and "a.bin" not in server.files()
