"""A replication site for tests: master, media hosts, Redis, real Celery worker processes."""
import json
import os
import socket
import time
from pathlib import Path

from django.db import connection

from resto_celery import lanes, publisher
from resto_celery.storage import AsyncStorage
from resto_celery.testing.worker import CeleryWorker

ROOT = Path(__file__).resolve().parent.parent

#: The queue of this test run on the shared RabbitMQ (deleted after each RabbitMQ test).
RABBITMQ_QUEUE = f"resto-test-{os.getpid()}"

#: Fast retries for tests; production defaults are in resto_celery.conf.
FAST_OPTIONS = {
    "timeout": 5,
    "max_retries": 4,
    "retry_backoff": 0.2,
    "retry_backoff_max": 1,
    "lease_ttl": 6,
    "breaker_threshold": 0,
    "failed_retry_after": 1,
}


def became_true(predicate, timeout=30, interval=0.05):
    """Poll ``predicate`` until it is true: True, or False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def wait_until(predicate, timeout=30, interval=0.05, message="condition"):
    """Poll ``predicate`` until it is true; fail after ``timeout`` seconds."""
    if not became_true(predicate, timeout, interval):
        raise AssertionError(f"timed out after {timeout}s waiting for {message}")


class UnansweringHost:
    """A loopback address whose connects time out, as a host behind a firewall that drops
    packets: a listener whose one-place accept queue is kept full, so the kernel drops
    every further connection attempt."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=0)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/media/"
        self.filler = socket.create_connection(self.listener.getsockname(), timeout=2)

    def close(self):
        self.filler.close()
        self.listener.close()


def host_entry(host):
    """The ``RESTO_MEDIA_HOSTS`` entry of a test media host: its URL, or its own entry."""
    return getattr(host, "host_entry", None) or host.url


class ReplicationSite:
    """Everything AsyncStorage needs, with the same settings in the test and the workers."""

    def __init__(self, media_root, hosts, broker_url, redis_url, tmp_path, **options):
        self.media_root = Path(media_root)
        self.hosts = hosts
        self.broker_url = broker_url
        self.redis_url = redis_url
        self.tmp_path = Path(tmp_path)
        if broker_url.startswith("amqp") and "queue" not in options:
            # RabbitMQ is shared by every run on the machine: a queue of our own.
            options["queue"] = RABBITMQ_QUEUE
        self.options = {**FAST_OPTIONS, "hosts": [host_entry(h) for h in hosts], "redis_url": redis_url, **options}
        self.queue = self.options.get("queue", "resto")
        self.queues = list(dict.fromkeys([self.queue, self.options.get("bulk_queue") or self.queue]))
        self.storage = AsyncStorage(location=str(self.media_root), **self.options)
        self.workers = []
        self.signal_log = self.tmp_path / "signals.jsonl"

    def worker_env(self, visibility_timeout=5):
        return {
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "PYTHONPATH": str(ROOT),
            "RESTO_TEST_DATABASE": "postgres" if connection.vendor == "postgresql" else "sqlite",
            "RESTO_TEST_DB_NAME": connection.settings_dict["NAME"],
            "RESTO_TEST_BROKER_URL": self.broker_url,
            "RESTO_TEST_REDIS_URL": self.redis_url,
            "RESTO_TEST_MEDIA_ROOT": str(self.media_root),
            "RESTO_TEST_STORAGE": "resto_celery.storage.AsyncStorage",
            "RESTO_TEST_STORAGE_OPTIONS": json.dumps({"location": str(self.media_root), **self.options}),
            "RESTO_TEST_VISIBILITY": str(visibility_timeout),
            "RESTO_TEST_SIGNAL_LOG": str(self.signal_log),
        }

    def start_worker(self, concurrency=2, pool="prefork", visibility_timeout=5, wrapper=(), queues=None):
        worker = CeleryWorker(
            "tests.celery_app",
            queues=tuple(queues or self.queues),
            concurrency=concurrency,
            pool=pool,
            env=self.worker_env(visibility_timeout),
            logfile=self.tmp_path / f"worker-{len(self.workers)}.log",
            wrapper=wrapper,
        )
        self.workers.append(worker)
        return worker.start()

    def stop(self):
        for worker in self.workers:
            worker.stop()

    def master_files(self):
        files = {}
        for path in self.media_root.rglob("*"):
            if path.is_file() and not path.name.startswith(".resto-"):
                try:
                    files[path.relative_to(self.media_root).as_posix()] = path.read_bytes()
                except FileNotFoundError:  # deleted while we walked
                    continue
        return files

    def converged(self):
        master = self.master_files()
        return all(host.files() == master for host in self.hosts)

    def wait_until_converged(self, timeout=60):
        wait_until(self.converged, timeout=timeout, message="every host to equal the master")

    def drained(self):
        """No message waiting in the queue, none delivered but unacknowledged (running or
        waiting for a retry countdown), none still with this process's publisher thread."""
        if not publisher.flush(timeout=5):
            return False
        if self.broker_url.startswith("redis"):
            import redis

            client = redis.Redis.from_url(self.broker_url)
            lanes_empty = all(client.llen(key) == 0 for queue in self.queues for key in lanes.queue_keys(queue))
            return lanes_empty and client.hlen("unacked") == 0
        from tests.celery_app import app

        with app.connection_for_write() as connection:
            _, ready, _ = connection.default_channel.queue_declare(self.queue, passive=True)
        if ready:
            return False
        inspect = app.control.inspect(timeout=1)
        busy = [inspect.active() or {}, inspect.reserved() or {}, inspect.scheduled() or {}]
        return not any(tasks for replies in busy for tasks in replies.values())

    def wait_until_drained_and_converged(self, timeout=60):
        wait_until(
            lambda: self.drained() and self.converged(), timeout=timeout,
            message="the queue to drain and every host to equal the master",
        )

    def signals(self):
        """The signals the workers sent, in order: ``[kind, host, name, action]`` each."""
        if not self.signal_log.exists():
            return []
        return [json.loads(line) for line in self.signal_log.read_text().splitlines()]

    def logs(self):
        return "\n".join(worker.log() for worker in self.workers)
