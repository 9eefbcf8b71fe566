from django.apps import AppConfig


class RestoCeleryConfig(AppConfig):
    name = "resto_celery"
    verbose_name = "Replicated media storage"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from django.test.signals import setting_changed

        from . import checks, registry  # noqa: F401 - importing checks registers the system checks

        setting_changed.connect(registry.clear, dispatch_uid="resto_celery.registry.clear")
