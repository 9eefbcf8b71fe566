"""The app that puts the backend under test in place of Django's ``FileSystemStorage``.

:mod:`.resto_settings` lists it first in ``INSTALLED_APPS``, so Django imports its
``models`` module (which does the swap) before any other app's models. Our backends can be
imported only once the apps are loaded (their module reads our models), and the thumbnail
apps build their storages while their models load (easy-thumbnails' ``storage`` module
makes its default storage on import): this is the one moment in between.
"""
