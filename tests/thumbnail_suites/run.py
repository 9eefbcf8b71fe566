"""Run a thumbnail app's own test suite with ``FileSystemStorage`` replaced by one of our backends.

    python -m tests.thumbnail_suites.run {easy_thumbnails|sorl} {hybrid|async} SUITE_DIR

``SUITE_DIR`` is the app's unpacked source distribution; the run works on a copy of it in a
temporary folder (the suites write into their own folders: sorl-thumbnail's ``MEDIA_ROOT``
is ``tests/media``, easy-thumbnails' is its ``tests`` package). Every ``FileSystemStorage``
the suite builds is then our backend (see :mod:`.swap`): ``HybridStorage`` replicating to
one live :class:`MediaServer`, or ``AsyncStorage`` sending its tasks to an in-memory broker
(no worker). The tests in :mod:`.skips` are skipped with their reason.

Prints the outcome as one JSON line (``RESULT {...}``: counts, failed tests, skipped tests
with their reasons, the storages the suite used, how many replications our backend made)
and exits 1 if a test failed or a skip names a test the suite lacks.
"""
import inspect
import json
import os
import shutil
import sys
import tempfile

from .skips import apply
from .suites import BACKENDS, SUITES


def main(app, backend, suite_dir):
    from resto_celery.testing import MediaServer

    suite = SUITES[app]
    workdir = tempfile.mkdtemp(prefix=f"thumbnail-suite-{app}-{backend}-")
    root = os.path.join(workdir, "suite")
    shutil.copytree(suite_dir, root)
    server = MediaServer().start()
    os.environ.update(
        RESTO_SUITE_HOSTS=json.dumps([server.url]),
        RESTO_SUITE_BACKEND=backend,
        DJANGO_SETTINGS_MODULE=suite.settings,
        TMPDIR=workdir,
    )
    tempfile.tempdir = workdir
    os.chdir(root)  # as tox, which runs the suite in the sdist's folder
    sys.path.insert(0, root)
    if suite.shares_tests_package:
        # The suite's ``tests`` package and ours share a name: the suite's modules come first
        # (tests.settings, tests.thumbnail_tests), ours (tests.thumbnail_suites) still resolve.
        import tests

        tests.__path__.insert(0, os.path.join(root, "tests"))
    try:
        return _run(app, backend, suite.labels(root), server)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _run(app, backend, labels, server):
    import django
    from django.test.runner import DiscoverRunner
    from django.utils.module_loading import import_string

    django.setup()
    published = _count_published_tasks()
    if backend == "async":
        from tests.sdist_suites import use_memory_broker

        use_memory_broker("thumbnail_suites")

    class Runner(DiscoverRunner):
        result = None

        def run_suite(self, suite, **kwargs):
            self.result = super().run_suite(suite, **kwargs)
            return self.result

    stale = apply(app, backend)
    runner = Runner(verbosity=1, interactive=False, parallel=1)
    failures = runner.run_tests(labels)
    result = runner.result
    summary = {
        "app": app,
        "backend": backend,
        "run": result.testsRun,
        "passed": result.testsRun - len(result.skipped) - len(result.failures) - len(result.errors),
        "failed": sorted(test.id() for test, _ in result.failures + result.errors),
        "skipped": dict(sorted((test.id(), reason) for test, reason in result.skipped)),
        "stale_skips": stale,
        "storages": _storages(import_string(BACKENDS[backend])),
        "replicated": {
            "requests": sum(1 for request in server.requests if request.method in ("PUT", "DELETE")),
            "tasks": published[0],
        },
    }
    print("RESULT " + json.dumps(summary), flush=True)
    return 1 if failures or stale else 0


def _storages(backend):
    """What the suite's storages are: the ``STORAGES`` aliases its settings name (made now if
    the suite made none), and every ``FileSystemStorage`` subclass its modules define, each
    with whether it is ``backend``."""
    from django.conf import settings
    from django.core.files.storage import storages
    from django.core.files.storage.filesystem import FileSystemStorage  # Django's own, never swapped

    found = {}
    for alias in settings.STORAGES:
        found[f"STORAGES[{alias!r}]"] = _describe(type(storages[alias]), backend)
    suite_modules = [
        module for name, module in list(sys.modules.items())
        if module is not None and name.split(".")[0] in ("easy_thumbnails", "sorl", "tests")
        and not name.startswith("tests.thumbnail_suites")
    ]
    for module in suite_modules:
        for value in vars(module).values():
            if (
                inspect.isclass(value) and issubclass(value, FileSystemStorage)
                and value.__module__ == module.__name__
            ):
                found[f"{value.__module__}.{value.__qualname__}"] = _describe(value, backend)
    return dict(sorted(found.items()))


def _describe(cls, backend):
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "ours": issubclass(cls, backend)}


def _count_published_tasks():
    """A one-item list counting the Celery tasks published from now on (AsyncStorage's)."""
    from celery.signals import after_task_publish

    count = [0]

    def published(**kwargs):
        count[0] += 1

    after_task_publish.connect(published, weak=False)
    return count


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in SUITES or sys.argv[2] not in BACKENDS:
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
