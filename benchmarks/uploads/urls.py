from django.urls import path

from . import views

urlpatterns = [
    path("upload/<str:config>/", views.upload),
    path("ping/", views.ping),
]
