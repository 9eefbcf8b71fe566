"""What a worker does once at its start (``worker_init``), in its main process before a
prefork pool forks, that each pool process would otherwise do on its first task."""
import mimetypes

from resto_celery import tasks


def test_the_worker_start_reads_the_systems_mime_types_before_the_pool_forks(monkeypatch):
    monkeypatch.setattr(mimetypes, "inited", False)
    monkeypatch.setattr(mimetypes, "_db", None)

    tasks.load_before_the_pool_starts()

    assert mimetypes.inited
    assert mimetypes.guess_type("photo.jpg")[0] == "image/jpeg"
