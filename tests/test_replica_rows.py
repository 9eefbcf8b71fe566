"""The workers' row writes and reads: ``Replica.objects.record_synced`` and
``synced_fingerprints``, on the database the suite runs on (PostgreSQL or SQLite), and
through ``bulk_create`` as on the other backends."""
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from resto_celery import models
from resto_celery.models import Replica

pytestmark = pytest.mark.django_db

ODD_NAMES = ["plain.txt", "it's 100% \"quoted\".txt", "dir/ünïcode ✓.jpg", "semi;colon -- DROP TABLE x.txt"]


@pytest.fixture(params=["on the cursor", "through bulk_create"])
def write_path(request, monkeypatch):
    """Both ways rows are written: the cursor's ``INSERT ... ON CONFLICT`` and the portable one."""
    if request.param == "through bulk_create":
        monkeypatch.setattr(models, "ON_CONFLICT_VENDORS", frozenset())
    return request.param


def test_record_synced_creates_a_synced_row_per_pair(write_path):
    Replica.objects.record_synced([("h1", name, f"10:{i}:1") for i, name in enumerate(ODD_NAMES)], task_id="t1")

    rows = {row.path: row for row in Replica.objects.filter(host="h1")}
    assert sorted(rows) == sorted(ODD_NAMES)
    for i, name in enumerate(ODD_NAMES):
        row = rows[name]
        assert (row.state, row.fingerprint, row.attempts, row.task_id) == ("synced", f"10:{i}:1", 0, "t1")
        assert row.last_success_at is not None and row.updated_at is not None
        assert (row.pending_since, row.retry_at, row.last_error) == (None, None, "")


def test_record_synced_overwrites_a_failing_row_but_keeps_its_last_error(write_path):
    failing = Replica.objects.record_failure(
        "h1", "a.txt", "HTTP 503", final=False, retry_at=timezone.now() + timedelta(seconds=30), task_id="t0",
    )
    assert failing.state == "pending" and failing.pending_since is not None

    Replica.objects.record_synced([("h1", "a.txt", "5:6:7")], task_id="t2")

    row = Replica.objects.get(host="h1", path="a.txt")
    assert (row.state, row.fingerprint, row.attempts, row.task_id) == ("synced", "5:6:7", 0, "t2")
    assert (row.pending_since, row.retry_at) == (None, None)
    assert row.last_error == "HTTP 503" and row.failed_task_id == "t0"  # the admin's "resolved since"
    assert row.last_success_at >= row.last_error_at
    assert Replica.objects.count() == 1


def test_record_synced_of_nothing_writes_nothing(write_path):
    Replica.objects.record_synced([])
    assert not Replica.objects.exists()


def test_synced_fingerprints_answers_only_the_pairs_asked_for():
    Replica.objects.record_synced([("h1", "a", "1:1:1"), ("h2", "b", "2:2:2"), ("h1", "b", "3:3:3")])

    # h1/b is in the hosts x paths product of the question but was not asked for.
    assert Replica.objects.synced_fingerprints([("h1", "a"), ("h2", "b"), ("h2", "a")]) == {
        ("h1", "a"): "1:1:1", ("h2", "b"): "2:2:2",
    }


def test_synced_fingerprints_ignores_rows_that_are_not_synced():
    Replica.objects.record_synced([("h1", "a", "1:1:1")])
    Replica.objects.record_failure("h1", "a", "HTTP 500", final=True, retry_at=None)

    assert Replica.objects.synced_fingerprints([("h1", "a")]) == {}


def test_synced_fingerprints_finds_odd_names():
    Replica.objects.record_synced([("h1", name, "9:9:9") for name in ODD_NAMES])

    assert Replica.objects.synced_fingerprints([("h1", name) for name in ODD_NAMES]) == {
        ("h1", name): "9:9:9" for name in ODD_NAMES
    }
    assert Replica.objects.synced_fingerprints([]) == {}


postgresql_only = pytest.mark.skipif(connection.vendor != "postgresql", reason="a PostgreSQL setting")


def _synchronous_commit():
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        return cursor.fetchone()[0]


@postgresql_only
@pytest.mark.django_db(transaction=True)
def test_a_workers_synced_rows_commit_without_waiting_for_postgresqls_disk_flush():
    with CaptureQueriesContext(connection) as queries:
        Replica.objects.record_synced([("h1", "a", "1:1:1"), ("h2", "a", "1:1:1")])

    [statement] = [query["sql"] for query in queries.captured_queries]
    assert "set_config('synchronous_commit', 'off', true)" in statement
    pairs = [("h1", "a"), ("h2", "a")]
    assert Replica.objects.synced_fingerprints(pairs) == dict.fromkeys(pairs, "1:1:1")


@postgresql_only
@pytest.mark.django_db(transaction=True)
def test_the_flush_setting_ends_with_the_rows_statement_and_leaves_the_connection_durable():
    Replica.objects.record_synced([("h1", "a", "1:1:1")])

    assert _synchronous_commit() == "on"


@postgresql_only
@pytest.mark.django_db(transaction=True)
def test_synced_rows_written_inside_a_callers_transaction_leave_its_durability_alone():
    with transaction.atomic():
        Replica.objects.record_synced([("h1", "a", "1:1:1")])
        assert _synchronous_commit() == "on"
