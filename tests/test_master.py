"""The master copy is written atomically: readers see no file or the whole file."""
import ast
import os
import threading
import warnings
from pathlib import Path

import pytest
from django.core.exceptions import SuspiciousFileOperation
from django.core.files.base import ContentFile, File

import resto_celery
from resto_celery.master import MasterStorage, is_temporary


class SlowContent(File):
    """A file whose chunks arrive slowly, so a reader has time to look mid-write."""

    def __init__(self, chunks, pause_event=None):
        super().__init__(None, name="slow.bin")
        self._chunks = chunks
        self.size = sum(len(c) for c in chunks)
        self.between_chunks = pause_event

    def chunks(self, chunk_size=None):
        for chunk in self._chunks:
            yield chunk
            if self.between_chunks:
                self.between_chunks()


def test_a_reader_never_sees_a_partly_written_file(tmp_path):
    storage = MasterStorage(location=str(tmp_path))
    target = tmp_path / "slow.bin"
    observed = []

    def look():
        observed.append(target.stat().st_size if target.exists() else None)

    content = SlowContent([b"x" * 65536] * 20, pause_event=look)
    storage.save("slow.bin", content)
    look()
    assert set(observed[:-1]) == {None}  # during the write: nothing at the final path
    assert observed[-1] == 20 * 65536


def test_a_reader_thread_sees_old_or_new_bytes_only_when_overwriting(tmp_path):
    storage = MasterStorage(location=str(tmp_path), allow_overwrite=True)
    old, new = b"o" * 300_000, b"n" * 300_000
    storage.save("f.bin", ContentFile(old))
    stop = threading.Event()
    torn = []

    def read_forever():
        for _ in range(100_000):
            if stop.is_set():
                return
            data = (tmp_path / "f.bin").read_bytes()
            if data not in (old, new):
                torn.append(len(data))

    reader = threading.Thread(target=read_forever)
    reader.start()
    for turn in range(30):
        storage.save("f.bin", ContentFile(new if turn % 2 else old))
    stop.set()
    reader.join(timeout=30)
    assert torn == []


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    storage = MasterStorage(location=str(tmp_path))

    def explode():
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        storage.save("f.bin", SlowContent([b"a", b"b"], pause_event=explode))
    assert os.listdir(tmp_path) == []


def test_existing_names_get_an_alternative_without_overwriting(tmp_path):
    storage = MasterStorage(location=str(tmp_path))
    storage.save("f.txt", ContentFile(b"first"))
    second = storage.save("f.txt", ContentFile(b"second"))
    assert second != "f.txt"
    assert (tmp_path / "f.txt").read_bytes() == b"first"
    assert (tmp_path / second).read_bytes() == b"second"


def test_saved_files_get_the_usual_permissions(tmp_path):
    storage = MasterStorage(location=str(tmp_path))
    storage.save("f.txt", ContentFile(b"x"))
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_file_permissions_mode_is_applied(tmp_path):
    storage = MasterStorage(location=str(tmp_path), file_permissions_mode=0o640)
    storage.save("f.txt", ContentFile(b"x"))
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o640


def test_uploaded_temporary_files_are_moved_in(tmp_path):
    from django.core.files.uploadedfile import TemporaryUploadedFile

    upload = TemporaryUploadedFile("up.bin", "application/octet-stream", 3, None)
    upload.write(b"abc")
    upload.flush()
    storage = MasterStorage(location=str(tmp_path / "root"))
    assert storage.save("up.bin", upload) == "up.bin"
    upload.close()  # as Django's request handling does; the file was moved away
    assert (tmp_path / "root" / "up.bin").read_bytes() == b"abc"


def test_temporary_names_are_recognised():
    assert is_temporary(".resto-abc123.part")
    assert not is_temporary("photo.part")


@pytest.fixture
def umask():
    """Set the process umask for the test (after every module was imported); restore it after."""
    previous = os.umask(0o022)
    yield lambda value: os.umask(value)
    os.umask(previous)


def test_files_get_the_umask_of_the_moment_they_are_written(tmp_path, umask, settings):
    settings.FILE_UPLOAD_PERMISSIONS = None  # Django's default is 0o644
    storage = MasterStorage(location=str(tmp_path))
    umask(0o027)
    storage.save("f.txt", ContentFile(b"x"))
    umask(0o002)
    storage.save("g.txt", ContentFile(b"x"))
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "g.txt").stat().st_mode & 0o777 == 0o664


def test_directory_permissions_mode_applies_to_every_folder_made(tmp_path, umask):
    umask(0o077)
    storage = MasterStorage(location=str(tmp_path), directory_permissions_mode=0o751)
    storage.save("a/b/f.txt", ContentFile(b"x"))
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o751
    assert (tmp_path / "a" / "b").stat().st_mode & 0o777 == 0o751


def test_the_constructor_takes_file_system_storage_arguments_by_position(tmp_path):
    storage = MasterStorage(str(tmp_path), "/files/", 0o640, 0o750, True)
    assert (storage.location, storage.base_url) == (str(tmp_path), "/files/")
    assert (storage.file_permissions_mode, storage.directory_permissions_mode) == (0o640, 0o750)
    storage.save("f.txt", ContentFile(b"one"))
    assert storage.save("f.txt", ContentFile(b"two")) == "f.txt"
    assert (tmp_path / "f.txt").read_bytes() == b"two"


class OpenFlagsOverwritingStorage(MasterStorage):
    """Django's deprecated way to overwrite (documented until 5.1): OS_OPEN_FLAGS without O_EXCL."""

    OS_OPEN_FLAGS = MasterStorage.OS_OPEN_FLAGS & ~os.O_EXCL

    def get_available_name(self, name, max_length=None):
        return name


@pytest.mark.timeout(10)
def test_os_open_flags_without_o_excl_overwrite_instead_of_spinning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Django 5.1+ says OS_OPEN_FLAGS is deprecated
        storage = OpenFlagsOverwritingStorage(location=str(tmp_path))
    storage.save("f.txt", ContentFile(b"one"))
    assert storage.save("f.txt", ContentFile(b"two")) == "f.txt"
    assert (tmp_path / "f.txt").read_bytes() == b"two"


class SameNameStorage(MasterStorage):
    def get_available_name(self, name, max_length=None):
        return name


@pytest.mark.timeout(10)
def test_a_taken_name_offered_again_fails_at_once(tmp_path):
    storage = SameNameStorage(location=str(tmp_path))
    storage.save("f.txt", ContentFile(b"one"))
    with pytest.raises(FileExistsError, match="allow_overwrite"):
        storage.save("f.txt", ContentFile(b"two"))
    assert (tmp_path / "f.txt").read_bytes() == b"one"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_a_file_opened_for_writing_appears_whole_on_close(tmp_path):
    storage = MasterStorage(location=str(tmp_path))
    storage.save("f.txt", ContentFile(b"old"))
    with storage.open("f.txt", "wb") as handle:
        handle.write(b"new ")
        assert (tmp_path / "f.txt").read_bytes() == b"old"
        handle.write(b"bytes")
        assert (tmp_path / "f.txt").read_bytes() == b"old"
    assert (tmp_path / "f.txt").read_bytes() == b"new bytes"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_a_file_opened_for_appending_keeps_its_bytes(tmp_path):
    storage = MasterStorage(location=str(tmp_path))
    storage.save("f.txt", ContentFile(b"head"))
    with storage.open("f.txt", "ab") as handle:
        handle.write(b"+tail")
    with storage.open("f.txt", "r+b") as handle:
        assert handle.read(4) == b"head"
        handle.write(b"!")
    assert (tmp_path / "f.txt").read_bytes() == b"head!tail"


def test_opening_a_missing_file_for_update_raises(tmp_path):
    storage = MasterStorage(location=str(tmp_path))
    with pytest.raises(FileNotFoundError):
        storage.open("missing.txt", "r+b")
    assert os.listdir(tmp_path) == []


def test_a_write_left_on_an_exception_is_discarded(tmp_path):
    storage = MasterStorage(location=str(tmp_path))
    storage.save("f.txt", ContentFile(b"old"))
    with pytest.raises(RuntimeError), storage.open("f.txt", "wb") as handle:  # noqa: PT012 - the failure is the test
        handle.write(b"half")
        raise RuntimeError("the view failed")
    assert (tmp_path / "f.txt").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_a_closed_file_reopened_for_writing_still_writes_atomically(tmp_path):
    storage = MasterStorage(location=str(tmp_path))
    storage.save("f.txt", ContentFile(b"old"))
    handle = storage.open("f.txt")
    handle.close()
    handle.open("wb")
    handle.write(b"new")
    assert (tmp_path / "f.txt").read_bytes() == b"old"
    handle.close()
    assert (tmp_path / "f.txt").read_bytes() == b"new"


def test_path_like_names_are_accepted(tmp_path):
    storage = MasterStorage(location=str(tmp_path))
    assert storage.save(Path("a") / "b.txt", ContentFile(b"x")) == "a/b.txt"
    assert storage.exists(Path("a/b.txt"))
    assert storage.listdir(Path("")) == (["a"], [])
    storage.delete(Path("a/b.txt"))
    assert not storage.exists(Path("a/b.txt"))


def test_absolute_names_inside_the_location_are_accepted(tmp_path):
    storage = MasterStorage(location=str(tmp_path))
    storage.save("a/b.txt", ContentFile(b"x"))
    with storage.open("a/b.txt") as handle:
        absolute = handle.name
    assert absolute == str(tmp_path / "a" / "b.txt")
    assert storage.exists(absolute) and storage.path(absolute) == absolute
    assert storage.get_modified_time(absolute) == storage.get_modified_time("a/b.txt")
    storage.delete(absolute)
    assert not storage.exists("a/b.txt")


@pytest.mark.parametrize("name", ["/etc/passwd", "{root}-sibling/b.txt"])
def test_absolute_names_outside_the_location_are_refused(tmp_path, name):
    storage = MasterStorage(location=str(tmp_path / "root"))
    with pytest.raises(SuspiciousFileOperation):
        storage.exists(name.format(root=tmp_path / "root"))


def test_the_package_imports_no_private_django_module():
    private = []
    for path in Path(resto_celery.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            modules += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            private += [f"{path.name}: {m}" for m in modules if m.startswith("django") and "._" in m]
    assert private == []
