"""The master copy is written atomically: readers see no file or the whole file."""
import os
import threading

import pytest
from django.core.files.base import ContentFile, File

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
    if "allow_overwrite" not in MasterStorage.__init__.__code__.co_varnames:
        pytest.skip("allow_overwrite needs Django 5.1+")
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
