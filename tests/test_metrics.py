"""Prometheus metrics: the /metrics view, the workers' counters and HTTP server, scraped and
read back with prometheus_client's own parser."""
import os
import shutil
import socket
import subprocess
import sys
from datetime import timedelta

import pytest
import requests
import yaml
from django.core import checks
from django.core.files.base import ContentFile
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from resto_celery import metrics
from resto_celery.models import Replica
from resto_celery.testing.worker import CeleryWorker
from tests.site import ROOT, wait_until

pytestmark = pytest.mark.urls("tests.metrics_urls")

DOCS = ROOT / "docs"


def parse(text):
    """``{(sample name, ((label, value), ...)): value}`` of a Prometheus text page."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape_view(client):
    response = client.get("/metrics")
    assert response.status_code == 200, response.content[:500]
    assert response["Content-Type"].startswith("text/plain")
    return parse(response.content.decode())


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The worker-side functions


@pytest.mark.django_db
def test_recorded_transfers_lease_waits_and_retries_show_on_the_page(client):
    before = scrape_view(client)
    metrics.transfer_done("media-1:8080", "upload", "ok", nbytes=10_240, seconds=0.02)
    metrics.transfer_done("media-1:8080", "upload", "ok", nbytes=20, seconds=0.5)
    metrics.transfer_done("media-1:8080", "delete", "failed", nbytes=0, seconds=2.0)
    metrics.lease_waited("media-1:8080")
    metrics.retry_scheduled("media-1:8080")
    after = scrape_view(client)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("resto_transfers_total", host="media-1:8080", action="upload", outcome="ok") == 2
    assert moved("resto_transfers_total", host="media-1:8080", action="delete", outcome="failed") == 1
    assert moved("resto_transfer_bytes_total", host="media-1:8080") == 10_260
    assert moved("resto_transfer_duration_seconds_count", host="media-1:8080", action="upload") == 2
    assert moved("resto_transfer_duration_seconds_bucket", host="media-1:8080", action="upload", le="0.025") == 1
    assert moved("resto_transfer_duration_seconds_count", host="media-1:8080", action="delete") == 0  # failed
    assert moved("resto_lease_waits_total", host="media-1:8080") == 1
    assert moved("resto_retries_total", host="media-1:8080") == 1


def test_recording_never_raises():
    metrics.transfer_done("media-1:8080", "upload", "ok", nbytes=-1, seconds=0.1)  # a counter cannot go down
    metrics.transfer_done(None, None, None, None, None)
    metrics.lease_waited(object())
    metrics.retry_scheduled("media-1:8080")


@pytest.mark.django_db
def test_metrics_off_records_nothing_and_the_page_is_not_found(client, settings):
    counted = scrape_view(client)
    settings.RESTO_METRICS = False
    metrics.transfer_done("media-off:8080", "upload", "ok", nbytes=5, seconds=0.01)
    assert client.get("/metrics").status_code == 404
    settings.RESTO_METRICS = True
    assert value(scrape_view(client), "resto_transfers_total", host="media-off:8080", action="upload",
                 outcome="ok") == value(counted, "resto_transfers_total", host="media-off:8080", action="upload",
                                        outcome="ok")


@pytest.mark.django_db
def test_without_prometheus_client_recording_is_a_no_op_and_the_page_says_what_to_install(client, monkeypatch):
    for name in [name for name in sys.modules if name.startswith("prometheus_client")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import prometheus_client raises ImportError
    monkeypatch.setattr(metrics, "_instruments", None)
    metrics.reset()
    try:
        metrics.transfer_done("media-1:8080", "upload", "ok", nbytes=5, seconds=0.01)
        metrics.lease_waited("media-1:8080")
        assert metrics._instruments is None
        response = client.get("/metrics")
        assert response.status_code == 501
        assert b"pip install 'resto-celery[prometheus]'" in response.content
    finally:
        metrics.reset()


def test_prefork_children_are_summed_in_multiprocess_mode(tmp_path, monkeypatch):
    """Each process writes its own files; one page sums them (prometheus_client's multiprocess mode)."""
    folder = tmp_path / "multiproc"
    folder.mkdir()
    code = (
        "from resto_celery import metrics\n"
        "metrics.transfer_done('media-1:8080', 'upload', 'ok', nbytes=100, seconds=0.01)\n"
        "metrics.retry_scheduled('media-1:8080')\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder), "PYTHONPATH": str(ROOT)}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    for _ in range(3):
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
    monkeypatch.setattr(metrics.HostsCollector, "collect", lambda self: iter(()))  # files only
    body, _ = metrics.exposition()
    samples = parse(body.decode())
    assert value(samples, "resto_transfers_total", host="media-1:8080", action="upload", outcome="ok") == 3
    assert value(samples, "resto_transfer_bytes_total", host="media-1:8080") == 300
    assert value(samples, "resto_retries_total", host="media-1:8080") == 3


# The per-host figures


@pytest.mark.django_db
def test_the_page_has_the_dashboards_figures_per_host(client, async_settings, async_hosts):
    up, behind = async_hosts[0].url, async_hosts[1].url
    success = timezone.now() - timedelta(minutes=1)
    Replica.objects.create(host=up, path="a.txt", state="synced", last_success_at=success)
    Replica.objects.create(host=up, path="b.txt", state="synced", last_success_at=success)
    Replica.objects.create(host=behind, path="a.txt", state="synced", last_success_at=success)
    Replica.objects.create(host=behind, path="b.txt", state="failed",
                           pending_since=timezone.now() - timedelta(minutes=10))
    Replica.objects.create(host=behind, path="c.txt", state="pending",
                           pending_since=timezone.now() - timedelta(minutes=2))
    samples = scrape_view(client)
    assert value(samples, "resto_status_up") == 1
    assert value(samples, "resto_replicas", host=up, state="synced") == 2
    assert value(samples, "resto_replicas", host=behind, state="synced") == 1
    assert value(samples, "resto_replicas", host=behind, state="failed") == 1
    assert value(samples, "resto_replicas", host=behind, state="pending") == 1
    assert value(samples, "resto_oldest_pending_age_seconds", host=up) == 0
    assert 600 <= value(samples, "resto_oldest_pending_age_seconds", host=behind) < 660
    assert value(samples, "resto_last_success_timestamp_seconds", host=up) == pytest.approx(success.timestamp())
    assert value(samples, "resto_breaker_open", host=up) == 0  # Redis answered: the breaker is closed
    assert ("resto_breaker_open", (("host", up),)) in samples


@pytest.mark.django_db
def test_the_page_runs_the_dashboards_queries_once_as_many_for_ten_rows_as_for_a_thousand(
    client, async_settings, async_hosts
):
    from resto_celery import status

    def queries():
        with CaptureQueriesContext(connection) as captured:
            scrape_view(client)
        return len(captured)

    with CaptureQueriesContext(connection) as dashboard:
        status.host_statuses(), status.master_statuses()

    Replica.objects.bulk_create([Replica(host=async_hosts[0].url, path=f"{i}.txt", state="synced") for i in range(10)])
    few = queries()
    assert few == len(dashboard)
    Replica.objects.bulk_create(
        [Replica(host=host.url, path=f"more/{i}.txt", state=state, pending_since=timezone.now())
         for host in async_hosts for i, state in zip(range(1000), ["synced", "pending", "failed"] * 400, strict=False)]
    )
    assert queries() == few


@pytest.mark.django_db
def test_a_database_that_cannot_be_read_gives_status_up_zero_not_an_error(client, monkeypatch):
    from resto_celery import status

    def broken(**kwargs):
        raise RuntimeError("connection refused")

    monkeypatch.setattr(status, "host_statuses", broken)
    samples = scrape_view(client)
    assert value(samples, "resto_status_up") == 0
    assert not any(name == "resto_replicas" for name, _ in samples)


@pytest.mark.django_db
def test_django_prometheus_and_our_page_show_each_others_metrics(client):
    from django_prometheus.middleware import Metrics

    Metrics.get_instance()  # django-prometheus's request metrics, in the default registry
    metrics.transfer_done("media-dp:8080", "upload", "ok", nbytes=1, seconds=0.01)
    ours = scrape_view(client)
    assert any(name.startswith("django_http_requests") for name, _ in ours)
    theirs = parse(client.get("/django-prometheus/metrics").content.decode())
    assert value(theirs, "resto_transfers_total", host="media-dp:8080", action="upload", outcome="ok") >= 1


def test_openmetrics_is_served_to_a_prometheus_that_asks_for_it(client, db):
    response = client.get("/metrics", HTTP_ACCEPT="application/openmetrics-text; version=1.0.0")
    assert response["Content-Type"].startswith("application/openmetrics-text")
    assert response.content.rstrip().endswith(b"# EOF")


# The worker's HTTP server


def test_a_port_in_use_is_logged_and_the_worker_goes_on(settings, caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings.RESTO_METRICS_PORT = taken.getsockname()[1]
        assert metrics.start_worker_server(pool="threads") is None
    assert "Cannot serve this worker's metrics" in caplog.text


@pytest.mark.parametrize("port", ["9808", -1, 70000, True])
def test_a_bad_port_fails_the_system_check(settings, port):
    settings.RESTO_METRICS_PORT = port
    assert [error.id for error in metrics.check_metrics_settings()] == ["resto_celery.E030"]


def test_a_good_port_passes_the_system_check_which_manage_py_check_runs(settings):
    settings.RESTO_METRICS_PORT = 9808
    assert metrics.check_metrics_settings() == []
    assert metrics.check_metrics_settings in checks.registry.registry.get_checks()


# End to end: a real prefork worker, a host that goes down and comes back


def _metrics_worker(site, port):
    env = {**site.worker_env(), "DJANGO_SETTINGS_MODULE": "tests.metrics_settings",
           "RESTO_TEST_METRICS_PORT": str(port)}
    worker = CeleryWorker("tests.celery_app", queues=(site.queue,), concurrency=2, pool="prefork", env=env,
                          logfile=site.tmp_path / "worker-metrics.log")
    site.workers.append(worker)
    return worker.start()


@pytest.mark.django_db(transaction=True)
def test_numbers_move_when_a_host_goes_down_and_comes_back(make_site, client, settings):
    site = make_site(host_count=2, breaker_threshold=2, breaker_cooldown=1)
    port = free_port()
    _metrics_worker(site, port)
    healthy, flaky = (host.url for host in site.hosts)

    def worker_page():
        response = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        response.raise_for_status()
        return parse(response.text)

    for index in range(3):
        site.storage.save(f"before/{index}.txt", ContentFile(b"x" * 100))
    site.wait_until_drained_and_converged()
    page, worker = scrape_view(client), worker_page()
    for host in (healthy, flaky):
        assert value(page, "resto_replicas", host=host, state="synced") == 3
        assert value(page, "resto_oldest_pending_age_seconds", host=host) == 0
        assert value(page, "resto_host_down", host=host) == 0
        assert value(worker, "resto_transfers_total", host=host, action="upload", outcome="ok") == 3
        assert value(worker, "resto_transfer_bytes_total", host=host) == 300
    synced_at = value(page, "resto_last_success_timestamp_seconds", host=flaky)

    site.hosts[1].go_down()
    for index in range(2):
        site.storage.save(f"during/{index}.txt", ContentFile(b"y" * 10))
    wait_until(lambda: value(scrape_view(client), "resto_host_down", host=flaky) == 1, timeout=30,
               message="the dashboard figures to say the host is down")
    page, worker = scrape_view(client), worker_page()
    assert value(page, "resto_replicas", host=healthy, state="synced") == 5
    behind = sum(value(page, "resto_replicas", host=flaky, state=state) for state in ("pending", "waiting", "failed"))
    assert behind == 2
    assert value(page, "resto_oldest_pending_age_seconds", host=flaky) > 0
    assert value(worker, "resto_transfers_total", host=flaky, action="upload", outcome="failed") >= 2
    assert value(worker, "resto_retries_total", host=flaky) >= 1

    site.hosts[1].come_back()
    wait_until(lambda: value(scrape_view(client), "resto_replicas", host=flaky, state="synced") == 5, timeout=30,
               message="the returned host to have caught up in the figures")
    page, worker = scrape_view(client), worker_page()
    assert value(page, "resto_host_down", host=flaky) == 0
    assert value(page, "resto_oldest_pending_age_seconds", host=flaky) == 0
    assert value(page, "resto_last_success_timestamp_seconds", host=flaky) > synced_at
    assert value(worker, "resto_transfers_total", host=flaky, action="upload", outcome="ok") == 5
    assert value(worker, "resto_transfer_duration_seconds_count", host=flaky, action="upload") == 5


# What docs/ ships


def _exported_names(client):
    """Every metric name on the page once each figure has something to say."""
    Replica.objects.create(host="media-docs:8080", path="a.txt", state="synced", last_success_at=timezone.now())
    metrics.transfer_done("media-docs:8080", "upload", "ok", nbytes=1, seconds=0.01)
    metrics.lease_waited("media-docs:8080")
    metrics.retry_scheduled("media-docs:8080")
    return {name for name, _ in scrape_view(client)}


def _metric_names(expression):
    import re

    return set(re.findall(r"\bresto_[a-z_]+", expression))


@pytest.mark.django_db
def test_the_alert_rules_use_only_metrics_we_export(client, async_settings):
    rules = yaml.safe_load((DOCS / "prometheus-alerts.yml").read_text())
    exported = _exported_names(client)
    expressions = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert len(expressions) >= 4
    for expression in expressions:
        assert _metric_names(expression) and _metric_names(expression) <= exported, expression


@pytest.mark.django_db
def test_the_grafana_dashboard_uses_only_metrics_we_export(client, async_settings):
    import json

    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    exported = _exported_names(client)
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(expressions) >= 6
    for expression in expressions:
        assert _metric_names(expression) <= exported, expression
    assert set().union(*map(_metric_names, expressions)) >= {
        "resto_replicas", "resto_oldest_pending_age_seconds", "resto_transfers_total", "resto_host_down",
        "resto_transfer_duration_seconds_bucket", "resto_transfer_bytes_total",
    }


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool is not installed (apt-get install prometheus)")
def test_the_alert_rules_pass_promtool_and_their_unit_tests():
    for command in (["check", "rules", "prometheus-alerts.yml"], ["test", "rules", "prometheus-alerts.test.yml"]):
        done = subprocess.run(["promtool", *command], cwd=DOCS, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
