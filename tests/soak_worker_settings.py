"""The soak's worker settings when RESTO_SOAK_TRACEMALLOC is set: the test settings, plus a
SIGUSR2 handler that writes the worker's tracemalloc snapshot, to find what grows.

The soak starts such workers with ``PYTHONTRACEMALLOC`` (frames kept per allocation) and
signals the one never killed after its warm-up and at the end of the load.
"""
import gc
import os
import signal
import time
import tracemalloc

from tests.settings import *  # noqa: F403 - the test settings, extended


def _dump_snapshot(signum, frame):
    gc.collect()  # tracebacks are cycles: only what is still alive after a full collection counts
    path = f"{os.environ['RESTO_SOAK_SNAPSHOTS']}/worker-{os.getpid()}-{time.time():.0f}.snapshot"
    tracemalloc.take_snapshot().dump(path + ".part")
    os.replace(path + ".part", path)


if tracemalloc.is_tracing() and os.environ.get("RESTO_SOAK_SNAPSHOTS"):
    signal.signal(signal.SIGUSR2, _dump_snapshot)
