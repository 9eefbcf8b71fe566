"""Run every benchmark, each in its own process; write ``results/*.json`` and ``results/README.md``.

``make bench`` runs this. ``--quick`` is a smoke run of a few seconds per benchmark whose
numbers mean little: it writes to a temporary folder, never over ``results/``, unless
``--output`` says where. ``--only bench_save`` runs one benchmark.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

BENCHMARKS = [
    "bench_save", "bench_replication", "bench_reconcile", "bench_reconcile_hosts", "bench_dashboard", "bench_resync",
    "bench_url", "bench_upload_view", "bench_outage", "bench_catchup", "bench_s3",
]
RESULTS = Path(__file__).resolve().parent / "results"
TIMEOUT = 3 * 3600  # seconds: a hung benchmark must not hang `make bench` forever

HEADER = """# Benchmark results

Written by `make bench` (`python -m benchmarks.run`); do not edit by hand. How the
benchmarks work and how to read them: [../README.md](../README.md). Numbers are medians
over rounds, with their range; ratios are to a baseline measured in the same run. Absolute
numbers depend on the machine and its load: compare ratios, not microseconds, between runs.
"""


def run_one(name, output, quick):
    """Run ``benchmarks.<name>`` in a fresh interpreter; return whether it succeeded."""
    command = [sys.executable, "-m", f"benchmarks.{name}", "--output", str(output)]
    if quick:
        command.append("--quick")
    print(f"\n=== {name} ===", flush=True)
    start = time.monotonic()
    try:
        completed = subprocess.run(command, cwd=common.ROOT, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        print(f"{name} did not finish within {TIMEOUT} s", file=sys.stderr)
        return False
    print(f"=== {name}: {'done' if completed.returncode == 0 else 'FAILED'} "
          f"in {time.monotonic() - start:.0f} s ===", flush=True)
    return completed.returncode == 0


def write_summary(folder, names):
    """Write ``README.md`` in ``folder`` from the JSON results of ``names`` found there."""
    parts = [HEADER]
    for name in names:
        path = folder / f"{name}.json"
        if path.exists():
            parts.append(common.render(json.loads(path.read_text())))
    (folder / "README.md").write_text("\n".join(parts))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run; results go to a temporary folder")
    parser.add_argument("--only", choices=BENCHMARKS, action="append", help="run only this benchmark (repeatable)")
    parser.add_argument("--output", type=Path, help=f"results folder (default {RESULTS.relative_to(common.ROOT)})")
    args = parser.parse_args(argv)
    names = args.only or BENCHMARKS
    folder = args.output or (Path(tempfile.mkdtemp(prefix="resto-bench-quick-")) if args.quick else RESULTS)
    folder.mkdir(parents=True, exist_ok=True)

    failed = [name for name in names if not run_one(name, folder / f"{name}.json", args.quick)]
    write_summary(folder, BENCHMARKS)
    print(f"\nResults in {folder}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
