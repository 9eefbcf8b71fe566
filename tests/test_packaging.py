"""What a PyPI user gets: migrations that match the models, and a wheel and sdist that ship
the type marker, the license and the package data."""
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from django.core.management import call_command

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.django_db
def test_the_models_need_no_new_migration(capsys):
    # --check exits with status 1 when makemigrations would write a migration.
    try:
        call_command("makemigrations", "resto_celery", "--check", "--dry-run", verbosity=1)
    except SystemExit as exit:
        pytest.fail(f"makemigrations would write a migration:\n{capsys.readouterr().out}"
                    if exit.code else f"makemigrations exited with {exit.code!r}")
    assert "No changes detected" in capsys.readouterr().out


@pytest.fixture(scope="module")
def distributions(tmp_path_factory):
    """The sdist, and the wheel built from it, as ``python -m build`` makes them for PyPI."""
    outdir = tmp_path_factory.mktemp("dist")
    completed = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(outdir), str(ROOT)],
        capture_output=True, text=True, timeout=240,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    [sdist] = outdir.glob("*.tar.gz")
    [wheel] = outdir.glob("*.whl")
    return sdist, wheel


def test_the_wheel_ships_the_type_marker_the_license_and_the_package_data(distributions):
    _, wheel = distributions
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        [metadata] = [name for name in names if name.endswith(".dist-info/METADATA")]
        fields = Parser().parsestr(archive.read(metadata).decode())
    assert "resto_celery/py.typed" in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names), sorted(names)
    assert "resto_celery/testing/nginx_media.conf" in names
    assert any(name.startswith("resto_celery/templates/") for name in names)
    assert any(name.startswith("resto_celery/migrations/0001_") for name in names)
    # Only the package: no tests, benchmarks or example site at the top of site-packages.
    assert {name.split("/")[0] for name in names} - {metadata.split("/")[0]} == {"resto_celery"}
    # PEP 639: an SPDX expression and the file, no legacy License field or classifier.
    assert fields["License-Expression"] == "BSD-3-Clause"
    assert fields.get_all("License-File") == ["LICENSE"]
    assert "License" not in fields
    assert not [c for c in fields.get_all("Classifier") if c.startswith("License ::")]


def test_the_sdist_ships_the_license_the_changelog_and_the_type_marker(distributions):
    sdist, _ = distributions
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", "resto_celery/py.typed"} <= names


def test_the_stable_api_is_importable_from_the_package():
    import resto_celery
    from resto_celery import exceptions, signals, storage

    assert resto_celery.AsyncStorage is storage.AsyncStorage
    assert resto_celery.ReplicationError is exceptions.ReplicationError
    assert resto_celery.replicated_everywhere is signals.replicated_everywhere
    assert sorted(resto_celery.__all__) == sorted(resto_celery._PUBLIC)
    assert all(getattr(resto_celery, name) is not None for name in resto_celery.__all__)
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        resto_celery.Nothing  # noqa: B018
