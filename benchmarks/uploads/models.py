"""An upload as a site stores one: a title and a file, saved through a ``FileField``."""
from django.core.files.storage import storages
from django.db import models


def fs_storage():
    return storages["upload_fs"]


def async_0_storage():
    return storages["upload_async_0"]


def async_1_storage():
    return storages["upload_async_1"]


def async_3_storage():
    return storages["upload_async_3"]


class Upload(models.Model):
    title = models.CharField(max_length=200)
    uploaded = models.DateTimeField(auto_now_add=True)

    class Meta:
        abstract = True

    def __str__(self):
        return self.title


class FsUpload(Upload):
    file = models.FileField(upload_to="uploads/%Y/%m/", storage=fs_storage)


class Async0Upload(Upload):
    file = models.FileField(upload_to="uploads/%Y/%m/", storage=async_0_storage)


class Async1Upload(Upload):
    file = models.FileField(upload_to="uploads/%Y/%m/", storage=async_1_storage)


class Async3Upload(Upload):
    file = models.FileField(upload_to="uploads/%Y/%m/", storage=async_3_storage)


#: The model of each configuration, by the name its URL uses.
MODELS = {"fs": FsUpload, "async-0": Async0Upload, "async-1": Async1Upload, "async-3": Async3Upload}
