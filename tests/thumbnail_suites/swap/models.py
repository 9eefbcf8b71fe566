"""Importing this module makes ``django.core.files.storage.FileSystemStorage`` our backend.

The backend is ``RESTO_SUITE_BACKEND`` (a key of :data:`..suites.BACKENDS`). Every storage
the suite builds from that name afterwards is ours: the classes its modules derive from it
(``TemporaryStorage``, ``TestStorage``, easy-thumbnails' ``ThumbnailFileSystemStorage``),
and ``STORAGES`` entries naming it. No model is defined here.
"""
import os

import django.contrib.staticfiles.storage  # Django's own subclasses stay as they are
import django.core.files.storage
from django.utils.module_loading import import_string

from ..suites import BACKENDS

django.core.files.storage.FileSystemStorage = import_string(BACKENDS[os.environ["RESTO_SUITE_BACKEND"]])
