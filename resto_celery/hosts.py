"""One transport per media host kind, shared by every storage and task of a process."""
import os
import threading

from .storage_host import StorageTransport
from .tahoe import TahoeTransport
from .transport import HostTransport
from .webdav import WebDAVTransport

_transports = {}
_transports_lock = threading.Lock()
# A forked child (a Celery prefork worker) must not reuse its parent's sockets.
os.register_at_fork(after_in_child=_transports.clear)


def transport_for(host, timeout):
    """Return the process-wide transport for a :class:`~resto_celery.conf.MediaHost`.

    Transports are shared so that every storage instance and every task in a process
    reuses the same keep-alive connections to a host.
    """
    key = (host, timeout)
    with _transports_lock:
        transport = _transports.get(key)
        if transport is None:
            transport = _transports[key] = make_transport(host, timeout)
        return transport


def make_transport(host, timeout):
    """A new transport for ``host``, by its kind (``http``, ``webdav``, ``tahoe`` or ``storage``)."""
    if host.kind == "storage":
        return StorageTransport(host, timeout=timeout)
    common = {"name": host.name, "timeout": timeout, "verify": host.ca_bundle or True}
    if host.kind == "tahoe":
        return TahoeTransport(
            host.base_url, dircap=host.dircap, readcap=host.readcap, public_url=host.public_url, **common
        )
    if host.kind == "webdav":
        return WebDAVTransport(host.base_url, auth=host.auth, headers=host.headers, **common)
    return HostTransport(host.base_url, auth=host.auth, headers=host.headers, **common)
