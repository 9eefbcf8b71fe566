"""Receivers for the test suite's workers: each resto_celery signal becomes a JSON line in
the file named by RESTO_TEST_SIGNAL_LOG (when set), for the test to read."""
import json
import os

from resto_celery.signals import replicated_everywhere, replicated_to_host


def _writer(kind):
    def receive(sender, name, action, host="*", **kwargs):
        with open(os.environ["RESTO_TEST_SIGNAL_LOG"], "a") as log:
            log.write(json.dumps([kind, host, name, action]) + "\n")

    return receive


if os.environ.get("RESTO_TEST_SIGNAL_LOG"):
    replicated_to_host.connect(_writer("host"), weak=False)
    replicated_everywhere.connect(_writer("everywhere"), weak=False)
