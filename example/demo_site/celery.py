"""The example site's Celery app, as Celery's Django guide writes it."""
import os

from celery import Celery

from resto_celery.testing.worker import end_children_with_the_worker

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo_site.settings")

app = Celery("demo_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# The demo SIGKILLed kills its worker; the worker's pool and embedded beat end with it.
end_children_with_the_worker()
