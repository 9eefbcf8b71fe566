"""HTTPS to nginx with a CA made by the test: verification on, and a clear failure with a wrong CA."""
import os

import pytest
from django.core.files.base import ContentFile

from resto_celery.exceptions import ReplicationError, TLSFailure
from resto_celery.storage import HybridStorage
from resto_celery.testing.tls import make_test_certificates
from resto_celery.transport import HostTransport

pytestmark = pytest.mark.nginx


@pytest.fixture
def certificates(tmp_path):
    return make_test_certificates(tmp_path / "pki")


@pytest.fixture
def wrong_ca(tmp_path):
    return make_test_certificates(tmp_path / "other-pki").ca_cert


@pytest.fixture
def https_host(make_nginx, certificates):
    return make_nginx(tls=(certificates.cert, certificates.key))


def test_transport_verifies_the_host_with_the_configured_ca(https_host, certificates, tmp_path):
    transport = HostTransport(https_host.url, verify=str(certificates.ca_cert))
    source = tmp_path / "f.txt"
    source.write_bytes(b"over tls")
    with source.open("rb") as f:
        assert transport.put("f.txt", f) == 201
    assert transport.size("f.txt") == 8
    assert https_host.files() == {"f.txt": b"over tls"}


def test_storage_replicates_over_https_with_the_ca_bundle_option(https_host, certificates, media_root):
    storage = HybridStorage(hosts=[https_host.url], ca_bundle=str(certificates.ca_cert))
    storage.save("doc.txt", ContentFile(b"secret document"))
    assert https_host.files() == {"doc.txt": b"secret document"}


def test_a_large_file_in_memory_reaches_an_https_host_whole_as_the_master_writes_it(
    https_host, certificates, media_root,
):
    """TLS has no sendfile(): the master's blocks are read and sent as they are written."""
    data = os.urandom(3 * 1024 * 1024 + 1)
    storage = HybridStorage(hosts=[https_host.url], ca_bundle=str(certificates.ca_cert))
    storage.save("large.bin", ContentFile(data))
    assert https_host.files() == {"large.bin": data}


def test_a_wrong_ca_fails_clearly_and_sends_nothing(https_host, wrong_ca):
    transport = HostTransport(https_host.url, name="media-tls", verify=str(wrong_ca))
    with pytest.raises(TLSFailure, match="certificate verify failed") as raised:
        transport.exists("f.txt")
    assert not raised.value.retryable
    assert str(raised.value).startswith("HEAD f.txt on media-tls failed: TLS error: certificate verify failed")


def test_the_system_ca_store_does_not_trust_a_self_signed_host(https_host, media_root):
    storage = HybridStorage(hosts=[https_host.url])
    with pytest.raises(ReplicationError) as raised:
        storage.save("doc.txt", ContentFile(b"x"))
    [error] = raised.value.failures.values()
    assert isinstance(error, TLSFailure)
    assert https_host.files() == {}


def test_a_per_host_ca_bundle_overrides_the_global_one(https_host, certificates, wrong_ca, media_root):
    storage = HybridStorage(
        hosts=[{"url": https_host.url, "ca_bundle": str(certificates.ca_cert)}], ca_bundle=str(wrong_ca)
    )
    storage.save("doc.txt", ContentFile(b"ok"))
    assert https_host.files() == {"doc.txt": b"ok"}
