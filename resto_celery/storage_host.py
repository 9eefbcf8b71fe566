"""Any Django storage as a media host: an S3 bucket through django-storages, or any other.

A host entry of kind ``"storage"`` names a storage class and its options, or a
``STORAGES`` alias (see :func:`resto_celery.conf.parse_host`). :class:`StorageTransport`
gives that storage the interface of every other media host, so leases, fingerprints,
the breaker, retries, ``Replica`` rows, reconcile and ``resto_resync`` work unchanged:

- **PUT** is ``storage.save()`` of the master's current bytes, streamed from the open
  master file, under the exact name. The storage must overwrite (django-storages'
  ``file_overwrite``, the default, or ``FileSystemStorage(allow_overwrite=True)``); one
  that renames instead is refused when the settings are read, and a rename seen at run
  time is undone and reported as a final failure.
- **DELETE** is ``storage.delete()``; a missing file is no error (Django's contract).
- **Reads** (``head``, listings, downloads) use the storage's public API, or for
  django-storages' ``S3Storage`` its boto3 client: one ``HEAD`` or one listing page per
  thousand objects gives sizes, dates and ETags, and downloads stream.

S3 specifics (any ``S3Storage`` subclass, any S3-compatible endpoint):

- Each upload carries a CRC32 of the master's bytes (``ChecksumCRC32``, computed from the
  master file before the upload), which S3 checks before it stores the object (a
  corrupted transfer is refused with ``BadDigest``) and keeps as the object's
  full-object checksum. ``"checksum": False`` in the host entry leaves that out, for
  S3-compatible stores that reject such headers.
- :meth:`StorageTransport.digests` tells what the bucket vouches for without a download
  (``resto_resync --verify``): the ETag, which is the MD5 of the bytes for single-part
  uploads (not under SSE-KMS or SSE-C) and the MD5 of the parts' MD5s for multipart ones,
  and a stored full-object checksum.
- The client's own timeouts are the host's ``timeout``, and its own retries are off:
  retries, backoff and the breaker are resto_celery's, as for every host.
- Errors map as HTTP's do: a 5xx, ``SlowDown``, ``RequestTimeout``, a connection error or
  a timeout is retryable; an access denied (``AccessDenied``, ``InvalidAccessKeyId``,
  ``SignatureDoesNotMatch``...), a missing bucket or any other 4xx is final and says so.

Credentials live in the storage's options only: errors name the host by its ``name``,
never by its options, and a filter keeps the access key out of botocore's debug log lines.
Like :mod:`resto_celery.transport` it knows nothing of Celery or of resto_celery's models.
"""

from __future__ import annotations

import base64
import logging
import re
import threading
import zlib
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import IO, TYPE_CHECKING, Any, cast
from urllib.parse import quote

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, SuspiciousOperation
from django.core.files import File
from django.core.files.storage import FileSystemStorage, Storage
from django.utils.module_loading import import_string

from .exceptions import HostTimeout, HostUnreachable, MissingFile, TransportError, UnexpectedStatus
from .transport import CHUNK_SIZE, Listing, RedactingFilter, RemoteFile, Timeout, Transport, check_name

if TYPE_CHECKING:
    from .conf import MediaHost

try:  # the "s3" extra: boto3 and django-storages
    from boto3.exceptions import S3UploadFailedError
    from boto3.s3.transfer import TransferConfig
    from botocore import exceptions as boto_errors
    from botocore.config import Config as BotoConfig
    from s3transfer.utils import ChunksizeAdjuster
except ImportError:  # pragma: no cover - without the extra, only non-S3 storages can be hosts
    boto_errors = BotoConfig = ChunksizeAdjuster = S3UploadFailedError = TransferConfig = None

logger = logging.getLogger(__name__)

#: S3 error codes that mean "your credentials may not do this": final, and the reason says so.
ACCESS_DENIED = frozenset({
    "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccountProblem",
    "InvalidToken", "ExpiredToken", "TokenRefreshRequired", "InvalidSecurity", "Forbidden",
})
#: S3 error codes worth trying again whatever their status (``RequestTimeout`` is a 400).
RETRYABLE_CODES = frozenset({
    "RequestTimeout", "SlowDown", "InternalError", "ServiceUnavailable", "Throttling", "ThrottlingException",
    "RequestLimitExceeded", "OperationAborted", "RequestTimeTooSkewed",
})
MISSING_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
#: Encryptions under which an S3 ETag is not the MD5 of the bytes.
OPAQUE_ETAG_ENCRYPTION = frozenset({"aws:kms", "aws:kms:dsse"})
PLAIN_ETAG = re.compile(r'^"?([0-9a-fA-F]{32})"?$')
MULTIPART_ETAG = re.compile(r'^"?([0-9a-fA-F]{32})-(\d+)"?$')
#: Full-object checksums S3 may keep, and the name :meth:`StorageTransport.digests` gives them.
S3_CHECKSUMS = {"ChecksumCRC32": "crc32", "ChecksumSHA1": "sha1", "ChecksumSHA256": "sha256"}


class StorageUnavailable(UnexpectedStatus):
    """The storage answered with an error worth trying again (``SlowDown``, ``RequestTimeout``...)."""

    retryable = True


def build_storage(host: MediaHost) -> Storage:
    """A new instance of the storage a ``"storage"`` host entry names (its class and
    options, or its ``STORAGES`` alias).

    Raises :class:`~django.core.exceptions.ImproperlyConfigured`, naming the host and never
    an option's value, for a class that cannot be imported or is not a storage, options it
    refuses, an unknown alias, or a storage that renames files instead of overwriting them.
    """
    backend, options = _class_and_options(host)
    if not isinstance(backend, str) or backend.startswith("resto_celery."):
        raise ImproperlyConfigured(
            f"Media host {host.name}: a resto_celery storage cannot be another one's media host; name the storage "
            f"that holds the files (e.g. 'storages.backends.s3.S3Storage')."
        )
    try:
        storage_class = import_string(backend)
    except ImportError as error:
        hint = " (pip install 'resto-celery[s3]' for S3)" if backend.startswith("storages.") else ""
        raise ImproperlyConfigured(f"Media host {host.name}: cannot import {backend!r}{hint}: {error}") from None
    if not (isinstance(storage_class, type) and issubclass(storage_class, Storage)):
        raise ImproperlyConfigured(f"Media host {host.name}: {backend!r} is not a Django storage class.")
    if _is_s3_class(storage_class):
        storage_class = type(storage_class.__name__, (_ChecksummedUploads, storage_class), {})
    try:
        storage = storage_class(**options)
    except ImproperlyConfigured as error:  # django-storages names the option, never its value
        raise ImproperlyConfigured(f"Media host {host.name}: {error}") from None
    except TypeError as error:  # "got an unexpected keyword argument 'x'": names only
        raise ImproperlyConfigured(
            f"Media host {host.name}: {storage_class.__name__} refused its options: {error}"
        ) from None
    if not _overwrites(storage):
        raise ImproperlyConfigured(
            f"Media host {host.name}: {storage_class.__name__} gives a saved file another name when one exists "
            f"(get_available_name); a media host must overwrite: set file_overwrite=True (django-storages; "
            f"overwrite_files=True for Azure) or allow_overwrite=True (FileSystemStorage)."
        )
    return storage


def _class_and_options(host: MediaHost) -> tuple[Any, dict[str, Any]]:
    """The dotted path of the storage class of ``host`` and its options (from STORAGES for an alias)."""
    if host.alias is None:
        return host.storage, host.storage_options
    entries = getattr(settings, "STORAGES", {}) or {}
    if host.alias not in entries:
        raise ImproperlyConfigured(f"Media host {host.name}: STORAGES has no alias {host.alias!r}.")
    return entries[host.alias].get("BACKEND", ""), entries[host.alias].get("OPTIONS", {}) or {}


def _is_s3_class(storage_class: type) -> bool:
    """Whether ``storage_class`` is django-storages' S3Storage (or a subclass)."""
    return any(
        klass.__module__ == "storages.backends.s3" and klass.__name__ == "S3Storage" for klass in storage_class.__mro__
    )


def _overwrites(storage: Storage) -> bool:
    if getattr(storage, "file_overwrite", True) is False:  # django-storages: S3, Google Cloud, SFTP...
        return False
    if getattr(storage, "overwrite_files", True) is False:  # django-storages: Azure
        return False
    if isinstance(storage, FileSystemStorage):
        return bool(getattr(storage, "_allow_overwrite", False))  # Django 5.1+; older ones always rename
    return True


class _ChecksummedUploads:
    """S3Storage whose uploads carry the extra parameters :class:`StorageTransport` sets for
    the upload running in this thread (``get_object_parameters`` is django-storages' hook
    for per-object parameters)."""

    _upload_parameters = threading.local()

    def get_object_parameters(self, name: str) -> dict[str, Any]:
        parameters = super().get_object_parameters(name)  # type: ignore[misc]  # a mixin of S3Storage
        parameters.update(getattr(self._upload_parameters, "extra", None) or {})
        return parameters


class StorageTransport(Transport):
    """The media host operations on a Django storage; see the module's documentation.

    ``host`` is the :class:`~resto_celery.conf.MediaHost` (kind ``"storage"``); ``timeout``
    bounds connecting and each read of an S3 client. May be shared between threads, as the
    storage may (django-storages' S3Storage keeps a client per thread).
    """

    can_list = True

    def __init__(self, host: MediaHost, *, timeout: Timeout = 2) -> None:
        self.name = host.name
        self.timeout = timeout
        self.public_url = host.public_url
        self.checksum = host.checksum
        # Any storage; S3Storage's own attributes (client_config, bucket_name...) are used when s3.
        self.storage: Any = cast(Any, build_storage(host))
        self.s3 = _is_s3_class(type(self.storage))
        if self.s3:
            timeouts = BotoConfig(
                connect_timeout=timeout, read_timeout=timeout, retries={"total_max_attempts": 1},
            )
            self.storage.client_config = self.storage.client_config.merge(timeouts)
            options = _class_and_options(host)[1]
            if "transfer_config" not in options and not getattr(settings, "AWS_S3_TRANSFER_CONFIG", None):
                # The worker's concurrency is the parallelism: each upload runs in its own thread
                # (parts one after the other, one in memory), not on a thread pool of its own.
                self.storage.transfer_config = TransferConfig(use_threads=False)

    # Writing

    def put(self, name: str, fileobj: IO[bytes], length: int | None = None) -> int:
        """``storage.save()`` of ``fileobj`` (from its start) under exactly ``name``.

        ``length`` is not needed (the storage reads to the end: S3 finds the size by seeking).
        S3: with a CRC32 of the bytes that the store checks (unless ``checksum`` is off).
        Returns 201, as a PUT of a file would (the store does not say whether it replaced one).
        """
        check_name(name)
        extra: dict[str, str] = {}
        if self.s3 and self.checksum:
            extra["ChecksumCRC32"] = _crc32_base64(fileobj)
        content = File(fileobj, name=name)
        if self.s3:
            self.storage._upload_parameters.extra = extra
        try:
            saved = self.storage.save(name, content)
        except Exception as error:  # noqa: BLE001 - translated to a retryable or a final failure
            raise self._translate(error, "PUT", name) from None
        finally:
            if self.s3:
                self.storage._upload_parameters.extra = None
        if saved != name:
            self._delete_quietly(saved)
            raise UnexpectedStatus(
                self.name, "PUT", name,
                f"the storage saved it as {saved!r} instead of overwriting (set file_overwrite or allow_overwrite)",
            )
        return 201

    def delete(self, name: str) -> bool:
        """``storage.delete()``: a missing file is no error. Returns True."""
        check_name(name)
        try:
            self.storage.delete(name)
        except Exception as error:  # noqa: BLE001 - translated
            raise self._translate(error, "DELETE", name) from None
        return True

    def _delete_quietly(self, name: str) -> None:
        try:
            self.storage.delete(name)
        except Exception as error:  # noqa: BLE001 - the rename is the failure reported
            logger.warning("Could not remove %s from %s after the storage renamed a file: %s", name, self.name, error)

    # Reading

    def head(self, name: str) -> RemoteFile | None:
        """A :class:`~resto_celery.transport.RemoteFile` for ``name``, or None if absent."""
        check_name(name)
        try:
            if self.s3:
                answer = self._client().head_object(Bucket=self.storage.bucket_name, Key=self._key(name),
                                                    ChecksumMode="ENABLED")
                return RemoteFile(
                    size=answer.get("ContentLength"), modified=answer.get("LastModified"), etag=answer.get("ETag"),
                    digests=tuple(sorted(_head_digests(answer).items())),
                )
            if not self.storage.exists(name):
                return None
            return RemoteFile(size=self.storage.size(name), modified=self._modified(name), etag=None)
        except Exception as error:  # noqa: BLE001 - translated
            translated = self._translate(error, "HEAD", name)
            if isinstance(translated, MissingFile):
                return None
            raise translated from None

    def download(self, name: str, fileobj: IO[bytes]) -> int:
        """Write the bytes of ``name`` into ``fileobj`` in chunks; return the byte count."""
        check_name(name)
        written = 0
        try:
            if self.s3:
                body = self._client().get_object(Bucket=self.storage.bucket_name, Key=self._key(name))["Body"]
                with body:
                    for chunk in body.iter_chunks(CHUNK_SIZE):
                        fileobj.write(chunk)
                        written += len(chunk)
                return written
            with self.storage.open(name, "rb") as source:
                for chunk in source.chunks(CHUNK_SIZE):
                    fileobj.write(chunk)
                    written += len(chunk)
            return written
        except Exception as error:  # noqa: BLE001 - translated
            raise self._translate(error, "GET", name) from None

    def list_directory(self, path: str = "") -> Listing:
        """``(directories, files)`` directly in ``path``: names, and names to :class:`RemoteFile`.

        A folder that does not exist is empty (object stores have no folders of their own).
        """
        try:
            if self.s3:
                return self._s3_listing(path, delimiter=True)
            directories, names = self.storage.listdir(path)
            prefix = f"{path}/" if path else ""
            files = {
                name: RemoteFile(self.storage.size(prefix + name), self._modified(prefix + name), None)
                for name in names
            }
            return sorted(directories), files
        except FileNotFoundError:
            return [], {}
        except Exception as error:  # noqa: BLE001 - translated
            translated = self._translate(error, "LIST", path or "/")
            if isinstance(translated, MissingFile):
                return [], {}
            raise translated from None

    def walk(self) -> Iterator[tuple[str, RemoteFile]]:
        """Every file, from one flat listing of the bucket (S3: a request per thousand objects)."""
        if not self.s3:
            yield from super().walk()
            return
        try:
            files = self._s3_listing("", delimiter=False)[1]
        except Exception as error:  # noqa: BLE001 - translated
            raise self._translate(error, "LIST", "/") from None
        yield from sorted(files.items())

    #: :func:`resto_celery.resync.make_plan` lists the host with :meth:`walk` at once
    #: instead of folder by folder (an S3 bucket's flat listing is far cheaper).
    @property
    def lists_flat(self) -> bool:
        return self.s3

    def digests(self, name: str, remote: RemoteFile | None = None) -> dict[str, str]:
        """What the store vouches for about ``name``'s bytes, without a download.

        From ``remote`` (a listing's entry, or :meth:`head`): its ETag when it is an MD5 (a
        single-part upload) or an MD5 of part MD5s whose part size is this storage's (its
        ``transfer_config``, as s3transfer adjusts it); with ``remote`` None, or when the
        ETag says nothing, a ``HEAD`` adds the stored full-object checksums and leaves the
        ETag out where encryption makes it opaque (SSE-KMS, SSE-C).
        """
        if not self.s3:
            return {}
        if remote is not None and remote.digests:
            return dict(remote.digests)  # a HEAD's answer
        if remote is not None:
            found = _etag_digests(remote.etag, remote.size, self._part_size(remote.size))
            if found:
                return found
        remote = self.head(name)
        if remote is None:
            raise MissingFile(self.name, "HEAD", name, "404 Not Found", 404)
        return dict(remote.digests)

    # Links

    def public_link(self, name: str) -> str:
        """The URL of ``name`` for a browser: the host's ``public_url`` (the bucket's or a CDN's
        public address) + name, else the storage's own ``url()`` (S3: a signed URL, or its
        ``custom_domain``)."""
        check_name(name)
        if self.public_url:
            return self.public_url + quote(name, safe="/")
        return self.storage.url(name)

    url = public_link

    def close(self) -> None:
        """Nothing to close: the storage keeps its own connections."""

    # S3 internals

    def _client(self) -> Any:
        return self.storage.connection.meta.client

    def _key(self, name: str) -> str:
        try:
            return self.storage._normalize_name(name)
        except SuspiciousOperation as error:
            raise ValueError(f"Refusing unsafe file name {name!r}.") from error

    def _root(self) -> str:
        location = (self.storage.location or "").strip("/")
        return f"{location}/" if location else ""

    def _s3_listing(self, path: str, *, delimiter: bool) -> Listing:
        root = self._root()
        prefix = root + (f"{path.strip('/')}/" if path else "")
        arguments: dict[str, str] = {"Bucket": self.storage.bucket_name, "Prefix": prefix}
        if delimiter:
            arguments["Delimiter"] = "/"
        directories: list[str] = []
        files: dict[str, RemoteFile] = {}
        for page in self._client().get_paginator("list_objects_v2").paginate(**arguments):
            for common in page.get("CommonPrefixes", ()):
                directories.append(common["Prefix"][len(prefix):].rstrip("/"))
            for entry in page.get("Contents", ()):
                key = entry["Key"][len(prefix):]
                if not key or key.endswith("/"):
                    continue  # a folder marker, not a file
                files[key] = RemoteFile(entry.get("Size"), entry.get("LastModified"), entry.get("ETag"))
        return sorted(directories), files

    def _part_size(self, size: int | None) -> int | None:
        config = getattr(self.storage, "transfer_config", None)
        if size is None or config is None or size < config.multipart_threshold:
            return None
        return ChunksizeAdjuster().adjust_chunksize(config.multipart_chunksize, size)

    def _modified(self, name: str) -> datetime | None:
        try:
            return self.storage.get_modified_time(name)
        except NotImplementedError:
            return None

    # Errors

    def _translate(self, error: BaseException, method: str, name: str) -> TransportError:
        """A :class:`~resto_celery.exceptions.TransportError` for anything the storage raised."""
        if isinstance(error, TransportError):
            return error
        if S3UploadFailedError is not None and isinstance(error, S3UploadFailedError):
            inner = error.__cause__ or error.__context__
            if inner is not None and not isinstance(inner, S3UploadFailedError):
                return self._translate(inner, method, name)
            return UnexpectedStatus(self.name, method, name, _redact(str(error)))
        if boto_errors is not None and isinstance(error, boto_errors.ClientError):
            return self._client_error(error, method, name)
        if boto_errors is not None and isinstance(error, boto_errors.BotoCoreError):
            return self._connection_error(error, method, name)
        if isinstance(error, FileNotFoundError):
            return MissingFile(self.name, method, name, "404 Not Found", 404)
        if isinstance(error, PermissionError):
            return UnexpectedStatus(self.name, method, name, f"access denied: {error.strerror or error}")
        if isinstance(error, OSError):
            return HostUnreachable(self.name, method, name, f"{type(error).__name__}: {error.strerror or error}",
                                   in_doubt=True)
        return UnexpectedStatus(self.name, method, name, _redact(f"{type(error).__name__}: {error}"))

    def _client_error(self, error: Exception, method: str, name: str) -> TransportError:
        answer = getattr(error, "response", None) or {}
        status = (answer.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        code = str((answer.get("Error") or {}).get("Code") or "")
        message = str((answer.get("Error") or {}).get("Message") or "")
        if code == str(status):  # a HEAD's error has no body: botocore takes the status for the code
            code = ""
        words = (str(status or ""), code, message and f"({message})")
        reason = _redact(" ".join(word for word in words if word))
        if code in ACCESS_DENIED or status == 403:
            return UnexpectedStatus(
                self.name, method, name,
                f"{reason}: access denied; check the storage's credentials and the bucket's policy", status or 403,
            )
        if code == "NoSuchBucket":
            return UnexpectedStatus(self.name, method, name, f"{reason}: the bucket does not exist", status or 404)
        if code in MISSING_CODES or (status == 404 and method in ("HEAD", "GET")):
            return MissingFile(self.name, method, name, reason or "404 Not Found", 404)
        if code in RETRYABLE_CODES:
            return StorageUnavailable(self.name, method, name, reason, status)
        return UnexpectedStatus(self.name, method, name, reason or "the store refused the request", status)

    def _connection_error(self, error: Exception, method: str, name: str) -> TransportError:
        reason = _redact(f"{type(error).__name__}: {error}")
        if isinstance(error, boto_errors.ConnectTimeoutError):
            return HostTimeout(self.name, method, name, f"timed out connecting (timeout {self.timeout}s)",
                               in_doubt=False)
        if isinstance(error, boto_errors.ReadTimeoutError):
            return HostTimeout(self.name, method, name,
                               f"timed out waiting for an answer (timeout {self.timeout}s)", in_doubt=True)
        if isinstance(error, boto_errors.EndpointConnectionError):
            return HostUnreachable(self.name, method, name, f"connection failed: {reason}", in_doubt=False)
        if isinstance(error, (boto_errors.ConnectionError, boto_errors.HTTPClientError,
                              boto_errors.ResponseStreamingError, boto_errors.IncompleteReadError)):
            return HostUnreachable(self.name, method, name, f"connection failed: {reason}", in_doubt=True)
        # Missing credentials, parameters the client refuses...: trying again will not help.
        return UnexpectedStatus(self.name, method, name, reason)


def _crc32_base64(fileobj: IO[bytes]) -> str:
    """The CRC32 of ``fileobj`` from its current position to its end, as S3 writes it
    (base64 of the big-endian value); the position is put back."""
    start = fileobj.tell()
    value = 0
    try:
        for chunk in iter(lambda: fileobj.read(CHUNK_SIZE * 4), b""):
            value = zlib.crc32(chunk, value)
    finally:
        fileobj.seek(start)
    return base64.b64encode(value.to_bytes(4, "big")).decode()


def _etag_digests(etag: str | None, size: int | None, part_size: int | None) -> dict[str, str]:
    """The MD5 an S3 ETag stands for: ``{"md5": hex}`` (single part), ``{"md5-parts/<part
    size>": "hex-N"}`` (multipart, when ``N`` parts of ``part_size`` make ``size``), or ``{}``."""
    if not etag:
        return {}
    plain = PLAIN_ETAG.match(etag)
    if plain:
        return {"md5": plain.group(1).lower()}
    parts = MULTIPART_ETAG.match(etag)
    if parts and part_size and size is not None and int(parts.group(2)) == max(1, -(-size // part_size)):
        return {f"md5-parts/{part_size}": f"{parts.group(1).lower()}-{parts.group(2)}"}
    return {}


def _head_digests(answer: Mapping[str, Any]) -> dict[str, str]:
    """The digests a ``HEAD`` (with ``ChecksumMode``) shows: full-object checksums, and the
    ETag's MD5 unless encryption makes it opaque."""
    found: dict[str, str] = {}
    if answer.get("ServerSideEncryption") not in OPAQUE_ETAG_ENCRYPTION and not answer.get("SSECustomerAlgorithm"):
        found.update(_etag_digests(answer.get("ETag"), None, None))
    if answer.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
        for field, algorithm in S3_CHECKSUMS.items():
            value = answer.get(field)
            if value and "-" not in value:
                try:
                    found[algorithm] = base64.b64decode(value).hex()
                except ValueError:
                    continue
    return found


_USER_INFO = re.compile(r"(://)[^/@\s]*@")
_ACCESS_KEY = re.compile(r"(Credential=|X-Amz-Credential=|AWSAccessKeyId=)[^/&\s,'\"]+")


def _redact(text: str) -> str:
    """``text`` with a URL's user info and an access key id (in a signature) replaced."""
    return _ACCESS_KEY.sub(r"\1***", _USER_INFO.sub(r"\1***@", text))


# Access key ids stay out of botocore's DEBUG lines (signed headers, presigned URLs).
for _logger in ("botocore.endpoint", "botocore.auth", "botocore.hooks", "botocore.httpsession", "botocore.parsers",
                "botocore.retryhandler", "urllib3.connectionpool"):
    logging.getLogger(_logger).addFilter(RedactingFilter(_redact))
