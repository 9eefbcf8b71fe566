"""manage.py resto_reconcile: one reconcile pass now, and the go-ahead for held deletions."""
import json

from django.core.management.base import BaseCommand, CommandError

from resto_celery import tasks
from resto_celery.reconcile import ALL_HOSTS


class Command(BaseCommand):
    help = (
        "Run one reconcile pass now, in this process: compare every master copy with the Replica rows and "
        "queue the uploads and deletes the hosts need (the workers do the transfers). A pass never deletes "
        "more than RESTO_MAX_DELETE_SHARE of a host's files; --allow-deletes HOST is the go-ahead to delete "
        "more on that host in this pass (after checking that the master really lost those files). "
        "Exits with status 1 when the master is refused or deletions were held."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--allow-deletes", action="append", default=[], metavar="HOST",
            help=f"Lift the deletion brake on HOST for this pass (repeat for several; '{ALL_HOSTS}' for every host).",
        )
        parser.add_argument("--json", action="store_true", help="Print the pass's counts as JSON.")

    def handle(self, *args, **options):
        counts = tasks.reconcile.run(allow_deletes=options["allow_deletes"])
        if options["json"]:
            self.stdout.write(json.dumps(counts, indent=2))
        else:
            self.stdout.write(
                f"{counts.get('files', 0)} master file(s), {counts.get('rows', 0)} row(s): queued "
                f"{counts.get('upload', 0)} upload(s) and {counts.get('delete', 0)} delete(s)."
            )
        if counts.get("skipped"):
            raise CommandError("Another reconcile pass is running; nothing was done.", returncode=1)
        if counts.get("refused"):
            raise CommandError(f"Refused: the master copy {counts['refused']}.", returncode=1)
        if counts.get("held"):
            raise CommandError(
                f"{counts['held']} deletion(s) held by the brake (see resto_status); after checking the master, "
                f"run again with --allow-deletes HOST.", returncode=1,
            )
