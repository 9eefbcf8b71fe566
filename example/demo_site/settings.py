"""Settings of the example site: SQLite, AsyncStorage, Celery on an embedded Redis.

`demo.py` starts Redis and the media hosts and passes them in RESTO_DEMO_* variables to
the processes it starts. While it runs it also writes them to var/demo-env.json, which
these settings read when the variables are not set: `manage.py resto_status` in another
terminal then sees the demo's Redis and hosts (never someone else's Redis on port 6379).
"""
import json
import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
VAR = Path(os.environ.get("RESTO_DEMO_VAR", BASE_DIR / "var"))


def _running_demo_environment(path):
    """The RESTO_DEMO_* variables of the demo that wrote ``path``, if it still runs."""
    try:
        written = json.loads(path.read_text())
        os.kill(written.pop("pid"), 0)
    except PermissionError:  # alive, as another user
        pass
    except (OSError, ValueError, KeyError, TypeError):  # no file, a bad one, or the demo is gone
        return {}
    return {name: value for name, value in written.items() if name.startswith("RESTO_DEMO_")}


if "RESTO_DEMO_HOSTS" not in os.environ:
    for _name, _value in _running_demo_environment(VAR / "demo-env.json").items():
        os.environ.setdefault(_name, _value)

SECRET_KEY = "resto-celery-demo-not-secret"
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]
USE_TZ = True
ROOT_URLCONF = "demo_site.urls"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_results",
    "resto_celery",
    "gallery",
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
if os.environ.get("RESTO_DEMO_POSTGRES_HOST"):  # docker-compose.yml
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": "resto_demo",
            "USER": "postgres",
            "HOST": os.environ["RESTO_DEMO_POSTGRES_HOST"],
        }
    }
else:
    import django

    # The worker's processes write concurrently: take the write lock when a transaction starts.
    _options = {"timeout": 20, **({"transaction_mode": "IMMEDIATE"} if django.VERSION >= (5, 1) else {})}
    DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": VAR / "demo.sqlite3", "OPTIONS": _options}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
STATIC_URL = "/static/"

# The master copy, and the media hosts that serve it.
MEDIA_ROOT = VAR / "master"
_hosts = json.loads(os.environ.get("RESTO_DEMO_HOSTS", "[]"))
# Where browsers fetch media: the first host, unless it is only reachable inside a network.
MEDIA_URL = os.environ.get("RESTO_DEMO_MEDIA_URL") or (_hosts[0] if _hosts else "/media/")
STORAGES = {
    "default": {
        "BACKEND": "resto_celery.storage.AsyncStorage",
        "OPTIONS": {
            "hosts": _hosts,
            "redis_url": os.environ.get("RESTO_DEMO_REDIS_URL"),
            # Quick retries so that the demo's outage heals in seconds.
            "max_retries": 8,
            "retry_backoff": 0.5,
            "retry_backoff_max": 2,
            "breaker_cooldown": 2,
            "failed_retry_after": 5,
            # Read-your-writes: until every host has a change, url() points at the master copy.
            "master_url": "/master-media/",
        },
    },
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}

# The master copy is served by resto_celery's view (demo_site/urls.py); runserver streams it.
# Behind nginx: "x-accel-redirect" and an internal location for MEDIA_ROOT.
RESTO_MASTER_SENDFILE = "django"

CELERY_BROKER_URL = os.environ.get("RESTO_DEMO_REDIS_URL", "redis://127.0.0.1:6379/0")
CELERY_RESULT_BACKEND = "django-db"
CELERY_RESULT_EXTENDED = True
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": 60, "unacked_restore_interval": 1, "unacked_restore_throttle": 5,
}
CELERY_WORKER_PREFETCH_MULTIPLIER = 1  # the tasks are acks_late: reserve one message at a time (README)
CELERY_DB_REUSE_MAX = 1000  # workers keep their database connection for 1000 tasks (README)
CELERY_BEAT_SCHEDULE = {
    "resto-reconcile": {
        "task": "resto_celery.reconcile", "schedule": 10.0, "options": {"queue": "resto", "expires": 10.0},
    },
}
