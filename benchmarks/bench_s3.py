"""Replication to an S3 bucket (a "storage" media host) with real workers, against boto3 itself.

- **Throughput**: ``save()`` N files as fast as the benchmark can, then wait until the
  workers have put every file in the bucket (its ``Replica`` row synced, then a listing of
  the bucket checks every object and size); files/s and MB/s from the first save to the
  last row. The baseline, measured in the same round against the same bucket: boto3's own
  ``upload_fileobj`` of the same master files from a thread pool as wide as the worker's
  concurrency, no Celery, no leases, no rows, no checksum: with boto3's defaults (the goal's
  baseline), and with ``use_threads=False`` as the storage hosts upload (shown beside it).
  Share = baseline time / ours (goal >= 0.5). Small files (10 KB) and larger ones (1 MB).

The bucket is moto's S3 server (``moto[server]``) in a process of its own on 127.0.0.1, so
both sides pay what a store that runs in Python costs; the share says what resto_celery's
protocol (message, lease, fingerprint, checksum, row) adds on top of one S3 upload.

    python -m benchmarks.bench_s3 [--quick] [--output FILE]
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import common

SMALL, LARGE = 10 * 1024, 1024 * 1024
POOL, CONCURRENCY = "threads", 8
SHARE_GOAL = 0.5
CONVERGE_TIMEOUT = 600
BUCKET = "resto-bench"
ACCESS_KEY, SECRET_KEY = "AKIARESTOBENCH000001", "resto-bench-secret"


class MotoServer:
    """moto's S3 server (``python -m moto.server``) in its own process on 127.0.0.1."""

    def __init__(self, workdir):
        from resto_celery.testing._support import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "moto.log", "wb")  # closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client().list_buckets()
                break
            except Exception:  # noqa: BLE001 - not listening yet
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("moto's server did not start") from None
                time.sleep(0.1)

    def client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.url, region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
        )

    def stop(self):
        self.process.terminate()
        self.process.wait(10)
        self.log.close()


class Bench:
    """The bucket, the master folder, the storage and the worker of one run."""

    def __init__(self, workdir, redis_server):
        self.workdir = workdir
        self.redis = redis_server
        self.master = workdir / "master"
        self.master.mkdir()
        self.s3 = MotoServer(workdir)
        self.client = self.s3.client()
        self.client.create_bucket(Bucket=BUCKET)
        self.entry = {
            "kind": "storage", "name": "s3-bench", "storage": "storages.backends.s3.S3Storage",
            "options": {"bucket_name": BUCKET, "endpoint_url": self.s3.url, "region_name": "us-east-1",
                        "access_key": ACCESS_KEY, "secret_key": SECRET_KEY},
        }
        self.options = {
            "location": str(self.master), "hosts": [self.entry], "redis_url": redis_server.url,
            "timeout": 60, "lease_ttl": 180, "breaker_threshold": 0,
        }
        os.environ["RESTO_BENCH_STORAGE_OPTIONS"] = json.dumps(self.options)
        self.worker = None

    @property
    def storage(self):
        from django.core.files.storage import storages

        return storages["default"]

    def start_worker(self):
        self.stop_worker()
        self.worker = common.celery_worker(POOL, CONCURRENCY, self.workdir / f"worker-{uuid.uuid4().hex[:6]}.log")

    def stop_worker(self):
        if self.worker is not None:
            self.worker.stop()
            self.worker = None

    def reset(self):
        """Empty the master, the bucket, the queue and the Replica table."""
        from resto_celery.master import MARKER_NAME
        from resto_celery.models import Replica

        for entry in os.scandir(self.master):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            elif entry.name != MARKER_NAME:
                os.unlink(entry.path)
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            keys = [{"Key": entry["Key"]} for entry in page.get("Contents", ())]
            if keys:
                self.client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys})
        common.flush_redis(self.redis.url)
        common.empty_table(Replica)

    def bucket_holds(self, names, size):
        """Fail unless the bucket holds every name with ``size`` bytes."""
        found = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            found.update((entry["Key"], entry["Size"]) for entry in page.get("Contents", ()))
        missing = [name for name in names if found.get(name) != size]
        if missing:
            raise AssertionError(f"{len(missing)} file(s) not in the bucket: {missing[:3]}")

    def close(self):
        self.stop_worker()
        self.s3.stop()


def ours(bench, count, size):
    """Seconds from the first save to every file's row synced (the object stored before it)."""
    from django.core.files.base import ContentFile

    from resto_celery.models import Replica

    bench.reset()
    data = os.urandom(size)
    prefix = f"t{uuid.uuid4().hex[:6]}"
    names = [f"{prefix}/{index:05d}.bin" for index in range(count)]
    start = time.perf_counter()
    for name in names:
        if bench.storage.save(name, ContentFile(data)) != name:
            raise AssertionError(f"{name} was renamed")
    deadline = time.monotonic() + CONVERGE_TIMEOUT
    while True:
        synced = Replica.objects.filter(state="synced").count()
        if synced >= count:
            break
        if Replica.objects.exclude(state__in=("synced", "pending")).exists() or time.monotonic() > deadline:
            others = list(Replica.objects.exclude(state="synced").values_list("state", "last_error")[:3])
            raise AssertionError(f"{synced} of {count} rows synced; others: {others}")
        time.sleep(0.02)  # a query per look: light on the database the worker writes to
    elapsed = time.perf_counter() - start
    bench.bucket_holds(names, size)
    return elapsed


def baseline(bench, count, size, threads=True):
    """Seconds for boto3's ``upload_fileobj`` of the same files from a pool of the same width:
    with boto3's defaults (``threads``: s3transfer's own thread pool per upload), or with
    ``use_threads=False``, as resto_celery's storage hosts upload."""
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig() if threads else TransferConfig(use_threads=False)
    bench.reset()
    data = os.urandom(size)
    prefix = f"b{uuid.uuid4().hex[:6]}"
    names = [f"{prefix}/{index:05d}.bin" for index in range(count)]
    for name in names:  # the same master files: read from disk, as the workers read them
        path = bench.master / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    local = threading.local()

    def upload(name):
        client = getattr(local, "client", None) or bench.s3.client()
        local.client = client
        with open(bench.master / name, "rb") as body:
            client.upload_fileobj(body, BUCKET, name, Config=config)

    with ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
        for name in names[:CONCURRENCY]:  # warm: one client (and connection) per thread, as the worker has
            pool.submit(upload, name).result()
        start = time.perf_counter()
        list(pool.map(upload, names))
    elapsed = time.perf_counter() - start
    bench.bucket_holds(names, size)
    return elapsed


def measure(bench, count, size, rounds):
    """Per round: (ours s, boto3 defaults s, boto3 without threads s)."""
    results = []
    bench.start_worker()
    ours(bench, max(count // 10, 3), size)  # warm-up: connections, imports, first rows
    for _ in range(rounds):
        mine = ours(bench, count, size)
        boto = baseline(bench, count, size)
        plain = baseline(bench, count, size, threads=False)
        results.append((mine, boto, plain))
        print(f"  {count} x {size // 1024} KB: ours {mine:.2f} s ({count / mine:.1f} files/s), boto3 upload_fileobj "
              f"{boto:.2f} s ({count / boto:.1f} files/s), share {boto / mine:.2f}; without threads {plain:.2f} s, "
              f"share {plain / mine:.2f}", flush=True)
    bench.stop_worker()
    return results


def main(argv=None):
    parser = common.argument_parser(__doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    quick = args.quick
    small_count, large_count, rounds = (40, 8, 1) if quick else (300, 40, 5)
    try:
        import moto.server  # noqa: F401
        import storages.backends.s3  # noqa: F401
    except ImportError as error:
        print(f"{error}: install the test extra (moto[server], django-storages[s3]); nothing measured")
        return 0
    with common.private_redis() as redis_server, tempfile.TemporaryDirectory(prefix="resto-bench-s3-") as workdir:
        bench = Bench(Path(workdir), redis_server)
        try:
            common.setup_django()
            common.celery_app()
            environment = common.environment()
            small = measure(bench, small_count, SMALL, rounds)
            large = measure(bench, large_count, LARGE, rounds)
        finally:
            bench.close()

    def summary(label, rounds_, count, size):
        return {
            "label": label,
            "ours_files_s": common.summarize([count / o for o, _, _ in rounds_]),
            "boto3_files_s": common.summarize([count / b for _, b, _ in rounds_]),
            "boto3_no_threads_files_s": common.summarize([count / p for _, _, p in rounds_]),
            "ours_mb_s": common.summarize([count * size / o / 1e6 for o, _, _ in rounds_]),
            "boto3_mb_s": common.summarize([count * size / b / 1e6 for _, b, _ in rounds_]),
            "share": common.summarize([b / o for o, b, _ in rounds_]),
            "share_no_threads": common.summarize([p / o for o, _, p in rounds_]),
            "rounds": rounds_,
        }

    rows = [summary("10 KB", small, small_count, SMALL), summary("1 MB", large, large_count, LARGE)]
    table = [
        [row["label"], f"{row['ours_files_s']['median']:,.1f}", f"{row['boto3_files_s']['median']:,.1f}",
         f"{row['ours_mb_s']['median']:,.2f}", f"{row['boto3_mb_s']['median']:,.2f}",
         f"{row['share']['median']:.2f}", f"{row['share']['min']:.2f} – {row['share']['max']:.2f}",
         f"{row['boto3_no_threads_files_s']['median']:,.1f}", f"{row['share_no_threads']['median']:.2f}",
         f"{row['share_no_threads']['min']:.2f} – {row['share_no_threads']['max']:.2f}"]
        for row in rows
    ]
    return common.write_result(
        args, "bench_s3", "Replication to an S3 bucket vs boto3's upload_fileobj",
        (
            f"AsyncStorage with one S3 media host (django-storages' S3Storage on moto's S3 server, its own process "
            f"on 127.0.0.1) and one real Celery worker ({POOL}, concurrency {CONCURRENCY}; private Redis broker). "
            f"{small_count} files of 10 KB and {large_count} of 1 MB per round, from the first save() to every "
            f"Replica row synced. Baseline in the same round: boto3 upload_fileobj of the same files from "
            f"{CONCURRENCY} threads. {rounds} round(s): medians and ranges."
        ),
        parameters={"small": small_count, "large": large_count, "rounds": rounds, "pool": POOL,
                    "concurrency": CONCURRENCY},
        environment=environment,
        results={"rows": rows},
        tables=[{
            "title": "Throughput to the bucket (medians)",
            "headers": [
                "files", "ours files/s", "boto3 files/s", "ours MB/s", "boto3 MB/s", "share", "share (min – max)",
                "boto3 no threads files/s", "share of it", "(min – max)",
            ],
            "rows": table,
        }],
        goals=[{
            "goal": f"throughput to an S3 host >= {SHARE_GOAL} of boto3 upload_fileobj's (share, median)",
            "met": all(row["share"]["median"] >= SHARE_GOAL for row in rows),
            "detail": ", ".join(f"{row['label']}: {row['share']['median']:.2f}" for row in rows),
        }],
        notes=[
            "boto3: upload_fileobj with its defaults (s3transfer starts a thread pool per upload); boto3 no threads: "
            "the same with TransferConfig(use_threads=False), which is how resto_celery's storage hosts upload when "
            "the storage's options set no transfer_config (the worker's concurrency is the parallelism).",
            "Ours includes what boto3 alone does not: the message, the lease, the master's fingerprint, a CRC32 "
            "of each file sent for the store to check, and the Replica row (PostgreSQL or SQLite).",
            "moto is a Python server: absolute numbers are far below a real S3's; the share is what to read.",
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
