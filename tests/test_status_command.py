"""manage.py resto_status: the dashboard's figures as a table or JSON, and an exit status for monitoring."""
import json
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from resto_celery.models import Replica

pytestmark = pytest.mark.django_db


def _run(*args):
    out = StringIO()
    call_command("resto_status", *args, stdout=out)
    return out.getvalue()


def test_all_synced_prints_a_table_and_succeeds(async_settings, async_hosts):
    for host in async_hosts:
        Replica.objects.create(host=host.url, path="a.txt", state="synced")
    output = _run()
    lines = output.splitlines()
    header = next(line for line in lines if line.startswith("HOST"))
    assert header.split() == [
        "HOST", "SYNCED", "PENDING", "FAILED", "WAITING", "OLDEST", "PENDING", "LAST", "SUCCESS", "HOST", "STATE",
        "HELD", "DELETES", "LAST", "ERROR",
    ]
    assert any(line.startswith(async_hosts[0].url) and " up" in line for line in lines)
    assert "2 host(s): 2 synced, 0 pending, 0 failed, 0 waiting for a host that is down" in output


def test_a_failed_host_makes_the_command_fail_for_monitoring(async_settings, async_hosts):
    Replica.objects.create(host=async_hosts[1].url, path="a.txt", state="failed", last_error="403 Forbidden")
    with pytest.raises(CommandError, match=f"1 media host\\(s\\) failing: {async_hosts[1].url}") as raised:
        _run()
    assert raised.value.returncode == 1


def test_json_output_for_scripts(async_settings, async_hosts):
    Replica.objects.create(
        host=async_hosts[0].url, path="a.txt", state="pending", last_error="timed out", last_error_at=timezone.now()
    )
    data = json.loads(_run("--json"))
    by_host = {entry["host"]: entry for entry in data["hosts"]}
    assert by_host[async_hosts[0].url]["pending"] == 1
    assert by_host[async_hosts[0].url]["last_error"] == "timed out"
    assert data["totals"]["pending"] == 1


def test_help_explains_the_options_and_the_exit_status():
    from resto_celery.management.commands.resto_status import Command

    text = Command().create_parser("manage.py", "resto_status").format_help()
    assert "--json" in text and "--no-breakers" in text and "status 1" in text


# The Nagios-style check: --max-lag and --max-failed


def _check(*args):
    """``(exit status, stdout lines)`` of ``resto_status`` run as a monitoring check."""
    out = StringIO()
    try:
        call_command("resto_status", *args, stdout=out)
    except CommandError as error:
        return error.returncode, out.getvalue().splitlines()
    return 0, out.getvalue().splitlines()


def _behind(host, path, minutes, state="pending"):
    Replica.objects.create(host=host, path=path, state=state,
                           pending_since=timezone.now() - timedelta(minutes=minutes))


def test_lag_within_max_lag_is_ok_in_one_nagios_line(async_settings, async_hosts):
    Replica.objects.create(host=async_hosts[0].url, path="a.txt", state="synced")
    _behind(async_hosts[1].url, "b.txt", minutes=1)
    code, lines = _check("--max-lag", "300")
    assert code == 0
    assert lines[0].startswith("RESTO OK - 2 host(s), lag 60s (max 300s), 0 failed | lag=60s;;300;0; failed=0;;;0;")


def test_lag_over_max_lag_is_critical_and_names_the_host(async_settings, async_hosts):
    _behind(async_hosts[1].url, "b.txt", minutes=10)
    code, lines = _check("--max-lag", "300")
    assert code == 2
    assert lines[0].startswith(f"RESTO CRITICAL - lag 600s > 300s on {async_hosts[1].url} | lag=600s;;300;0;")
    assert any(line.startswith(f"{async_hosts[1].url}: 0 synced, 1 pending") for line in lines[1:])


def test_failed_files_up_to_max_failed_are_ok_and_beyond_are_critical(async_settings, async_hosts):
    _behind(async_hosts[0].url, "a.txt", minutes=0, state="failed")
    _behind(async_hosts[1].url, "a.txt", minutes=0, state="failed")
    assert _check("--max-failed", "2")[0] == 0
    code, lines = _check("--max-failed", "1")
    assert code == 2
    first, second = sorted(host.url for host in async_hosts)  # hosts in name order
    assert lines[0].startswith(f"RESTO CRITICAL - 2 failed > 1 ({first} 1, {second} 1)")


def test_failed_files_without_max_failed_are_a_warning(async_settings, async_hosts):
    _behind(async_hosts[1].url, "a.txt", minutes=0, state="failed")
    code, lines = _check("--max-lag", "300")
    assert code == 1
    assert lines[0].startswith(f"RESTO WARNING - 1 failed ({async_hosts[1].url} 1)")


def test_a_host_down_within_max_lag_is_a_warning(async_settings, async_hosts, redis_url):
    from resto_celery.broker import coordinator_for
    from resto_celery.storage import AsyncStorage

    storage = AsyncStorage(hosts=[async_hosts[0].url], redis_url=redis_url, breaker_threshold=2)
    breaker = coordinator_for(storage.options).breaker(async_hosts[0].url)
    breaker.record_failure("HTTP 503 Service Unavailable")
    breaker.record_failure("HTTP 503 Service Unavailable")
    code, lines = _check("--max-lag", "300")
    assert code == 1
    assert lines[0].startswith(f"RESTO WARNING - {async_hosts[0].url} down")
    [host_line] = [line for line in lines if line.startswith(f"{async_hosts[0].url}:")]
    assert "DOWN since" in host_line and host_line.endswith("): HTTP 503 Service Unavailable")


def test_lag_beats_a_warning_when_both_are_there(async_settings, async_hosts):
    _behind(async_hosts[0].url, "a.txt", minutes=0, state="failed")
    _behind(async_hosts[1].url, "b.txt", minutes=30)
    code, lines = _check("--max-lag", "600")
    assert code == 2
    assert lines[0].startswith("RESTO CRITICAL - lag 1800s > 600s") and "; 1 failed" in lines[0]


def test_a_status_that_cannot_be_read_is_unknown(async_settings, monkeypatch):
    from django.db import OperationalError

    from resto_celery import status

    def unreachable(**kwargs):
        raise OperationalError("connection to server at 127.0.0.1 refused")

    monkeypatch.setattr(status, "host_statuses", unreachable)
    code, lines = _check("--max-lag", "300")
    assert code == 3
    assert lines == ["RESTO UNKNOWN - cannot read the replication status: connection to server at 127.0.0.1 refused"]


def test_json_with_a_threshold_carries_the_verdict_and_datetimes(async_settings, async_hosts):
    moment = timezone.now() - timedelta(minutes=20)
    Replica.objects.create(host=async_hosts[0].url, path="a.txt", state="synced", last_success_at=moment)
    _behind(async_hosts[1].url, "b.txt", minutes=20)
    code, lines = _check("--json", "--max-lag", "60")
    data = json.loads("\n".join(lines))
    assert code == 2
    assert data["check"]["status"] == "CRITICAL" and data["check"]["lag_host"] == async_hosts[1].url
    by_host = {entry["host"]: entry for entry in data["hosts"]}
    assert by_host[async_hosts[0].url]["last_success"].startswith(moment.strftime("%Y-%m-%dT%H:%M:%S"))
    assert data["totals"]["oldest_pending"].startswith((moment).strftime("%Y-%m-%dT%H:%M"))


def test_help_names_the_thresholds_and_the_nagios_exit_statuses():
    from resto_celery.management.commands.resto_status import Command

    text = " ".join(Command().create_parser("manage.py", "resto_status").format_help().split())
    assert "--max-lag SECONDS" in text and "--max-failed N" in text and "exit status 0, 1 or 2" in text
