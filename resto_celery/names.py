"""Validation of storage names before anything is written anywhere."""
import posixpath

from django.core.exceptions import SuspiciousFileOperation


def clean_name(name):
    """Return ``name`` normalized (``a//b/./c`` -> ``a/b/c``) or raise.

    Raises :class:`~django.core.exceptions.SuspiciousFileOperation` for names that could
    escape the storage root or that no filesystem can hold: empty names, absolute paths,
    ``..`` components, NUL bytes. Django's own ``validate_file_name`` misses NUL bytes and
    leaves ``.`` and ``//`` segments, which media hosts would each interpret differently.
    """
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
