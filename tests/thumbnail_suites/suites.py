"""Which thumbnail apps' suites run against our backends, and how each is run.

Each suite runs from its release's source distribution, as its own tox.ini runs it
(``django-admin test`` in the unpacked sdist, the sdist's folder first on ``sys.path``),
with its own settings module extended by ``settings_<app>`` of this package.
"""
from dataclasses import dataclass
from pathlib import Path

BACKENDS = {"hybrid": "resto_celery.storage.HybridStorage", "async": "resto_celery.storage.AsyncStorage"}


@dataclass(frozen=True)
class Suite:
    #: The pip requirement whose sdist holds the suite.
    requirement: str
    #: A file every complete unpacked sdist has (relative to its top folder).
    landmark: str
    #: The Django settings module of the run (this package's extension of the suite's own).
    settings: str
    #: The package holding the suite's tests, relative to the sdist's top folder.
    tests_package: str
    #: How many tests the suite has (the release is pinned, so this never moves by itself).
    tests: int
    #: Whether that package is a top-level ``tests`` package: the name of ours, so the run
    #: puts the sdist's folder first on our ``tests.__path__`` (see :mod:`.run`).
    shares_tests_package: bool = False

    @property
    def version(self):
        return self.requirement.split("==")[1]

    def labels(self, root):
        """The test labels of the suite unpacked in ``root``: its test modules, as discovery finds them."""
        root = Path(root)
        package = root / self.tests_package
        return sorted(
            ".".join(path.relative_to(root).with_suffix("").parts)
            for path in package.rglob("test*.py")
            if all((folder / "__init__.py").is_file() for folder in path.parents if folder.is_relative_to(package))
        )


SUITES = {
    "easy_thumbnails": Suite(
        requirement="easy-thumbnails==2.10.1",
        landmark="easy_thumbnails/tests/settings.py",
        settings="tests.thumbnail_suites.settings_easy_thumbnails",
        tests_package="easy_thumbnails/tests",
        tests=128,
    ),
    # tox.ini: DJANGO_SETTINGS_MODULE=tests.settings.pil, the Pillow engine (its default).
    "sorl": Suite(
        requirement="sorl-thumbnail==13.4.0",
        landmark="tests/settings/pil.py",
        settings="tests.thumbnail_suites.settings_sorl",
        tests_package="tests",
        tests=145,
        shares_tests_package=True,
    ),
}
