"""RESTO_BULK_SLOTS: a worker holds at most N bulk messages at once, and its other pool
slots stay free for live changes (resto_celery.bulk_slots). Real worker, real media server."""
import time

import pytest
from django.core.files.base import ContentFile
from django.test import override_settings

from resto_celery import lanes
from resto_celery.bulk_slots import can_unblock, slots_for
from resto_celery.checks import check_bulk_slots
from resto_celery.tasks import reconcile
from tests.site import wait_until
from tests.test_lanes import _site_with_master_files

pytestmark = pytest.mark.django_db(transaction=True)

FILES = 40  # eight bulk messages of five changes
HOST_DELAY = 0.3  # per request: each bulk message takes about this long


def _most_bulk_messages_running_at_once(site):
    """Watch the worker (``inspect().active()``) until the queue drains; the highest count seen."""
    from tests.celery_app import app

    most = 0
    deadline = time.monotonic() + 60
    while not site.drained() and time.monotonic() < deadline:
        active = app.control.inspect(timeout=0.5).active() or {}
        running = sum(
            1 for tasks in active.values() for task in tasks
            if (task.get("delivery_info") or {}).get("priority") == lanes.REDIS_BULK
        )
        most = max(most, running)
    return most


def _catching_up_site(make_site, monkeypatch, slots):
    """A site whose one host catches up on ``FILES`` files, slowly, through a prefork/2 worker
    with ``RESTO_BULK_SLOTS`` set to ``slots`` ("none": unbounded; None: left unset)."""
    if slots is not None:
        monkeypatch.setenv("RESTO_TEST_BULK_SLOTS", str(slots))
    site = _site_with_master_files(make_site, FILES)
    reconcile.run()
    site.hosts[0].set_delay(HOST_DELAY, count=10 * FILES)
    site.start_worker(concurrency=2)
    return site


def test_an_unbounded_worker_of_two_runs_two_bulk_messages_at_once(make_site, monkeypatch):
    site = _catching_up_site(make_site, monkeypatch, slots="none")
    assert _most_bulk_messages_running_at_once(site) == 2
    site.wait_until_drained_and_converged(timeout=60)


def test_a_worker_of_two_keeps_one_slot_for_live_changes_by_default(make_site, monkeypatch):
    site = _catching_up_site(make_site, monkeypatch, slots=None)
    assert _most_bulk_messages_running_at_once(site) == 1
    site.wait_until_drained_and_converged(timeout=60)


def test_a_worker_with_one_bulk_slot_runs_one_bulk_message_at_a_time_and_catches_up(make_site, monkeypatch):
    site = _catching_up_site(make_site, monkeypatch, slots=1)
    assert _most_bulk_messages_running_at_once(site) == 1
    site.wait_until_drained_and_converged(timeout=60)


def test_a_save_during_a_bounded_catch_up_takes_the_free_slot(make_site, monkeypatch):
    site = _catching_up_site(make_site, monkeypatch, slots=1)
    wait_until(lambda: len(site.hosts[0].files()) >= 5, message="the catch-up to start")
    site.storage.save("fresh.txt", ContentFile(b"a fresh upload"))
    saved = time.monotonic()
    wait_until(lambda: "fresh.txt" in site.hosts[0].files(), timeout=30, message="the fresh upload")
    lag = time.monotonic() - saved
    left = FILES - (len(site.hosts[0].files()) - 1)
    print(f"fresh upload on the host {lag:.2f}s after save(), {left} old files not there yet")
    assert left > 0  # it did not wait for the catch-up
    site.wait_until_drained_and_converged(timeout=60)


@pytest.mark.parametrize("value", [0, -1, 1.5, "2", True])
def test_bulk_slots_that_are_not_a_whole_number_of_at_least_one_are_refused(value):
    with override_settings(RESTO_BULK_SLOTS=value):
        [error] = check_bulk_slots()
    assert error.id == "resto_celery.E011" and repr(value) in error.msg


@pytest.mark.parametrize("value", ["auto", None, 1, 4])
def test_auto_no_bound_or_a_whole_number_is_accepted(value):
    with override_settings(RESTO_BULK_SLOTS=value):
        assert check_bulk_slots() == []


@pytest.mark.parametrize(("pool_slots", "bulk_slots"), [(2, 1), (3, 1), (8, 4), (1, None), (None, None)])
def test_auto_gives_the_bulk_lane_half_the_pool_and_bounds_no_pool_of_one(pool_slots, bulk_slots):
    assert slots_for("auto", pool_slots) == bulk_slots


@pytest.mark.parametrize("setting", [None, 1, 3])
def test_a_bound_that_is_set_holds_whatever_the_pool(setting):
    assert slots_for(setting, 8) == setting


@pytest.mark.parametrize(("version", "can"), [("7.0.15", True), ("5.0.0", True), ("4.0.14", False), ("unknown", False)])
def test_only_redis_5_or_newer_can_cut_a_wait_short(version, can):
    assert can_unblock(version) is can
