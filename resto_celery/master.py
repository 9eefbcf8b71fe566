"""The master copy: a ``FileSystemStorage`` whose writes readers never see half done."""

from __future__ import annotations

import io
import os
import pathlib
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import IO, Any, cast

from django.core.exceptions import SuspiciousFileOperation
from django.core.files import File
from django.core.files.move import file_move_safe
from django.core.files.storage import FileSystemStorage
from django.core.files.utils import validate_file_name

from .names import clean_name, relative_name

#: Temporary files are made beside their target (same filesystem, so the final rename is
#: atomic) with this prefix and suffix; reconcile and resync skip them.
TEMP_PREFIX = ".resto-"
TEMP_SUFFIX = ".part"

#: The marker file at the top of the master folder that proves it is the site's master
#: (see :mod:`resto_celery.marker`). Not a file of the site: never listed, saved or replicated.
MARKER_NAME = ".resto-master"

#: ``open()`` mode characters that write: such a master file is written to a temporary
#: file and moved into place (then replicated) on close.
WRITE_FLAGS = "wax+"


def is_temporary(filename: str) -> bool:
    """Whether ``filename`` (a base name) is an in-progress master write."""
    return filename.startswith(TEMP_PREFIX) and filename.endswith(TEMP_SUFFIX)


class MasterStorage(FileSystemStorage):
    """``FileSystemStorage`` with atomic writes and strict names.

    A file is written to a temporary name in its target folder, then linked into place
    (``os.link`` refuses an existing name, which keeps Django's no-overwrite rule without
    a race) or, when overwriting is allowed, renamed over the old file. A process reading
    the master path sees the old file, no file, or the whole new file; never a torn one.
    A file opened for writing (``open(name, "wb")``...) is written the same way when it
    is closed, and :meth:`written` is called. Names may be path-like, and absolute paths
    inside ``location`` (Django accepts both).

    Takes ``FileSystemStorage``'s arguments on every Django version (``allow_overwrite``
    included). A subclass whose ``OS_OPEN_FLAGS`` lacks ``O_EXCL`` (Django's deprecated
    way to overwrite) overwrites, as ``allow_overwrite=True`` does.
    """

    def __init__(
        self, location: str | os.PathLike[str] | None = None, base_url: str | None = None,
        file_permissions_mode: int | None = None, directory_permissions_mode: int | None = None,
        allow_overwrite: bool = False,
    ) -> None:
        super().__init__(location, base_url, file_permissions_mode, directory_permissions_mode)
        flags = getattr(self, "OS_OPEN_FLAGS", os.O_EXCL)  # gone in Django 6.0
        self._allow_overwrite = allow_overwrite or not flags & os.O_EXCL

    def path(self, name: str) -> str:
        name = relative_name(name, self.location)
        # The storage root ("", "." or location itself), which listdir() needs; no file has that name.
        if name in ("", "."):
            return super().path("")
        return super().path(clean_name(name))

    def is_name_available(self, name: str, max_length: int | None = None) -> bool:
        if self._allow_overwrite:
            return not (max_length and len(name) > max_length)
        return super().is_name_available(name, max_length=max_length)

    def get_available_name(self, name: str, max_length: int | None = None) -> str:
        if not self._allow_overwrite:
            return super().get_available_name(name, max_length=max_length)
        # Overwriting, a name is available unless too long, on every Django version
        # (Django 4.2's loop would ask exists() for ever). Checked and shortened as Django does.
        name = str(name).replace("\\", "/")
        dir_name, file_name = os.path.split(name)
        if ".." in pathlib.PurePath(dir_name).parts:
            raise SuspiciousFileOperation(f"Detected path traversal attempt in '{dir_name}'")
        validate_file_name(file_name)
        if not max_length or len(name) <= max_length:
            return name
        file_ext = "".join(pathlib.PurePath(file_name).suffixes)
        file_root = file_name.removesuffix(file_ext)[: max_length - len(name)]
        if not file_root:
            raise SuspiciousFileOperation(
                f'Storage can not find an available filename for "{name}". '
                'Please make sure that the corresponding file field allows sufficient "max_length".'
            )
        return os.path.join(dir_name, file_root + file_ext)

    def written(self, name: str) -> None:
        """Called once ``name`` was written through :meth:`open` and moved into place (a hook)."""

    def listdir(self, path: str) -> tuple[list[str], list[str]]:
        directories, files = super().listdir(path)
        if not str(relative_name(path, self.location)).strip("/."):
            files = [name for name in files if name != MARKER_NAME]
        return directories, files

    def _save(self, name: str, content: File) -> str:
        full_path, fd, temp_path = self._temporary_beside(name)
        try:
            self._write(fd, temp_path, content)
            return self._into_place(name, full_path, temp_path)
        finally:
            if os.path.lexists(temp_path):
                os.unlink(temp_path)

    def _into_place(self, name: str, full_path: str, temp_path: str) -> str:
        """Move the written temporary file into place as ``name`` (another available name if
        that was taken meanwhile, unless overwriting); return the name it took."""
        self._finish_temporary(temp_path)
        while True:
            try:
                _move_into_place(temp_path, full_path, overwrite=self._allow_overwrite)
                break
            except FileExistsError:
                available = self.get_available_name(name)
                if available == name:  # never spin on one name
                    raise FileExistsError(
                        f"{name} exists and get_available_name() returned it again; "
                        "use allow_overwrite=True to overwrite files."
                    ) from None
                name, full_path = available, self.path(available)
        return self._name_of(full_path)

    def _name_of(self, full_path: str) -> str:
        """The storage name of the file at ``full_path``."""
        return os.path.relpath(full_path, self.location).replace("\\", "/")

    def _open(self, name: str, mode: str = "rb") -> MasterFile:
        full_path = self.path(name)
        name = os.path.relpath(full_path, self.location).replace("\\", "/")
        if not any(flag in mode for flag in WRITE_FLAGS):
            return MasterFile(open(full_path, mode), full_path, self, name)
        self._refuse_marker(full_path)
        if "x" in mode and os.path.lexists(full_path):
            raise FileExistsError(f"{name} exists (mode {mode!r}).")
        if os.path.isdir(full_path):
            raise IsADirectoryError(f"{name} is a directory.")
        fd, temp_path = _create_temporary(os.path.dirname(full_path))
        try:
            if "r" in mode or "a" in mode:  # keep the current bytes
                try:
                    with open(full_path, "rb") as current, open(temp_path, "r+b") as copy:
                        shutil.copyfileobj(current, copy)
                except FileNotFoundError:
                    if "r" in mode:
                        raise
            file = os.fdopen(fd, mode.replace("x", "w"))
        except BaseException:
            os.close(fd)
            os.unlink(temp_path)
            raise
        return MasterFile(file, full_path, self, name, pending=(temp_path, "x" not in mode))

    @contextmanager
    def replacing(self, name: str) -> Iterator[IO[bytes]]:
        """Yield a binary file whose bytes replace ``name`` atomically when the block ends.

        Readers see the old file or the whole new one; if the block raises, nothing changes.
        Nothing is replicated (``resto_resync --restore-from`` rebuilds the master with it).
        """
        full_path, fd, temp_path = self._temporary_beside(name)
        try:
            with os.fdopen(fd, "wb") as sink:
                yield sink
            self._finish_temporary(temp_path)
            _move_into_place(temp_path, full_path, overwrite=True)
        finally:
            if os.path.lexists(temp_path):
                os.unlink(temp_path)

    def _commit(self, temp_path: str, full_path: str, name: str, overwrite: bool) -> None:
        """Move a file written through :meth:`open` into place, then call :meth:`written`."""
        try:
            self._finish_temporary(temp_path)
            _move_into_place(temp_path, full_path, overwrite=overwrite)
        finally:
            if os.path.lexists(temp_path):
                os.unlink(temp_path)
        self.written(name)

    def _temporary_beside(self, name: str) -> tuple[str, int, str]:
        """``(full_path, fd, temp_path)``: where ``name`` goes (its folder made), and a new
        temporary file in that folder, to be moved into place once written."""
        full_path = self.path(name)
        self._refuse_marker(full_path)
        directory = os.path.dirname(full_path)
        self._make_directory(directory)
        return (full_path, *_create_temporary(directory))

    def _refuse_marker(self, full_path: str) -> None:
        if os.path.join(self.location, MARKER_NAME) == full_path:
            raise SuspiciousFileOperation(f"{MARKER_NAME} is the master copy's marker; no file may take its name.")

    def _make_directory(self, directory: str) -> None:
        try:
            if self.directory_permissions_mode is not None:
                _make_directories(directory, self.directory_permissions_mode)
            else:
                os.makedirs(directory, exist_ok=True)
        except FileExistsError:
            raise FileExistsError(f"{directory} exists and is not a directory.") from None

    @staticmethod
    def _write(fd: int, temp_path: str, content: File) -> None:
        if hasattr(content, "temporary_file_path"):
            mode = os.fstat(fd).st_mode & 0o777  # 0o666 less the umask, as the file we replace
            os.close(fd)
            file_move_safe(content.temporary_file_path(), temp_path, allow_overwrite=True)
            os.chmod(temp_path, mode)
            return
        whole = in_memory(content)
        if whole is not None:  # written from where it is, not copied out in chunks first
            try:
                for _ in write_in_steps(fd, whole):
                    pass
            finally:
                os.close(fd)
            return
        with os.fdopen(fd, "wb") as destination:
            for chunk in content.chunks():
                destination.write(chunk if isinstance(chunk, bytes) else chunk.encode())

    def _finish_temporary(self, temp_path: str) -> None:
        """Give a written temporary file its final mode and group, before it is moved into place."""
        if self.file_permissions_mode is not None:
            os.chmod(temp_path, self.file_permissions_mode)
        # As Django: a file takes the group of the storage root (a moved upload may not have it).
        if os.name == "posix":
            location_gid = os.stat(self.location).st_gid
            if os.stat(temp_path).st_gid != location_gid:
                try:
                    os.chown(temp_path, -1, location_gid)
                except PermissionError:
                    pass


class MasterFile(File):
    """A file of the master copy, named by its absolute path (as Django's are).

    Opened for writing, it writes to a temporary file beside its target: :meth:`close`
    moves that into place and tells the storage (which replicates it), and leaving a
    ``with`` block on an exception discards the write. A closed one reopens through the
    storage, so no write ever bypasses it.
    """

    # Always set: the open file and its absolute path (Django's File allows None for both).
    file: IO[Any]
    name: str

    def __init__(
        self, file: IO[Any], name: str, storage: MasterStorage, storage_name: str,
        pending: tuple[str, bool] | None = None,
    ) -> None:
        super().__init__(file, name)
        self._storage = storage
        self._storage_name = storage_name
        self._pending = pending  # (temporary path, overwrite) while open for writing

    def open(self, mode: str | None = None, *args: Any, **kwargs: Any) -> MasterFile:
        if not self.closed or not any(flag in (mode or self.mode) for flag in WRITE_FLAGS):
            return super().open(mode, *args, **kwargs)
        reopened = cast(MasterFile, self._storage.open(self._storage_name, mode or self.mode, *args, **kwargs))
        self.file, self._pending = reopened.file, reopened._pending
        return self

    def close(self) -> None:
        pending, self._pending = self._pending, None
        self.file.close()
        if pending is not None:
            temp_path, overwrite = pending
            self._storage._commit(temp_path, self.name, self._storage_name, overwrite)

    def discard(self) -> None:
        """Close without writing anything: the master keeps its previous bytes."""
        pending, self._pending = self._pending, None
        self.file.close()
        if pending is not None and os.path.lexists(pending[0]):
            os.unlink(pending[0])

    def __exit__(
        self, exc_type: type[BaseException] | None, exc_value: BaseException | None, traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


def in_memory(content: File) -> memoryview | None:
    """The bytes of ``content``, when it holds them in memory (a ``ContentFile`` of bytes,
    an ``InMemoryUploadedFile``); else None. ``getvalue()`` of a ``BytesIO`` made from
    bytes and not written to is those bytes, not a copy (``getbuffer()`` would copy them)."""
    inner = getattr(content, "file", None)
    return memoryview(inner.getvalue()) if type(inner) is io.BytesIO else None


#: Bytes in memory are written to the master this much at a time (one write of a whole
#: megabyte was no quicker here, and a file being sent as it is written goes step by step).
WRITE_STEP = 256 * 1024


def write_in_steps(fd: int, data: memoryview) -> Iterator[int]:
    """Write ``data`` to ``fd`` a :data:`WRITE_STEP` at a time; yield how much is written after each."""
    written = 0
    while written < len(data):
        written += os.write(fd, data[written:written + WRITE_STEP])
        yield written


def _create_temporary(directory: str) -> tuple[int, str]:
    """Create an empty temporary file in ``directory``; return ``(fd, path)``.

    Its mode is 0o666 less the process's umask of the moment, as Django's files (the
    umask is applied by the kernel, never read: reading it means setting it, which
    races with other threads).
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        path = os.path.join(directory, f"{TEMP_PREFIX}{secrets.token_hex(8)}{TEMP_SUFFIX}")
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue


def _move_into_place(temp_path: str, full_path: str, overwrite: bool) -> None:
    """Atomically make ``full_path`` the file at ``temp_path`` (``FileExistsError`` if it
    exists and ``overwrite`` is false). ``temp_path`` remains; the caller removes it."""
    if overwrite:
        os.replace(temp_path, full_path)
    else:
        os.link(temp_path, full_path)


def _make_directories(directory: str, mode: int) -> None:
    """``os.makedirs(directory, mode)`` with ``mode`` applied to every folder it makes
    (``makedirs`` applies the umask to them), never changing the process's umask."""
    missing = []
    while directory and not os.path.isdir(directory):
        missing.append(directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, mode)
        except FileExistsError:
            if not os.path.isdir(folder):
                raise
            continue
        os.chmod(folder, mode)
