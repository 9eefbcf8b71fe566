"""Per-host replication figures, for the admin dashboard and ``manage.py resto_status``.

Each figure is one aggregate query, or one index lookup per host, so the cost does not grow
with the number of ``Replica`` rows beyond an index scan.
"""
import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone as dt_timezone

from django.db.models import Count
from django.utils import timezone
from redis.exceptions import RedisError

from . import lanes, marker, registry
from .broker import coordinator_for
from .exceptions import MasterUnavailable
from .models import Hold, MasterCopy, Replica

logger = logging.getLogger(__name__)


@dataclass
class HostStatus:
    """What an operator needs to know about one media host."""

    host: str
    configured: bool = True
    synced: int = 0
    pending: int = 0
    waiting: int = 0  # changes that wait for the host to come back (its breaker is open)
    failed: int = 0
    oldest_pending: datetime | None = None
    last_success: datetime | None = None
    last_error: str = ""
    last_error_at: datetime | None = None
    last_error_path: str = ""
    breaker_open_for: float | None = None  # seconds; None when Redis could not be asked
    down_since: datetime | None = None  # when the breaker opened, while the host is down
    down_cause: str = ""  # the last failure's error, while the host is down
    back_at: datetime | None = None  # when the host last came back (within a day)
    catch_up: dict | None = None  # the bulk lane's last pass for this host: sent, done, rate, eta
    held_deletes: int = 0  # deletions the brake holds back, waiting for an operator
    notes: list = field(default_factory=list)

    @property
    def behind(self):
        return self.pending + self.waiting + self.failed

    @property
    def down(self):
        """Whether the host is down as far as the workers know (its breaker opened, no success since)."""
        return self.down_since is not None or bool(self.breaker_open_for)

    @property
    def oldest_pending_age(self):
        """Seconds since the oldest change this host has not caught up with."""
        if self.oldest_pending is None:
            return None
        return (timezone.now() - self.oldest_pending).total_seconds()

    @property
    def healthy(self):
        return not self.failed and not self.down and not self.held_deletes

    def as_dict(self):
        """The figures as a dict, datetimes included (``DjangoJSONEncoder`` writes them)."""
        data = asdict(self)
        data.update(behind=self.behind, oldest_pending_age=self.oldest_pending_age, healthy=self.healthy,
                    down=self.down)
        return data

    @property
    def catching_up(self):
        """Whether the host's last bulk pass still has transfers to do."""
        return bool(self.catch_up and self.catch_up["left"])


def configured_hosts():
    """Host name -> storage, for every Celery-replicated storage of this process."""
    hosts = {}
    for storage in registry.replicated_storages():
        for host in storage.hosts:
            hosts.setdefault(host, storage)
    return hosts


def host_statuses(with_breakers=True):
    """A :class:`HostStatus` per configured host, plus hosts that only old rows mention."""
    storages = configured_hosts()
    statuses = {host: HostStatus(host) for host in storages}
    # COUNT(*) lets PostgreSQL answer from the (host, state) index alone (index-only scan).
    for row in Replica.objects.values("host", "state").annotate(count=Count("*")).order_by():
        status = statuses.setdefault(row["host"], HostStatus(row["host"], configured=False))
        setattr(status, row["state"], row["count"])
    held = {}
    for host, count in Hold.objects.filter(kind=Hold.Kind.DELETES).values_list("subject", "count"):
        held[host] = held.get(host, 0) + count
    for host, status in statuses.items():
        rows = Replica.objects.filter(host=host)
        status.last_success = (
            rows.filter(last_success_at__isnull=False).order_by("-last_success_at")
            .values_list("last_success_at", flat=True).first()
        )
        status.oldest_pending = (
            rows.filter(pending_since__isnull=False).order_by("pending_since")
            .values_list("pending_since", flat=True).first()
        )
        error = (  # errors of files still behind: a repaired one is no longer news
            rows.filter(last_error_at__isnull=False).exclude(state=Replica.State.SYNCED).order_by("-last_error_at")
            .values("last_error", "last_error_at", "path").first()
        )
        if error:
            status.last_error = error["last_error"]
            status.last_error_at, status.last_error_path = error["last_error_at"], error["path"]
        status.held_deletes = held.get(host, 0)
        if not status.configured:
            status.notes.append("not in the settings any more: old rows only")
        elif with_breakers:
            _read_breaker(status, storages[host])
    return sorted(statuses.values(), key=lambda status: (not status.configured, status.host))


@dataclass
class MasterStatus:
    """Whether a master copy proves it is the site's, as this process sees it, and who refused it."""

    location: str
    identity: str | None = None
    problem: str = ""  # why this process refuses it ("" when it is the master)
    note: str = ""
    refusals: list = field(default_factory=list)  # Hold rows: machines whose workers refused it

    @property
    def healthy(self):
        return not self.problem and not self.refusals

    def as_dict(self):
        return {
            "location": self.location, "identity": self.identity, "problem": self.problem, "note": self.note,
            "healthy": self.healthy,
            "refusals": [
                {"machine": hold.subject, "reason": hold.reason, "count": hold.count,
                 "first_at": hold.first_at, "last_at": hold.last_at}
                for hold in self.refusals
            ],
        }


def master_statuses():
    """A :class:`MasterStatus` per master folder of the Celery-replicated storages (two queries)."""
    locations = sorted({storage.location for storage in registry.replicated_storages()})
    recorded = dict(MasterCopy.objects.filter(location__in=locations).values_list("location", "identity"))
    refusals = {}
    for hold in Hold.objects.filter(kind=Hold.Kind.MASTER, location__in=locations).order_by("-last_at"):
        refusals.setdefault(hold.location, []).append(hold)
    statuses = []
    for location in locations:
        status = MasterStatus(location, refusals=refusals.get(location, []))
        wanted = recorded.get(location)
        try:
            status.identity = marker.read(location)
        except MasterUnavailable as refusal:
            status.problem = refusal.reason
        else:
            if status.identity is None and wanted is None:
                status.note = "no marker yet: the first save makes it (or manage.py resto_master --init)"
            else:
                status.problem = marker.judge(status.identity, wanted)
        statuses.append(status)
    return statuses


def totals(statuses):
    """Sums over hosts: synced, pending, waiting, failed, and the oldest pending change."""
    pending = [status.oldest_pending for status in statuses if status.oldest_pending]
    return {
        "hosts": len(statuses),
        "synced": sum(status.synced for status in statuses),
        "pending": sum(status.pending for status in statuses),
        "waiting": sum(status.waiting for status in statuses),
        "down_hosts": sum(1 for status in statuses if status.down),
        "failed": sum(status.failed for status in statuses),
        "oldest_pending": min(pending) if pending else None,
        "failing_hosts": sum(1 for status in statuses if not status.healthy),
        "held_deletes": sum(status.held_deletes for status in statuses),
    }


OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
CHECK_LABELS = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}


@dataclass
class Check:
    """A monitoring verdict (Nagios plugin codes): ``code`` 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN."""

    code: int
    problems: list  # (code, text), the worst first
    lag: float  # seconds: the oldest change a host has not caught up with, over every host
    lag_host: str
    failed: int

    @property
    def label(self):
        return CHECK_LABELS[self.code]


def check(statuses, masters, max_lag=None, max_failed=None):
    """Judge the figures for monitoring.

    CRITICAL: a host has a change older than ``max_lag`` seconds that it does not hold yet;
    more than ``max_failed`` files failed (over every host); a master copy is refused (the
    workers replicate nothing). WARNING: a host is down (its breaker opened), deletions are
    held for an operator, or, without ``max_failed``, any file failed.
    """
    problems = []
    lagging = [status for status in statuses if status.oldest_pending_age is not None]
    worst = max(lagging, key=lambda status: status.oldest_pending_age, default=None)
    lag = max(worst.oldest_pending_age, 0.0) if worst else 0.0
    failed = sum(status.failed for status in statuses)
    if max_lag is not None and lag > max_lag:
        behind = [status.host for status in lagging if status.oldest_pending_age > max_lag]
        problems.append((CRITICAL, f"lag {lag:.0f}s > {max_lag:g}s on {', '.join(behind)}"))
    for master in masters:
        if not master.healthy:
            why = master.problem or f"refused by the workers on {', '.join(h.subject for h in master.refusals)}"
            problems.append((CRITICAL, f"master copy {master.location} refused: {why}"))
    failing = ", ".join(f"{status.host} {status.failed}" for status in statuses if status.failed)
    if max_failed is not None and failed > max_failed:
        problems.append((CRITICAL, f"{failed} failed > {max_failed} ({failing})"))
    elif max_failed is None and failed:
        problems.append((WARNING, f"{failed} failed ({failing})"))
    for status in statuses:
        if status.down:
            problems.append((WARNING, f"{status.host} down"))
        if status.held_deletes:
            problems.append((WARNING, f"{status.held_deletes} deletion(s) held on {status.host}"))
    problems.sort(key=lambda problem: -problem[0])
    code = problems[0][0] if problems else OK
    return Check(code, problems, lag, worst.host if worst else "", failed)


def _read_breaker(status, storage):
    """The host's breaker: open for how long, down since when and why, back since when (one
    round trip)."""
    try:
        coordinator = coordinator_for(storage.options)
        open_for, down_since, back_at, cause = coordinator.breaker(status.host).health()
    except Exception as error:  # noqa: BLE001 - the dashboard must render without Redis
        logger.warning("Could not read the circuit breaker of %s: %s", status.host, error)
        return
    status.breaker_open_for = open_for
    status.down_since = _moment(down_since)
    status.down_cause = cause
    status.back_at = _moment(back_at)
    status.catch_up = _catch_up(coordinator.client, status.host)


def _catch_up(client, host):
    """Estimate how far the host is through the transfers its last bulk pass sent: done is
    what the host has recorded since the pass started (one index range count)."""
    try:
        found = lanes.catch_up(client, host)
    except RedisError:
        return None
    if found is None:
        return None
    sent, started_at = found
    since = _moment(started_at)
    done = min(sent, Replica.objects.filter(host=host, last_success_at__gte=since).count())
    elapsed = max((timezone.now() - since).total_seconds(), 0.001)
    rate = done / elapsed
    left = sent - done
    return {
        "sent": sent, "done": done, "left": left, "since": since, "rate": rate,
        "eta": (left / rate) if left and rate else (0.0 if not left else None),
    }


def _moment(unix_time):
    return datetime.fromtimestamp(unix_time, tz=dt_timezone.utc) if unix_time is not None else None
