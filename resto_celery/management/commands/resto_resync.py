"""manage.py resto_resync: bring media hosts in line with the master copy, or restore the master."""
import time

from django.core.files.storage import storages
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from resto_celery import marker, registry, resync
from resto_celery.exceptions import MasterUnavailable
from resto_celery.models import Replica


class Command(BaseCommand):
    help = (
        "Compare the master copy with each media host and upload what is missing or different "
        "(sizes; --verify also compares contents, by the hash an object store keeps or by a download). "
        "Replaces the rsync that "
        "django-resto asked for after an outage or when adding a host. Hosts that list their files "
        "(WebDAV, Tahoe-LAFS, nginx serving its JSON autoindex) are listed once, folder by folder, and "
        "files that exist only on them are reported (--delete-extra deletes them); other plain HTTP "
        "hosts get a HEAD per file, and such files stay unseen. "
        "With --restore-from HOST it works the other way: it rebuilds a lost master copy from HOST. "
        "Exits with status 1 when anything failed."
    )

    def add_arguments(self, parser):
        parser.add_argument("--storage", default="default", help="The STORAGES alias to resync (default: default).")
        parser.add_argument(
            "--host", action="append", dest="hosts", metavar="HOST",
            help="A media host (its name, as in RESTO_MEDIA_HOSTS); repeat for several. Default: all.",
        )
        parser.add_argument(
            "--verify", action="store_true",
            help="Also compare contents: by the hash the host keeps where it keeps one (an S3 bucket's MD5 ETag or "
            "stored checksum: no download), else by downloading the file (SHA-256).",
        )
        parser.add_argument("--dry-run", action="store_true", help="Print the plan; change nothing.")
        parser.add_argument(
            "--via-queue", action="store_true",
            help="Send Celery tasks for the workers instead of copying in this process (AsyncStorage).",
        )
        parser.add_argument(
            "--delete-extra", action="store_true",
            help="Also delete the files a listing host (WebDAV, Tahoe-LAFS, nginx with JSON listings) holds "
            "that the master has not.",
        )
        parser.add_argument(
            "--allow-mass-delete", action="store_true",
            help="With --delete-extra: delete even when the extra files are more than RESTO_MAX_DELETE_SHARE "
            "of what the host holds (the deletion brake; without this flag such a pass deletes nothing).",
        )
        parser.add_argument("--workers", type=int, default=8, help="Parallel transfers per host (default 8).")
        parser.add_argument(
            "--restore-from", metavar="HOST",
            help="Disaster recovery: copy the files HOST holds (as the Replica table lists them) into the master.",
        )
        parser.add_argument(
            "--force", action="store_true", help="With --restore-from: overwrite master files newer than the host's."
        )

    def handle(self, *args, **options):
        storage = storages[options["storage"]]
        if not hasattr(storage, "transport") or not hasattr(storage, "location"):
            raise CommandError(f"STORAGES[{options['storage']!r}] is not a resto_celery storage with a master copy.")
        if options["workers"] < 1:
            raise CommandError("--workers must be at least 1.")
        if options["restore_from"]:
            return self._restore(storage, options)
        if options["via_queue"] and not isinstance(storage, registry.CeleryReplicated):
            raise CommandError("--via-queue needs an AsyncStorage.")
        hosts = options["hosts"] or storage.hosts
        unknown = sorted(set(hosts) - set(storage.hosts))
        if unknown:
            raise CommandError(f"Unknown media host(s) {', '.join(unknown)}; configured: {', '.join(storage.hosts)}.")
        failed = []
        for host in hosts:
            try:
                ok = self._resync_host(storage, host, options)
            except MasterUnavailable as refusal:
                raise CommandError(
                    f"Refused: {refusal}. Nothing was compared, uploaded or deleted.", returncode=1,
                ) from refusal
            if not ok:
                failed.append(host)
        if failed:
            raise CommandError(f"Resync incomplete for {', '.join(failed)}.", returncode=1)

    def _resync_host(self, storage, host, options):
        started = time.monotonic()
        self.stdout.write(self.style.MIGRATE_HEADING(f"{host}"))
        try:
            with self._bar(f"checking {host}") as bar:
                plan = resync.make_plan(
                    storage, host, verify=options["verify"], workers=options["workers"],
                    progress=lambda name, size: bar.update(1),
                )
        except resync.HostDown as error:
            self.stderr.write(self.style.ERROR(f"  {error}. Nothing was compared; try again when it is back."))
            return False
        checked = plan.unchanged + len(plan.upload) + len(plan.errors)
        self.stdout.write(
            f"  {checked} file(s) checked: {plan.unchanged} identical, {len(plan.upload)} to upload "
            f"({_size(plan.upload_bytes)}), {len(plan.errors)} could not be checked."
        )
        if options["verify"]:
            self.stdout.write(
                f"  Contents compared: {plan.by_digest} by the host's checksums (nothing downloaded), "
                f"{plan.downloaded} by download ({_size(plan.downloaded_bytes)} downloaded)."
            )
        delete_extra = options["delete_extra"]
        if not plan.can_list:
            self.stdout.write(
                f"  This host does not list its folders ({plan.unlisted}): a HEAD per file, and files that exist "
                f"only on it cannot be seen. nginx lists them with 'autoindex on; autoindex_format json;' "
                f"for folder URLs (see the README)."
            )
        elif plan.extra:
            what = "to delete" if delete_extra else "left alone (--delete-extra deletes them)"
            self.stdout.write(f"  {len(plan.extra)} file(s) only on the host, not in the master: {what}.")
        if options["dry_run"]:
            for name, size, reason in plan.upload:
                self.stdout.write(f"  would upload {name} ({_size(size)}): {reason}")
            for name, size in plan.extra:
                self.stdout.write(f"  {'would delete' if delete_extra else 'only on the host:'} {name} ({_size(size)})")
            for name, error in plan.errors:
                self.stdout.write(f"  could not check {name}: {error}")
            return not plan.errors
        outcome = resync.Outcome(host)
        if plan.upload or (delete_extra and plan.extra):
            with self._bar(f"updating {host}", total=plan.upload_bytes, unit="B") as bar:
                outcome = resync.apply_plan(
                    storage, plan, workers=options["workers"], via_queue=options["via_queue"],
                    delete_extra=delete_extra, allow_mass_delete=options["allow_mass_delete"],
                    max_delete_share=storage.options.max_delete_share,
                    progress=lambda name, size: bar.update(size),
                )
        if outcome.held:
            self.stderr.write(self.style.ERROR(
                f"  Deletion brake: {outcome.held} extra file(s) is more than "
                f"{resync.delete_limit(plan, storage.options.max_delete_share)} of the {plan.listed} the host holds "
                f"(RESTO_MAX_DELETE_SHARE); none was deleted. Check the master, then run again with "
                f"--allow-mass-delete if they really must go."
            ))
        for name, error in [*plan.errors, *outcome.failures]:
            self.stderr.write(self.style.ERROR(f"  failed: {name}: {error}"))
        done = f"{outcome.queued} task(s) queued" if options["via_queue"] else (
            f"{outcome.uploaded} uploaded ({_size(outcome.uploaded_bytes)})"
            + (f", {outcome.deleted} deleted" if delete_extra and plan.can_list else "")
        )
        failures = len(plan.errors) + len(outcome.failures) + outcome.held
        style = self.style.ERROR if failures else self.style.SUCCESS
        self.stdout.write(style(f"  {done}, {failures} failed, in {time.monotonic() - started:.1f}s."))
        return not failures

    def _restore(self, storage, options):
        host = options["restore_from"]
        if host not in storage.hosts:
            raise CommandError(f"Unknown media host {host}; configured: {', '.join(storage.hosts)}.")
        names = Replica.objects.filter(host=host).order_by("path").values_list("path", flat=True)
        count = names.count()
        self.stdout.write(f"Restoring up to {count} file(s) that {host} holds (from the Replica table).")
        if options["dry_run"]:
            for name in names.iterator():
                self.stdout.write(f"  would restore {name}")
            return
        try:
            marker.verify(storage.location, create=True)
        except MasterUnavailable as refusal:
            raise CommandError(
                f"Refused: {refusal}. If this folder is where the master belongs (it lost its marker with its "
                f"files), run 'manage.py resto_master --adopt' first.", returncode=1,
            ) from refusal
        try:
            with self._bar(f"restoring from {host}", total=count) as bar:
                restored, skipped, failures = resync.restore(
                    storage, host, names.iterator(), force=options["force"], workers=options["workers"],
                    progress=lambda name: bar.update(1),
                )
        except resync.HostDown as error:
            raise CommandError(f"{error}. Nothing was restored.", returncode=1) from error
        for name, reason in skipped:
            self.stdout.write(f"  kept {name}: {reason}")
        for name, error in failures:
            self.stderr.write(self.style.ERROR(f"  failed: {name}: {error}"))
        self.stdout.write(f"{len(restored)} restored, {len(skipped)} kept, {len(failures)} failed.")
        if failures:
            raise CommandError(f"{len(failures)} file(s) could not be restored.", returncode=1)

    def _bar(self, description, total=None, unit="file"):
        return tqdm(
            total=total, desc=f"  {description}", unit=unit, unit_scale=unit == "B",
            file=self.stderr._out, disable=None, leave=False,
        )


def _size(count):
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
