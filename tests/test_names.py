"""Names are validated before anything is written anywhere."""
import pytest
from django.core.exceptions import SuspiciousFileOperation

from resto_celery.names import clean_name


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/passwd", "a/\x00b", "", ".", "a/.."])
def test_unsafe_names_are_refused(name):
    with pytest.raises(SuspiciousFileOperation):
        clean_name(name)


@pytest.mark.parametrize(
    "name, cleaned",
    [("a//b", "a/b"), ("./a/./b", "a/b"), ("a b/c%20d#e?f+g", "a b/c%20d#e?f+g"), ("..a/b..", "..a/b..")],
)
def test_harmless_names_are_normalized(name, cleaned):
    assert clean_name(name) == cleaned
