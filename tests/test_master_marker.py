"""A missing or wrong master stops replication instead of deleting everything (issue 20).

The scenario an operator lives through: files replicated to three nginx hosts; then a
worker starts on a machine where MEDIA_ROOT is not mounted (here: a worker in a mount
namespace of its own, with an empty folder bind-mounted over the master), a file is
overwritten and reconcile runs. Nothing may be lost, the refusal must be loud, and once
the volume is mounted again every host must catch up with no other manual step.
"""
import errno
import os
import shutil
import subprocess
from io import StringIO

import pytest
from django.contrib.auth.models import User
from django.core.files.base import ContentFile
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client

from resto_celery import marker, replication
from resto_celery.exceptions import MasterReadError, MasterUnavailable
from resto_celery.models import Hold, MasterCopy, Replica
from resto_celery.storage import AsyncStorage
from resto_celery.tasks import reconcile
from tests.site import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def _can(*command):
    try:
        return subprocess.run(command, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_mount_namespaces = pytest.mark.skipif(
    os.environ.get("CI") != "true" and not _can("unshare", "--mount", "true"),
    reason="needs root and unshare --mount (util-linux) to give a worker an unmounted view of the master",
)
needs_setpriv = pytest.mark.skipif(
    os.environ.get("CI") != "true" and not _can("setpriv", "--bounding-set=-dac_override", "true"),
    reason="needs root and setpriv (util-linux) to run a worker that permissions apply to",
)


def _status():
    out = StringIO()
    try:
        call_command("resto_status", "--no-breakers", stdout=out)
    except CommandError as error:
        return out.getvalue(), error
    return out.getvalue(), None


def _dashboard():
    User.objects.create_superuser("boss", "boss@example.com", "pw")
    client = Client()
    client.login(username="boss", password="pw")
    return client.get("/admin/resto_celery/replicationdashboard/").content.decode()


def _unmounted_worker(site, empty):
    """A worker that sees ``empty`` where the master is, as on a machine whose volume did not mount."""
    script = f'mount --bind "{empty}" "{site.media_root}" && exec "$0" "$@"'
    return site.start_worker(
        pool="threads", concurrency=4, wrapper=["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
    )


def _mount_again(worker, site):
    subprocess.run(["nsenter", "--target", str(worker.pid), "--mount", "umount", str(site.media_root)], check=True)


@pytest.mark.nginx
@needs_mount_namespaces
def test_a_worker_that_sees_an_unmounted_master_deletes_nothing_and_catches_up_once_it_is_mounted(
    make_site, make_nginx, tmp_path
):
    site = make_site(hosts=[make_nginx(), make_nginx(), make_nginx()])
    good = site.start_worker()
    names = [f"photos/{index}.jpg" for index in range(50)]
    for name in names:
        site.storage.save(name, ContentFile(f"photo {name}".encode()))
    site.wait_until_drained_and_converged()
    assert all(len(host.files()) == 50 for host in site.hosts)
    good.stop()

    empty = tmp_path / "not-mounted"
    empty.mkdir()
    bad = _unmounted_worker(site, empty)
    assert "This worker will replicate nothing from" in bad.log()  # said at start, at ERROR
    site.storage.delete(names[0])
    site.storage.save(names[0], ContentFile(b"a new version"))
    reconcile.apply_async(queue=site.queue)
    wait_until(lambda: site.drained() and "Reconcile refused" in bad.log(), message="the refusals")

    before = {host: host.files() for host in site.hosts}
    assert all(len(files) == 50 for files in before.values())  # zero files lost on every host
    assert all(files[names[0]] == f"photo {names[0]}".encode() for files in before.values())
    log = bad.log()
    assert f"Failed to upload {names[0]} on" in log and "marker file .resto-master is missing" in log
    assert Replica.objects.filter(path=names[0], state=Replica.State.FAILED).count() == 3
    output, error = _status()
    assert error is not None and error.returncode == 1
    assert f"refused by the workers on {marker.machine()}" in output
    assert "Replication refused from the master copy" in _dashboard()

    _mount_again(bad, site)
    reconcile.apply_async(queue=site.queue)
    site.wait_until_drained_and_converged()
    assert all(host.files()[names[0]] == b"a new version" for host in site.hosts)
    wait_until(lambda: not Hold.objects.filter(kind=Hold.Kind.MASTER).exists(), message="the refusal to clear")
    assert _status()[1] is None


def test_the_brake_holds_a_mass_deletion_until_an_operator_allows_it(make_site):
    site = make_site(host_count=3, max_delete_share=0.1)
    site.start_worker()
    names = [f"docs/{index}.txt" for index in range(50)]
    for name in names:
        site.storage.save(name, ContentFile(name.encode()))
    site.wait_until_drained_and_converged()
    for name in names[:40]:
        os.remove(site.media_root / name)  # the master really lost most of its files

    reconcile.apply_async(queue=site.queue)
    wait_until(lambda: Hold.objects.filter(kind=Hold.Kind.DELETES).count() == 3, message="the brake")
    wait_until(site.drained, message="the queue to drain")
    assert all(len(host.files()) == 50 for host in site.hosts)
    assert "reconcile would delete 40 of the 50 files" in Hold.objects.first().reason
    assert "Deletions held on" in site.logs()
    output, error = _status()
    assert error is not None and "HELD DELETES" in output
    page = _dashboard()
    assert f"Allow 40 deletion(s) on {site.hosts[0].url}" in page

    client = Client()
    client.login(username="boss", password="pw")
    client.post("/admin/resto_celery/replicationdashboard/allow-deletes/", {"host": site.hosts[0].url})
    wait_until(lambda: len(site.hosts[0].files()) == 10, message="the allowed deletions on the first host")
    assert all(len(host.files()) == 50 for host in site.hosts[1:])  # still held there

    out = StringIO()
    call_command("resto_reconcile", "--allow-deletes", "*", stdout=out)
    site.wait_until_drained_and_converged()
    assert not Hold.objects.exists()


@needs_setpriv
def test_a_master_file_the_worker_cannot_read_is_retried_never_deleted(make_site):
    site = make_site(host_count=2, max_retries=2)
    without_root_powers = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                           "--inh-caps=-dac_override,-dac_read_search"]
    worker = site.start_worker(pool="threads", wrapper=without_root_powers)
    site.storage.save("a.txt", ContentFile(b"readable"))
    site.wait_until_drained_and_converged()
    worker.stop()
    site.storage.delete("a.txt")
    site.storage.save("a.txt", ContentFile(b"secret for now"))
    os.chmod(site.media_root / "a.txt", 0)  # EACCES for a process that permissions apply to
    site.start_worker(pool="threads", wrapper=without_root_powers)
    wait_until(lambda: Replica.objects.filter(path="a.txt", state=Replica.State.FAILED).count() == 2,
               message="both hosts' rows to fail once the retries ran out")
    assert all(host.files() == {"a.txt": b"readable"} for host in site.hosts)  # kept, not deleted
    assert "cannot be read (Permission denied)" in site.logs()
    os.chmod(site.media_root / "a.txt", 0o644)
    reconcile.apply_async(queue=site.queue)
    site.wait_until_drained_and_converged()


# The decisions themselves, one by one.

@pytest.fixture
def location(media_root):
    return str(media_root)


def test_the_first_save_of_a_new_site_makes_the_marker_and_the_first_worker_check_records_it(make_site):
    site = make_site()
    site.storage.save("a.txt", ContentFile(b"x"))
    identity = marker.read(str(site.media_root))
    assert identity and not MasterCopy.objects.exists()  # the request wrote no row, read none
    marker.forget()
    assert marker.verify(str(site.media_root)) == identity
    assert MasterCopy.objects.get().identity == identity


def test_a_marker_a_save_makes_in_place_of_a_lost_one_is_refused_until_adopted(location):
    """An app server saving into an unmounted volume makes a marker there: never trusted."""
    storage = AsyncStorage(location=location, hosts=["m1:80"])
    site_identity = marker.verify(location, create=True)
    os.remove(os.path.join(location, marker.MARKER_NAME))
    marker.forget()
    storage.save("a.txt", ContentFile(b"x"))  # the publish fails (no broker): logged, beside the point
    assert marker.read(location) not in (None, site_identity)
    with pytest.raises(MasterUnavailable, match="another master's"):
        marker.verify(location)
    assert marker.adopt(location) == site_identity


def test_a_folder_without_a_marker_is_refused_and_the_refusal_is_recorded_for_this_machine(location):
    marker.verify(location, create=True)
    os.remove(os.path.join(location, marker.MARKER_NAME))
    with pytest.raises(MasterUnavailable, match="is missing: is the volume mounted"):
        marker.verify(location, "a.txt")
    hold = Hold.objects.get(kind=Hold.Kind.MASTER)
    assert hold.subject == marker.machine() and "is missing" in hold.reason


def test_a_marker_of_another_master_is_refused(location):
    marker.verify(location, create=True)
    marker.write(location, "0123-not-this-site", replace=True)
    with pytest.raises(MasterUnavailable, match="another master's"):
        marker.verify(location)


def test_a_successful_check_clears_this_machines_refusal(location):
    marker.verify(location, create=True)
    identity = marker.read(location)
    os.remove(os.path.join(location, marker.MARKER_NAME))
    with pytest.raises(MasterUnavailable):
        marker.verify(location)
    marker.write(location, identity)
    assert marker.verify(location) == identity
    assert not Hold.objects.exists()


def test_adopt_makes_a_folder_the_master_with_the_sites_identity(location):
    marker.verify(location, create=True)
    identity = marker.read(location)
    shutil.rmtree(location)
    os.makedirs(location)  # a master restored from a backup without its marker
    with pytest.raises(MasterUnavailable):
        marker.verify(location)
    assert marker.adopt(location) == identity
    assert marker.verify(location) == identity


def test_a_damaged_marker_is_refused_not_replaced(location):
    marker.verify(location, create=True)
    with open(os.path.join(location, marker.MARKER_NAME), "w") as handle:
        handle.write("{not json")
    with pytest.raises(MasterUnavailable, match="damaged"):
        marker.verify(location)


def test_a_file_cannot_take_the_markers_name(location):
    storage = AsyncStorage(location=location, hosts=[])
    with pytest.raises(Exception, match="marker"):
        storage.save(marker.MARKER_NAME, ContentFile(b"x"))


def test_the_marker_is_not_listed(location):
    storage = AsyncStorage(location=location, hosts=[])
    marker.verify(location, create=True)
    storage.save("a.txt", ContentFile(b"x"))
    assert storage.listdir("") == ([], ["a.txt"])


def test_a_symlink_loop_in_the_master_is_a_read_error_not_an_absence(location):
    os.symlink("loop", os.path.join(location, "loop"))
    with pytest.raises(MasterReadError, match="cannot be read"):
        replication.open_master(os.path.join(location, "loop"), location, "loop")


def test_a_folder_where_the_file_was_is_an_absence(location):
    os.mkdir(os.path.join(location, "was-a-file"))
    assert replication.open_master(os.path.join(location, "was-a-file"), location, "was-a-file") is None


@pytest.mark.parametrize("code", [errno.EIO, errno.ESTALE, errno.EACCES])
def test_io_errors_and_stale_nfs_handles_are_read_errors_not_absences(location, monkeypatch, code):
    """The kernel's answer is simulated here (no NFS server on loopback); EACCES and ELOOP
    are also tested for real above."""

    def failing_open(path, mode="r", *args, **kwargs):
        raise OSError(code, os.strerror(code), path)

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(MasterReadError, match=os.strerror(code)):
        replication.open_master(os.path.join(location, "a.txt"), location, "a.txt")


def test_resto_master_reports_a_refused_master_and_fails(location, settings):
    from tests.conftest import set_storages

    set_storages(settings, {
        "default": {"BACKEND": "resto_celery.storage.HybridStorage", "OPTIONS": {"hosts": ["m1:80"]}},
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    })
    out, err = StringIO(), StringIO()
    call_command("resto_master", "--init", stdout=out, stderr=err)
    assert "is the master (identity" in out.getvalue()
    os.remove(os.path.join(location, marker.MARKER_NAME))
    with pytest.raises(CommandError) as raised:
        call_command("resto_master", stdout=out, stderr=err)
    assert raised.value.returncode == 1 and "is missing" in err.getvalue()
    call_command("resto_master", "--adopt", stdout=out, stderr=err)
    call_command("resto_master", stdout=out, stderr=err)
