"""Exceptions raised by resto_celery.

This module imports nothing from Django or Celery, so the transport can use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class TransportError(OSError):
    """An HTTP operation on one media host did not succeed.

    Carries what an operator needs to act: the host (its configured name, never a URL
    with credentials), the HTTP method, the file name, the status code when the host
    answered, and a short reason. ``retryable`` tells whether trying again later can
    help (connection errors, timeouts, 5xx) or not (other 4xx, TLS failures).
    """

    retryable = False
    #: True when the request may have reached the host and may still be applied (a
    #: timeout or a connection cut after sending): its outcome is unknown.
    in_doubt = False

    def __init__(
        self, host: str | None, method: str, name: str, reason: str, status: int | None = None,
        in_doubt: bool | None = None,
    ) -> None:
        self.host = host
        self.method = method
        self.name = name
        self.reason = reason
        self.status = status
        if in_doubt is not None:
            self.in_doubt = in_doubt
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.method} {self.name} on {self.host} failed: {self.reason}"

    def without_host(self) -> str:
        """The message without the host, for a row or a page that names the host already."""
        return f"{self.method} {self.name} failed: {self.reason}"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps the exception picklable (Celery stores it in results).
        return (type(self), (self.host, self.method, self.name, self.reason, self.status, self.in_doubt))


class HostUnreachable(TransportError):
    """The host refused the connection, reset it, or could not be resolved."""

    retryable = True


class HostTimeout(TransportError):
    """The host did not accept the connection or answer within the timeout."""

    retryable = True


class HostShortCircuited(TransportError):
    """The host failed repeatedly: its circuit breaker is open, so it was not contacted.

    ``wait`` is how many seconds the breaker stays open.
    """

    retryable = True

    def __init__(
        self, host: str | None, method: str, name: str, reason: str, status: int | None = None,
        in_doubt: bool | None = None, wait: float = 0.0,
    ) -> None:
        self.wait = wait
        super().__init__(host, method, name, reason, status, in_doubt)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.host, self.method, self.name, self.reason, self.status, self.in_doubt, self.wait))


class TLSFailure(TransportError):
    """The TLS handshake failed, usually because the certificate could not be verified."""


class UnexpectedStatus(TransportError):
    """The host answered with a status code the operation does not accept."""

    @property
    def retryable(self) -> bool:  # type: ignore[override]
        return self.status is not None and (self.status >= 500 or self.status in (408, 429))


class MissingFile(UnexpectedStatus, FileNotFoundError):
    """The host answered 404 for a file that was expected to exist."""


class ReplicationError(OSError):
    """An operation failed on one or more media hosts.

    Raised by the synchronous backends when ``fatal_exceptions`` is on, after every host
    was tried and every failure logged. ``failures`` maps each failing host's name to the
    :class:`TransportError` (or other exception) it raised.
    """

    def __init__(self, operation: str, name: str, failures: Mapping[str, BaseException], total_hosts: int) -> None:
        self.operation = operation
        self.name = name
        self.failures = dict(failures)
        self.total_hosts = total_hosts
        details = "; ".join(f"{host}: {_reason(exc)}" for host, exc in self.failures.items())
        super().__init__(
            f"Failed to {operation} {name} on {len(self.failures)} of {total_hosts} "
            f"media host(s): {details}"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.operation, self.name, self.failures, self.total_hosts))


def _reason(exc: BaseException) -> str:
    return exc.reason if isinstance(exc, TransportError) else f"{type(exc).__name__}: {exc}"


class MasterError(OSError):
    """The master copy could not tell what a path should be: nothing is sent for it.

    ``location`` is the master's folder, ``path`` the storage name (``""`` for the whole
    master) and ``reason`` a short sentence for the log and the ``Replica`` row.
    """

    retryable = True

    def __init__(self, location: str, path: str, reason: str) -> None:
        self.location = location
        self.path = path
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.path} in the master copy {self.location}" if self.path else f"the master copy {self.location}"
        return f"{where}: {self.reason}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.location, self.path, self.reason))


class MasterUnavailable(MasterError):
    """The folder is not the site's master copy: its marker is missing, not the site's, or unreadable.

    An unmounted volume, a container started without it or a wrong ``MEDIA_ROOT`` all look
    like an empty master; deciding from it would delete every file on every host.
    """


class MasterReadError(MasterError):
    """One master file exists but could not be read (permissions, I/O error, stale NFS handle).

    Only "no such file, in a master that is there" means delete; this is a failure to retry.
    """
