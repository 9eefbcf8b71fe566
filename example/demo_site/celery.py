"""The example site's Celery app, as Celery's Django guide writes it."""
import os

from celery import Celery
from celery.signals import beat_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo_site.settings")

app = Celery("demo_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@beat_init.connect
def _embedded_beat_ends_with_its_worker(**kwargs):
    """`celery worker --beat` (make demo-serve) runs beat in a child process of the worker,
    which outlives a SIGKILLed worker: on Linux, have it killed with the worker."""
    from billiard.process import current_process

    if current_process().name == "Beat":  # not a `celery beat` of its own
        from resto_celery.testing._support import die_with_parent

        die_with_parent()
