"""How long a task waits before asking again for a (host, path) lease another worker holds."""
import pytest

from resto_celery.retries import lease_wait

JITTER = (0.75, 1.25)


def test_the_first_wait_is_a_few_tens_of_milliseconds_as_a_small_transfer_takes():
    assert 0.02 * JITTER[0] <= lease_wait(wait=30.0, waits=0) <= 0.02 * JITTER[1]


@pytest.mark.parametrize("waits", range(10))
def test_each_wait_doubles_the_one_before(waits):
    doubled = 2 * 0.02 * 2 ** waits
    assert doubled * JITTER[0] <= lease_wait(wait=600.0, waits=waits + 1) <= doubled * JITTER[1]


def test_the_waits_stop_growing_at_about_twenty_seconds():
    assert lease_wait(wait=600.0, waits=50) <= 20.48 * JITTER[1]
    assert lease_wait(wait=600.0, waits=50) >= 20.48 * JITTER[0]


def test_a_lease_about_to_expire_is_asked_for_again_when_it_does():
    assert lease_wait(wait=0.5, waits=8) <= 0.5 * JITTER[1]
