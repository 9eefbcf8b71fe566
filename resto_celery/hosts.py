"""One transport per media host kind, shared by every storage and task of a process."""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any, cast

from .storage_host import StorageTransport
from .tahoe import TahoeTransport
from .transport import HostTransport
from .webdav import WebDAVTransport

if TYPE_CHECKING:
    from .conf import MediaHost
    from .transport import Timeout, Transport

_transports: dict[tuple[MediaHost, Timeout], Transport] = {}
_transports_lock = threading.Lock()
# A forked child (a Celery prefork worker) must not reuse its parent's sockets.
os.register_at_fork(after_in_child=_transports.clear)


def transport_for(host: MediaHost, timeout: Timeout) -> Transport:
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


def make_transport(host: MediaHost, timeout: Timeout) -> Transport:
    """A new transport for ``host``, by its kind (``http``, ``webdav``, ``tahoe`` or ``storage``)."""
    if host.kind == "storage":
        return StorageTransport(host, timeout=timeout)
    common: dict[str, Any] = {"name": host.name, "timeout": timeout, "verify": host.ca_bundle or True}
    if host.kind == "tahoe":  # conf.parse_host gives every tahoe host its dircap
        return TahoeTransport(
            host.base_url, dircap=cast(str, host.dircap), readcap=host.readcap, public_url=host.public_url, **common
        )
    if host.kind == "webdav":
        return WebDAVTransport(host.base_url, auth=host.auth, headers=host.headers, **common)
    return HostTransport(host.base_url, auth=host.auth, headers=host.headers, **common)
