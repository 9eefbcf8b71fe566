"""``Replica``: what each media host holds, as far as the workers know.

Rows are written by workers only, each write in its own autocommit transaction, never by
the web request. With the master tree, they are the whole truth that ``reconcile`` needs.
"""
import functools

from django.db import connections, models
from django.utils import timezone

from .exceptions import TransportError

#: Backends whose SQL has ``INSERT ... ON CONFLICT (...) DO UPDATE`` (SQLite since 3.24): the
#: workers' row writes go straight to the cursor there, the rest through ``bulk_create``.
ON_CONFLICT_VENDORS = frozenset({"postgresql", "sqlite"})

#: The columns a new synced row needs beyond those :func:`_synced_values` sets: empty, not
#: NULL (the table has no database defaults).
_NEW_ROW = {"last_error": "", "failed_task_id": ""}


class ReplicaQuerySet(models.QuerySet):
    def record_synced(self, rows, task_id=""):
        """Each ``(host, path, fingerprint)`` of ``rows``: the host now holds the master's bytes
        with that fingerprint.

        One ``INSERT ... ON CONFLICT DO UPDATE`` for all, in autocommit. It runs for every
        file on every host: on PostgreSQL and SQLite the statement goes to the cursor as it
        is (0.9 ms for three rows against 1.9 ms through ``bulk_create``, which builds a
        model per row and wraps the one statement in a transaction).

        On PostgreSQL, in autocommit, the statement's own transaction commits without
        waiting for the WAL to reach the disk (``synchronous_commit`` off for it alone: 0.15
        ms a statement instead of 0.5 here, more on a busy disk). A crash of the database
        server can then lose the last fraction of a second of these rows, never a part of
        one, and never a later write without the earlier ones: a row falls back to an older
        state, which reconcile reads as "send again", never as "skip".
        """
        rows = list(rows)
        if not rows:
            return
        now = timezone.now()
        connection = connections[self.db]
        if connection.vendor not in ON_CONFLICT_VENDORS:
            values = _synced_values(now, task_id)
            self.bulk_create(
                [Replica(host=host, path=path, fingerprint=fingerprint, **values) for host, path, fingerprint in rows],
                update_conflicts=True, unique_fields=["host", "path"], update_fields=["fingerprint", *values],
            )
            return
        values = _synced_values(connection.ops.adapt_datetimefield_value(now), task_id)
        columns = ["host", "path", "fingerprint", *values, *_NEW_ROW]
        parameters = [value for host, path, fingerprint in rows
                      for value in (host, path, fingerprint, *values.values(), *_NEW_ROW.values())]
        sql = _upsert_sql(connection, columns, ["fingerprint", *values], len(rows))
        if connection.vendor == "postgresql" and connection.get_autocommit():
            # Evaluated once per row written, inside the statement's implicit transaction,
            # which reads the setting when it commits; a local setting ends with it.
            sql += " RETURNING set_config('synchronous_commit', 'off', true)"
        with connection.cursor() as cursor:
            cursor.execute(sql, parameters)

    def of_paths(self, paths):
        """The rows of ``paths``, on every host: how rows are looked up by path.

        On the path alone, never with ``host IN (...)`` beside it: a PostgreSQL planner
        whose statistics do not know a host yet (one just added, or a table that grew since
        its last ``ANALYZE``) takes the hosts for the rarer condition and reads every row of
        those hosts through a host index (7 ms with 30,000 rows, against 0.05 ms through
        the path index). A path has a row per host at most: the caller keeps the hosts it
        wants.
        """
        return self.filter(path__in=paths)

    def record_gone(self, pairs):
        """The hosts of ``(host, path)`` pairs no longer hold the path (nor does the master):
        forget their rows. Returns ``{pair: the fingerprint its row had, "" if none}``.
        """
        pairs = list(pairs)
        gone = dict.fromkeys(pairs, "")
        if not pairs:
            return gone
        rows = self.of_paths({path for _, path in pairs})
        found = {(host, path): (pk, fingerprint) for pk, host, path, fingerprint
                 in rows.values_list("pk", "host", "path", "fingerprint") if (host, path) in gone}
        gone.update((pair, fingerprint) for pair, (_, fingerprint) in found.items())
        self.filter(pk__in=[pk for pk, _ in found.values()]).delete()
        return gone

    def synced_fingerprints(self, pairs):
        """``{(host, path): fingerprint}`` of the pairs whose row says the host holds those bytes.

        One query, straight to the cursor (it runs before every transfer: the ORM's
        query building was three quarters of its cost).
        """
        pairs = set(pairs)
        if not pairs:
            return {}
        paths = sorted({path for _, path in pairs})
        connection = connections[self.db]
        with connection.cursor() as cursor:
            cursor.execute(_synced_fingerprints_sql(connection, len(paths)), [Replica.State.SYNCED.value, *paths])
            rows = cursor.fetchall()
        return {(host, path): fingerprint for host, path, fingerprint in rows if (host, path) in pairs}

    def record_waiting(self, host, path, error, *, retry_at, task_id=""):
        """The host is down (its breaker open): the change waits, with no message of its own,
        for the host's probe to succeed (which sends every waiting change), or for reconcile
        at ``retry_at`` should the probe never come."""
        return self._record_attempt(host, path, error, Replica.State.WAITING, retry_at, task_id)

    def record_failure(self, host, path, error, *, final, retry_at, task_id=""):
        """An attempt failed: ``pending`` while retries remain, ``failed`` when ``final``.

        ``retry_at`` is when the next attempt is due (a task retry, or reconcile for a
        final failure). Returns the row.
        """
        state = Replica.State.FAILED if final else Replica.State.PENDING
        return self._record_attempt(host, path, error, state, retry_at, task_id)

    def _record_attempt(self, host, path, error, state, retry_at, task_id):
        now = timezone.now()
        row, _ = self.get_or_create(host=host, path=path, defaults={"pending_since": now})
        row.state = state
        row.attempts += 1
        # The row names the host: its error need not (the dashboard and the admin show both).
        row.last_error = (error.without_host() if isinstance(error, TransportError) else str(error))[:2000]
        row.last_error_at = now
        row.pending_since = row.pending_since or now
        row.retry_at = retry_at
        row.task_id = task_id or row.task_id
        row.failed_task_id = task_id or row.failed_task_id
        row.save()
        return row


class Replica(models.Model):
    """One file on one media host: its state, its fingerprint, its last error."""

    class State(models.TextChoices):
        SYNCED = "synced", "synced"
        PENDING = "pending", "pending (retrying)"
        WAITING = "waiting", "waiting for the host to come back"
        FAILED = "failed", "failed"

    #: States of rows for which no retry task is scheduled: the host's return (its probe's
    #: success) or reconcile sends them.
    UNSCHEDULED = (State.FAILED, State.WAITING)

    host = models.CharField(max_length=255, help_text="The media host's name, as in RESTO_MEDIA_HOSTS.")
    path = models.CharField(max_length=1024, help_text="The storage name of the file.")
    state = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    fingerprint = models.CharField(
        max_length=128, blank=True, help_text="The master file's size, mtime and inode when it was last copied."
    )
    attempts = models.PositiveIntegerField(default=0, help_text="Failed attempts since the last success.")
    last_error = models.TextField(blank=True)
    last_error_at = models.DateTimeField(null=True, blank=True)
    last_success_at = models.DateTimeField(null=True, blank=True)
    pending_since = models.DateTimeField(
        null=True, blank=True, help_text="When the host first fell behind on this file."
    )
    retry_at = models.DateTimeField(null=True, blank=True, help_text="When the next attempt is due.")
    task_id = models.CharField(max_length=255, blank=True, help_text="The last Celery task that worked on it.")
    failed_task_id = models.CharField(
        max_length=255, blank=True, help_text="The last Celery task that failed on it (its result has the traceback)."
    )
    updated_at = models.DateTimeField(auto_now=True)

    objects = ReplicaQuerySet.as_manager()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["host", "path"], name="resto_replica_host_path")]
        indexes = [
            # The dashboard: counts per host and state, and per host the newest success,
            # the newest error and the oldest change still pending, each one index lookup.
            models.Index(fields=["host", "state"], name="resto_replica_host_state"),
            models.Index(fields=["host", "last_success_at"], name="resto_replica_host_success"),
            models.Index(fields=["host", "last_error_at"], name="resto_replica_host_error"),
            models.Index(fields=["host", "pending_since"], name="resto_replica_host_pending"),
            # reconcile: rows by path (batches of the master tree).
            models.Index(fields=["path"], name="resto_replica_path"),
        ]

    def __str__(self):
        return f"{self.path} on {self.host} ({self.state})"


class MasterCopy(models.Model):
    """The identity the site expects in its master copy's marker file (see :mod:`resto_celery.marker`).

    One row per master folder; written when the marker is made (the first save, or
    ``manage.py resto_master``), read by workers before they decide anything from the master.
    """

    location = models.CharField(max_length=1024, unique=True, help_text="The master folder (MEDIA_ROOT).")
    identity = models.CharField(max_length=64, help_text="The identity written in the folder's marker file.")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name = "master copy"

    def __str__(self):
        return f"{self.location} ({self.identity})"


class Hold(models.Model):
    """Replication refused on purpose, until an operator acts or the cause goes away.

    ``master``: a machine's worker saw no valid master copy (``subject`` is the machine) and
    sent nothing. ``deletes``: a reconcile or resync pass would have deleted more than the
    brake allows on a host (``subject`` is the host) and deleted nothing. Shown by the
    dashboard and ``resto_status``; a later successful check or pass removes the row.
    """

    class Kind(models.TextChoices):
        MASTER = "master", "master copy refused"
        DELETES = "deletes", "deletions held"

    kind = models.CharField(max_length=16, choices=Kind.choices)
    location = models.CharField(max_length=1024, help_text="The master folder concerned.")
    subject = models.CharField(max_length=255, help_text="The machine (master) or the media host (deletes).")
    reason = models.TextField()
    count = models.PositiveIntegerField(default=0, help_text="Refusals seen, or deletions held back.")
    first_at = models.DateTimeField(default=timezone.now)
    last_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["kind", "location", "subject"], name="resto_hold_unique")]

    def __str__(self):
        return f"{self.get_kind_display()}: {self.subject}"


class ReplicationDashboard(Replica):
    """The admin's per-host dashboard (a proxy, so it has its place in the admin index)."""

    class Meta:
        proxy = True
        verbose_name = "replication dashboard"
        verbose_name_plural = "replication dashboard"


def _synced_values(now, task_id):
    """What a success writes in a row besides its fingerprint (its last error stays, for the
    admin's history)."""
    return {"state": Replica.State.SYNCED.value, "attempts": 0, "last_success_at": now, "pending_since": None,
            "retry_at": None, "task_id": task_id, "updated_at": now}


def _quoted_column(connection, name):
    return connection.ops.quote_name(Replica._meta.get_field(name).column)


def _upsert_sql(connection, columns, updates, count):
    """``INSERT`` of ``count`` rows of ``columns``; on a ``(host, path)`` conflict, ``updates``
    take the new values."""
    column = functools.partial(_quoted_column, connection)
    row = "(" + ", ".join(["%s"] * len(columns)) + ")"
    return (f"INSERT INTO {connection.ops.quote_name(Replica._meta.db_table)} ({', '.join(map(column, columns))}) "
            f"VALUES {', '.join([row] * count)} "
            f"ON CONFLICT ({column('host')}, {column('path')}) DO UPDATE SET "
            + ", ".join(f"{column(name)} = EXCLUDED.{column(name)}" for name in updates))


def _synced_fingerprints_sql(connection, paths):
    """The synced rows of ``paths`` on any host (the caller keeps the pairs it asked for; no
    host condition: see :meth:`ReplicaQuerySet.of_paths`)."""
    column = functools.partial(_quoted_column, connection)
    return (f"SELECT {column('host')}, {column('path')}, {column('fingerprint')} "
            f"FROM {connection.ops.quote_name(Replica._meta.db_table)} WHERE {column('state')} = %s "
            f"AND {column('path')} IN ({', '.join(['%s'] * paths)})")
