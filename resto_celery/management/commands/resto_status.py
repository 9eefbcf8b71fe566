"""manage.py resto_status: the dashboard's figures in the terminal, for people and monitoring."""
import json

from django.core.management.base import BaseCommand, CommandError

from resto_celery import status
from resto_celery.templatetags.resto_admin import ago


class Command(BaseCommand):
    help = (
        "Show, per media host, how many files are synced, pending (being retried), failed and waiting "
        "for the host to come back, the oldest pending change, the last success, the last error and "
        "whether the host is up or down (its circuit breaker; when it went down or came back); and "
        "whether each master copy carries its marker (workers that refused it, deletions the brake holds). "
        "Exits with status 1 when any host has failed files, is down or has held deletions, or a "
        "master copy is refused, so it can be used as a monitoring check."
    )

    def add_arguments(self, parser):
        parser.add_argument("--json", action="store_true", help="Print JSON (hosts and totals) for scripts.")
        parser.add_argument(
            "--no-breakers", action="store_true", help="Do not ask Redis for the circuit breakers' state."
        )

    def handle(self, *args, **options):
        statuses = status.host_statuses(with_breakers=not options["no_breakers"])
        masters = status.master_statuses()
        totals = status.totals(statuses)
        if options["json"]:
            totals = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in totals.items()}
            self.stdout.write(json.dumps(
                {"masters": [m.as_dict() for m in masters], "hosts": [s.as_dict() for s in statuses], "totals": totals},
                indent=2,
            ))
        else:
            self._masters(masters)
            self._table(statuses, totals)
        problems = [f"master copy {m.location} refused" for m in masters if not m.healthy]
        failing = [s.host for s in statuses if not s.healthy]
        if failing:
            problems.append(f"{len(failing)} media host(s) failing: {', '.join(failing)}")
        if problems:
            raise CommandError("; ".join(problems), returncode=1)

    def _masters(self, masters):
        for master in masters:
            if master.problem:
                self.stdout.write(self.style.ERROR(f"MASTER {master.location}: REFUSED here: {master.problem}."))
            elif master.note:
                self.stdout.write(f"MASTER {master.location}: {master.note}.")
            else:
                self.stdout.write(f"MASTER {master.location}: ok (identity {master.identity}).")
            for hold in master.refusals:
                self.stdout.write(self.style.ERROR(
                    f"  refused by the workers on {hold.subject} ({hold.count} time(s), last {_ago(hold.last_at)}): "
                    f"{hold.reason}."
                ))
        if masters:
            self.stdout.write("")

    def _table(self, statuses, totals):
        headers = [
            "HOST", "SYNCED", "PENDING", "FAILED", "WAITING", "OLDEST PENDING", "LAST SUCCESS", "HOST STATE",
            "HELD DELETES",
            "LAST ERROR",
        ]
        rows = [
            [
                s.host + ("" if s.configured else " (not configured)"),
                str(s.synced), str(s.pending), str(s.failed), str(s.waiting),
                _ago(s.oldest_pending), _ago(s.last_success) or "never",
                _host_state(s), str(s.held_deletes) if s.held_deletes else "",
                (s.last_error[:70] if s.last_error else ""),
            ]
            for s in statuses
        ]
        widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
        for row in [headers, *rows]:
            line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            bad = row is not headers and (row[3] != "0" or row[8] or row[7].startswith("DOWN"))
            style = self.style.ERROR if bad else (lambda text: text)
            self.stdout.write(style(line))
        self.stdout.write(
            f"\n{totals['hosts']} host(s): {totals['synced']} synced, {totals['pending']} pending, "
            f"{totals['failed']} failed, {totals['waiting']} waiting for a host that is down; "
            f"oldest pending change: {_ago(totals['oldest_pending']) or 'none'}"
        )


def _ago(moment):
    return ago(moment)  # "3 minutes ago"; "just now" under a minute


def _host_state(host_status):
    """"up", "up, back 2 minutes ago", "DOWN since 5 minutes ago (breaker open 25s)", "?" (no Redis)."""
    if host_status.breaker_open_for is None:
        return "?" if host_status.configured else ""
    if host_status.down:
        since = f" since {_ago(host_status.down_since)}" if host_status.down_since else ""
        return f"DOWN{since} (breaker open {host_status.breaker_open_for:.0f}s)"
    state = f"up, back {_ago(host_status.back_at)}" if host_status.back_at else "up"
    if host_status.catching_up:
        catch_up = host_status.catch_up
        eta = f", ~{catch_up['eta']:.0f}s left" if catch_up["eta"] is not None else ""
        state += f"; catching up {catch_up['done']}/{catch_up['sent']}{eta}"
    return state
