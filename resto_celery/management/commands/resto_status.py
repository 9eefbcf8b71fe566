"""manage.py resto_status: the dashboard's figures in the terminal, for people and monitoring."""
import json

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone
from django.utils.timesince import timesince

from resto_celery import status


class Command(BaseCommand):
    help = (
        "Show, per media host, how many files are synced, pending (being retried) and failed, "
        "the oldest pending change, the last success, the last error and the circuit breaker. "
        "Exits with status 1 when any host has failed files or an open breaker, so it can be "
        "used as a monitoring check."
    )

    def add_arguments(self, parser):
        parser.add_argument("--json", action="store_true", help="Print JSON (hosts and totals) for scripts.")
        parser.add_argument(
            "--no-breakers", action="store_true", help="Do not ask Redis for the circuit breakers' state."
        )

    def handle(self, *args, **options):
        statuses = status.host_statuses(with_breakers=not options["no_breakers"])
        totals = status.totals(statuses)
        if options["json"]:
            totals = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in totals.items()}
            self.stdout.write(json.dumps({"hosts": [s.as_dict() for s in statuses], "totals": totals}, indent=2))
        else:
            self._table(statuses, totals)
        failing = [s.host for s in statuses if not s.healthy]
        if failing:
            raise CommandError(f"{len(failing)} media host(s) failing: {', '.join(failing)}", returncode=1)

    def _table(self, statuses, totals):
        headers = ["HOST", "SYNCED", "PENDING", "FAILED", "OLDEST PENDING", "LAST SUCCESS", "BREAKER", "LAST ERROR"]
        rows = [
            [
                s.host + ("" if s.configured else " (not configured)"),
                str(s.synced), str(s.pending), str(s.failed),
                _ago(s.oldest_pending), _ago(s.last_success) or "never",
                _breaker(s), (s.last_error[:70] if s.last_error else ""),
            ]
            for s in statuses
        ]
        widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
        for row in [headers, *rows]:
            line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
            style = self.style.ERROR if row is not headers and row[3] != "0" else (lambda text: text)
            self.stdout.write(style(line))
        self.stdout.write(
            f"\n{totals['hosts']} host(s): {totals['synced']} synced, {totals['pending']} pending, "
            f"{totals['failed']} failed; oldest pending change: {_ago(totals['oldest_pending']) or 'none'}"
        )


def _ago(moment):
    return f"{timesince(moment, timezone.now())} ago" if moment else ""


def _breaker(host_status):
    if host_status.breaker_open_for is None:
        return "?" if host_status.configured else ""
    return f"OPEN {host_status.breaker_open_for:.0f}s" if host_status.breaker_open_for else "closed"
