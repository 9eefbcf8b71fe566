"""A real S3 API for tests: moto's server (``moto[server]``) on 127.0.0.1, with fault injection.

:class:`S3Server` serves moto's S3 over HTTP in this process (as moto's own
``ThreadedMotoServer`` does: werkzeug, one thread per request), so boto3 and
django-storages talk to it exactly as to a bucket anywhere, and Celery workers in other
processes reach it over the network. Between the client and moto sits a small WSGI layer
that can answer S3 errors (``fail_next(status=503)``, ``fail_next(status=403,
code="AccessDenied")``), answer late (``set_delay``), or take the server off the network
(``go_down``/``come_back``: moto's buckets stay, as a store's do across an outage), and
that records each request's method, path and checksum headers. Hand-written because moto
has no fault injection of its own; the S3 behaviour is all moto's.

:class:`S3Bucket` is one bucket on such a server as a media host (kind ``"storage"``,
django-storages' ``S3Storage``), with the helpers the other test hosts have (``files()``,
``seed``, ``read``...).

Needs the ``test`` extra (moto[server], django-storages[s3], boto3).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from ._support import free_port

DEFAULT_REGION = "us-east-1"
#: moto accepts any credentials; these are distinctive, so tests can look for leaks.
TEST_ACCESS_KEY = "AKIARESTOTESTKEY0001"
TEST_SECRET_KEY = "resto-test-secret/DO-NOT-LEAK+0123456789"

#: The reason phrase of each status an injected failure may have.
REASONS = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 500: "Internal Server Error",
           502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
#: The S3 error code an injected failure has, by status, unless one is given.
CODES = {400: "BadRequest", 403: "AccessDenied", 404: "NoSuchKey", 500: "InternalError", 502: "BadGateway",
         503: "SlowDown", 504: "GatewayTimeout"}


@dataclass
class S3Request:
    """One request the server received: method, path (``/bucket/key``), and the checksum
    headers it carried (``x-amz-checksum-*``, ``Content-MD5``)."""

    method: str
    path: str
    checksums: dict[str, str] = field(default_factory=dict)


class _Fault:
    def __init__(
        self, count: int | None, methods: set[str] | None, status: int | None = None, code: str | None = None,
        delay: float | None = None,
    ) -> None:
        self.remaining, self.methods = count, methods
        self.status, self.code, self.delay = status, code, delay

    def take(self, method: str) -> bool:
        if self.methods and method not in self.methods:
            return False
        if self.remaining is not None:
            if self.remaining <= 0:
                return False
            self.remaining -= 1
        return True


class S3Server:
    """moto's S3 on ``http://127.0.0.1:<port>``; see the module's documentation."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port or free_port()
        self.requests: list[S3Request] = []
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self._server: Any = None  # werkzeug's server while serving
        self._thread: threading.Thread | None = None
        self._app: Any = None  # moto's WSGI application

    def __repr__(self) -> str:
        return f"<S3Server {self.url}>"

    @property
    def url(self) -> str:
        """The endpoint URL (``endpoint_url`` of boto3 and S3Storage)."""
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> S3Server:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        class QuietHandler(MotoRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                pass

        if self._app is None:
            self._app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server(self.host, self.port, self._wsgi, threaded=True, request_handler=QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name=f"s3-{self.port}")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(10)
            self._server = self._thread = None

    def go_down(self) -> None:
        """Stop answering (connections are refused); the buckets and objects stay."""
        self.stop()

    def come_back(self) -> None:
        """Answer again, on the same port, with everything the buckets held."""
        if self._server is None:
            self.start()

    def fail_next(
        self, count: int = 1, status: int = 500, methods: str | Iterable[str] | None = None, code: str | None = None,
    ) -> None:
        """Answer the next ``count`` requests (of ``methods``, default all) with an S3 error:
        ``status`` and an XML body with ``code`` (by default the usual one for the status:
        ``InternalError``, ``SlowDown``, ``AccessDenied``...)."""
        with self._lock:
            code = code or CODES.get(status, "Error")
            self._faults.append(_Fault(count, _methods(methods), status=status, code=code))

    def set_delay(self, seconds: float, methods: str | Iterable[str] | None = None, count: int | None = None) -> None:
        """Answer requests (of ``methods``; the next ``count``, or all) ``seconds`` late."""
        with self._lock:
            self._faults.append(_Fault(count, _methods(methods), delay=seconds))

    def reset_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def client(self, access_key: str = TEST_ACCESS_KEY, secret_key: str = TEST_SECRET_KEY) -> Any:
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.url, region_name=DEFAULT_REGION,
            aws_access_key_id=access_key, aws_secret_access_key=secret_key,
        )

    def _take(self, method: str) -> tuple[float, _Fault | None]:
        delay: float = 0.0
        failure: _Fault | None = None
        with self._lock:
            for fault in list(self._faults):
                if fault.delay is not None and not delay and fault.take(method):
                    delay = fault.delay
                elif fault.status is not None and failure is None and fault.take(method):
                    failure = fault
                if fault.remaining is not None and fault.remaining <= 0:
                    self._faults.remove(fault)
        return delay, failure

    def _wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        checksums = {
            key[5:].lower().replace("_", "-"): value for key, value in environ.items()
            if key.startswith(("HTTP_X_AMZ_CHECKSUM", "HTTP_CONTENT_MD5"))
        }
        self.requests.append(S3Request(method, environ.get("PATH_INFO", ""), checksums))
        delay, failure = self._take(method)
        if delay:
            time.sleep(delay)
        if failure is None:
            return self._app(environ, start_response)
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if length:
            environ["wsgi.input"].read(length)  # read what was sent, as S3 does before it answers
        body = b"" if method == "HEAD" else (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{failure.code}</Code>'
            f"<Message>injected by the test</Message><RequestId>resto-test</RequestId></Error>"
        ).encode()
        start_response(
            f"{failure.status} {REASONS.get(cast(int, failure.status), 'Error')}",  # a failure has a status
            [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))],
        )
        return [body]


def _methods(methods: str | Iterable[str] | None) -> set[str] | None:
    if methods is None:
        return None
    return {methods.upper()} if isinstance(methods, str) else {m.upper() for m in methods}


class S3Bucket:
    """One bucket on an :class:`S3Server`, as a media host (``host_entry``).

    The entry is django-storages' ``S3Storage`` with the bucket, the endpoint and the test
    credentials in its options; ``name`` is the host's name (default ``s3-<bucket>``).
    ``options`` adds to (or overrides) the storage's options.
    """

    def __init__(
        self, server: S3Server, bucket: str | None = None, *, name: str | None = None,
        options: Mapping[str, Any] | None = None, entry: Mapping[str, Any] | None = None,
    ) -> None:
        self.server = server
        self.bucket = bucket or f"resto-{uuid.uuid4().hex[:12]}"
        self.name = name or f"s3-{self.bucket}"
        self.options: dict[str, Any] = {
            "bucket_name": self.bucket, "endpoint_url": server.url, "region_name": DEFAULT_REGION,
            "access_key": TEST_ACCESS_KEY, "secret_key": TEST_SECRET_KEY, "querystring_auth": False,
            **(options or {}),
        }
        self.extra_entry = dict(entry or {})
        self.client = server.client()
        self.client.create_bucket(Bucket=self.bucket)

    def __repr__(self) -> str:
        return f"<S3Bucket {self.name}>"

    @property
    def host_entry(self) -> dict[str, Any]:
        """The ``RESTO_MEDIA_HOSTS`` entry of this bucket (kind ``"storage"``)."""
        return {
            "kind": "storage", "name": self.name, "storage": "storages.backends.s3.S3Storage",
            "options": dict(self.options), **self.extra_entry,
        }

    @property
    def url(self) -> str:
        """The bucket's public address (path style)."""
        return f"{self.server.url}/{self.bucket}/"

    def _key(self, name: str) -> str:
        location = (self.options.get("location") or "").strip("/")
        return f"{location}/{name}" if location else name

    def files(self) -> dict[str, bytes]:
        """``{name: bytes}`` of every object in the bucket (under the storage's ``location``)."""
        location = (self.options.get("location") or "").strip("/")
        prefix = f"{location}/" if location else ""
        found: dict[str, bytes] = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for entry in page.get("Contents", ()):
                found[entry["Key"][len(prefix):]] = self.client.get_object(
                    Bucket=self.bucket, Key=entry["Key"]
                )["Body"].read()
        return found

    def read(self, name: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()

    def head(self, name: str) -> dict[str, Any]:
        return self.client.head_object(Bucket=self.bucket, Key=self._key(name), ChecksumMode="ENABLED")

    def has(self, name: str) -> bool:
        return name in self.files()

    def seed(self, name: str, data: bytes) -> None:
        """Put an object behind resto_celery's back."""
        self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)

    def remove(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(name))

    def corrupt(self, name: str, offset: int = 0) -> None:
        """Flip the bits of one byte of ``name`` in place: same size, same date. What the store
        then tells of the object (its ETag) is what S3's would be: the MD5 of the bytes it holds
        (moto's own in-process state is changed; no request is made)."""
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        key = s3_backends[DEFAULT_ACCOUNT_ID]["aws"].buckets[self.bucket].keys[self._key(name)]
        data = bytearray(key.value)
        data[offset] ^= 0xFF
        modified = key.last_modified
        key.value = bytes(data)
        key._etag = None  # moto caches the MD5 of the bytes; S3's ETag always is that MD5
        key.last_modified = modified

    # The fault injection and outages of the server
    def go_down(self) -> None:
        self.server.go_down()

    def come_back(self) -> None:
        self.server.come_back()

    def fail_next(
        self, count: int = 1, status: int = 500, methods: str | Iterable[str] | None = None, code: str | None = None,
    ) -> None:
        self.server.fail_next(count=count, status=status, methods=methods, code=code)

    def set_delay(self, seconds: float, methods: str | Iterable[str] | None = None, count: int | None = None) -> None:
        self.server.set_delay(seconds, methods=methods, count=count)

    def reset_faults(self) -> None:
        self.server.reset_faults()

