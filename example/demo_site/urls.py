from django.contrib import admin
from django.urls import include, path

from gallery import views

urlpatterns = [
    path("", views.upload, name="upload"),
    path("admin/", admin.site.urls),
    path("master-media/", include("resto_celery.urls")),  # files on their way to the media hosts
]
