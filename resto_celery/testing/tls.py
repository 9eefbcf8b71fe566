"""A throw-away certificate authority for HTTPS tests (needs the ``trustme`` package).

::

    certs = make_test_certificates(tmp_path)
    server = NginxMediaServer(root, tls=(certs.cert, certs.key))
    requests.get(server.url, verify=certs.ca_cert)

`trustme <https://trustme.readthedocs.io/>`_ makes the certificates; this module only
writes them where nginx, lighttpd and ``requests`` read PEM files.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import trustme

__all__ = ["CertificateFiles", "make_test_certificates"]


@dataclass(frozen=True)
class CertificateFiles:
    """PEM files: the CA certificate (for clients to trust), the server certificate and its key."""

    ca_cert: Path
    cert: Path
    key: Path


def make_test_certificates(
    folder: str | os.PathLike[str],
    *,
    hostnames: Iterable[str] = ("localhost",),
    ip_addresses: Iterable[str] = ("127.0.0.1",),
) -> CertificateFiles:
    """Create a new CA and a server certificate it signs for ``hostnames`` and ``ip_addresses``.

    Writes ``ca.pem``, ``server.pem`` and ``server-key.pem`` (unencrypted, mode 0600) in
    ``folder`` (created if needed). Keys are EC P-256; the server certificate is valid from
    a day ago to 30 days from now. Each call makes a distinct CA, so two calls give
    certificates that do not trust each other.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hostnames, ip_addresses = list(hostnames), list(ip_addresses)
    now = datetime.datetime.now(datetime.timezone.utc)

    ca = trustme.CA(organization_name="resto_celery tests", key_type=trustme.KeyType.ECDSA)
    server = ca.issue_cert(
        *hostnames, *ip_addresses,  # trustme tells IP addresses from host names itself
        common_name=(hostnames + ip_addresses or ["resto_celery test server"])[0],
        organization_name="resto_celery tests",
        not_before=now - datetime.timedelta(days=1),
        not_after=now + datetime.timedelta(days=30),
        key_type=trustme.KeyType.ECDSA,
    )

    files = CertificateFiles(folder / "ca.pem", folder / "server.pem", folder / "server-key.pem")
    ca.cert_pem.write_to_path(files.ca_cert)
    files.cert.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    server.private_key_pem.write_to_path(files.key)
    files.key.chmod(0o600)
    return files
