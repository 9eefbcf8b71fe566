"""tests.settings without django_celery_results: a site of HybridStorage only, as the README's
install section for it lists its apps."""
from tests.settings import *  # noqa: F403

INSTALLED_APPS = [app for app in INSTALLED_APPS if app != "django_celery_results"]  # noqa: F405
