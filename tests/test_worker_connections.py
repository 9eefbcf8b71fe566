"""A worker's database connection: kept between tasks with ``CELERY_DB_REUSE_MAX``, dropped
when the database dropped it; a worker that would reconnect for every task is told of it
(``manage.py check --deploy``: resto_celery.W003, and a warning when a worker starts)."""
import logging

import celery
import pytest
from django.core.checks import run_checks
from django.core.files.base import ContentFile
from django.db import connection, connections, router

from resto_celery import checks, publisher, tasks
from resto_celery.models import Replica
from resto_celery.tasks import reconcile

from .conftest import set_storages
from .site import wait_until


@pytest.fixture
def replica_database(monkeypatch):
    """The connection ``Replica`` rows are written through, made to look like a PostgreSQL
    one whatever the suite runs on; its ``CONN_MAX_AGE`` is the test's to set."""
    connection = connections[router.db_for_write(Replica)]
    monkeypatch.setattr(connection, "vendor", "postgresql")
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", 0)
    return connection


def _deploy_check_ids():
    return [message.id for message in run_checks(include_deployment_checks=True)
            if message.id.startswith("resto_celery.")]


@pytest.mark.django_db
def test_deploy_check_warns_that_workers_would_reconnect_after_every_task(async_settings, replica_database):
    assert "resto_celery.W003" in _deploy_check_ids()


def test_the_warning_names_the_database_and_the_settings(async_settings, replica_database):
    (warning,) = checks.check_worker_connections()
    assert "Celery workers reconnect to DATABASES['default'] for every task" in warning.msg
    assert "Set CELERY_DB_REUSE_MAX" in warning.hint


def test_db_reuse_max_passes_the_deploy_check(async_settings, replica_database):
    async_settings.CELERY_DB_REUSE_MAX = 100
    assert checks.check_worker_connections() == []


def test_conn_max_age_alone_does_not_pass_on_celery_5_6_and_later(async_settings, replica_database, monkeypatch):
    # Celery 5.6 closes the connections around every task whatever CONN_MAX_AGE says (celery#9824).
    replica_database.settings_dict["CONN_MAX_AGE"] = 60
    monkeypatch.setattr(celery, "VERSION", (5, 6, 0))
    assert [message.id for message in checks.check_worker_connections()] == ["resto_celery.W003"]


@pytest.mark.parametrize("max_age", [60, None])
def test_conn_max_age_passes_before_celery_5_6(async_settings, replica_database, monkeypatch, max_age):
    replica_database.settings_dict["CONN_MAX_AGE"] = max_age  # None: kept for ever
    monkeypatch.setattr(celery, "VERSION", (5, 5, 3))
    assert checks.check_worker_connections() == []


def test_sqlite_passes_the_deploy_check(async_settings, replica_database, monkeypatch):
    monkeypatch.setattr(replica_database, "vendor", "sqlite")
    assert checks.check_worker_connections() == []


def test_a_site_without_celery_replication_passes_the_deploy_check(settings, replica_database):
    set_storages(settings, {"default": {"BACKEND": "resto_celery.storage.HybridStorage", "OPTIONS": {"hosts": []}}})
    assert checks.check_worker_connections() == []


@pytest.mark.django_db
def test_the_ordinary_checks_leave_it_to_deploy(async_settings, replica_database):
    assert "resto_celery.W003" not in [message.id for message in run_checks()]


@pytest.mark.django_db
def test_a_starting_worker_logs_that_it_would_reconnect_after_every_task(async_settings, replica_database, caplog):
    with caplog.at_level(logging.WARNING, logger="resto_celery.tasks"):
        tasks.warn_of_reconnects_at_start()
    assert "This worker reconnects to database 'default' for every task" in caplog.text


@pytest.mark.django_db
def test_a_starting_worker_with_db_reuse_max_says_nothing_of_it(async_settings, replica_database, caplog):
    async_settings.CELERY_DB_REUSE_MAX = 100
    with caplog.at_level(logging.WARNING, logger="resto_celery.tasks"):
        tasks.warn_of_reconnects_at_start()
    assert "reconnects" not in caplog.text


def _worker_backends():
    """The PostgreSQL server processes serving the test database to anyone but this test."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return {pid for (pid,) in cursor.fetchall()}


def _terminate(pids):
    with connection.cursor() as cursor:
        for pid in pids:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])


def _save_and_wait(site, name):
    site.storage.save(name, ContentFile(name.encode()))
    assert publisher.flush(timeout=10)
    wait_until(lambda: name in site.hosts[0].files(), timeout=30, message=f"{name} on the host")


postgres_only = pytest.mark.skipif(connection.vendor != "postgresql", reason="counts PostgreSQL server processes")


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_a_worker_with_db_reuse_max_keeps_one_connection_for_its_tasks(make_site, monkeypatch):
    monkeypatch.setenv("RESTO_TEST_DB_REUSE_MAX", "1000")
    site = make_site(host_count=1)
    site.start_worker(concurrency=1)
    _save_and_wait(site, "first.txt")
    backends = _worker_backends()

    for index in range(5):
        _save_and_wait(site, f"more-{index}.txt")

    assert backends and _worker_backends() == backends


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_a_kept_connection_that_the_database_dropped_fails_one_task_not_the_next(make_site, monkeypatch):
    monkeypatch.setenv("RESTO_TEST_DB_REUSE_MAX", "1000")
    site = make_site(host_count=1)
    worker = site.start_worker(concurrency=1)
    _save_and_wait(site, "before.txt")

    _terminate(_worker_backends())  # a database restart, as the worker's kept connection sees it
    site.storage.save("during.txt", ContentFile(b"during"))
    assert publisher.flush(timeout=10)
    wait_until(lambda: "terminating connection" in worker.log() or "server closed" in worker.log(), timeout=30,
               message="the task on the dropped connection to fail")

    _save_and_wait(site, "after.txt")  # on a new connection
    reconcile.run()  # and the failed one is sent by reconcile, as ever
    wait_until(lambda: "during.txt" in site.hosts[0].files(), timeout=30, message="during.txt after reconcile")


@pytest.mark.parametrize("task", [tasks.upload, tasks.replicate, tasks.reconcile], ids=lambda task: task.name)
def test_a_task_sent_with_arguments_it_does_not_take_is_refused_before_it_is_sent(task):
    with pytest.raises(TypeError, match="positional argument"):
        task.apply_async(args=("one", "two", "three", "four", "five"))
