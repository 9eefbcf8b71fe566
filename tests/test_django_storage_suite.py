"""HybridStorage and AsyncStorage pass Django's own storage tests, as FileSystemStorage does.

The suite is ``tests/file_storage`` of the installed Django release's source distribution,
downloaded once into ``.cache/django-suite/<version>/``; :mod:`tests.django_suite.run`
runs it in a process of its own with ``FileSystemStorage`` swapped for our backend, and
:mod:`tests.django_suite.skips` lists every test that does not run, and why. A Django
release that changes the storage contract fails here.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import django
import pytest

from tests.django_suite.skips import applicable
from tests.sdist_suites import fetch_sdist

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "django-suite"
SUITE = "file_storage"


def _download_suite(version, target):
    """Put ``tests/file_storage`` of Django ``version``'s sdist into ``target``."""

    def select(parts):
        return parts[2:] if parts[1:3] == ("tests", SUITE) else None

    fetch_sdist(f"django=={version}", target, select=select, landmark=f"{SUITE}/tests.py")


@pytest.fixture(scope="module")
def suite_dir():
    """The folder holding the installed Django's ``file_storage`` tests (downloaded once)."""
    version = django.get_version()
    target = CACHE / version
    if not (target / SUITE / "tests.py").is_file():
        shutil.rmtree(target, ignore_errors=True)
        _download_suite(version, target)
    return target


@pytest.fixture(scope="module")
def outcomes(suite_dir):
    """Run the suite for a backend once per module: ``outcomes(backend)`` -> (summary, output)."""
    runs = {}

    def run(backend):
        if backend not in runs:
            process = subprocess.run(
                [sys.executable, "-m", "tests.django_suite.run", backend, str(suite_dir)],
                cwd=ROOT, capture_output=True, text=True, timeout=280,
            )
            output = process.stdout + process.stderr
            lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
            if not lines:
                pytest.fail(f"Django's storage suite did not run for {backend}:\n{output}")
            runs[backend] = json.loads(lines[-1].removeprefix("RESULT ")), output
        return runs[backend]

    return run


@pytest.mark.parametrize("backend", ["hybrid", "async"])
def test_every_test_of_django_storage_suite_passes(outcomes, backend):
    summary, output = outcomes(backend)
    assert summary["failed"] == [], output
    assert summary["django"] == django.get_version()
    assert summary["passed"] == summary["run"] - len(summary["skipped"])
    assert summary["run"] > 150


@pytest.mark.parametrize("backend", ["hybrid", "async"])
def test_only_the_listed_tests_are_skipped(outcomes, backend):
    summary, _ = outcomes(backend)
    assert summary["skipped"] == applicable(backend)


def test_the_skip_list_names_only_tests_the_suite_has(outcomes):
    summary, _ = outcomes("hybrid")
    assert summary["stale_skips"] == []
