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
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

import django
import pytest

from tests.django_suite.skips import applicable

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "django-suite"
SUITE = "file_storage"


def _download_suite(version, target):
    """Put ``tests/file_storage`` of Django ``version``'s sdist into ``target``."""
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE.parent / ".gitignore").write_text("*\n")
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        download = subprocess.run(
            [sys.executable, "-m", "pip", "download", f"django=={version}", "--no-binary", ":all:", "--no-deps",
             "--quiet", "-d", work],
            capture_output=True, text=True, timeout=600,
        )
        sdists = list(Path(work).glob("*.tar.gz"))
        if download.returncode != 0 or len(sdists) != 1:
            pytest.fail(f"Could not download Django {version}'s source distribution:\n{download.stderr}")
        staged = Path(work) / version
        with tarfile.open(sdists[0]) as sdist:
            for member in sdist.getmembers():
                parts = PurePosixPath(member.name).parts
                if member.isfile() and parts[1:3] == ("tests", SUITE) and ".." not in parts:
                    destination = staged.joinpath(*parts[2:])
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    destination.write_bytes(sdist.extractfile(member).read())
        if not (staged / SUITE / "tests.py").is_file():
            pytest.fail(f"Django {version}'s source distribution has no tests/{SUITE}/tests.py.")
        try:
            staged.rename(target)
        except OSError:  # another run put it there first
            if not target.is_dir():
                raise


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
