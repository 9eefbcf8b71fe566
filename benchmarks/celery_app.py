"""The Celery app of the benchmarks' workers (as a project's ``proj/celery.py``)."""
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.settings")

app = Celery("resto_bench")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
