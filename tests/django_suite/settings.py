"""Settings of the process that runs Django's storage tests (see :mod:`tests.django_suite.run`).

As Django's own ``tests/test_sqlite.py``, plus the apps ``AsyncStorage`` reads tables of.
The runner adds the suite's ``file_storage`` app once the storage is swapped in.
"""
import json
import os

SECRET_KEY = "django_tests_secret_key"
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3"}}
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = False

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django_celery_results",
    "resto_celery",
]
ROOT_URLCONF = "file_storage.urls"
STATIC_URL = "static/"
# Django's runner shows only errors; a 404 on DELETE (a WARNING) is expected here.
LOGGING = {"version": 1, "disable_existing_loggers": False, "loggers": {"resto_celery": {"level": "ERROR"}}}

RESTO_MEDIA_HOSTS = json.loads(os.environ["RESTO_SUITE_HOSTS"])

# AsyncStorage's tasks go to an in-memory broker that no worker reads: the suite tests the
# storage API, not replication, so no lease is ever taken in Redis.
CELERY_BROKER_URL = "memory://"
SILENCED_SYSTEM_CHECKS = ["resto_celery.E005"]
CELERY_RESULT_BACKEND = "django-db"
