"""The signals a site hears when a change has arrived: once per host, once everywhere (issue 18)."""
import pytest
from django.core.files.base import ContentFile

from resto_celery.tasks import reconcile
from tests.site import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def _heard(site, kind, action, name):
    return sorted(host for k, host, n, a in site.signals() if (k, a, n) == (kind, action, name))


def test_an_upload_is_announced_once_per_host_and_once_everywhere(make_site):
    site = make_site(host_count=2)
    site.start_worker()
    site.storage.save("a.txt", ContentFile(b"hello"))
    wait_until(lambda: _heard(site, "everywhere", "upload", "a.txt"), message="the everywhere signal")
    assert _heard(site, "host", "upload", "a.txt") == sorted(host.url for host in site.hosts)
    assert _heard(site, "everywhere", "upload", "a.txt") == ["*"]


def test_the_everywhere_signal_comes_after_every_hosts_signal(make_site):
    site = make_site(host_count=3)
    site.start_worker()
    site.storage.save("a.txt", ContentFile(b"hello"))  # one message: one task sends to the three hosts
    wait_until(lambda: _heard(site, "everywhere", "upload", "a.txt"), message="the everywhere signal")
    kinds = [kind for kind, _, name, action in site.signals() if (name, action) == ("a.txt", "upload")]
    assert kinds == ["host", "host", "host", "everywhere"]


def test_duplicates_skips_and_reconciles_announce_nothing_again(make_site):
    site = make_site(host_count=2)
    site.start_worker()
    site.storage.save("a.txt", ContentFile(b"hello"))
    wait_until(lambda: _heard(site, "everywhere", "upload", "a.txt"), message="the signals of the save")
    heard = site.signals()
    for host in site.hosts:
        site.storage.enqueue("upload", host.url, "a.txt")  # a duplicate: the fingerprint matches
    reconcile.apply_async(queue=site.queue)
    wait_until(site.drained, message="the queue to drain")
    assert site.signals() == heard


def test_a_change_retried_after_a_failure_is_announced_once_when_it_arrives(make_site):
    site = make_site(host_count=2)
    flaky = site.hosts[1]
    flaky.fail_next(count=2, status=503)
    site.start_worker()
    site.storage.save("a.txt", ContentFile(b"hello"))
    wait_until(lambda: _heard(site, "everywhere", "upload", "a.txt"), message="the everywhere signal")
    site.wait_until_drained_and_converged()
    assert _heard(site, "host", "upload", "a.txt") == sorted(host.url for host in site.hosts)
    assert _heard(site, "everywhere", "upload", "a.txt") == ["*"]
    assert "Will retry to upload a.txt" in site.logs()


def test_a_delete_is_announced_per_host_and_everywhere(make_site):
    site = make_site(host_count=2)
    site.start_worker()
    site.storage.save("a.txt", ContentFile(b"hello"))
    wait_until(lambda: _heard(site, "everywhere", "upload", "a.txt"), message="the upload")
    site.storage.delete("a.txt")
    wait_until(lambda: _heard(site, "everywhere", "delete", "a.txt"), message="the everywhere delete signal")
    assert _heard(site, "host", "delete", "a.txt") == sorted(host.url for host in site.hosts)


def test_an_overwrite_is_announced_for_the_new_version(make_site):
    site = make_site(host_count=1)
    site.start_worker()
    site.storage.save("a.txt", ContentFile(b"one"))
    wait_until(lambda: _heard(site, "everywhere", "upload", "a.txt"), message="the first version")
    site.storage.delete("a.txt")
    site.storage.save("a.txt", ContentFile(b"two"))
    wait_until(lambda: len(_heard(site, "everywhere", "upload", "a.txt")) == 2, message="the second version")
    site.wait_until_converged()
