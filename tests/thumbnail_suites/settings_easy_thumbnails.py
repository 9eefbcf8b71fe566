"""Settings of the process that runs easy-thumbnails' suite: its own, extended for our backends.

Its ``STORAGES`` aliases stay as they are, ``default`` (``FileSystemStorage``) and
``easy_thumbnails`` (``TemporaryStorage``, a ``FileSystemStorage`` subclass): both are our
backend once :mod:`.swap` has run. The second is a master copy of its own (a temporary
folder) beside the first (``MEDIA_ROOT``): as on any site with two such storages on one
media host, the host gets a name of its own there (``resto_celery.E004``: a task names
only the host, so workers could not tell the two apart).
"""
from easy_thumbnails.tests.settings import *  # noqa: F403 - the suite's own settings

from .resto_settings import extend

extend(globals())

STORAGES = {
    **STORAGES,  # noqa: F405
    "easy_thumbnails": {
        **STORAGES["easy_thumbnails"],  # noqa: F405
        "OPTIONS": {"hosts": [{"url": RESTO_MEDIA_HOSTS[0], "name": "thumbnails"}]},  # noqa: F405
    },
}
