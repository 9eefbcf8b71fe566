"""Signals sent by the workers when a change has arrived on the media hosts.

Connect to them in a worker process (an ``AppConfig.ready()`` imported by the workers) to
purge a CDN, warm a cache or tell a client its upload is live::

    from django.dispatch import receiver
    from resto_celery.signals import replicated_everywhere

    @receiver(replicated_everywhere)
    def purge_cdn(sender, name, action, **kwargs):
        cdn.purge(sender.url(name))

Each is sent once per change: not again for a redelivered or duplicate task, a transfer
skipped because the host already had those bytes, or a reconcile that finds nothing to do.
Overwrites in quick succession are replicated as the master's newest state, so a receiver
hears of the version the hosts hold. Receivers run inside the worker's task: keep them
quick, and what they raise is logged, never lets the task fail.
"""
from django.dispatch import Signal

#: A change of ``name`` reached one host. ``sender`` is the storage; arguments ``host`` (its
#: name), ``name`` and ``action``: ``"upload"`` (the host holds the master's bytes) or
#: ``"delete"`` (the host no longer has the file).
replicated_to_host = Signal()

#: A change of ``name`` reached every host of the storage. ``sender`` is the storage;
#: arguments ``name`` and ``action`` (``"upload"`` or ``"delete"``).
replicated_everywhere = Signal()
