"""System checks: bad settings are reported by ``manage.py check`` before anything runs.

Messages quote :mod:`resto_celery.conf`'s errors, which never show a credential.
"""
import os

import celery
from celery import current_app
from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.core.files.storage import storages
from django.db import DatabaseError, connections, router
from django.utils.module_loading import import_string

from . import bulk_slots, conf, registry, status
from .broker import redis_url_of
from .models import Replica
from .storage import ReplicatedStorageMixin


@checks.register(checks.Tags.compatibility)
def check_settings(app_configs=None, **kwargs):
    """Validate the global ``RESTO_*`` settings and every ``STORAGES`` entry using our backends."""
    errors = []
    try:
        # Leases are checked per storage, for the backends that take them (AsyncStorage).
        _check_options(conf.resolve(leases=False), "RESTO_* settings", errors)
    except ImproperlyConfigured as exc:
        errors.append(checks.Error(str(exc), id="resto_celery.E001"))
    replicated = {}  # host name -> (alias, master location) of Celery-replicated storages
    for alias, entry in getattr(settings, "STORAGES", {}).items():
        try:
            backend = import_string(entry.get("BACKEND", ""))
        except ImportError:
            continue  # Django reports unusable backends itself
        if not (isinstance(backend, type) and issubclass(backend, ReplicatedStorageMixin)):
            continue
        where = f"STORAGES[{alias!r}]"
        try:
            storage = storages[alias]  # the site's own instance: no throwaway copy registered
        except ImproperlyConfigured as exc:
            errors.append(checks.Error(f"{where}: {exc}", id="resto_celery.E002"))
            continue
        if not storage.options.hosts:
            errors.append(
                checks.Warning(
                    f"{where} uses {backend.__name__} with no media hosts: files stay in the master copy only.",
                    hint="Set RESTO_MEDIA_HOSTS or the 'hosts' option.",
                    id="resto_celery.W001",
                )
            )
        _check_options(storage.options, where, errors)
        if isinstance(storage, registry.CeleryReplicated):
            _check_celery_storage(storage, alias, where, replicated, errors)
    return errors


def _check_celery_storage(storage, alias, where, replicated, errors):
    try:
        conf.check_leases(storage.options.lease_ttl, storage.options.timeout)
    except ImproperlyConfigured as exc:
        errors.append(checks.Error(f"{where}: {exc}", id="resto_celery.E002"))
    for host in storage.hosts:
        other = replicated.setdefault(host, (alias, storage.location))
        if other[1] != storage.location:
            errors.append(
                checks.Error(
                    f"{where} and STORAGES[{other[0]!r}] both replicate to media host {host} from different "
                    f"master copies; a task names only the host, so workers could not tell them apart.",
                    hint="Give one of them another name with a dict host entry: {'url': ..., 'name': ...}.",
                    id="resto_celery.E004",
                )
            )
    # The Django setting, not the Celery app's conf: checks run before a worker's app is set up.
    broker = getattr(settings, "CELERY_BROKER_URL", None) or ""
    if storage.options.redis_url is None and broker and redis_url_of(broker) is None:
        errors.append(
            checks.Error(
                f"{where}: AsyncStorage keeps its leases in Redis, and the Celery broker ({broker.split('://')[0]}) "
                f"is not Redis.",
                hint="Set RESTO_REDIS_URL (or the 'redis_url' option).",
                id="resto_celery.E005",
            )
        )


def _check_options(options, where, errors):
    for host in options.hosts:
        if (host.auth or host.headers) and host.scheme == "http":
            errors.append(
                checks.Warning(
                    f"{where}: credentials for media host {host.name} would be sent over plain HTTP.",
                    hint="Use an https:// URL for hosts that need credentials.",
                    id="resto_celery.W002",
                )
            )
        if host.ca_bundle and not os.path.isfile(host.ca_bundle):
            errors.append(
                checks.Error(
                    f"{where}: the CA bundle {host.ca_bundle} for media host {host.name} does not exist.",
                    id="resto_celery.E003",
                )
            )


@checks.register(checks.Tags.compatibility)
def check_master_copies(app_configs=None, **kwargs):
    """Each master copy this process would replicate from carries the site's marker.

    Celery runs the system checks when a worker starts, so a worker on a machine whose
    volume is not mounted says so before it takes any task (and logs it at ERROR, see
    ``resto_celery.tasks.check_masters_at_start``). Quiet until the database is migrated.
    """
    try:
        masters = status.master_statuses()
    except (DatabaseError, ImproperlyConfigured, LookupError):
        return []  # not migrated yet, or settings errors that check_settings reports
    return [
        checks.Error(
            f"Replication is refused from the master copy {master.location}: {master.problem}.",
            hint="Mount the volume that holds the master copy, or if this folder is the master, "
            "run 'manage.py resto_master --adopt'.",
            id="resto_celery.E010",
        )
        for master in masters if master.problem
    ]


def reconnecting_database():
    """The alias of the database the workers write ``Replica`` rows to when a worker would
    reconnect to it for every task, else ``None``.

    Celery's Django fixup closes the database connections before and after every task
    unless ``CELERY_DB_REUSE_MAX`` is set: unconditionally since Celery 5.6 (celery#9824),
    when ``CONN_MAX_AGE`` is 0 before. SQLite is left out: opening its file costs nothing.
    """
    alias = router.db_for_write(Replica)
    connection = connections[alias]
    if connection.vendor == "sqlite" or _db_reuse_max():
        return None
    if celery.VERSION < (5, 6) and connection.settings_dict.get("CONN_MAX_AGE", 0) != 0:
        return None
    return alias


def _db_reuse_max():
    """``CELERY_DB_REUSE_MAX`` as the worker's fixup reads it (Django settings with the
    ``CELERY`` namespace), or from the Django settings should the app use none."""
    return current_app.conf.get("CELERY_DB_REUSE_MAX") or getattr(settings, "CELERY_DB_REUSE_MAX", None)


RECONNECT_HINT = (
    "Set CELERY_DB_REUSE_MAX (1000, say): Celery then closes the connections to DATABASES[{alias!r}] "
    "every 1000 tasks instead of around each."
)


@checks.register(checks.Tags.database, deploy=True)
def check_worker_connections(app_configs=None, **kwargs):
    """``check --deploy``: a worker that reconnects to the database for every task pays a
    connection (4 ms to a local PostgreSQL) for every change it replicates."""
    try:
        if not registry.replicated_storages():
            return []
    except ImproperlyConfigured:
        return []  # check_settings reports it
    alias = reconnecting_database()
    if alias is None:
        return []
    return [
        checks.Warning(
            f"Celery workers reconnect to DATABASES[{alias!r}] for every task: a new connection for every "
            "change replicated.",
            hint=RECONNECT_HINT.format(alias=alias),
            id="resto_celery.W003",
        )
    ]


@checks.register(checks.Tags.compatibility)
def check_bulk_slots(app_configs=None, **kwargs):
    """``RESTO_BULK_SLOTS`` (:mod:`resto_celery.bulk_slots`): ``"auto"``, None, or a whole number of at least 1."""
    value = bulk_slots.configured_slots()
    whole = isinstance(value, int) and not isinstance(value, bool)
    if value is None or value == bulk_slots.AUTO or (whole and value >= 1):
        return []
    return [
        checks.Error(
            f'RESTO_BULK_SLOTS must be "auto" (the default: half the worker\'s pool), None (no bound) '
            f"or a whole number of at least 1, not {value!r}.",
            hint="It is how many bulk messages (catch-up work) a worker holds at once.",
            id="resto_celery.E011",
        )
    ]
