"""When each file arrives in a host's folder, to the microsecond: Linux inotify, through ctypes.

nginx's DAV module writes an upload to a temporary file and renames it into place: the
rename (``IN_MOVED_TO``) is the moment the host serves the new file. A thread blocked in
``read()`` on the inotify descriptor stamps each event with ``time.time()`` as it comes;
it costs no CPU between events (a watcher that stats the folders every few milliseconds
costs the process it runs in about 1.5 ms of CPU per file and is up to its period late;
nginx's ``$msec`` is its event loop's cached time, to the millisecond, so up to a
millisecond and more early). The stamp is late by the thread's wake-up, typically tens of
microseconds: a lag read from it errs on the long side.

Only the folders given are watched, not the folders below them: make them first.
"""
import ctypes
import ctypes.util
import os
import select
import struct
import threading
import time

IN_MOVED_TO = 0x00000080
IN_CLOSE_WRITE = 0x00000008
IN_NONBLOCK = 0o4000
_EVENT = struct.Struct("iIII")


def available():
    """Whether this system has inotify (Linux)."""
    return _libc() is not None


def _libc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    return libc if hasattr(libc, "inotify_init1") else None


class Arrivals:
    """Stamps ``(folder, name) -> time.time()`` of the first rename into each of ``folders``
    (or the first close of a file written there: a host whose temporary files are on
    another file system copies them into place)."""

    def __init__(self, folders):
        libc = _libc()
        if libc is None:
            raise OSError("inotify is not available on this system")
        self.fd = libc.inotify_init1(IN_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.folders = {}
        for folder in folders:
            watch = libc.inotify_add_watch(self.fd, os.fsencode(str(folder)), IN_MOVED_TO | IN_CLOSE_WRITE)
            if watch < 0:
                os.close(self.fd)
                raise OSError(ctypes.get_errno(), f"inotify_add_watch failed on {folder}")
            self.folders[watch] = folder
        self.arrived = {}
        self.lock = threading.Lock()
        self.stop_reading, self.stop_writing = os.pipe()
        self.thread = threading.Thread(target=self._read, daemon=True, name="arrivals")
        self.thread.start()

    def _read(self):
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self.stop_reading, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            now = time.time()
            if self.stop_reading in ready:
                return
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                continue
            offset, found = 0, []
            while offset < len(data):
                watch, _, _, length = _EVENT.unpack_from(data, offset)
                raw = data[offset + _EVENT.size:offset + _EVENT.size + length]
                offset += _EVENT.size + length
                found.append((self.folders.get(watch), os.fsdecode(raw.rstrip(b"\0"))))
            with self.lock:
                for key in found:
                    self.arrived.setdefault(key, now)

    def at(self, folder, name):
        """When ``name`` was first renamed into ``folder`` (``time.time()``), or None."""
        with self.lock:
            return self.arrived.get((folder, name))

    def close(self):
        os.write(self.stop_writing, b"x")
        self.thread.join(5)
        for fd in (self.fd, self.stop_reading, self.stop_writing):
            os.close(fd)
