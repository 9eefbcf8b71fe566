"""Every test of the thumbnail apps' suites that does not run against our backends, and why.

The one place to look: the runner skips the tests in :data:`SKIPS` and nothing else, the
suites skip those in :data:`SUITE_SKIPS` themselves (with the reason given there), and the
pytest test fails if any other test is skipped or fails, or if an entry names a test the
suite lacks.
"""
import importlib
import unittest

_OFFLINE = "No internet on this machine or in CI (loopback only); the test fails with URLError."

#: app -> {test id: (reason[, the backends it applies to])}: the tests the runner skips.
SKIPS = {
    "easy_thumbnails": {
        "easy_thumbnails.tests.test_files.FilesTest.test_postprocessor": (
            "Asserts that the last log record of any logger during get_thumbnail() is easy_thumbnails.optimize's "
            "INFO; the optimize post-processor saves the thumbnail again right after that record, and "
            "HybridStorage replicates the save at once through requests, whose urllib3 logs every request at "
            "DEBUG. The thumbnail itself is right (AsyncStorage, which only publishes a task, passes).",
            ("hybrid",),
        ),
    },
    "sorl": {
        "tests.thumbnail_tests.test_engines.SimpleTestCase.test_storage_serialize_short_backend_path": (
            "Expects the kvstore key of a file on STORAGES['default'] (BACKEND "
            "'django.core.files.storage.FileSystemStorage') to be made from the class path "
            "'django.core.files.storage.filesystem.FileSystemStorage'; sorl makes it from the class's own "
            "path, which for ours is resto_celery.storage.HybridStorage (or AsyncStorage). With that path "
            "expected instead, the whole test passes (the alias and URL of the 'short' storage).",
        ),
        "tests.thumbnail_tests.test_engines.SimpleTestCase.test_image_file_deserialize": (
            "Makes an ImageFile of https://dummyimage.com/300x300/ and stores it in the kvstore, which "
            f"downloads the image to read its size. {_OFFLINE}",
        ),
        "tests.thumbnail_tests.test_templatetags.TemplateTestCaseB.test_portrait": (
            f"Renders thumbnails of https://dummyimage.com/120x100/ and /100x120/, downloaded. {_OFFLINE}",
        ),
        "tests.thumbnail_tests.test_templatetags.TemplateTestCaseB.test_url": (
            "Renders a thumbnail of https://dummyimage.com/100x100/, downloaded: no internet on this machine "
            "or in CI, so no thumbnail is made and the margin filter opens a missing file (FileNotFoundError).",
        ),
    },
}

#: app -> {test id: the reason the suite gives}: the tests the suite skips by itself in this
#: setting (sorl-thumbnail's Pillow engine, Django < 6.1), not because of our backends.
SUITE_SKIPS = {
    "easy_thumbnails": {},
    "sorl": {
        "tests.thumbnail_tests.test_engines.CropTestCase.test_smart_crop_unsupported":
            "the PIL and vips engines support smart crop",
        "tests.thumbnail_tests.test_engines.ImageValidationTestCase.test_vips_truncated_validation":
            "only the PIL and vips engines decode every pixel to validate an image",
        "tests.thumbnail_tests.test_engines.SimpleTestCase.test_format_check_only_on_conversion":
            "only the convert engine checks the written format",
        "tests.thumbnail_tests.test_engines.SimpleTestCase.test_identify_failure":
            "only the convert engine shells out to identify",
        "tests.thumbnail_tests.test_engines.SimpleTestCase.test_padding_color_name":
            "the other engines accept color names",
        "tests.thumbnail_tests.test_engines.SimpleTestCase.test_pixel_limit":
            "Pillow has its own limit, DecompressionBombError",
        "tests.thumbnail_tests.test_engines.SimpleTestCase.test_read_option_without_details":
            "only the convert engine shells out to identify",
        "tests.thumbnail_tests.test_engines.SimpleTestCase.test_read_options":
            "read options are only supported by the convert engine",
        "tests.thumbnail_tests.test_engines.SimpleTestCase.test_unsupported_output_format":
            "only the convert engine falls back to another format",
        "tests.thumbnail_tests.test_engines.SimpleTestCase.test_vips_cache_max":
            "only the vips engine uses libvips",
        "tests.thumbnail_tests.test_engines.SimpleTestCase.test_vips_untrusted_loaders":
            "only the vips engine uses libvips",
        "tests.thumbnail_tests.test_source.SourceCacheTestCase.test_async_request_reads_once_and_releases":
            "request_started reaches an ASGI request from Django 6.1",
    },
}


def applicable(app, backend):
    """Every test of ``app``'s suite expected not to run on ``backend``: test id -> reason."""
    return dict(sorted({**SUITE_SKIPS[app], **_skipped_by_runner(app, backend)}.items()))


def apply(app, backend):
    """Mark the tests of :data:`SKIPS` skipped; return the entries of both lists that name no test."""
    stale = [test for test in sorted({**SUITE_SKIPS[app], **SKIPS[app]}) if _method(test) is None]
    for test, reason in _skipped_by_runner(app, backend).items():
        if test not in stale:
            test_case, method_name = _method(test)
            setattr(test_case, method_name, unittest.skip(reason)(getattr(test_case, method_name)))
    return stale


def _skipped_by_runner(app, backend):
    return {test: reason for test, (reason, *backends) in SKIPS[app].items() if not backends or backend in backends[0]}


def _method(test):
    """``(TestCase class, method name)`` of the test id ``test``, or None if the suite lacks it."""
    module_name, class_name, method_name = test.rsplit(".", 2)
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    test_case = getattr(module, class_name, None)
    if not callable(getattr(test_case, method_name, None)):
        return None
    return test_case, method_name
