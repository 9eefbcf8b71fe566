"""A tiny Django app for ``bench_upload_view``: a model with a ``FileField`` and its upload view.

One model per storage under test (Django binds a ``FileField`` to its storage when the
model is defined), each with the storage of a ``STORAGES`` alias that
``RESTO_BENCH_UPLOAD_STORAGES`` defines (see ``benchmarks/settings.py``).
"""
