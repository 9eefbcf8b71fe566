"""Prometheus metrics: per-host figures from the ``Replica`` rows, and the workers' transfers.

Needs ``prometheus_client`` (``pip install resto-celery[prometheus]``); without it, or with
``RESTO_METRICS = False``, every function here is a cheap no-op.

Two sources, two endpoints:

- **Per host, from the database** (the dashboard's queries, :mod:`resto_celery.status`):
  files per state, the age of the oldest change not yet on the host, the last success, the
  breaker. Computed at each scrape by :func:`resto_celery.views.metrics`, the ``/metrics``
  view of the web app, so they are the same whichever app server Prometheus asks.
- **From the workers**, counted where the work is done: transfers by host, action and
  outcome, bytes sent, transfer durations, lease waits and retries. Served by the worker
  itself when ``RESTO_METRICS_PORT`` is set (``prometheus_client``'s HTTP server, started
  in the worker's main process). A prefork pool's children count into files that the main
  process sums (``prometheus_client``'s multiprocess mode): ``PROMETHEUS_MULTIPROC_DIR``
  when the environment has it, else a private folder made at start and removed at exit.

Both also go to ``prometheus_client``'s default registry, so ``django-prometheus``'s own
``/metrics`` (and its exporter thread) show the workers' counters too, and our view shows
``django-prometheus``'s metrics: mount either.
"""
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import threading

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

logger = logging.getLogger(__name__)

ACTIONS = ("upload", "delete")
OUTCOMES = ("ok", "skipped", "failed", "waiting")
#: Seconds; a 10 KB PUT on a LAN is a few ms, a 1 GB one a minute, a timeout RESTO_TIMEOUT.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
DEFAULT_ADDRESS = "127.0.0.1"

_lock = threading.Lock()
_enabled = None  # None: not read yet (settings may change in tests: see reset())
_instruments = None  # the worker-side metric objects, made once per process
_failed_once = False
_server = None  # the worker's HTTP server: (httpd, thread, port)
_private_dir = None  # the multiprocess folder this worker made, removed at its shutdown


def available():
    """Whether ``prometheus_client`` is installed. It is not imported here: a prefork worker
    must choose the multiprocess mode before it is (Celery runs the system checks first)."""
    if "prometheus_client" in sys.modules:
        return sys.modules["prometheus_client"] is not None
    try:
        return importlib.util.find_spec("prometheus_client") is not None
    except (ImportError, ValueError):
        return False


def enabled():
    """Whether metrics are on: ``RESTO_METRICS`` (default True) and ``prometheus_client`` installed."""
    global _enabled
    if _enabled is None:
        try:
            wanted = bool(getattr(settings, "RESTO_METRICS", True))
        except ImproperlyConfigured:  # settings not configured: a plain script
            wanted = True
        _enabled = wanted and available()
    return _enabled


def reset(**kwargs):
    """Read ``RESTO_METRICS`` again (connected to ``setting_changed``)."""
    global _enabled
    if kwargs.get("setting", "RESTO_METRICS") == "RESTO_METRICS":
        _enabled = None


# The workers' counters


class _Instruments:
    def __init__(self):
        from prometheus_client import Counter, Histogram

        self.transfers = Counter(
            "resto_transfers", "Transfers to media hosts by outcome: ok, skipped (the host had the bytes), "
            "failed (an attempt failed), waiting (the host is down: the change waits for its return).",
            ["host", "action", "outcome"],
        )
        self.bytes = Counter("resto_transfer_bytes", "Bytes sent to media hosts (PUT bodies).", ["host"])
        self.duration = Histogram(
            "resto_transfer_duration_seconds", "Duration of successful transfers (PUT or DELETE).",
            ["host", "action"], buckets=DURATION_BUCKETS,
        )
        self.lease_waits = Counter(
            "resto_lease_waits", "Tasks that found the (host, path) lease taken and were deferred.", ["host"]
        )
        self.retries = Counter("resto_retries", "Retries scheduled after a retryable failure.", ["host"])


def _get_instruments():
    """The metric objects, made on first use (not at import: a prefork worker must choose
    the multiprocess mode before ``prometheus_client`` is imported), or None when off."""
    global _instruments
    if not enabled():
        return None
    if _instruments is None:
        with _lock:
            if _instruments is None:
                _instruments = _Instruments()
    return _instruments


def _swallow(error):
    """Metrics never fail replication: log the first error of the process, then stay quiet."""
    global _failed_once
    if not _failed_once:
        _failed_once = True
        logger.warning("Could not record a replication metric (later errors are not logged): %s", error)


def transfer_done(host, action, outcome, nbytes=0, seconds=None):
    """Count one transfer of ``action`` ("upload" or "delete") to ``host``.

    ``outcome`` is "ok", "skipped" (the host already had the bytes), "failed" or "waiting"
    (the host's breaker is open). ``nbytes``: the bytes sent (0 for a delete or a skip);
    ``seconds``: how long the transfer took, recorded for successful ones.
    """
    try:
        instruments = _get_instruments()
        if instruments is None:
            return
        instruments.transfers.labels(host, action, outcome).inc()
        if nbytes:
            instruments.bytes.labels(host).inc(nbytes)
        if outcome == "ok" and seconds is not None:
            instruments.duration.labels(host, action).observe(seconds)
    except Exception as error:  # noqa: BLE001 - a metric must never fail a transfer
        _swallow(error)


def lease_waited(host):
    """A task found the ``(host, path)`` lease taken and deferred its work."""
    _count("lease_waits", host)


def retry_scheduled(host):
    """A retryable failure on ``host`` scheduled a retry."""
    _count("retries", host)


def _count(counter, host):
    """Add one to the per-host counter named ``counter`` (an :class:`_Instruments` attribute)."""
    try:
        instruments = _get_instruments()
        if instruments is not None:
            getattr(instruments, counter).labels(host).inc()
    except Exception as error:  # noqa: BLE001 - a metric must never fail a transfer
        _swallow(error)


# The per-host figures, from the database


class HostsCollector:
    """Per media host, at each collection: the dashboard's figures (:func:`status.host_statuses`)."""

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        from . import status

        up = GaugeMetricFamily("resto_status_up", "1 if the Replica rows (and the master copies) could be read.")
        try:
            statuses = status.host_statuses(with_breakers=True)
            masters = status.master_statuses()
        except Exception as error:  # noqa: BLE001 - a scrape reports the failure, it does not raise
            logger.warning("Could not read the replication status for /metrics: %s", error)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        replicas = GaugeMetricFamily("resto_replicas", "Files per state on each media host (Replica rows).",
                                     labels=["host", "state"])
        oldest = GaugeMetricFamily(
            "resto_oldest_pending_age_seconds",
            "Age of the oldest change a host has not caught up with (pending, waiting or failed); 0 if none.",
            labels=["host"],
        )
        success = GaugeMetricFamily("resto_last_success_timestamp_seconds",
                                    "When a file last reached the host (Unix time); absent if never.", labels=["host"])
        breaker = GaugeMetricFamily("resto_breaker_open", "1 while the host's circuit breaker is open.",
                                    labels=["host"])
        down = GaugeMetricFamily(
            "resto_host_down", "1 while the host is down for the workers (its breaker opened, no success since).",
            labels=["host"],
        )
        held = GaugeMetricFamily("resto_held_deletes", "Deletions the brake holds back, waiting for an operator.",
                                 labels=["host"])
        for host in statuses:
            for state in ("synced", "pending", "waiting", "failed"):
                replicas.add_metric([host.host, state], getattr(host, state))
            oldest.add_metric([host.host], max(host.oldest_pending_age or 0.0, 0.0))
            if host.last_success is not None:
                success.add_metric([host.host], host.last_success.timestamp())
            if host.breaker_open_for is not None:  # None: Redis did not answer, or not configured
                breaker.add_metric([host.host], 1 if host.breaker_open_for else 0)
                down.add_metric([host.host], 1 if host.down else 0)
            held.add_metric([host.host], host.held_deletes)
        master = GaugeMetricFamily(
            "resto_master_ok", "1 if the master copy proves it is the site's here and no worker refused it.",
            labels=["location"],
        )
        for copy in masters:
            master.add_metric([copy.location], 1 if copy.healthy else 0)
        yield from (replicas, oldest, success, breaker, down, held, master)


def exposition(accept_header=""):
    """``(body, content type)`` of the ``/metrics`` page: this process's registry (or, in
    multiprocess mode, every process's files) plus the per-host figures."""
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.exposition import choose_encoder

    registry = CollectorRegistry(auto_describe=False)  # True would collect twice: the queries too
    if _multiprocess_dir():
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_Everything(REGISTRY))
    registry.register(HostsCollector())
    encoder, content_type = choose_encoder(accept_header or "")
    return encoder(registry), content_type


class _Everything:
    """A collector that yields what another registry holds (the default one, with
    django-prometheus's metrics and the worker counters of this process)."""

    def __init__(self, registry):
        self.registry = registry

    def collect(self):
        return self.registry.collect()


def _multiprocess_dir():
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


# The worker's HTTP server


def metrics_port():
    """``RESTO_METRICS_PORT`` (None: the worker serves no metrics)."""
    return getattr(settings, "RESTO_METRICS_PORT", None)


def start_worker_server(pool=""):
    """Serve this worker's counters on ``RESTO_METRICS_ADDRESS:RESTO_METRICS_PORT``.

    ``pool`` names the worker's pool: for a prefork pool, without ``PROMETHEUS_MULTIPROC_DIR``
    in the environment, a private folder is made for the children's files (before they fork).
    Never raises: a port in use is logged at ERROR and the worker goes on without metrics.
    Returns the port served, or None.
    """
    global _server, _private_dir
    port = metrics_port()
    if port is None or not enabled() or _server is not None:
        return None
    address = getattr(settings, "RESTO_METRICS_ADDRESS", DEFAULT_ADDRESS)
    try:
        if "prefork" in pool and not _multiprocess_dir():
            if "prometheus_client.values" in sys.modules:
                logger.error(
                    "This prefork worker's metrics will miss its pool processes: prometheus_client was imported "
                    "before the worker started. Set PROMETHEUS_MULTIPROC_DIR (an empty folder) in its environment."
                )
            else:
                _private_dir = tempfile.mkdtemp(prefix="resto-metrics-")
                os.environ["PROMETHEUS_MULTIPROC_DIR"] = _private_dir
        from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

        if _multiprocess_dir():
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = REGISTRY
        httpd, thread = start_http_server(int(port), addr=address, registry=registry)
    except Exception as error:  # noqa: BLE001 - a worker without metrics still replicates
        logger.error("Cannot serve this worker's metrics on %s:%s: %s", address, port, error)
        return None
    served = httpd.server_address[1]
    _server = (httpd, thread, served)
    logger.info("Serving this worker's metrics on http://%s:%s/metrics", address, served)
    return served


def stop_worker_server():
    """Stop the worker's HTTP server and remove the private multiprocess folder, if any."""
    global _server, _private_dir
    if _server is not None:
        httpd, thread, _ = _server
        _server = None
        try:
            httpd.shutdown()
            httpd.server_close()
            thread.join(5)
        except Exception as error:  # noqa: BLE001
            logger.warning("Could not stop the metrics server: %s", error)
    if _private_dir is not None:
        shutil.rmtree(_private_dir, ignore_errors=True)
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR") == _private_dir:
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]
        _private_dir = None


def _on_worker_init(sender=None, **kwargs):
    pool = getattr(sender, "pool_cls", "")
    name = pool if isinstance(pool, str) else f"{getattr(pool, '__module__', '')}.{getattr(pool, '__name__', '')}"
    start_worker_server(pool=name.lower())
    # The counters' module, imported once here (its mode chosen just above), not by every
    # prefork pool process on its first transfer (about 25 ms each).
    _get_instruments()


def _on_worker_shutdown(**kwargs):
    stop_worker_server()


def connect_worker_signals():
    """Connect the worker's start and stop to the metrics server (called from ``AppConfig.ready``)."""
    from celery import signals

    signals.worker_init.connect(_on_worker_init, dispatch_uid="resto_celery.metrics.worker_init", weak=False)
    signals.worker_shutdown.connect(
        _on_worker_shutdown, dispatch_uid="resto_celery.metrics.worker_shutdown", weak=False
    )


# System checks


@checks.register(checks.Tags.compatibility)
def check_metrics_settings(app_configs=None, **kwargs):
    """``RESTO_METRICS_PORT`` is a port (or None), and ``prometheus_client`` is there to serve it."""
    errors = []
    port = getattr(settings, "RESTO_METRICS_PORT", None)
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535):
        errors.append(checks.Error(
            f"RESTO_METRICS_PORT must be a TCP port number (0-65535) or None, not {port!r}.",
            id="resto_celery.E030",
        ))
    elif port is not None and not available():
        errors.append(checks.Warning(
            "RESTO_METRICS_PORT is set but prometheus_client is not installed: workers serve no metrics.",
            hint="pip install 'resto-celery[prometheus]'",
            id="resto_celery.W030",
        ))
    address = getattr(settings, "RESTO_METRICS_ADDRESS", DEFAULT_ADDRESS)
    if not isinstance(address, str):
        errors.append(checks.Error(
            f"RESTO_METRICS_ADDRESS must be an address string such as '0.0.0.0', not {address!r}.",
            id="resto_celery.E031",
        ))
    return errors
