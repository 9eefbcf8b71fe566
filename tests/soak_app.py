"""One app process of the soak test: saves, overwrites and deletes its own files at a steady rate.

Run by :class:`tests.soak.Soak` as ``python -m tests.soak_app`` with the environment of a
worker (``ReplicationSite.worker_env()``: the same settings, storage, broker and database)
plus ``RESTO_SOAK_*``. Each change is journaled as a JSON line once ``save()``/``delete()``
returned: ``{"t": unix time, "path": name, "size": bytes or null, "sha1": hex or null}``.
The process owns the paths ``app<N>/...``, so its journal's last line per path is the truth.
"""
import hashlib
import json
import os
import random
import signal
import sys
import time


def main():
    import django

    django.setup()
    from django.core.files.base import ContentFile
    from django.core.files.storage import storages

    from resto_celery import publisher
    from tests.celery_app import app

    app.set_default()
    index = int(os.environ["RESTO_SOAK_APP"])
    rate = float(os.environ["RESTO_SOAK_RATE"])
    seconds = float(os.environ["RESTO_SOAK_SECONDS"])
    paths = [f"app{index}/d{number % 3}/f{number:02d}.bin" for number in range(int(os.environ["RESTO_SOAK_PATHS"]))]
    rng = random.Random(int(os.environ.get("RESTO_SOAK_SEED", "0")) * 100 + index)
    storage = storages["default"]
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    present = set()
    version = 0
    with open(os.environ["RESTO_SOAK_JOURNAL"], "a", buffering=1) as journal:

        def record(path, data):
            digest = None if data is None else hashlib.sha1(data).hexdigest()
            journal.write(json.dumps({"t": time.time(), "path": path, "size": None if data is None else len(data),
                                      "sha1": digest}) + "\n")

        next_at = time.monotonic()
        end = next_at + seconds
        while time.monotonic() < end and not stopping:
            path = rng.choice(paths)
            if path in present and rng.random() < 0.3:
                storage.delete(path)
                present.discard(path)
                record(path, None)
            else:
                if path in present:  # an overwrite: save() would pick another name
                    storage.delete(path)
                    record(path, None)
                version += 1
                data = rng.randbytes(1024 + (version * 7919) % 60_000)  # each version its own size
                saved = storage.save(path, ContentFile(data))
                present.add(saved)
                record(saved, data)
            next_at += 1 / rate
            time.sleep(max(0.0, next_at - time.monotonic()))
    publisher.flush(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
