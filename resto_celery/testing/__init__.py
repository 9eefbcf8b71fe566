"""Public test tooling: real media servers to test storages against.

- :class:`MediaServer`: a threaded HTTP media server in the test process, with fault
  injection (failures, delays, outages, read-only mode) and a request log.
- :class:`~resto_celery.testing.nginx.NginxMediaServer`: a real nginx with its dav module.
- :class:`~resto_celery.testing.webdav.LighttpdWebDAVServer` and
  :class:`~resto_celery.testing.webdav.WsgiDAVServer`: WebDAV hosts (MKCOL, PROPFIND).
- :class:`~resto_celery.testing.tahoe.TahoeGrid`: a local Tahoe-LAFS grid (``make tahoe``),
  and :class:`~resto_celery.testing.tahoe.TahoeDirectory`, one of its directories as a host.
- :func:`~resto_celery.testing.tls.make_test_certificates`: a throw-away CA for HTTPS tests
  (needs the ``trustme`` package, in the ``test`` extra).
"""
from .media_server import MediaServer, RequestRecord
from .nginx import NginxMediaServer, NginxNotFound, find_nginx
from .tahoe import TahoeDirectory, TahoeGrid, TahoeNotFound, find_tahoe
from .webdav import LighttpdNotFound, LighttpdWebDAVServer, WsgiDAVServer, find_lighttpd

__all__ = [
    "MediaServer", "RequestRecord", "NginxMediaServer", "NginxNotFound", "find_nginx",
    "LighttpdWebDAVServer", "LighttpdNotFound", "WsgiDAVServer", "find_lighttpd",
    "TahoeDirectory", "TahoeGrid", "TahoeNotFound", "find_tahoe",
]
