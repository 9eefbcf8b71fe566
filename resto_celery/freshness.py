"""Read-your-writes for URLs: which paths have a change that has not reached every host yet.

While a change of a path is on its way (tens of milliseconds on a quiet day, minutes while a
host is down), a host may hold the old bytes or none. An ``AsyncStorage`` with the
``master_url`` option answers ``url()`` of such a path with the master copy's URL, and the
hosts' URL once every host has confirmed the master's version. The state is shared by
every app process through Redis (a hash per master: path -> the version on its way):

- ``save()``/``delete()`` mark the path with the version they wrote (its fingerprint, or
  ``"-"`` for a delete), overwriting an older mark;
- the worker whose transfer completes the set (every host holds that version, or no host
  holds the file) confirms it: the mark is removed only if it still names that version, so
  a newer change stays marked.

``url()`` never asks Redis per call: each process keeps a snapshot of the marked paths,
read in one ``HKEYS`` at most every :data:`STALENESS` seconds, plus the paths it marked
itself since. A path marked by another process is therefore seen within ``STALENESS``
seconds; one confirmed is served from the hosts within as long (until then, from the
master, which is always right).
"""
import logging
import os
import threading
import time

from redis.exceptions import RedisError

from .coordination import _key

logger = logging.getLogger(__name__)

#: How old a process's snapshot of the marked paths may get (seconds).
STALENESS = 1.0
#: The mark of a deleted file.
DELETED = "-"

_CONFIRM = """
if redis.call('hget', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('hdel', KEYS[1], ARGV[1]) end
return 0
"""

_lock = threading.Lock()
_views = {}  # location -> _View
os.register_at_fork(after_in_child=_views.clear)


class _View:
    def __init__(self):
        self.names = frozenset()
        self.read_at = -STALENESS
        self.own = {}  # name -> monotonic time this process marked it


class Unconfirmed:
    """The marked paths of the master at ``location``, in Redis (``client``: the leases' Redis)."""

    def __init__(self, client, location):
        self.client = client
        self.key = "resto:unconfirmed:" + _key(location)
        with _lock:
            self.view = _views.setdefault(location, _View())

    def mark(self, name, version):
        """Record that ``version`` of ``name`` is on its way to the hosts (the app, after a change)."""
        self.client.hset(self.key, name, version)
        with _lock:
            self.view.own[name] = time.monotonic()

    def confirm(self, name, version):
        """``version`` of ``name`` is on every host: unmark it unless a newer change marked it since."""
        return bool(self.client.eval(_CONFIRM, 1, self.key, name, version))

    def pending(self, name):
        """Whether ``name`` may not be on every host yet, as this process knows (no Redis call
        unless the snapshot is older than :data:`STALENESS`)."""
        view = self.view
        now = time.monotonic()
        if now - view.read_at >= STALENESS:
            self._refresh(now)
        return name in view.names or name in view.own

    def _refresh(self, now):
        view = self.view
        try:
            names = frozenset(name.decode("utf-8", "surrogateescape") for name in self.client.hkeys(self.key))
        except RedisError as error:
            logger.warning("Could not read which files are still on their way to the media hosts: %s", error)
            with _lock:
                view.read_at = now  # try again after STALENESS, keep the last snapshot meanwhile
            return
        with _lock:
            view.names, view.read_at = names, now
            # What this process marked before the read is in the snapshot if still pending.
            view.own = {name: at for name, at in view.own.items() if at >= now}
