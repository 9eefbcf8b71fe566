"""The master copy's marker: proof that a folder is the site's master, not an empty mount point.

The master decides what every media host holds: a file it lacks is deleted everywhere. A
folder that merely sits at ``MEDIA_ROOT`` (a volume that failed to mount, a container
started without it, a typo, a restore into the wrong place) looks exactly like a master
that lost every file. So the master carries a marker file, ``.resto-master``, holding an
identity that the database (:class:`~resto_celery.models.MasterCopy`) also records, as
Syncthing's ``.stfolder`` does. Every component that decides from the master's state
(tasks, reconcile, ``resto_resync``) calls :func:`verify` first; without the right marker
nothing is sent, the change stays recorded, and the refusal is logged and shown.

Who makes the marker: the first save of an ``AsyncStorage`` in a site whose database has
no identity for that folder yet (:func:`ensure`), ``manage.py resto_master --init``, or
``resto_resync``'s first run. Workers never make one: a worker is exactly the process that
may be looking at the wrong folder.
"""
import json
import logging
import os
import platform
import tempfile
import threading
import time
import uuid

from django.db import DatabaseError, IntegrityError
from django.db.models import F
from django.utils import timezone

from .exceptions import MasterUnavailable
from .master import MARKER_NAME
from .models import Hold, MasterCopy

logger = logging.getLogger(__name__)

#: How long a process trusts the identity it read from the database (seconds).
EXPECTED_TTL = 30.0
#: A machine that keeps refusing updates its hold at most this often (seconds).
REPORT_EVERY = 5.0

_lock = threading.Lock()
_expected = {}  # location -> (identity or None, monotonic time read)
_ensured = set()  # locations this process has seen with a marker (app side)
_reported = {}  # location -> monotonic time of the last hold written
_cleared = {}  # location -> monotonic time of the last hold cleared
os.register_at_fork(after_in_child=lambda: (_expected.clear(), _reported.clear(), _cleared.clear()))


def machine():
    """The name of this machine, as holds name it."""
    return platform.node() or "unknown"


def marker_path(location):
    return os.path.join(location, MARKER_NAME)


def is_marker(name):
    """Whether the storage name ``name`` is the marker (it is never a file of the site)."""
    return name == MARKER_NAME


def read(location):
    """The identity in the marker of ``location``, or None when there is no marker.

    Raises :class:`MasterUnavailable` when the marker exists but cannot be read or parsed:
    an I/O error is not an absence.
    """
    try:
        with open(marker_path(location), "rb") as handle:
            content = handle.read(4096)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:
        raise MasterUnavailable(location, "", f"its marker file {MARKER_NAME} cannot be read: {error}") from error
    try:
        identity = json.loads(content)["identity"]
    except (ValueError, KeyError, TypeError):
        raise MasterUnavailable(location, "", f"its marker file {MARKER_NAME} is damaged") from None
    if not isinstance(identity, str) or not identity:
        raise MasterUnavailable(location, "", f"its marker file {MARKER_NAME} is damaged")
    return identity


def write(location, identity, *, replace=False):
    """Write the marker of ``location`` atomically; with ``replace`` False, never over another one."""
    content = json.dumps({
        "identity": identity,
        "created": timezone.now().isoformat(),
        "about": "resto_celery master copy marker: without it no worker replicates from this folder.",
    }).encode()
    fd, temp = tempfile.mkstemp(dir=location, prefix=".resto-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, 0o644)
        if replace:
            os.replace(temp, marker_path(location))
        else:
            try:
                os.link(temp, marker_path(location))
            except FileExistsError:
                pass  # another process made it first: read() tells whose it is
    finally:
        if os.path.lexists(temp):
            os.unlink(temp)


def expected(location, *, fresh=False):
    """The identity the database records for ``location`` (None if none), cached for a while."""
    now = time.monotonic()
    with _lock:
        cached = _expected.get(location)
    if cached is not None and not fresh and now - cached[1] < EXPECTED_TTL:
        return cached[0]
    identity = MasterCopy.objects.filter(location=location).values_list("identity", flat=True).first()
    with _lock:
        _expected[location] = (identity, now)
    return identity


def forget(location=None):
    """Drop what this process remembers about ``location`` (or every location)."""
    with _lock:
        for cache in (_expected, _reported, _cleared):
            cache.pop(location, None) if location else cache.clear()
        _ensured.discard(location) if location else _ensured.clear()


def verify(location, path="", *, record=True, create=False):
    """Return the master's identity, or raise :class:`MasterUnavailable` saying why it is refused.

    The folder must hold a marker whose identity is the one the database records. A marker
    the database has never heard of is recorded (the first check after an upgrade); with
    ``create`` (commands run by an operator), a folder with no marker in a site that has no
    identity yet gets one. ``record`` writes the refusal as a :class:`~resto_celery.models.Hold`
    of this machine (at most every few seconds) and clears it after a success.
    """
    try:
        found = read(location)
        wanted = expected(location)
        if found is None and wanted is None and create:
            found = wanted = _create(location)
        if found is not None and wanted is None:
            wanted = _record_identity(location, found)
        if found is not None and found != wanted:
            wanted = expected(location, fresh=True)  # adopted elsewhere since we cached it?
        problem = judge(found, wanted)
        if problem:
            raise MasterUnavailable(location, path, problem)
    except MasterUnavailable as refusal:
        if record:
            _report(location, refusal)
        raise
    if record:
        _clear(location)
    return found


def judge(found, wanted):
    """Why a folder whose marker says ``found`` is not the master whose identity is ``wanted``
    (either may be None: no marker, nothing recorded); "" when it is the master."""
    if found is None and wanted is None:
        return (
            f"it has no marker file {MARKER_NAME} yet: the first save makes one, or run "
            f"'manage.py resto_master --init' on a machine where this folder is the master"
        )
    if found is None:
        return (
            f"its marker file {MARKER_NAME} is missing: is the volume mounted? An empty or wrong folder "
            f"is not the master, so nothing is uploaded or deleted until the marker is back"
        )
    if wanted is not None and found != wanted:
        return (
            f"its marker file {MARKER_NAME} is another master's (identity {found}; this site's is {wanted}): "
            f"a wrong volume, a restore into the wrong folder, or a marker deleted and made again? Nothing is "
            f"sent from it; if this folder is the master, run 'manage.py resto_master --adopt'"
        )
    return ""


def ensure(location):
    """Make sure the master at ``location`` has its marker; called by the app after a master write.

    Costs one ``open`` per process once the marker exists, and never a database query: the
    request writes no row and reads none. A folder without a marker gets a new one; the
    first worker that verifies it records its identity (a new site, or the first save after
    an upgrade). That is safe for a wrong folder too: a site whose database already records
    an identity refuses a marker made anywhere else (:func:`verify`), so an app server that
    saves into an unmounted volume cannot make the workers trust it.
    """
    if location in _ensured:
        return
    try:
        found = read(location)
        if found is None:
            write(location, uuid.uuid4().hex)  # the folder exists: a file was just written in it
            found = read(location)  # another process may have made it first: theirs stands
            logger.info("Made the master copy marker %s (identity %s).", marker_path(location), found)
    except (MasterUnavailable, OSError) as error:
        logger.error("Could not check the marker of the master copy %s: %s", location, error)
        return
    with _lock:
        _ensured.add(location)


def adopt(location):
    """Declare ``location`` the master: write the site's identity into its marker (making one if needed).

    For an operator who restored or moved the master and knows this folder is the right one.
    Returns the identity.
    """
    identity = expected(location, fresh=True)
    if identity is None:
        identity = _record_identity(location, uuid.uuid4().hex)
    write(location, identity, replace=True)
    forget(location)
    Hold.objects.filter(kind=Hold.Kind.MASTER, location=location).delete()
    return identity


def holds(location=None):
    """The current holds (refusals and held deletions), newest first."""
    rows = Hold.objects.all() if location is None else Hold.objects.filter(location=location)
    return list(rows.order_by("-last_at"))


def _create(location):
    """Make the marker if the database has no identity for ``location``; return the identity or None."""
    if expected(location, fresh=True) is not None:
        logger.error(
            "The master copy %s has no marker file %s although this site made one: workers refuse to "
            "replicate from it. If this folder really is the master (restored from a backup, moved), run "
            "'manage.py resto_master --adopt'; if a volume is not mounted, mount it.",
            location, MARKER_NAME,
        )
        return None
    identity = _record_identity(location, uuid.uuid4().hex)
    os.makedirs(location, exist_ok=True)
    write(location, identity)
    logger.info("Made the master copy marker %s (identity %s).", marker_path(location), identity)
    return read(location)


def _record_identity(location, identity):
    """Record ``identity`` for ``location`` unless one is recorded already; return the recorded one."""
    try:
        row, _ = MasterCopy.objects.get_or_create(location=location, defaults={"identity": identity})
    except IntegrityError:  # another process recorded one at the same moment
        row = MasterCopy.objects.get(location=location)
    with _lock:
        _expected[location] = (row.identity, time.monotonic())
    return row.identity


def _report(location, refusal):
    if not _time_to(_reported, _cleared, location, REPORT_EVERY):
        return
    try:
        record_hold(Hold.Kind.MASTER, location, machine(), refusal.reason)
    except DatabaseError as error:  # the refusal is logged by the caller all the same
        logger.warning("Could not record the refusal of %s: %s", location, error)


def _clear(location):
    if not _time_to(_cleared, _reported, location, EXPECTED_TTL):
        return
    try:
        Hold.objects.filter(kind=Hold.Kind.MASTER, location=location, subject=machine()).delete()
    except DatabaseError as error:
        logger.warning("Could not clear the refusal of %s: %s", location, error)


def _time_to(done, opposite, location, every):
    """Whether the hold of ``location`` is due a write (its last one, in ``done``, is older than
    ``every`` seconds); if so, note it now and forget the last write of the ``opposite`` kind."""
    now = time.monotonic()
    with _lock:
        if now - done.get(location, -every) < every:
            return False
        done[location] = now
        opposite.pop(location, None)
    return True


def record_hold(kind, location, subject, reason, count=1, *, add=True):
    """Create or refresh the :class:`~resto_celery.models.Hold` of ``(kind, location, subject)``.

    ``count`` is added to the row's count (``add``) or replaces it.
    """
    now = timezone.now()
    fields = {"reason": reason, "last_at": now, "count": F("count") + count if add else count}
    if Hold.objects.filter(kind=kind, location=location, subject=subject).update(**fields):
        return
    try:
        Hold.objects.create(kind=kind, location=location, subject=subject, reason=reason, count=count,
                            first_at=now, last_at=now)
    except IntegrityError:
        Hold.objects.filter(kind=kind, location=location, subject=subject).update(**fields)


def clear_hold(kind, location, subject):
    """Remove the hold of ``(kind, location, subject)``, if any."""
    Hold.objects.filter(kind=kind, location=location, subject=subject).delete()
