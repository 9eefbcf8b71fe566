"""What our backends add to a suite's own settings (see ``settings_<app>``).

The suite keeps its settings; this adds only what our backends need: their apps (whose
tables ``AsyncStorage`` reads), :mod:`.swap` first among the apps, one media host, and a
Celery broker in memory (no worker: the suites test the storage API, not replication).
"""
import json
import os

SWAP_APP = "tests.thumbnail_suites.swap"


def extend(namespace):
    """Add our settings to the suite's settings module ``namespace`` (its ``globals()``)."""
    namespace["INSTALLED_APPS"] = [
        # First, so its models module (the swap) loads before any app's models do.
        SWAP_APP,
        *namespace["INSTALLED_APPS"],
        "django_celery_results",
        "resto_celery",
    ]
    namespace["RESTO_MEDIA_HOSTS"] = json.loads(os.environ["RESTO_SUITE_HOSTS"])
    # AsyncStorage's tasks go to an in-memory broker that no worker reads, so no lease is
    # ever taken in Redis (resto_celery.E005 asks for Redis for those).
    namespace["CELERY_BROKER_URL"] = "memory://"
    namespace["CELERY_RESULT_BACKEND"] = "django-db"
    namespace["SILENCED_SYSTEM_CHECKS"] = [*namespace.get("SILENCED_SYSTEM_CHECKS", ()), "resto_celery.E005"]
    # A DELETE of a file the host lacks is a 404, logged at WARNING: expected here.
    namespace["LOGGING"] = {
        "version": 1, "disable_existing_loggers": False, "loggers": {"resto_celery": {"level": "ERROR"}},
    }
