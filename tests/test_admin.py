"""The admin failure dashboard, the Replica list and the repair actions."""
import json
import os
from datetime import timedelta

import pytest
import redis
from django.contrib.auth.models import Permission, User
from django.core.files.base import ContentFile
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from django_celery_results.models import TaskResult

from resto_celery import lanes
from resto_celery.models import Replica
from tests.conftest import set_storages
from tests.site import wait_until

DASHBOARD = "admin:resto_celery_replicationdashboard_changelist"
CHANGELIST = "admin:resto_celery_replica_changelist"


def _staff(username, *perms):
    user = User.objects.create_user(username, password="pw", is_staff=True)
    for perm in perms:
        user.user_permissions.add(Permission.objects.get(codename=perm, content_type__app_label="resto_celery"))
    return user


@pytest.fixture
def viewer(db):
    client = Client()
    client.force_login(_staff("viewer", "view_replica"))
    return client


@pytest.fixture
def operator(db):
    client = Client()
    client.force_login(_staff("operator", "view_replica", "change_replica"))
    return client


@pytest.fixture
def stranger(db):
    client = Client()
    client.force_login(_staff("stranger"))
    return client


def _rows(host, state, count, **fields):
    Replica.objects.bulk_create(
        Replica(host=host, path=f"{state}/{index}.txt", state=state, **fields) for index in range(count)
    )


def _raw_queued(redis_url, queue="resto"):
    """Every message waiting in ``queue``, both lanes (live first)."""
    client = redis.Redis.from_url(redis_url)
    return [raw for key in lanes.queue_keys(queue) for raw in client.lrange(key, 0, -1)]


def _queued(redis_url, queue="resto"):
    return [json.loads(raw)["headers"]["argsrepr"] for raw in _raw_queued(redis_url, queue)]


@pytest.mark.django_db
def test_dashboard_shows_counts_per_host_and_totals(async_settings, async_hosts, viewer):
    now = timezone.now()
    _rows(async_hosts[0].url, "synced", 5, last_success_at=now)
    _rows(async_hosts[1].url, "synced", 3)
    _rows(async_hosts[1].url, "pending", 2, pending_since=now - timedelta(hours=2))
    _rows(async_hosts[1].url, "failed", 4, pending_since=now - timedelta(hours=1),
          last_error="PUT x on h failed: 503 Service Unavailable", last_error_at=now)

    response = viewer.get(reverse(DASHBOARD))

    assert response.status_code == 200
    by_host = {status.host: status for status in response.context["statuses"]}
    assert (by_host[async_hosts[0].url].synced, by_host[async_hosts[0].url].failed) == (5, 0)
    second = by_host[async_hosts[1].url]
    assert (second.synced, second.pending, second.failed) == (3, 2, 4)
    assert second.oldest_pending == now - timedelta(hours=2)
    assert "503 Service Unavailable" in second.last_error
    assert response.context["totals"]["failed"] == 4 and response.context["totals"]["synced"] == 8
    assert b"503 Service Unavailable" in response.content


@pytest.mark.django_db
def test_dashboard_shows_a_host_whose_breaker_opened_as_down_since_then(async_settings, async_hosts, viewer, redis_url):
    from resto_celery.broker import coordinator_for
    from resto_celery.storage import AsyncStorage

    storage = AsyncStorage(hosts=[async_hosts[0].url], redis_url=redis_url, breaker_threshold=2)
    breaker = coordinator_for(storage.options).breaker(async_hosts[0].url)
    breaker.record_failure("connection failed: Connection refused")
    breaker.record_failure("connection failed: Connection refused")
    response = viewer.get(reverse(DASHBOARD))
    by_host = {status.host: status for status in response.context["statuses"]}
    assert by_host[async_hosts[0].url].breaker_open_for > 0
    assert by_host[async_hosts[1].url].breaker_open_for == 0
    assert by_host[async_hosts[0].url].down and not by_host[async_hosts[1].url].down
    assert by_host[async_hosts[0].url].down_since <= timezone.now()
    assert b"down since" in response.content and b"circuit breaker open" in response.content
    assert b"down since <span" in response.content and b"just now</span>" in response.content  # not "0 minutes ago"
    assert b"0\xc2\xa0minutes ago" not in response.content
    assert by_host[async_hosts[0].url].down_cause == "connection failed: Connection refused"
    cause = b"connection failed: Connection refused"
    assert b'<div class="resto-down-cause" title="' + cause + b'">' + cause + b"</div>" in response.content


@pytest.mark.django_db
def test_dashboard_says_when_a_host_came_back(async_settings, async_hosts, viewer, redis_url):
    from resto_celery.broker import coordinator_for
    from resto_celery.storage import AsyncStorage

    storage = AsyncStorage(hosts=[async_hosts[0].url], redis_url=redis_url, breaker_threshold=1)
    coordinator = coordinator_for(storage.options)
    coordinator.breaker(async_hosts[0].url).record_failure()
    leases = coordinator.leases([(async_hosts[0].url, "a.txt")])
    leases.acquire()
    assert leases.release(succeeded={(async_hosts[0].url, "a.txt")}) == {async_hosts[0].url}  # a success: it is back
    response = viewer.get(reverse(DASHBOARD))
    status = {status.host: status for status in response.context["statuses"]}[async_hosts[0].url]
    assert not status.down and status.back_at <= timezone.now()
    assert b"came back" in response.content


@pytest.mark.django_db
def test_dashboard_counts_the_changes_waiting_for_a_down_host(async_settings, async_hosts, viewer):
    Replica.objects.create(host=async_hosts[0].url, path="a.txt", state="waiting")
    response = viewer.get(reverse(DASHBOARD))
    status = {status.host: status for status in response.context["statuses"]}[async_hosts[0].url]
    assert (status.waiting, status.behind) == (1, 1)
    assert b"+1 waiting" in response.content


def _dashboard_queries(client):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as captured:
        assert client.get(reverse(DASHBOARD)).status_code == 200
    return len(captured.captured_queries)


@pytest.mark.django_db
def test_dashboard_query_count_does_not_grow_with_rows(async_settings, async_hosts, viewer):
    _rows(async_hosts[0].url, "synced", 10)
    few = _dashboard_queries(viewer)
    Replica.objects.all().delete()
    _rows(async_hosts[0].url, "synced", 3000)
    _rows(async_hosts[1].url, "failed", 3000, last_error="x", last_error_at=timezone.now())
    many = _dashboard_queries(viewer)
    # session, user, 2 permission lookups; one grouped count; held deletions; the master's
    # recorded identity and its refusals; three index lookups per host
    assert few == many == 4 + 1 + 1 + 2 + 3 * len(async_hosts)


@pytest.mark.django_db
def test_the_app_index_links_to_the_dashboard(async_settings, viewer):
    response = viewer.get(reverse("admin:app_list", kwargs={"app_label": "resto_celery"}))
    assert reverse(DASHBOARD).encode() in response.content


@pytest.mark.django_db
def test_a_viewer_sees_no_action_buttons_and_cannot_post_them(async_settings, async_hosts, viewer):
    _rows(async_hosts[0].url, "failed", 1)
    response = viewer.get(reverse(DASHBOARD))
    assert b'value="Retry failed"' not in response.content
    assert b"<form" not in response.content.split(b"content-main")[1]
    response = viewer.post(reverse("admin:resto_celery_retry_failed"), {"host": async_hosts[0].url})
    assert response.status_code == 403


@pytest.mark.django_db
def test_staff_without_permissions_sees_nothing(async_settings, stranger):
    assert stranger.get(reverse(DASHBOARD)).status_code == 403
    assert stranger.get(reverse(CHANGELIST)).status_code == 403
    index = stranger.get(reverse("admin:index"))
    assert b"Replication dashboard" not in index.content and b"Replicas" not in index.content


@pytest.mark.django_db
def test_actions_only_accept_post(async_settings, async_hosts, operator):
    assert operator.get(reverse("admin:resto_celery_retry_failed"), {"host": async_hosts[0].url}).status_code == 405


@pytest.mark.django_db
def test_actions_need_the_csrf_token(async_settings, async_hosts):
    client = Client(enforce_csrf_checks=True)
    client.force_login(_staff("operator", "view_replica", "change_replica"))
    response = client.post(reverse("admin:resto_celery_retry_failed"), {"host": async_hosts[0].url})
    assert response.status_code == 403


@pytest.mark.django_db
def test_retry_failed_enqueues_every_failed_row_of_the_host(async_settings, async_hosts, operator, redis_url):
    _rows(async_hosts[0].url, "failed", 3)
    _rows(async_hosts[0].url, "synced", 2)
    _rows(async_hosts[1].url, "failed", 1)
    response = operator.post(reverse("admin:resto_celery_retry_failed"), {"host": async_hosts[0].url}, follow=True)
    assert "Re-sent 3 failed replication task(s)" in next(str(m) for m in response.context["messages"])
    assert sorted(_queued(redis_url)) == sorted(repr((async_hosts[0].url, f"failed/{i}.txt")) for i in range(3))


@pytest.mark.django_db
def test_an_unknown_host_is_refused(async_settings, operator):
    response = operator.post(reverse("admin:resto_celery_retry_failed"), {"host": "http://evil/"})
    assert response.status_code == 403


@pytest.mark.django_db
def test_full_resync_forgets_fingerprints_and_queues_a_reconcile(async_settings, async_hosts, operator, redis_url):
    _rows(async_hosts[0].url, "synced", 4, fingerprint="1:2:3")
    response = operator.post(reverse("admin:resto_celery_resync"), {"host": async_hosts[0].url}, follow=True)
    assert "Marked 4 file(s)" in next(str(m) for m in response.context["messages"])
    assert set(Replica.objects.values_list("fingerprint", flat=True)) == {""}
    assert [json.loads(raw)["headers"]["task"] for raw in _raw_queued(redis_url)] == ["resto_celery.reconcile"]


@pytest.mark.django_db
def test_replica_changelist_filters_searches_and_has_a_date_hierarchy(async_settings, async_hosts, viewer):
    _rows(async_hosts[0].url, "failed", 2, last_error_at=timezone.now())
    _rows(async_hosts[1].url, "synced", 3)
    url = reverse(CHANGELIST)
    assert viewer.get(url, {"host": async_hosts[0].url}).context["cl"].result_count == 2
    assert viewer.get(url, {"state": "synced"}).context["cl"].result_count == 3
    assert viewer.get(url, {"q": "failed/1"}).context["cl"].result_count == 1
    response = viewer.get(url)
    assert b"last_error_at__year=" in response.content  # the date hierarchy


@pytest.mark.django_db
def test_retry_selected_action_enqueues_the_selected_rows(async_settings, async_hosts, operator, redis_url):
    _rows(async_hosts[0].url, "failed", 2)
    ids = list(Replica.objects.values_list("pk", flat=True))
    response = operator.post(reverse(CHANGELIST), {"action": "retry_selected", "_selected_action": ids}, follow=True)
    assert "Re-sent 2 replication task(s)" in next(str(m) for m in response.context["messages"])
    assert len(_queued(redis_url)) == 2


@pytest.mark.django_db
def test_a_viewer_cannot_run_the_retry_action(async_settings, async_hosts, viewer, redis_url):
    _rows(async_hosts[0].url, "failed", 1)
    ids = list(Replica.objects.values_list("pk", flat=True))
    viewer.post(reverse(CHANGELIST), {"action": "retry_selected", "_selected_action": ids})
    assert _queued(redis_url) == []


@pytest.mark.django_db
def test_the_detail_page_shows_the_task_history(async_settings, async_hosts, viewer):
    host = async_hosts[0].url
    replica = Replica.objects.create(
        host=host, path="a b.txt", state="failed", attempts=3, last_error="boom", task_id="t-1", failed_task_id="t-1"
    )
    TaskResult.objects.create(
        task_id="t-1", task_name="resto_celery.upload", task_args=json.dumps(repr((host, "a b.txt"))),
        status="FAILURE", traceback="Traceback: HostUnreachable boom",
    )
    TaskResult.objects.create(
        task_id="t-2", task_name="resto_celery.upload", task_args=json.dumps(repr((host, "other.txt"))),
        status="SUCCESS",
    )
    response = viewer.get(reverse("admin:resto_celery_replica_change", args=[replica.pk]))
    assert response.status_code == 200
    assert [r.task_id for r in response.context["task_results"]] == ["t-1"]
    assert b"HostUnreachable boom" in response.content


@pytest.mark.django_db(transaction=True)
def test_the_task_history_finds_a_failure_of_a_file_with_quotes_and_accents_in_its_name(make_site, viewer):
    site = make_site(host_count=1, max_retries=0)
    site.hosts[0].read_only = True
    site.start_worker()
    name = 'photos/café "x".jpg'
    site.storage.save(name, ContentFile(b"payload"))
    wait_until(lambda: TaskResult.objects.filter(status="FAILURE").exists(), message="a failed task result")
    replica = Replica.objects.get(path=name)
    response = viewer.get(reverse("admin:resto_celery_replica_change", args=[replica.pk]))
    [result] = response.context["task_results"]
    assert result.status == "FAILURE" and result.task_id == replica.failed_task_id
    assert "403" in response.content.decode()


@pytest.mark.django_db(transaction=True)
def test_retry_from_the_dashboard_repairs_the_host_with_a_worker_running(make_site, operator, settings):
    site = make_site(host_count=2, max_retries=0)
    set_storages(settings, {
        "default": {"BACKEND": "resto_celery.storage.AsyncStorage", "OPTIONS": site.storage.deconstruct()[2]},
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    })
    broken = site.hosts[1]
    broken.read_only = True
    site.start_worker()
    site.storage.save("a.txt", ContentFile(b"payload"))
    wait_until(lambda: Replica.objects.filter(host=broken.url, state="failed").exists(), message="a failed row")
    broken.read_only = False
    operator.post(reverse("admin:resto_celery_retry_failed"), {"host": broken.url})
    site.wait_until_converged()
    wait_until(lambda: Replica.objects.get(host=broken.url).state == "synced", message="the row to be synced")


@pytest.mark.django_db
def test_the_replica_page_is_a_view_page_without_save_buttons(async_settings, async_hosts, operator):
    replica = Replica.objects.create(host=async_hosts[0].url, path="a.txt", state="failed", last_error="boom")
    url = reverse("admin:resto_celery_replica_change", args=[replica.pk])
    response = operator.get(url)  # an operator may change replicas, yet the row is a record
    page = response.content.decode()
    assert response.status_code == 200
    assert "View replica" in page and "Change replica" not in page
    assert 'name="_save"' not in page and 'name="_continue"' not in page
    assert operator.post(url, {}).status_code == 403
    # The list keeps its retry action for those who may change replicas.
    assert "retry_selected" in operator.get(reverse(CHANGELIST)).content.decode()


@pytest.mark.django_db
def test_a_synced_rows_old_error_is_labelled_as_resolved(async_settings, async_hosts, viewer):
    now = timezone.now()
    host = async_hosts[0].url
    synced = Replica.objects.create(
        host=host, path="healed.txt", state="synced", last_error=f"PUT healed.txt failed: 503 on {host}",
        last_error_at=now - timedelta(minutes=5), last_success_at=now,
    )
    failed = Replica.objects.create(
        host=host, path="broken.txt", state="failed", last_error=f"PUT broken.txt failed: 403 on {host}",
        last_error_at=now, last_success_at=now - timedelta(minutes=5),
    )
    page = viewer.get(reverse("admin:resto_celery_replica_change", args=[synced.pk])).content.decode()
    assert "Resolved: synced at" in page and "after this error at" in page and "503" in page
    page = viewer.get(reverse("admin:resto_celery_replica_change", args=[failed.pk])).content.decode()
    assert "Resolved" not in page and "403" in page
    listing = viewer.get(reverse(CHANGELIST)).content.decode()
    assert "resolved since; was: PUT healed.txt failed: 503" in listing
    assert "resolved since; was: PUT broken.txt" not in listing


def test_times_under_a_minute_read_just_now():
    from resto_celery.templatetags.resto_admin import age, ago

    now = timezone.now()
    assert ago(now) == "just now"
    assert ago(now - timedelta(seconds=59)) == "just now"
    assert ago(now - timedelta(minutes=3)) == "3\xa0minutes ago"
    assert ago(None) == ""
    assert (age(now), age(now - timedelta(minutes=3))) == ("under a minute", "3\xa0minutes")


def test_host_urls_may_wrap_after_their_slashes():
    from resto_celery.templatetags.resto_admin import breakable_url

    assert breakable_url("http://m<1>:80/media/") == "http:/<wbr>/<wbr>m&lt;1&gt;:80/<wbr>media/<wbr>"


def test_the_admin_works_without_django_celery_results_installed(tmp_path):
    """A HybridStorage site lists no django_celery_results app: the admin loads, checks pass,
    and a Replica page simply has no task history."""
    import subprocess
    import sys

    script = (
        "import django; django.setup();"
        "from django.contrib import admin; admin.autodiscover();"
        "from django.core.management import call_command; call_command('check');"
        "call_command('migrate', verbosity=0);"
        "from resto_celery.models import Replica; row = Replica.objects.create(host='h', path='a', task_id='t');"
        "from resto_celery.admin import ReplicaAdmin; print(ReplicaAdmin._task_results(row.pk))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings_without_results",
             "RESTO_TEST_DATABASE": "sqlite", "RESTO_TEST_DB_NAME": str(tmp_path / "db.sqlite3")},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("None")
