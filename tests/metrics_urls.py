"""The test site's URLs plus the metrics page, for tests/test_metrics.py (``pytest.mark.urls``)."""
from django.urls import include, path

from resto_celery import views
from tests.urls import urlpatterns as site_urlpatterns

urlpatterns = [
    *site_urlpatterns,
    path("metrics", views.metrics, name="resto-metrics"),
    path("django-prometheus/", include("django_prometheus.urls")),
]
