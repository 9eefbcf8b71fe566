"""HybridStorage and AsyncStorage pass the test suites of the thumbnail apps sites use with them.

easy-thumbnails and sorl-thumbnail (the releases pinned in :mod:`tests.thumbnail_suites.suites`)
ship their tests in their source distributions, downloaded once into
``.cache/thumbnail-suites/``. :mod:`tests.thumbnail_suites.run` runs each suite in a process
of its own, with its own settings, and every ``FileSystemStorage`` it builds swapped for our
backend; :mod:`tests.thumbnail_suites.skips` lists every test that does not run, and why.
These apps hand our storages names of their own making (absolute paths included), read
files back by path, and delete and list them: a change of ours that breaks them fails here.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sdist_suites import fetch_sdist
from tests.thumbnail_suites.skips import applicable
from tests.thumbnail_suites.suites import BACKENDS, SUITES

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "thumbnail-suites"


def _download_suite(suite, target):
    """Unpack ``suite``'s source distribution (its top folder's content) into ``target``."""
    # Modes kept: easy-thumbnails runs its mockoptim.py.
    fetch_sdist(suite.requirement, target, select=lambda parts: parts[1:], landmark=suite.landmark, keep_modes=True)


@pytest.fixture(scope="module")
def suite_dir():
    """``suite_dir(app)``: the folder of ``app``'s unpacked source distribution (downloaded once)."""

    def find(app):
        suite = SUITES[app]
        target = CACHE / suite.requirement.replace("==", "-")
        if not (target / suite.landmark).is_file():
            shutil.rmtree(target, ignore_errors=True)
            _download_suite(suite, target)
        return target

    return find


@pytest.fixture(scope="module")
def outcomes(suite_dir):
    """Run a suite on a backend once per module: ``outcomes(app, backend)`` -> (summary, output)."""
    runs = {}

    def run(app, backend):
        if (app, backend) not in runs:
            process = subprocess.run(
                [sys.executable, "-m", "tests.thumbnail_suites.run", app, backend, str(suite_dir(app))],
                cwd=ROOT, capture_output=True, text=True, timeout=280,
            )
            output = process.stdout + process.stderr
            lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
            if not lines:
                pytest.fail(f"The suite of {SUITES[app].requirement} did not run for {backend}:\n{output}")
            runs[app, backend] = json.loads(lines[-1].removeprefix("RESULT ")), output
        return runs[app, backend]

    return run


apps = pytest.mark.parametrize("app", list(SUITES))
backends = pytest.mark.parametrize("backend", list(BACKENDS))


@apps
@backends
def test_every_test_of_the_suite_passes(outcomes, app, backend):
    summary, output = outcomes(app, backend)
    assert summary["failed"] == [], output
    assert summary["passed"] == summary["run"] - len(summary["skipped"])
    assert summary["run"] == SUITES[app].tests


@apps
@backends
def test_only_the_listed_tests_are_skipped(outcomes, app, backend):
    summary, _ = outcomes(app, backend)
    assert summary["skipped"] == applicable(app, backend)


@apps
def test_the_skip_list_names_only_tests_the_suite_has(outcomes, app):
    summary, _ = outcomes(app, "hybrid")
    assert summary["stale_skips"] == []


@apps
@backends
def test_every_storage_the_suite_builds_is_our_backend(outcomes, app, backend):
    summary, _ = outcomes(app, backend)
    assert "STORAGES['default']" in summary["storages"]
    assert {where: found for where, found in summary["storages"].items() if not found["ours"]} == {}


@apps
@backends
def test_the_suite_replicates_through_our_backend(outcomes, app, backend):
    """HybridStorage sends PUTs and DELETEs to the media host; AsyncStorage publishes tasks instead."""
    summary, _ = outcomes(app, backend)
    replicated = summary["replicated"]
    if backend == "hybrid":
        assert replicated["requests"] > 0 and replicated["tasks"] == 0
    else:
        assert replicated["tasks"] > 0 and replicated["requests"] == 0
