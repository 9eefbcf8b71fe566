"""Which storage a task's host belongs to.

Task messages carry only ``(host, path)``. A worker finds the storage (its master copy and
options) by host name among the Celery-replicated storages of its settings: those of
``STORAGES`` and any constructed in code (a ``FileField(storage=AsyncStorage(...))`` is
constructed when the models are imported).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, cast

from django.conf import settings
from django.utils.module_loading import import_string

if TYPE_CHECKING:
    from .storage import AsyncStorage

_by_host: dict[str, AsyncStorage] = {}
_lock = threading.Lock()


class UnknownHost(LookupError):
    """No Celery-replicated storage on this worker has a host of that name."""


class CeleryReplicated:
    """Base of the storages whose changes Celery workers replicate (``AsyncStorage``).

    Constructing one registers it (:func:`register`), because a worker must find a storage
    given in code too: a ``FileField(storage=AsyncStorage(...))`` is constructed when the
    models are imported, and nothing else names it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        register(cast("AsyncStorage", self))  # a mixin of AsyncStorage


def register(storage: AsyncStorage) -> None:
    """Make ``storage`` the one that serves its hosts (the latest constructed wins)."""
    with _lock:
        for host in storage.hosts:
            _by_host[host] = storage


def clear(**kwargs: Any) -> None:
    """Forget every registered storage (connected to ``setting_changed`` for STORAGES)."""
    if kwargs.get("setting", "STORAGES") in ("STORAGES", "RESTO_MEDIA_HOSTS"):
        with _lock:
            _by_host.clear()


def storage_for_host(host: str) -> AsyncStorage:
    """Return the storage that has a media host named ``host``, or raise :class:`UnknownHost`."""
    storage = _by_host.get(host)
    if storage is None:
        _load_configured()
        storage = _by_host.get(host)
    if storage is None:
        raise UnknownHost(
            f"No AsyncStorage on this worker has a media host named {host!r}; "
            f"check RESTO_MEDIA_HOSTS and STORAGES in the worker's settings (known: {sorted(_by_host)})."
        )
    return storage


def replicated_storages() -> list[AsyncStorage]:
    """Every Celery-replicated storage known to this process, each once."""
    _load_configured()
    with _lock:
        unique = {id(storage): storage for storage in _by_host.values()}
    return list(unique.values())


def _load_configured() -> None:
    from django.core.files.storage import storages

    for alias, entry in settings.STORAGES.items():
        try:
            backend = import_string(entry.get("BACKEND", ""))
        except ImportError:
            continue
        if isinstance(backend, type) and issubclass(backend, CeleryReplicated):
            # Constructing registers it, but the handler may return an instance built before
            # the registry was last cleared: register it again.
            register(cast("AsyncStorage", storages[alias]))
