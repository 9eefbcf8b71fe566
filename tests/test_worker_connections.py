"""Workers that would reconnect to the database after every task are told about it:
``manage.py check --deploy`` (resto_celery.W003) and a warning when a worker starts."""
import logging

import pytest
from django.core.checks import run_checks
from django.db import connections, router

from resto_celery import checks, tasks
from resto_celery.models import Replica

from .conftest import set_storages


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


def test_the_warning_names_the_database_and_the_setting(async_settings, replica_database):
    (warning,) = checks.check_worker_connections()
    assert "DATABASES['default'] has CONN_MAX_AGE 0" in warning.msg
    assert "CONN_MAX_AGE" in warning.hint and "CONN_HEALTH_CHECKS" in warning.hint


@pytest.mark.parametrize("max_age", [60, None])
def test_persistent_connections_pass_the_deploy_check(async_settings, replica_database, max_age):
    replica_database.settings_dict["CONN_MAX_AGE"] = max_age  # None: kept for ever
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
        tasks.check_masters_at_start()
    assert "reconnects to database 'default' after every task (CONN_MAX_AGE is 0)" in caplog.text


@pytest.mark.django_db
def test_a_starting_worker_with_persistent_connections_says_nothing_of_it(async_settings, replica_database, caplog):
    replica_database.settings_dict["CONN_MAX_AGE"] = 60
    with caplog.at_level(logging.WARNING, logger="resto_celery.tasks"):
        tasks.check_masters_at_start()
    assert "reconnects" not in caplog.text
