"""Run Django's storage tests with ``FileSystemStorage`` replaced by one of our backends.

    python -m tests.django_suite.run {hybrid|async} SUITE_DIR

``SUITE_DIR`` holds the ``file_storage`` folder of the installed Django's ``tests/``. Every
``FileSystemStorage`` the suite builds (in its tests, its models, its subclasses) is then
our backend: ``HybridStorage`` replicating to one live :class:`MediaServer`, or
``AsyncStorage`` sending its tasks to an in-memory broker (no worker: the suite tests the
storage API, not replication). The tests in :mod:`.skips` are skipped with their reason.
Prints the outcome as one JSON line (``RESULT {...}``: counts, failed tests, skipped tests
with their reasons) and exits 1 if a test failed or a skip names a test the suite lacks.
"""
import json
import os
import shutil
import sys
import tempfile
import warnings

BACKENDS = {"hybrid": "resto_celery.storage.HybridStorage", "async": "resto_celery.storage.AsyncStorage"}


def main(backend, suite_dir):
    from resto_celery.testing import MediaServer

    suite_dir = os.path.abspath(suite_dir)
    workdir = tempfile.mkdtemp(prefix=f"django-suite-{backend}-")
    server = MediaServer().start()
    os.environ.update(
        RESTO_SUITE_HOSTS=json.dumps([server.url]),
        DJANGO_SETTINGS_MODULE="tests.django_suite.settings",
        TMPDIR=workdir,
    )
    tempfile.tempdir = workdir
    os.chdir(workdir)  # FileSystemStorage(location="") is the current directory
    sys.path.insert(0, suite_dir)
    try:
        return _run(backend)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _run(backend):
    import django
    from django.apps import apps
    from django.conf import settings
    from django.test.runner import DiscoverRunner
    from django.utils import deprecation

    # As Django's runtests.py: its deprecation warnings, ResourceWarning and RuntimeWarning
    # are errors, so our backends use nothing Django deprecates.
    for name in dir(deprecation):
        if name.startswith("RemovedInDjango") and name.endswith("Warning"):
            warnings.simplefilter("error", getattr(deprecation, name))
    warnings.simplefilter("error", ResourceWarning)
    warnings.simplefilter("error", RuntimeWarning)

    django.setup()
    if backend == "async":
        from tests.sdist_suites import use_memory_broker

        use_memory_broker("django_suite")
    # As runtests.py: the app under test is installed once the others are ready, here
    # after the swap, so its models' storages are ours.
    import django.contrib.staticfiles.storage  # Django's own subclasses stay as they are
    import django.core.files.storage
    from django.utils.module_loading import import_string

    django.core.files.storage.FileSystemStorage = import_string(BACKENDS[backend])
    apps.set_installed_apps([*settings.INSTALLED_APPS, "file_storage"])

    from .skips import apply

    class Runner(DiscoverRunner):
        result = None

        def run_suite(self, suite, **kwargs):
            self.result = super().run_suite(suite, **kwargs)
            return self.result

    stale = apply(backend)
    runner = Runner(verbosity=1, interactive=False, parallel=1)
    failures = runner.run_tests(["file_storage"])
    result = runner.result
    summary = {
        "backend": backend,
        "django": django.get_version(),
        "run": result.testsRun,
        "passed": result.testsRun - len(result.skipped) - len(result.failures) - len(result.errors),
        "failed": sorted(test.id() for test, _ in result.failures + result.errors),
        "skipped": {test.id(): reason for test, reason in result.skipped},
        "stale_skips": stale,
    }
    print("RESULT " + json.dumps(summary), flush=True)
    return 1 if failures or stale else 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in BACKENDS:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
