from django.contrib import admin
from django.urls import include, path

from gallery import views

urlpatterns = [
    path("", views.upload, name="upload"),
    path("demo/hosts/", views.hosts, name="demo-hosts"),  # take a media host down, bring it back
    path("admin/", admin.site.urls),
    path("master-media/", include("resto_celery.urls")),  # files on their way to the media hosts
]
