"""manage.py resto_status: the dashboard's figures as a table or JSON, and an exit status for monitoring."""
import json
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
