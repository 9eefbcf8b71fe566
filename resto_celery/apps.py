from django.apps import AppConfig


class RestoCeleryConfig(AppConfig):
    name = "resto_celery"
    verbose_name = "Replicated media storage"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from django.test.signals import setting_changed

        # Importing checks and metrics registers their system checks.
        from . import checks, metrics, registry  # noqa: F401

        setting_changed.connect(registry.clear, dispatch_uid="resto_celery.registry.clear")
        setting_changed.connect(metrics.reset, dispatch_uid="resto_celery.metrics.reset")
        metrics.connect_worker_signals()
