"""Names are validated before anything is written anywhere."""
from pathlib import Path

import pytest
from django.core.exceptions import SuspiciousFileOperation

from resto_celery.names import clean_name, relative_name


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


def test_path_like_names_are_cleaned_as_strings():
    assert clean_name(Path("a") / "b.txt") == "a/b.txt"


def test_an_absolute_path_inside_the_location_becomes_its_relative_name(tmp_path):
    assert relative_name(str(tmp_path / "a" / "b.txt"), str(tmp_path)) == "a/b.txt"
    assert relative_name(tmp_path / "a" / "b.txt", str(tmp_path)) == "a/b.txt"
    assert relative_name(str(tmp_path), str(tmp_path)) == ""


@pytest.mark.parametrize("outside", ["/etc/passwd", "{root}-sibling/a.txt", "{root}/../escape.txt"])
def test_an_absolute_path_outside_the_location_is_refused(tmp_path, outside):
    with pytest.raises(SuspiciousFileOperation, match="outside the storage location"):
        relative_name(outside.format(root=tmp_path), str(tmp_path))


@pytest.mark.parametrize("name", ["a/b.txt", "a/../b", "", None])
def test_relative_names_are_left_for_clean_name_to_judge(tmp_path, name):
    assert relative_name(name, str(tmp_path)) == name
