"""Operator actions (admin, commands): re-send tasks now, or mark a host for a full resync.

They enqueue the same ``(host, path)`` tasks as the storage; the master decides what is sent.
"""
import logging

from celery import current_app
from django.utils import timezone

from . import lanes, registry
from .models import Replica
from .tasks import reconcile

logger = logging.getLogger(__name__)


def retry(replicas, *, user=None):
    """Enqueue a task now for each row of the ``Replica`` queryset. Returns how many were sent."""
    sent = 0
    for host, path in replicas.values_list("host", "path").iterator():
        storage = registry.storage_for_host(host)
        operation = "upload" if storage.exists(path) else "delete"
        storage.enqueue(operation, host, path)
        sent += 1
    logger.info("%s re-sent %d replication task(s).", user or "An operator", sent)
    return sent


def retry_failed(host, *, user=None):
    """Enqueue a task now for every failed row of ``host``. Returns how many were sent."""
    return retry(Replica.objects.filter(host=host, state=Replica.State.FAILED), user=user)


def mark_for_resync(host, *, user=None):
    """Make the next reconcile send every file to ``host`` again, and queue a reconcile now.

    Fingerprints are forgotten, so no transfer is skipped; files with no row were going to
    be sent anyway. Returns how many rows were marked.
    """
    storage = registry.storage_for_host(host)  # refuses hosts that are not configured
    marked = Replica.objects.filter(host=host).update(fingerprint="", retry_at=timezone.now())
    reconcile.apply_async(queue=storage.options.bulk_queue_for(host), priority=lanes.bulk_priority(current_app))
    logger.info("%s marked %s for a full resync (%d rows).", user or "An operator", host, marked)
    return marked


def allow_deletes(host, *, user=None):
    """The operator's go-ahead for deletions the brake held on ``host``: queue a reconcile pass
    that may delete beyond the brake there (and nowhere else)."""
    storage = registry.storage_for_host(host)
    reconcile.apply_async(kwargs={"allow_deletes": [host]}, queue=storage.options.bulk_queue_for(host),
                          priority=lanes.bulk_priority(current_app))
    logger.warning("%s allowed the held deletions on %s; a reconcile pass is queued.", user or "An operator", host)
