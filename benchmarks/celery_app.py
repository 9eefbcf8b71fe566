"""The Celery app of the benchmarks' workers (as a project's ``proj/celery.py``)."""
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.settings")

app = Celery("resto_bench")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@app.task(name="benchmarks.noop", ignore_result=True)
def noop(key):
    """Celery's floor for bench_replication: a task that only counts itself (one Redis INCR)."""
    import redis

    redis.Redis.from_url(os.environ["RESTO_BENCH_BROKER_URL"]).incr(key)
