"""The test settings, plus a worker metrics server on RESTO_TEST_METRICS_PORT (tests/test_metrics.py)."""
import os

from tests.settings import *  # noqa: F403 - the test settings, as a project's settings module extends a base

RESTO_METRICS_PORT = int(os.environ["RESTO_TEST_METRICS_PORT"])
