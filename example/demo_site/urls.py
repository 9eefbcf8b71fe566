from django.contrib import admin
from django.urls import path

from gallery import views

urlpatterns = [
    path("", views.upload, name="upload"),
    path("admin/", admin.site.urls),
]
