"""What the runs of other projects' test suites share (Django's storage suite, the thumbnail apps').

:func:`fetch_sdist` unpacks part of a package's source distribution into a cache folder,
once; :func:`use_memory_broker` gives a suite's process a Celery app on its settings.
"""
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

import pytest


def fetch_sdist(requirement, target, *, select, landmark, keep_modes=False):
    """Unpack the files of ``requirement``'s sdist that ``select`` keeps into ``target``.

    ``select(parts)`` takes a member's path parts and returns the parts of its place under
    ``target``, or None to leave it out. A failed download, or no ``landmark`` file in
    ``target`` afterwards, fails the test (never a skip). Safe when several runs race.
    """
    cache = target.parent
    cache.mkdir(parents=True, exist_ok=True)
    (cache.parent / ".gitignore").write_text("*\n")
    with tempfile.TemporaryDirectory(dir=cache) as work:
        download = subprocess.run(
            [sys.executable, "-m", "pip", "download", requirement, "--no-binary", ":all:", "--no-deps",
             "--quiet", "-d", work],
            capture_output=True, text=True, timeout=600,
        )
        sdists = list(Path(work).glob("*.tar.gz"))
        if download.returncode != 0 or len(sdists) != 1:
            pytest.fail(f"Could not download the source distribution of {requirement}:\n{download.stderr}")
        staged = Path(work) / "staged"
        with tarfile.open(sdists[0]) as sdist:
            for member in sdist.getmembers():
                parts = PurePosixPath(member.name).parts
                if not member.isfile() or ".." in parts or member.name.startswith("/"):
                    continue
                kept = select(parts)
                if not kept:
                    continue
                destination = staged.joinpath(*kept)
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(sdist.extractfile(member).read())
                if keep_modes:
                    destination.chmod(member.mode & 0o755)
        if not (staged / landmark).is_file():
            pytest.fail(f"The source distribution of {requirement} has no {landmark}.")
        try:
            staged.rename(target)
        except OSError:  # another run put it there first
            if not target.is_dir():
                raise


def use_memory_broker(name):
    """Make a Celery app configured from the Django settings (a ``memory://`` broker there)
    the default and current one, so that our shared tasks publish through it."""
    from celery import Celery

    app = Celery(name)
    app.config_from_object("django.conf:settings", namespace="CELERY")
    app.set_default()
    app.set_current()
