"""manage.py resto_status: the dashboard's figures in the terminal, for people and monitoring."""
import json

from django.core.management.base import BaseCommand, CommandError
from django.core.serializers.json import DjangoJSONEncoder

from resto_celery import status
from resto_celery.templatetags.resto_admin import ago


class Command(BaseCommand):
    help = (
        "Show, per media host, how many files are synced, pending (being retried), failed and waiting "
        "for the host to come back, the oldest pending change, the last success, the last error and "
        "whether the host is up or down (its circuit breaker; when it went down or came back); and "
        "whether each master copy carries its marker (workers that refused it, deletions the brake holds). "
        "Exits with status 1 when any host has failed files, is down or has held deletions, or a "
        "master copy is refused, so it can be used as a monitoring check. With --max-lag or --max-failed "
        "it is a Nagios-style check: one line OK, WARNING or CRITICAL (then details and performance data), "
        "exit status 0, 1 or 2 (3, UNKNOWN, when the figures cannot be read)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--json", action="store_true", help="Print JSON (hosts and totals) for scripts.")
        parser.add_argument(
            "--no-breakers", action="store_true", help="Do not ask Redis for the circuit breakers' state."
        )
        parser.add_argument(
            "--max-lag", type=float, metavar="SECONDS",
            help="CRITICAL (exit 2) when a host has not caught up with a change older than this "
                 "(pending, waiting for the host or failed). Makes the output a Nagios-style check.",
        )
        parser.add_argument(
            "--max-failed", type=int, metavar="N",
            help="CRITICAL (exit 2) when more than N files failed, over every host (without it, any failed "
                 "file is a WARNING). Makes the output a Nagios-style check.",
        )

    def handle(self, *args, **options):
        nagios = options["max_lag"] is not None or options["max_failed"] is not None
        try:
            statuses = status.host_statuses(with_breakers=not options["no_breakers"])
            masters = status.master_statuses()
        except Exception as error:
            if not nagios:
                raise
            self.stdout.write(f"RESTO UNKNOWN - cannot read the replication status: {error}")
            raise CommandError(f"cannot read the replication status: {error}", returncode=status.UNKNOWN) from None
        totals = status.totals(statuses)
        if nagios:
            self._check(statuses, masters, totals, options)
            return
        if options["json"]:
            self.stdout.write(json.dumps(
                {"masters": [m.as_dict() for m in masters], "hosts": [s.as_dict() for s in statuses], "totals": totals},
                indent=2, cls=DjangoJSONEncoder,
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

    def _check(self, statuses, masters, totals, options):
        """The Nagios-style check: its status line, details, performance data and exit status."""
        max_lag, max_failed = options["max_lag"], options["max_failed"]
        verdict = status.check(statuses, masters, max_lag=max_lag, max_failed=max_failed)
        if verdict.problems:
            summary = "; ".join(text for _, text in verdict.problems)
        else:
            summary = (f"{len(statuses)} host(s), lag {verdict.lag:.0f}s"
                       + (f" (max {max_lag:g}s)" if max_lag is not None else "")
                       + f", {verdict.failed} failed" + (f" (max {max_failed})" if max_failed is not None else ""))
        line = f"RESTO {verdict.label} - {summary}"
        if options["json"]:
            self.stdout.write(json.dumps({
                "check": {"status": verdict.label, "code": verdict.code, "summary": line,
                          "lag": verdict.lag, "lag_host": verdict.lag_host, "failed": verdict.failed},
                "masters": [m.as_dict() for m in masters], "hosts": [s.as_dict() for s in statuses], "totals": totals,
            }, indent=2, cls=DjangoJSONEncoder))
        else:
            perfdata = " ".join([
                f"lag={verdict.lag:.0f}s;;{'' if max_lag is None else f'{max_lag:g}'};0;",
                f"failed={verdict.failed};;{'' if max_failed is None else max_failed};0;",
                f"pending={totals['pending']};;;0;", f"waiting={totals['waiting']};;;0;",
                f"synced={totals['synced']};;;0;", f"down_hosts={totals['down_hosts']};;;0;",
            ])
            self.stdout.write(f"{line} | {perfdata}")
            for host in statuses:
                self.stdout.write(
                    f"{host.host}: {host.synced} synced, {host.pending} pending, {host.waiting} waiting, "
                    f"{host.failed} failed; oldest change not there: {_ago(host.oldest_pending) or 'none'}; "
                    f"{_host_state(host)}"
                )
        if verdict.code:
            raise CommandError(line, returncode=verdict.code)

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
    """"up", "up, back 2 minutes ago", "DOWN since 5 minutes ago (breaker open 25s): connection
    failed: Connection refused", "?" (no Redis)."""
    if host_status.breaker_open_for is None:
        return "?" if host_status.configured else ""
    if host_status.down:
        since = f" since {_ago(host_status.down_since)}" if host_status.down_since else ""
        cause = f": {host_status.down_cause}" if host_status.down_cause else ""
        return f"DOWN{since} (breaker open {host_status.breaker_open_for:.0f}s){cause}"
    state = f"up, back {_ago(host_status.back_at)}" if host_status.back_at else "up"
    if host_status.catching_up:
        catch_up = host_status.catch_up
        eta = f", ~{catch_up['eta']:.0f}s left" if catch_up["eta"] is not None else ""
        state += f"; catching up {catch_up['done']}/{catch_up['sent']}{eta}"
    return state
