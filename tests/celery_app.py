"""The Celery app of the test suite's workers (as a real project's ``proj/celery.py``)."""
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

app = Celery("tests")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

import tests.signal_log  # noqa: E402,F401 - the signal receivers of the tests that listen
