"""Django settings for the benchmarks: only what the storages and ``Replica`` need.

The database is PostgreSQL (``resto_celery_bench`` on 127.0.0.1:5432, or the name in
``RESTO_BENCH_DATABASE_NAME``) when it answers, else an SQLite file in the temporary folder;
``RESTO_BENCH_DATABASE`` (``postgres`` or ``sqlite``) forces one. The benchmark scripts
create and migrate it themselves (:func:`benchmarks.common.setup_django`). The Celery
broker is ``RESTO_BENCH_BROKER_URL``: the scripts start a private Redis and set it before
Django is set up.
``RESTO_BENCH_UPLOAD_STORAGES`` adds ``bench_upload_view``'s app, URLs and storages.
"""
import json
import os
import socket
import tempfile

SECRET_KEY = "resto-celery-benchmarks"
DEBUG = False  # with DEBUG on, Django would keep every query in memory
USE_TZ = True
TIME_ZONE = "UTC"
ALLOWED_HOSTS = ["*"]

INSTALLED_APPS = [
    "django_celery_results",
    "resto_celery",
]


def _postgres_answers():
    """Whether something listens on 127.0.0.1:5432 and psycopg can be imported."""
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=0.3).close()
    except OSError:
        return False
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return False
    return True


_engine = os.environ.get("RESTO_BENCH_DATABASE") or ("postgres" if _postgres_answers() else "sqlite")
if _engine == "postgres":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": os.environ.get("RESTO_BENCH_DATABASE_NAME", "resto_celery_bench"),
            "USER": os.environ.get("PGUSER", "postgres"),
            "HOST": "127.0.0.1",
            "PORT": 5432,
            # Kept between requests (bench_upload_view's server), as a production site should.
            "CONN_MAX_AGE": 600,
            "CONN_HEALTH_CHECKS": True,
        }
    }
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.path.join(tempfile.gettempdir(), "resto-celery-bench.sqlite3"),
            "OPTIONS": {"timeout": 20},
        }
    }

MEDIA_ROOT = os.path.join(tempfile.gettempdir(), "resto-celery-bench-media")
MEDIA_URL = "/media/"

STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}

# bench_replication's workers (and the benchmark itself) replicate with this AsyncStorage.
if os.environ.get("RESTO_BENCH_STORAGE_OPTIONS"):
    STORAGES["default"] = {
        "BACKEND": "resto_celery.storage.AsyncStorage",
        "OPTIONS": json.loads(os.environ["RESTO_BENCH_STORAGE_OPTIONS"]),
    }
# bench_upload_view: its upload app (a model per storage under test, the view, its URLs), and
# the storages of those models, as a JSON dict of STORAGES entries by alias.
if os.environ.get("RESTO_BENCH_UPLOAD_STORAGES"):
    STORAGES.update(json.loads(os.environ["RESTO_BENCH_UPLOAD_STORAGES"]))
    INSTALLED_APPS.append("benchmarks.uploads")
    ROOT_URLCONF = "benchmarks.uploads.urls"
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_DB_REUSE_MAX = 1000  # as the README advises: Celery would reconnect workers for every task

# As the README recommends for a real site: results in the database, extended.
CELERY_BROKER_URL = os.environ.get("RESTO_BENCH_BROKER_URL", "memory://")
CELERY_RESULT_BACKEND = "django-db"
CELERY_RESULT_EXTENDED = True

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"resto_celery": {"handlers": ["console"], "level": "WARNING"}},
}

# bench_catchup's set-ups: "auto" (the default), "none" (unbounded) or a number of bulk slots.
_BULK_SLOTS = os.environ.get("RESTO_BENCH_BULK_SLOTS", "auto")
RESTO_BULK_SLOTS = None if _BULK_SLOTS == "none" else _BULK_SLOTS if _BULK_SLOTS == "auto" else int(_BULK_SLOTS)
