"""manage.py resto_master: show, make or adopt the master copy's marker."""
from django.core.files.storage import storages
from django.core.management.base import BaseCommand, CommandError

from resto_celery import marker
from resto_celery.exceptions import MasterUnavailable


class Command(BaseCommand):
    help = (
        "Show whether each master copy carries its marker file (.resto-master), the proof that the folder is "
        "this site's master and not an empty mount point. Without it workers upload and delete nothing. "
        "--init makes the marker of a site that has none yet; --adopt declares this folder the master "
        "(after restoring or moving it) by writing the site's identity into it. "
        "Exits with status 1 when a master is refused."
    )

    def add_arguments(self, parser):
        parser.add_argument("--storage", action="append", dest="aliases", metavar="ALIAS",
                            help="A STORAGES alias (repeat for several). Default: every storage with a master copy.")
        action = parser.add_mutually_exclusive_group()
        action.add_argument("--init", action="store_true",
                            help="Make the marker where the site has no identity recorded yet "
                            "(a new site, an upgrade).")
        action.add_argument("--adopt", action="store_true",
                            help="This folder is the master: write the site's identity into its marker, "
                            "replacing a missing or foreign one. Check the folder first: replication trusts it.")

    def handle(self, *args, **options):
        refused = []
        for alias, location in self._masters(options["aliases"]):
            if options["adopt"]:
                identity = marker.adopt(location)
                adopted = f"{alias}: {location} adopted as the master (identity {identity})."
                self.stdout.write(self.style.SUCCESS(adopted))
                continue
            try:
                identity = marker.verify(location, record=False, create=options["init"])
            except MasterUnavailable as refusal:
                refused.append(alias)
                self.stderr.write(self.style.ERROR(f"{alias}: {location} is refused: {refusal.reason}."))
                continue
            self.stdout.write(self.style.SUCCESS(f"{alias}: {location} is the master (identity {identity})."))
        if refused:
            raise CommandError(f"{len(refused)} master copy(ies) refused: {', '.join(refused)}", returncode=1)

    def _masters(self, aliases):
        found = []
        for alias in aliases or list(storages.backends):
            try:
                storage = storages[alias]
            except Exception as error:  # an unusable alias is the operator's to fix
                raise CommandError(f"STORAGES[{alias!r}]: {error}") from error
            if hasattr(storage, "transport") and hasattr(storage, "location"):
                found.append((alias, storage.location))
            elif aliases:
                raise CommandError(f"STORAGES[{alias!r}] is not a resto_celery storage with a master copy.")
        if not found:
            raise CommandError("No resto_celery storage with a master copy in STORAGES.")
        return found
