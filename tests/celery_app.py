"""The Celery app of the test suite's workers (as a real project's ``proj/celery.py``)."""
import os

from celery import Celery

from resto_celery.testing.worker import end_children_with_the_worker

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

app = Celery("tests")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
end_children_with_the_worker()  # a SIGKILLed worker leaves no pool process behind

import tests.signal_log  # noqa: E402,F401 - the signal receivers of the tests that listen
