"""``path("master-media/", include("resto_celery.urls"))``: the master copy, see :mod:`resto_celery.views`."""
from django.urls import path

from .views import serve_master

app_name = "resto_celery"
urlpatterns = [path("<path:name>", serve_master, name="master")]
