"""Validation of storage names before anything is written anywhere."""
import os
import posixpath

from django.core.exceptions import SuspiciousFileOperation


def clean_name(name):
    """Return ``name`` normalized (``a//b/./c`` -> ``a/b/c``) or raise.

    ``name`` is a string or a path-like object (``pathlib.Path("a/b.txt")``), as Django
    accepts. Raises :class:`~django.core.exceptions.SuspiciousFileOperation` for names
    that could escape the storage root or that no filesystem can hold: empty names,
    absolute paths, ``..`` components, NUL bytes. Django's own ``validate_file_name``
    misses NUL bytes and leaves ``.`` and ``//`` segments, which media hosts would each
    interpret differently.
    """
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str) or not name:
        raise SuspiciousFileOperation(f"Invalid file name {name!r}: it must be a non-empty string.")
    if "\x00" in name:
        raise SuspiciousFileOperation(f"Invalid file name {name!r}: it contains a NUL byte.")
    if name.startswith("/"):
        raise SuspiciousFileOperation(f"Detected path traversal attempt in {name!r}: absolute path.")
    if ".." in name.split("/"):
        raise SuspiciousFileOperation(f"Detected path traversal attempt in {name!r}: '..' component.")
    normalized = posixpath.normpath(name)
    if normalized in (".", ""):
        raise SuspiciousFileOperation(f"Invalid file name {name!r}: it names the storage root.")
    return normalized


def relative_name(name, location):
    """Return ``name`` as a name relative to the storage root ``location``.

    Django's ``FileSystemStorage`` also takes the absolute path of a file inside its
    location (the ``File`` its ``open()`` returns is named so, and apps hand that name
    back): such a path becomes the relative name, ``""`` for the root itself. A path-like
    name becomes a string. Other names are returned as they are, for :func:`clean_name`
    to judge. Raises :class:`~django.core.exceptions.SuspiciousFileOperation` for an
    absolute path outside ``location``.
    """
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str) or not os.path.isabs(name) or "\x00" in name:
        return name
    root = os.path.abspath(location)
    full = os.path.abspath(name)
    if full == root:
        return ""
    if not full.startswith(root.rstrip(os.sep) + os.sep):
        raise SuspiciousFileOperation(f"Detected path traversal attempt in {name!r}: outside the storage location.")
    return os.path.relpath(full, root).replace(os.sep, "/")
