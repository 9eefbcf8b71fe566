"""Django settings for the test suite, and for the Celery workers the tests start.

The test process and its worker processes must agree on the database, the broker and the
storage: the tests pass those to workers through ``RESTO_TEST_*`` environment variables.
"""
import json
import os
import socket
import tempfile

SECRET_KEY = "resto-celery-tests"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "tests.urls"
ALLOWED_HOSTS = ["*"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_results",
    "resto_celery",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]


def _postgres_answers():
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=0.3).close()
    except OSError:
        return False
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return False
    return True


# Workers are separate processes, so the test database must be a real shared one:
# PostgreSQL when it answers on 127.0.0.1, else an SQLite file. RESTO_TEST_DATABASE
# (postgres|sqlite) forces one; workers get the test database's name in RESTO_TEST_DB_NAME.
_engine = os.environ.get("RESTO_TEST_DATABASE") or ("postgres" if _postgres_answers() else "sqlite")
_worker_db = os.environ.get("RESTO_TEST_DB_NAME")
if _engine == "postgres":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": _worker_db or "resto_celery",
            "USER": os.environ.get("PGUSER", "postgres"),
            "HOST": "127.0.0.1",
            "PORT": 5432,
            "TEST": {"NAME": f"test_resto_celery_{os.getpid()}"},
        }
    }
else:
    import django

    # Workers write concurrently: take the write lock when a transaction starts (Django 5.1+),
    # instead of failing with "database is locked" when a read turns into a write.
    _SQLITE_OPTIONS = {"timeout": 20, **({"transaction_mode": "IMMEDIATE"} if django.VERSION >= (5, 1) else {})}
    _sqlite = os.path.join(tempfile.gettempdir(), f"resto-celery-test-{os.getpid()}.sqlite3")
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": _worker_db or _sqlite,
            "TEST": {"NAME": _sqlite},
            "OPTIONS": _SQLITE_OPTIONS,
        }
    }

MEDIA_ROOT = os.environ.get("RESTO_TEST_MEDIA_ROOT") or os.path.join(tempfile.gettempdir(), "resto-celery-media")
MEDIA_URL = "/media/"
STATIC_URL = "/static/"
RESTO_MEDIA_HOSTS = json.loads(os.environ.get("RESTO_TEST_HOSTS", "[]"))

_storage_options = json.loads(os.environ.get("RESTO_TEST_STORAGE_OPTIONS", "{}"))
STORAGES = {
    "default": {
        "BACKEND": os.environ.get("RESTO_TEST_STORAGE", "django.core.files.storage.FileSystemStorage"),
        "OPTIONS": _storage_options,
    },
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}

CELERY_BROKER_URL = os.environ.get("RESTO_TEST_BROKER_URL", "memory://")
CELERY_RESULT_BACKEND = "django-db"
CELERY_RESULT_EXTENDED = True
CELERY_TASK_TRACK_STARTED = True
CELERY_BROKER_TRANSPORT_OPTIONS = {
    # Redis redelivers a task whose worker died once this many seconds passed...
    "visibility_timeout": float(os.environ.get("RESTO_TEST_VISIBILITY", "3600")),
    # ...and looks for such tasks every interval * throttle seconds (default 100 s).
    "unacked_restore_interval": 1,
    "unacked_restore_throttle": 1,
}
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Workers keep their database connection for this many tasks (unset: Celery reconnects for every task).
CELERY_DB_REUSE_MAX = int(os.environ["RESTO_TEST_DB_REUSE_MAX"]) if os.environ.get("RESTO_TEST_DB_REUSE_MAX") else None
RESTO_REDIS_URL = os.environ.get("RESTO_TEST_REDIS_URL")
#: Tests of resto_celery.bulk_slots: a bound of this many bulk messages, or "none" (unset: the default).
_BULK_SLOTS = os.environ.get("RESTO_TEST_BULK_SLOTS")
if _BULK_SLOTS:
    RESTO_BULK_SLOTS = None if _BULK_SLOTS == "none" else int(_BULK_SLOTS)

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Workers log through Celery's root handler (--loglevel INFO); nothing to add here.
LOGGING = {"version": 1, "disable_existing_loggers": False}
