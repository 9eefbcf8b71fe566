"""Rows looked up by path stay index lookups when PostgreSQL's statistics lag behind.

A host just added (a catch-up), or a table grown since its last ``ANALYZE``: the planner
does not know the new hosts, takes ``host IN (...)`` for the rarer condition, and reads
every row of those hosts through a host index, on every transfer. Each test makes the
statistics stale as a new host does (``ANALYZE`` with other hosts' rows, then the rows of
new hosts), runs a lookup as the workers do, and reads PostgreSQL's plan of the SQL sent.
"""
import json
import os

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from resto_celery import marker
from resto_celery.models import Replica
from resto_celery.reconcile import reconcile
from resto_celery.storage import HybridStorage

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's planner (the suite runs on SQLite)"),
]

NEW_HOSTS = ["http://127.0.0.1:41031/media/", "http://127.0.0.1:41032/media/", "http://127.0.0.1:41033/media/"]
ROWS_PER_HOST = 3000
PATH_INDEX = "resto_replica_path"


@pytest.fixture
def stale_statistics():
    """Statistics from a table of other hosts, then the rows of three new ones."""
    table = connection.ops.quote_name(Replica._meta.db_table)
    Replica.objects.bulk_create(
        Replica(host=f"http://127.0.0.1:5100{i % 3}/media/", path=f"before/{i}.bin", state="synced",
                fingerprint="1:1:1")
        for i in range(300)
    )
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {table}")
    Replica.objects.all().delete()
    Replica.objects.bulk_create(
        (Replica(host=host, path=f"old/{i:05d}.bin", state="synced", fingerprint="1:1:1")
         for i in range(ROWS_PER_HOST) for host in NEW_HOSTS),
        batch_size=3000,
    )


def _scans(plan):
    """How a plan reads the table: the names of the indexes it scans, and "Seq Scan" for a
    scan of the whole table."""
    node = plan.get("Plan", plan)
    found = []
    if "Index Name" in node:
        found.append(node["Index Name"])
    elif node["Node Type"] == "Seq Scan":
        found.append("Seq Scan")
    for child in node.get("Plans", []):
        found += _scans(child)
    return found


def _plans_of_selects(queries):
    plans = []
    with connection.cursor() as cursor:
        for query in queries:
            if query["sql"].lstrip().upper().startswith("SELECT") and Replica._meta.db_table in query["sql"]:
                cursor.execute("EXPLAIN (FORMAT JSON) " + query["sql"])
                [[plan]] = cursor.fetchall()
                plans.append(_scans((json.loads(plan) if isinstance(plan, str) else plan)[0]))
    return plans


def _assert_read_through_the_path_index(queries):
    plans = _plans_of_selects(queries)
    assert plans, "no SELECT of the Replica table was sent"
    for scans in plans:
        assert scans and set(scans) == {PATH_INDEX}, f"not through {PATH_INDEX} alone: {scans}"


def test_the_fingerprints_read_before_a_transfer_come_through_the_path_index(stale_statistics):
    pairs = [(host, "old/00007.bin") for host in NEW_HOSTS]
    with CaptureQueriesContext(connection) as captured:
        found = Replica.objects.synced_fingerprints(pairs)

    assert found == dict.fromkeys(pairs, "1:1:1")
    _assert_read_through_the_path_index(captured.captured_queries)


def test_the_rows_a_delete_forgets_are_found_through_the_path_index(stale_statistics):
    pairs = [(NEW_HOSTS[0], "old/00007.bin"), (NEW_HOSTS[1], "old/00008.bin")]
    with CaptureQueriesContext(connection) as captured:
        gone = Replica.objects.record_gone(pairs)

    assert gone == dict.fromkeys(pairs, "1:1:1")
    assert not Replica.objects.filter(host=NEW_HOSTS[0], path="old/00007.bin").exists()
    assert Replica.objects.filter(host=NEW_HOSTS[1], path="old/00007.bin").exists()
    _assert_read_through_the_path_index(captured.captured_queries)


def test_reconcile_reads_the_rows_of_a_batch_of_master_files_through_the_path_index(stale_statistics, media_root):
    storage = HybridStorage(hosts=NEW_HOSTS)
    marker.verify(storage.location, create=True)
    os.makedirs(storage.path("old"))
    for name in ("old/00007.bin", "old/00008.bin"):
        with open(storage.path(name), "wb") as handle:
            handle.write(b"x")
    with CaptureQueriesContext(connection) as captured:
        counts = reconcile(storage, lambda *task: None)

    assert counts["files"] == 2
    batch_queries = [query for query in captured.captured_queries if "old/00007.bin" in query["sql"]]
    _assert_read_through_the_path_index(batch_queries)
