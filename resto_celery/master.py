"""The master copy: a ``FileSystemStorage`` whose writes readers never see half done."""
import os
import tempfile

from django.core.files.move import file_move_safe
from django.core.files.storage import FileSystemStorage
from django.utils._os import safe_makedirs

from .names import clean_name

#: Temporary files are made beside their target (same filesystem, so the final rename is
#: atomic) with this prefix and suffix; reconcile and resync skip them.
TEMP_PREFIX = ".resto-"
TEMP_SUFFIX = ".part"


def _process_umask():
    # mkstemp() creates files 0600; a plain open() would have used 0666 & ~umask.
    # os.umask() can only be read by setting it, so read it once, before threads start.
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _process_umask()


def is_temporary(filename):
    """Whether ``filename`` (a base name) is an in-progress master write."""
    return filename.startswith(TEMP_PREFIX) and filename.endswith(TEMP_SUFFIX)


class MasterStorage(FileSystemStorage):
    """``FileSystemStorage`` with atomic writes and strict names.

    A file is written to a temporary name in its target folder, then linked into place
    (``os.link`` refuses an existing name, which keeps Django's no-overwrite rule without
    a race) or, when overwriting is allowed, renamed over the old file. A process reading
    the master path sees the old file, no file, or the whole new file; never a torn one.
    """

    def path(self, name):
        # "" is the storage root, which listdir("") needs; files never have that name.
        return super().path(clean_name(name) if name else name)

    def _save(self, name, content):
        full_path = self.path(name)
        directory = os.path.dirname(full_path)
        self._make_directory(directory)
        fd, temp_path = tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX)
        try:
            self._write(fd, temp_path, content)
            os.chmod(temp_path, self._file_mode())
            while True:
                try:
                    os.link(temp_path, full_path)
                    break
                except FileExistsError:
                    if getattr(self, "_allow_overwrite", False):
                        os.replace(temp_path, full_path)
                        break
                    name = self.get_available_name(name)
                    full_path = self.path(name)
        finally:
            if os.path.lexists(temp_path):
                os.unlink(temp_path)
        self._ensure_location_group_id(full_path)
        return os.path.relpath(full_path, self.location).replace("\\", "/")

    def _make_directory(self, directory):
        try:
            if self.directory_permissions_mode is not None:
                safe_makedirs(directory, self.directory_permissions_mode, exist_ok=True)
            else:
                os.makedirs(directory, exist_ok=True)
        except FileExistsError:
            raise FileExistsError(f"{directory} exists and is not a directory.") from None

    @staticmethod
    def _write(fd, temp_path, content):
        if hasattr(content, "temporary_file_path"):
            os.close(fd)
            file_move_safe(content.temporary_file_path(), temp_path, allow_overwrite=True)
            return
        with os.fdopen(fd, "wb") as destination:
            for chunk in content.chunks():
                destination.write(chunk if isinstance(chunk, bytes) else chunk.encode())

    def _file_mode(self):
        if self.file_permissions_mode is not None:
            return self.file_permissions_mode
        return 0o666 & ~_UMASK

    if not hasattr(FileSystemStorage, "_ensure_location_group_id"):  # Django < 5.1

        def _ensure_location_group_id(self, full_path):
            pass
