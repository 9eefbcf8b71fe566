"""Serve the master copy of a file, for URLs of changes not yet on every media host.

``AsyncStorage(master_url=...)`` points ``url()`` of a file whose newest change is still on
its way at the master copy (see :mod:`resto_celery.freshness`). Serve that URL either with
the app servers' web server (a location for ``MEDIA_ROOT``: the fastest), or with this view::

    # urls.py
    path("master-media/", include("resto_celery.urls")),
    # settings.py: RESTO_MASTER_URL = "/master-media/"

The view never streams files from Python in production: it answers with the header that
hands the file to the web server in front (``RESTO_MASTER_SENDFILE``):

- ``"x-accel-redirect"`` (nginx): ``X-Accel-Redirect: RESTO_MASTER_ACCEL_PREFIX + name``,
  an ``internal`` location whose ``alias`` is ``MEDIA_ROOT``;
- ``"x-sendfile"`` (Apache ``mod_xsendfile``, lighttpd): ``X-Sendfile`` with the file's path.

Under ``DEBUG`` (``runserver``), or with ``RESTO_MASTER_SENDFILE = "django"``, Django streams it.

:func:`metrics` is the Prometheus page (see :mod:`resto_celery.metrics`)::

    path("metrics", resto_celery.views.metrics, name="resto-metrics"),
"""
import mimetypes
import os

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, SuspiciousFileOperation
from django.core.files.storage import storages
from django.http import FileResponse, Http404, HttpResponse
from django.utils.encoding import filepath_to_uri
from django.views.decorators.http import require_safe

from . import metrics as resto_metrics
from .master import MARKER_NAME

SENDFILE_MODES = ("x-accel-redirect", "x-sendfile", "django")


@require_safe
def serve_master(request, name, storage="default"):
    """The master copy of ``name`` in ``STORAGES[storage]`` (404 if it has none)."""
    master = storages[storage]
    try:
        path = master.path(name)
    except (SuspiciousFileOperation, ValueError):
        raise Http404("No such file.") from None
    relative = os.path.relpath(path, master.location).replace(os.sep, "/")
    if relative == MARKER_NAME or relative.startswith("../"):
        raise Http404("No such file.")
    mode = getattr(settings, "RESTO_MASTER_SENDFILE", None) or ("django" if settings.DEBUG else None)
    if mode not in SENDFILE_MODES:
        raise ImproperlyConfigured(
            "RESTO_MASTER_SENDFILE must be 'x-accel-redirect' (nginx), 'x-sendfile' (Apache, lighttpd) "
            "or 'django' (streams from Python: development only)."
        )
    try:
        handle = open(path, "rb")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise Http404("No such file.") from None
    content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
    if mode == "django":
        return FileResponse(handle, content_type=content_type)
    handle.close()
    response = HttpResponse(content_type=content_type)
    if mode == "x-accel-redirect":
        prefix = getattr(settings, "RESTO_MASTER_ACCEL_PREFIX", "/_resto_master/")
        response["X-Accel-Redirect"] = prefix + filepath_to_uri(relative)
    else:
        response["X-Sendfile"] = path
    return response


@require_safe
def metrics(request):
    """The Prometheus page: per-host figures from the ``Replica`` rows, plus everything in
    ``prometheus_client``'s default registry (or, with ``PROMETHEUS_MULTIPROC_DIR``, every
    process's files), django-prometheus's metrics included. Restrict it to your Prometheus
    (an ``allow`` in the web server, or a private address): it names the media hosts."""
    if not resto_metrics.available():
        return HttpResponse(
            "prometheus_client is not installed: pip install 'resto-celery[prometheus]'\n",
            status=501, content_type="text/plain",
        )
    if not resto_metrics.enabled():
        raise Http404("Metrics are off (RESTO_METRICS = False).")
    body, content_type = resto_metrics.exposition(request.headers.get("Accept", ""))
    return HttpResponse(body, content_type=content_type)
