"""Replication log records carry structured fields (``extra=``): ``host``, ``path``,
``task_id`` and ``attempt``, so that a log pipeline can group them by host."""
import logging

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import storages

from resto_celery import marker, tasks
from resto_celery.exceptions import UnexpectedStatus
from resto_celery.master import MasterStorage

pytestmark = pytest.mark.django_db


@pytest.fixture
def storage(async_settings, media_root):
    storage = storages["default"]
    marker.verify(storage.location, create=True)
    MasterStorage(location=storage.location).save("a.txt", ContentFile(b"bytes"))
    return storage


def _records(caplog, level, text):
    return [record for record in caplog.records if record.levelno == level and text in record.getMessage()]


def test_a_final_failure_is_logged_with_host_path_task_and_attempt(storage, async_hosts, caplog):
    host = async_hosts[0]
    host.fail_next(status=403, methods=["PUT"])
    with caplog.at_level(logging.ERROR, logger="resto_celery.tasks"), pytest.raises(UnexpectedStatus):
        tasks.upload.apply(args=(host.url, "a.txt"), task_id="task-42", throw=True)
    [record] = _records(caplog, logging.ERROR, "Failed to upload a.txt")
    assert (record.host, record.path, record.task_id, record.attempt) == (host.url, "a.txt", "task-42", 1)


def test_a_transfer_is_logged_at_debug_with_the_same_fields(storage, async_hosts, caplog):
    host = async_hosts[1]
    with caplog.at_level(logging.DEBUG, logger="resto_celery.tasks"):
        tasks.upload.apply(args=(host.url, "a.txt"), task_id="task-7", throw=True)
    [record] = _records(caplog, logging.DEBUG, "upload of a.txt on")
    assert (record.host, record.path, record.task_id, record.attempt) == (host.url, "a.txt", "task-7", 1)
