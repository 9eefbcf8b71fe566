"""HybridStorage's fan-out: a small file or a delete goes to every plain HTTP host from the
saving thread (every request sent, then every answer read); larger files, other kinds of
host and subclasses that change what one host gets go host by host on the transfer threads.
Real hosts: the project's MediaServer, and raw loopback servers where the order of the
bytes on the wire is the point."""
import errno
import io
import logging
import os
import socket
import threading
import time

import pytest
from django.core.files.base import ContentFile

from resto_celery import replication, storage as storage_module
from resto_celery.exceptions import HostTimeout, HostUnreachable, MasterReadError, ReplicationError
from resto_celery.storage import HybridStorage
from resto_celery.transport import HostTransport, finish_together
from tests.site import UnansweringHost, wait_until


@pytest.fixture
def no_transfer_threads(monkeypatch):
    """The process's transfer thread pools, emptied: what a save makes shows up here."""
    pools = {}
    monkeypatch.setattr(replication, "_pools", pools)
    return pools


def _storage(media_root, hosts, cls=HybridStorage):
    return cls(location=str(media_root), hosts=[host.url for host in hosts], timeout=2)


def test_a_small_file_reaches_every_host_without_a_transfer_thread(media_root, make_media_server, no_transfer_threads):
    hosts = [make_media_server() for _ in range(3)]
    storage = _storage(media_root, hosts)

    storage.save("small.txt", ContentFile(b"x" * 10_000))
    storage.delete("small.txt")

    assert no_transfer_threads == {}  # sent and answered from the saving thread
    assert [len([r for r in h.requests if r.method in ("PUT", "DELETE")]) for h in hosts] == [2, 2, 2]
    assert all(h.files() == {} for h in hosts)


def test_a_large_file_streams_to_every_host_from_the_saving_thread(media_root, make_media_server, no_transfer_threads):
    hosts = [make_media_server() for _ in range(3)]
    data = os.urandom(3 * 1024 * 1024 + 1)  # many send blocks, an odd last one

    _storage(media_root, hosts).save("large.bin", ContentFile(data))

    assert no_transfer_threads == {}
    assert all(h.files() == {"large.bin": data} for h in hosts)


def test_the_master_file_goes_to_each_plain_http_host_by_sendfile(media_root, make_media_server, monkeypatch):
    """The kernel copies the master's pages to each host's socket: no block passes through Python."""
    hosts, data = [make_media_server() for _ in range(2)], os.urandom(1024 * 1024)
    sendfile, calls = os.sendfile, []

    def counting_sendfile(out, source, offset, count):
        calls.append(out)
        return sendfile(out, source, offset, count)

    monkeypatch.setattr(os, "sendfile", counting_sendfile)

    _storage(media_root, hosts).save("large.bin", ContentFile(data))

    assert len(set(calls)) == 2  # each host's socket
    assert all(h.files() == {"large.bin": data} for h in hosts)


def test_a_subclass_that_changes_what_one_host_gets_is_called_for_a_large_file_in_memory_too(
    media_root, make_media_server,
):
    hosts, data, called = [make_media_server() for _ in range(2)], os.urandom(1024 * 1024), []

    class Counting(HybridStorage):
        def replicate(self, host, name):
            called.append(host)
            return super().replicate(host, name)

    storage = _storage(media_root, hosts, Counting)
    storage.save("large.bin", ContentFile(data))

    assert sorted(called) == sorted(storage.hosts)
    assert all(h.files() == {"large.bin": data} for h in hosts)


def test_hosts_of_another_kind_get_a_transfer_thread_each(media_root, make_dav_server, no_transfer_threads):
    webdav = [make_dav_server("wsgidav") for _ in range(2)]
    storage = HybridStorage(location=str(media_root), hosts=[host.host_entry for host in webdav])

    storage.save("photos/cat.jpg", ContentFile(b"jpeg"))  # WebDAV makes the folder first: its own put()

    assert not storage.transport(storage.hosts[0]).pipelines
    assert "live" in no_transfer_threads  # the first host in the saving thread, the other on a transfer thread
    assert all(host.files() == {"photos/cat.jpg": b"jpeg"} for host in webdav)


def test_a_subclass_that_changes_what_one_host_gets_is_still_called_for_each_host(media_root, make_media_server):
    hosts = [make_media_server() for _ in range(3)]
    called = []

    class Counting(HybridStorage):
        def replicate(self, host, name):
            called.append(host)
            return super().replicate(host, name)

    storage = _storage(media_root, hosts, Counting)
    storage.save("a.txt", ContentFile(b"a"))

    assert sorted(called) == sorted(storage.hosts)
    assert all(h.files() == {"a.txt": b"a"} for h in hosts)


def test_a_host_that_is_down_fails_alone_and_the_others_get_the_file(media_root, make_media_server, caplog):
    up, down, also_up = make_media_server(), make_media_server(), make_media_server()
    down.stop()
    storage = _storage(media_root, [up, down, also_up])

    with caplog.at_level(logging.ERROR, logger="resto_celery"), pytest.raises(ReplicationError) as raised:
        storage.save("a.txt", ContentFile(b"bytes"))

    assert up.files() == also_up.files() == {"a.txt": b"bytes"}
    assert list(raised.value.failures) == [storage.hosts[1]]
    failed = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failed) == 1 and failed[0].startswith("Failed to upload a.txt on ")


class _HoldingServer:
    """A loopback HTTP server that reads each request whole, records that it came, and
    answers 201 only once ``answer`` is set."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/media/"
        self.received, self.answer = threading.Event(), threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        connection, _ = self.listener.accept()
        with connection:
            data = b""
            while b"\r\n\r\n" not in data:
                data += connection.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            while len(body) < length:
                body += connection.recv(65536)
            self.received.set()
            if self.answer.wait(10):
                connection.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")

    def close(self):
        self.answer.set()
        self.listener.close()


def test_a_started_put_reaches_every_host_before_any_answer_is_read():
    servers = [_HoldingServer() for _ in range(3)]
    transports = [HostTransport(server.url, timeout=5) for server in servers]
    try:
        pending = [transport.start_put("a.txt", io.BytesIO(b"bytes"), 5) for transport in transports]

        wait_until(lambda: all(server.received.is_set() for server in servers), timeout=5,
                   message="every host to have the whole request, none answered yet")
        for server in servers:
            server.answer.set()
        assert [request.finish() for request in pending] == [201, 201, 201]
    finally:
        for transport, server in zip(transports, servers, strict=True):
            transport.close()
            server.close()


def test_a_start_to_a_host_that_refuses_connections_fails_at_once_and_not_in_doubt(make_media_server):
    server = make_media_server()
    url = server.url
    server.stop()

    with pytest.raises(HostUnreachable) as raised:
        HostTransport(url, timeout=2).start_put("a.txt", io.BytesIO(b"bytes"), 5)

    assert not raised.value.in_doubt  # nothing was sent: no lease need wait for it


class _StalledServer:
    """A loopback server that reads a request's head and then nothing more."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/media/"
        self.done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        connection, _ = self.listener.accept()
        with connection:
            connection.recv(1024)
            self.done.wait(30)

    def close(self):
        self.done.set()
        self.listener.close()


def test_a_host_that_stops_taking_the_body_times_out_in_doubt_and_the_others_finish(tmp_path, make_media_server):
    stalled, server = _StalledServer(), make_media_server()
    source = tmp_path / "big.bin"
    data = os.urandom(32 * 1024 * 1024)  # more than the loopback socket buffers take
    source.write_bytes(data)
    transports = [HostTransport(stalled.url, timeout=1), HostTransport(server.url, timeout=5)]
    try:
        with source.open("rb") as first, source.open("rb") as second:
            pending = [transports[0].start_put("big.bin", first), transports[1].start_put("big.bin", second)]
            timed_out, stored = finish_together(pending)
    finally:
        stalled.close()
        for transport in transports:
            transport.close()

    assert isinstance(timed_out, HostTimeout) and timed_out.in_doubt
    assert stored == 201 and server.files() == {"big.bin": data}


class _SilentServer:
    """A loopback server that reads every request whole and never answers."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/media/"
        self.done = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._hold, args=(connection,), daemon=True).start()

    def _hold(self, connection):
        with connection:
            connection.recv(65536)
            self.done.wait(30)

    def close(self):
        self.done.set()
        self.listener.close()


def test_answers_are_awaited_together_so_a_silent_host_costs_one_timeout_not_one_per_request():
    silent = _SilentServer()
    transport = HostTransport(silent.url, timeout=0.5)
    try:
        pending = [transport.start_put(f"{n}.txt", io.BytesIO(b"bytes"), 5) for n in range(6)]
        started = time.monotonic()
        outcomes = finish_together(pending)
        waited = time.monotonic() - started
    finally:
        transport.close()
        silent.close()

    assert all(isinstance(outcome, HostTimeout) and outcome.in_doubt for outcome in outcomes)
    assert waited < 1.5, f"{waited:.2f} s: each answer got a read timeout of its own (6 x 0.5 s)"


class _FailingStream(io.RawIOBase):
    """A file whose second read fails, as a disk or NFS error in the middle of a file."""

    def __init__(self, size):
        super().__init__()
        self.reads = 0
        self.size = size

    def readable(self):
        return True

    def read(self, size=-1):
        self.reads += 1
        if self.reads > 1:
            raise OSError(5, "Input/output error")
        return b"x" * size


def test_a_body_that_fails_to_read_midway_is_that_requests_outcome_and_the_others_finish(make_media_server):
    broken_host, good_host = make_media_server(), make_media_server()
    transports = [HostTransport(broken_host.url, timeout=2), HostTransport(good_host.url, timeout=2)]
    size = 1024 * 1024
    try:
        pending = [transports[0].start_put("a.bin", _FailingStream(size), size),
                   transports[1].start_put("a.bin", io.BytesIO(b"y" * size), size)]
        failed, stored = finish_together(pending)
        idle = len(transports[0]._connections._idle)
    finally:
        for transport in transports:
            transport.close()

    assert isinstance(failed, OSError) and failed.errno == 5  # the file's error, not the host's
    assert stored == 201 and good_host.files() == {"a.bin": b"y" * size}
    assert broken_host.files() == {} and idle == 0  # its half-sent connection was closed, not kept


def test_a_master_file_that_cannot_be_read_is_a_master_read_error_not_a_host_failure(tmp_path):
    source = tmp_path / "a.bin"
    source.write_bytes(b"x" * 100)
    fd = os.open(source, os.O_RDONLY)
    reader = replication._PositionalReader(fd, 100, str(tmp_path), "a.bin")
    os.close(fd)  # reads now fail as on a stale NFS handle: EBADF

    with pytest.raises(MasterReadError, match=r"a\.bin.*cannot be read"):
        reader.read(10)


def test_each_answer_is_read_as_it_comes_so_a_quick_host_is_not_timed_by_a_slow_one(make_media_server):
    slow, quick = make_media_server(), make_media_server()
    slow.set_delay(0.3, methods="PUT")
    transports = [HostTransport(slow.url, timeout=2), HostTransport(quick.url, timeout=2)]
    try:
        pending = [transports[0].start_put("a.txt", io.BytesIO(b"bytes"), 5),
                   transports[1].start_put("a.txt", io.BytesIO(b"bytes"), 5)]
        assert finish_together(pending) == [201, 201]
    finally:
        for transport in transports:
            transport.close()

    slow_request, quick_request = pending
    assert quick_request.answered_at < slow_request.answered_at


def test_hosts_that_never_answer_a_connect_cost_one_timeout_together_and_hold_back_no_other(
    media_root, make_media_server,
):
    unanswering = [UnansweringHost(), UnansweringHost()]
    up = make_media_server()
    storage = HybridStorage(location=str(media_root), hosts=[h.url for h in unanswering] + [up.url], timeout=1)
    started = time.monotonic()
    try:
        with pytest.raises(ReplicationError) as raised:
            storage.save("a.txt", ContentFile(b"bytes"))
    finally:
        for host in unanswering:
            host.close()
    waited = time.monotonic() - started

    assert up.files() == {"a.txt": b"bytes"}
    [put] = [r for r in up.requests if r.method == "PUT"]
    assert put.time - started < 0.9, "the answering host's PUT waited for a connect timeout"
    assert sorted(raised.value.failures) == sorted(h.url for h in unanswering)
    for error in raised.value.failures.values():
        assert isinstance(error, HostTimeout) and "timed out connecting" in str(error) and not error.in_doubt
    assert waited < 1.8, f"{waited:.2f} s: the hosts were connected to one after another (2 x 1 s)"


class _CountingHost:
    """A loopback HTTP host that answers 201 to each whole PUT and counts, as they come, the
    body bytes it has received of the request in progress."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/media/"
        self.received, self.bodies = 0, []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        connection, _ = self.listener.accept()
        with connection:
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = connection.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:")))
                self.received = len(body)
                while len(body) < length:
                    chunk = connection.recv(65536)
                    if not chunk:
                        return
                    body += chunk
                    self.received = len(body)
                body, data = body[:length], body[length:]
                self.bodies.append(body)
                connection.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")

    def close(self):
        self.listener.close()


def test_a_file_in_memory_goes_to_the_hosts_as_the_master_writes_it_all_but_its_last_byte(media_root, monkeypatch):
    """While the master's temporary file is written, its bytes go to the host; the last one
    goes only once the file is in place, so a host never has a file the master lacks."""
    host, data = _CountingHost(), os.urandom(2 * 1024 * 1024 + 1)
    storage = _storage(media_root, [host])
    at_commit = []
    into_place = HybridStorage._into_place

    def committing(self, name, full_path, temp_path):
        time.sleep(0.2)  # time for the host to take whatever was sent
        at_commit.append((host.received, os.path.exists(full_path)))
        return into_place(self, name, full_path, temp_path)

    monkeypatch.setattr(HybridStorage, "_into_place", committing)
    try:
        assert storage.save("large.bin", ContentFile(data)) == "large.bin"
    finally:
        host.close()

    (received, master_there), = at_commit
    assert 0 < received < len(data) and not master_there  # bytes went before the master was in place, not all
    assert host.bodies == [data]
    assert (media_root / "large.bin").read_bytes() == data


def test_a_master_file_that_cannot_be_put_in_place_leaves_nothing_on_the_hosts(
    media_root, make_media_server, monkeypatch,
):
    """Every byte but the last had gone to the hosts: they drop the PUTs left unfinished."""
    hosts = [make_media_server() for _ in range(2)]

    def refused(self, temp_path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), temp_path)

    monkeypatch.setattr(HybridStorage, "_finish_temporary", refused)
    with pytest.raises(PermissionError):
        _storage(media_root, hosts).save("large.bin", ContentFile(os.urandom(1024 * 1024)))

    time.sleep(0.2)  # the hosts see their connections closed mid-body; a file would show by now
    assert [host.files() for host in hosts] == [{}, {}]
    assert os.listdir(media_root) == []  # no master file, no temporary one


def test_a_name_taken_while_the_file_was_written_goes_to_the_hosts_under_the_name_it_took(
    media_root, make_media_server, monkeypatch,
):
    hosts = [make_media_server() for _ in range(2)]
    data = os.urandom(1024 * 1024)
    writes = storage_module.write_in_steps

    def another_save_takes_the_name(fd, whole):
        yield from writes(fd, whole)
        (media_root / "large.bin").write_bytes(b"the other save's")

    monkeypatch.setattr(storage_module, "write_in_steps", another_save_takes_the_name)
    saved = _storage(media_root, hosts).save("large.bin", ContentFile(data))

    assert saved != "large.bin" and (media_root / saved).read_bytes() == data
    assert [host.files() for host in hosts] == [{saved: data}, {saved: data}]


def test_a_host_that_refuses_connections_fails_alone_as_the_file_is_written(media_root, make_media_server):
    up, down = make_media_server(), make_media_server()
    down.stop()
    data = os.urandom(1024 * 1024)

    with pytest.raises(ReplicationError, match=r"large\.bin on 1 of 2 media host.*refused"):
        _storage(media_root, [down, up]).save("large.bin", ContentFile(data))

    assert up.files() == {"large.bin": data} and (media_root / "large.bin").read_bytes() == data
