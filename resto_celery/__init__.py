"""Replicated media storage for Django: a master copy plus every media server, kept in sync by Celery.

The stable API is what ``__all__`` lists, importable from the package itself::

    from resto_celery import AsyncStorage, ReplicationError

Everything else (modules and names with or without a leading underscore) may change between
releases. The storages are imported on first use, so importing the package needs no
configured Django.
"""
import importlib

#: Public name -> the module that defines it.
_PUBLIC = {
    "AsyncStorage": "storage",
    "HybridStorage": "storage",
    "DistributedStorage": "storage",
    "MasterStorage": "master",
    "ReplicationError": "exceptions",
    "TransportError": "exceptions",
    "HostUnreachable": "exceptions",
    "HostTimeout": "exceptions",
    "HostShortCircuited": "exceptions",
    "TLSFailure": "exceptions",
    "UnexpectedStatus": "exceptions",
    "MissingFile": "exceptions",
    "MasterError": "exceptions",
    "MasterUnavailable": "exceptions",
    "MasterReadError": "exceptions",
    "replicated_to_host": "signals",
    "replicated_everywhere": "signals",
}

__all__ = [
    "AsyncStorage", "DistributedStorage", "HostShortCircuited", "HostTimeout", "HostUnreachable", "HybridStorage",
    "MasterError", "MasterReadError", "MasterStorage", "MasterUnavailable", "MissingFile", "ReplicationError",
    "TLSFailure", "TransportError", "UnexpectedStatus", "replicated_everywhere", "replicated_to_host",
]


def __getattr__(name):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'resto_celery' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *__all__})
