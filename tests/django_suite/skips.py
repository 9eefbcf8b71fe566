"""Every test of Django's storage suite that does not run against our backends, and why.

The one place to look: the runner skips these and nothing else, and the pytest test fails
if any other test is skipped or fails, or if an entry names a test the suite lacks.
"""
import importlib
import unittest

import django

#: test id -> (first Django version whose suite has the test, reason[, the backends it applies to]).
SKIPS = {
    "file_storage.tests.FileSystemStorageTests.test_deconstruction": (
        (4, 2),
        "Deconstructs to 'django.core.files.storage.FileSystemStorage'; ours deconstruct to their own "
        "path (resto_celery.storage.HybridStorage...), which migrations must import.",
    ),
    "file_storage.tests.OverwritingStorageOSOpenFlagsWarningTests.test_os_open_flags_deprecation_warning": (
        (5, 1),
        "Django warns about OS_OPEN_FLAGS with stacklevel=2, which points at our super().__init__() call, "
        "not at the test's line; the warning itself is given, and the overwrite works (the rest of "
        "OverwritingStorageOSOpenFlagsTests runs).",
    ),
    "file_storage.tests.FileSaveRaceConditionTest.test_race_condition": (
        (4, 2),
        "Lists the storage's folder with os.listdir() and expects the saved file first: AsyncStorage's "
        "master folder also holds its marker, .resto-master (which the storage's own listdir() hides).",
        ("async",),
    ),
}


def applicable(backend, version=None):
    """The entries of :data:`SKIPS` for ``backend`` and the Django ``version`` (default: installed)."""
    version = version or django.VERSION[:2]
    return {
        test: reason
        for test, (since, reason, *backends) in SKIPS.items()
        if version >= since and (not backends or backend in backends[0])
    }


def apply(backend):
    """Mark the applicable tests skipped; return the entries that name no test of the suite."""
    stale = []
    for test, reason in applicable(backend).items():
        module_name, class_name, method_name = test.rsplit(".", 2)
        test_case = getattr(importlib.import_module(module_name), class_name, None)
        method = getattr(test_case, method_name, None)
        if method is None:
            stale.append(test)
            continue
        setattr(test_case, method_name, unittest.skip(reason)(method))
    return stale
