"""Settings of the process that runs sorl-thumbnail's suite: its own, extended for our backends.

``tests.settings.pil`` is the suite's (the run puts the sdist's ``tests`` folder first on
our ``tests`` package's path). Its ``STORAGES["default"]`` (``TestStorage``, a
``FileSystemStorage`` subclass) is our backend once :mod:`.swap` has run.
"""
from tests.settings.pil import *  # noqa: F403 - the suite's own settings (tox.ini's "pil" target)

from .resto_settings import extend

extend(globals())
