"""``manage.py resto_resync`` over many small files: a first run to an empty host, a second in sync.

A ``HybridStorage`` over a real media host on 127.0.0.1 and a master tree of small files
in nested folders (default 10,000). The host is nginx with its dav module, twice over the
same folder: one server lists its folders as JSON (``nginx_listing.conf``: resync lists
the host, one GET per folder), the other does not (nginx's default: a HEAD per file); without
nginx, a ``MediaServer`` storing on disk (a HEAD per file). Three rounds of, for each way
(their order alternates from round to round): the command to the emptied host (it uploads
everything), the command again (everything in sync, nothing sent); then the floor,
``rsync -a SRC/ DST/`` between two local folders (to an empty folder, then again in sync).
Ratios are computed round by round.

    python -m benchmarks.bench_resync [--files N] [--quick] [--profile]
"""
import io
import os
import random
import re
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks import common

ROUNDS = 3
QUICK_FILES = 500
PER_FOLDER = 100  # files per leaf folder; leaves are d<i>/e<j>/, ten of them per top folder
MIN_SIZE, MAX_SIZE = 1024, 4096
GOAL_RATIO = 0.1  # issue 11: the in-sync run takes at most a tenth of the first run's time
#: The ways the host is compared: (key suffix, label). "" is the listing host, the default.
MODES = (("", "lists its folders (nginx JSON autoindex)"), (" head", "a HEAD per file (no listing)"))


def make_tree(root, files):
    """``files`` files of 1-4 KB (random bytes, seeded) under ``root``: two levels of folders."""
    rng = random.Random(20240601)
    total = 0
    for index in range(files):
        leaf = index // PER_FOLDER
        path = root / f"d{leaf // 10:03d}" / f"e{leaf % 10}" / f"f{index:06d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        size = rng.randint(MIN_SIZE, MAX_SIZE)
        path.write_bytes(rng.randbytes(size))
        total += size
    return total


def empty_folder(folder):
    """Delete everything under ``folder``, keep the folder itself (nginx serves it)."""
    for entry in os.scandir(folder):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


def tree_stats(root):
    """``(files, bytes)`` under ``root``, the master's marker left out (it is no file of the site)."""
    from resto_celery.master import MARKER_NAME

    count = size = 0
    for directory, _, names in os.walk(root):
        for name in names:
            if name == MARKER_NAME and os.path.samefile(directory, root):
                continue
            count += 1
            size += os.path.getsize(os.path.join(directory, name))
    return count, size


def start_hosts(workdir):
    """Started media hosts serving ``workdir/host``: ``(servers by mode, root folder, description)``.

    With nginx, two servers over the same folder: one lists its folders as JSON (mode ""),
    one does not (mode " head"). Without nginx, one ``MediaServer`` (a HEAD per file).
    """
    from resto_celery.testing import MediaServer, NginxMediaServer, find_nginx

    root = workdir / "host"
    root.mkdir()
    nginx = find_nginx()
    if nginx:
        servers = {
            suffix: NginxMediaServer(root, workdir=workdir / f"nginx{suffix.strip()}", nginx=nginx,
                                     listing=not suffix).start()
            for suffix, _ in MODES
        }
        version = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.strip().split("/")[-1]
        return servers, root, f"nginx {version} (dav module)"
    return {" head": MediaServer(root).start()}, root, "MediaServer on disk (nginx not installed)"


def use_storage(master, host_urls):
    """Make ``STORAGES["default"]`` a HybridStorage over ``master`` and the hosts; rebuild it."""
    from django.conf import settings
    from django.core.files.storage import storages

    settings.STORAGES = {
        "default": {"BACKEND": "resto_celery.storage.HybridStorage",
                    "OPTIONS": {"location": str(master), "hosts": list(host_urls)}},
    }
    storages._storages = {}
    storages._backends = None
    storages.__dict__.pop("backends", None)  # a cached_property on some Django versions
    return storages["default"]


def run_resync(*options):
    """Run ``resto_resync``; return ``(seconds, stdout, stderr)``. A failure raises (CommandError)."""
    from django.core.management import call_command

    stdout, stderr = io.StringIO(), io.StringIO()
    started = time.perf_counter()
    call_command("resto_resync", *options, stdout=stdout, stderr=stderr)
    return time.perf_counter() - started, stdout.getvalue(), stderr.getvalue()


def parse_summary(stdout):
    """``(checked, identical, to_upload, uploaded, listed)`` from the command's output."""
    checked = re.search(r"(\d+) file\(s\) checked: (\d+) identical, (\d+) to upload", stdout)
    uploaded = re.search(r"(\d+) uploaded", stdout)
    if not checked:
        raise RuntimeError(f"unexpected resto_resync output:\n{stdout}")
    listed = "does not list its folders" not in stdout
    return (*map(int, checked.groups()), int(uploaded.group(1)) if uploaded else 0, listed)


def run_rsync(source, target):
    """``(seconds, system CPU seconds)`` of ``rsync -a source/ target/`` (its processes' kernel time)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime
    started = time.perf_counter()
    subprocess.run(["rsync", "-a", f"{source}/", f"{target}/"], check=True)
    seconds = time.perf_counter() - started
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime - before


def time_walk(master):
    """Seconds to list the master tree with fingerprints (what make_plan does before any HEAD)."""
    from resto_celery import replication

    started = time.perf_counter()
    count = sum(1 for _ in replication.walk_master(str(master)))
    return time.perf_counter() - started, count


def profile_in_sync(label, *options):
    """cProfile one in-sync run, its checks run serially in this thread (cProfile sees one thread).

    The folders of a listing host are still listed by threads: the profile shows the main
    thread waiting for them.
    """
    from resto_celery import resync

    original = resync._parallel

    def serial(function, items, workers):
        for item in items:
            yield function(item)

    resync._parallel = serial
    try:
        common.print_profile(label, run_resync, *options, limit=25)
    finally:
        resync._parallel = original


def main(argv=None):
    parser = common.argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000, help="files in the master tree (default 10,000)")
    args = parser.parse_args(argv)
    files = QUICK_FILES if args.quick else args.files
    rsync = shutil.which("rsync")

    common.setup_django()  # the command's app needs Django; HybridStorage needs no broker
    times = {key: [] for key in ("first", "second", "first head", "second head", "rsync first", "rsync second", "walk")}
    rsync_system = []  # system CPU seconds of each first copy
    checks = []
    with tempfile.TemporaryDirectory(prefix="resto-bench-resync-") as temp:
        workdir = Path(temp)
        master = workdir / "master"
        started = time.monotonic()
        master_bytes = make_tree(master, files)
        print(f"{files:,} files ({master_bytes / 2**20:.1f} MiB) written in {time.monotonic() - started:.1f} s",
              flush=True)
        servers, host_root, host_kind = start_hosts(workdir)
        modes = [(suffix, label) for suffix, label in MODES if suffix in servers]
        try:
            use_storage(master, [server.url for server in servers.values()])
            print(f"host: {host_kind}: " + ", ".join(f"{servers[s].url} {label}" for s, label in modes), flush=True)
            env = common.environment()  # the load average before the measures
            for round_number in range(ROUNDS):
                check = {}
                # The order of the ways alternates from round to round: each sees the disk fresh as often.
                for suffix, _ in modes[round_number % len(modes):] + modes[:round_number % len(modes)]:
                    host = servers[suffix].url
                    empty_folder(host_root)
                    os.sync()
                    seconds, out, _ = run_resync("--host", host)
                    first = parse_summary(out)
                    times["first" + suffix].append(seconds)
                    host_files = tree_stats(host_root)
                    seconds, out, _ = run_resync("--host", host)
                    second = parse_summary(out)
                    times["second" + suffix].append(seconds)
                    check[suffix.strip() or "listing"] = {"first": first, "second": second, "host_files": host_files}
                checks.append(check)
                walk, _ = time_walk(master)
                times["walk"].append(walk)
                if rsync:
                    # A new folder each round: on this ext4 (mounted with `discard`) writing just
                    # after deleting 10,000 files was seen to be 10x slower, whatever was synced.
                    rsync_target = workdir / f"rsync-{round_number}"
                    rsync_target.mkdir()
                    os.sync()
                    seconds, system = run_rsync(master, rsync_target)
                    times["rsync first"].append(seconds)
                    rsync_system.append(system)
                    times["rsync second"].append(run_rsync(master, rsync_target)[0])
                    if tree_stats(rsync_target) != (files, master_bytes):
                        raise RuntimeError("rsync did not copy the whole tree")
                    shutil.rmtree(rsync_target)
                runs = [f"{label}: first {times['first' + s][-1]:.2f} s, second {times['second' + s][-1]:.2f} s"
                        for s, label in modes]
                if rsync:
                    runs.append(f"rsync {times['rsync first'][-1]:.2f} s / {times['rsync second'][-1]:.2f} s")
                print(f"round {round_number + 1}: " + "; ".join(runs), flush=True)
            if args.profile:
                suffix, label = modes[0]
                profile_in_sync(f"resto_resync, host in sync, {files:,} files, host {label} (checks serial)",
                                "--host", servers[suffix].url)
        finally:
            for server in servers.values():
                server.stop()
            from resto_celery import hosts

            for transport in list(hosts._transports.values()):
                transport.close()

    # Checks: the work was really done, and each way compared as it says.
    every_round_ok = all(
        c["first"][:4] == (files, 0, files, files) and c["second"][:4] == (files, files, 0, 0)
        and c["host_files"] == (files, master_bytes)
        and c["first"][4] == c["second"][4] == (mode == "listing")
        for check in checks for mode, c in check.items()
    )
    summary = {key: common.summarize(values) for key, values in times.items() if values}

    def ratio_of(numerator, denominator):
        return common.summarize([n / d for n, d in zip(times[numerator], times[denominator], strict=True)])

    ratios = {f"second{s} / first{s}": ratio_of("second" + s, "first" + s) for s, _ in modes}
    if len(modes) == 2:
        ratios["second / second head"] = ratio_of("second", "second head")
        ratios["first / first head"] = ratio_of("first", "first head")
    if rsync:
        for s, _ in modes:
            ratios[f"first{s} / rsync first"] = ratio_of("first" + s, "rsync first")
            ratios[f"second{s} / rsync second"] = ratio_of("second" + s, "rsync second")
        ratios["rsync second / rsync first"] = ratio_of("rsync second", "rsync first")

    def seconds_cells(key):
        s = summary[key]
        return [f"{s['median']:.2f}", f"{s['min']:.2f} – {s['max']:.2f}", f"{files / s['median']:,.0f}"]

    def ratio_cell(key):
        r = ratios[key]
        return f"{common.ratio(r['median'])} ({common.ratio(r['min'])} – {common.ratio(r['max'])})"

    na = ["n/a", "n/a", "n/a"]
    time_rows = []
    for s, label in modes:
        time_rows += [
            [f"`resto_resync`, host {label}, empty host (uploads all)", *seconds_cells("first" + s),
             ratio_cell(f"first{s} / rsync first") if rsync else "n/a"],
            [f"`resto_resync`, host {label}, host in sync", *seconds_cells("second" + s),
             ratio_cell(f"second{s} / rsync second") if rsync else "n/a"],
        ]
    time_rows += [
        ["`rsync -a`, to an empty folder (floor)", *(seconds_cells("rsync first") if rsync else na),
         "1.00x" if rsync else "n/a"],
        ["`rsync -a`, in sync (floor)", *(seconds_cells("rsync second") if rsync else na),
         "1.00x" if rsync else "n/a"],
        ["listing the master alone (`walk_master`)", *seconds_cells("walk"), "–"],
    ]
    second_rows = [[f"`resto_resync`, host {label}", ratio_cell(f"second{s} / first{s}")] for s, label in modes]
    second_rows.append(["`rsync -a`", ratio_cell("rsync second / rsync first") if rsync else "n/a"])
    tables = [
        {"title": "Time", "headers": ["run", "median s", "min – max s", "files/s", "ratio to rsync, same phase"],
         "rows": time_rows},
        {"title": "Second run (in sync) over first run (empty target)", "headers": ["run", "ratio (range)"],
         "rows": second_rows},
    ]
    if len(modes) == 2:
        tables.append({
            "title": "Listing host over a HEAD per file, same round", "headers": ["run", "ratio (range)"],
            "rows": [["first run (empty host)", ratio_cell("first / first head")],
                     ["second run (in sync)", ratio_cell("second / second head")]],
        })
    goal_suffix, goal_label = modes[0]
    goal_ratio = ratios[f"second{goal_suffix} / first{goal_suffix}"]
    return common.write_result(
        args, "bench_resync", "resto_resync over many small files",
        (
            f"`manage.py resto_resync --host HOST` (default options: 8 threads) of a `HybridStorage` whose master tree "
            f"holds {files:,} files of 1–4 KB ({master_bytes / 2**20:.1f} MiB, {PER_FOLDER} per folder, two levels of "
            f"folders), to one media host on 127.0.0.1: **{host_kind}**, storing on disk. "
            + ("Two nginx servers serve the same folder: one lists its folders as JSON (`autoindex_format json`, "
               "`resto_celery/testing/nginx_listing.conf`: resync makes one GET per folder), the other does not "
               "(nginx's default: resync makes one HEAD per file); each round runs both, in alternating order. "
               if len(modes) == 2 else "")
            + "First run to the emptied host (uploads everything), second run with the host in sync (uploads nothing); "
            f"the floor is `rsync -a SRC/ DST/` between two local folders, to an empty folder then again in sync. "
            f"{ROUNDS} rounds: median and range; ratios computed round by round."
        ),
        environment=env,
        results={
            "files": files, "bytes": master_bytes, "host": host_kind, "modes": [label for _, label in modes],
            "rsync": bool(rsync), "seconds": summary, "ratios": ratios, "checks": checks,
            "rsync_first_system_seconds": rsync_system,
        },
        tables=tables,
        goals=[
            {"goal": f"a second run, host in sync, at most {GOAL_RATIO}x the first run's time (host {goal_label})",
             "met": None if args.quick else goal_ratio["median"] <= GOAL_RATIO,
             "detail": f"second/first {common.ratio(goal_ratio['median'])} (rounds {common.ratio(goal_ratio['min'])}"
                       f" – {common.ratio(goal_ratio['max'])})"
                       + (f"; with a HEAD per file {ratio_cell('second head / first head')}" if len(modes) == 2 else "")
                       + ("; a --quick run is too small to judge" if args.quick else "")},
            {"goal": "the work was done: every file uploaded by the first run, none by the second, the host holds the "
                     "tree; the listing host was listed and the other was not",
             "met": every_round_ok,
             "detail": f"{files:,} files, {master_bytes:,} bytes; rounds: "
                       + "; ".join(", ".join(f"{mode}: first {c['first'][3]:,} uploaded, second {c['second'][1]:,} "
                                             f"identical / {c['second'][2]:,} to upload, "
                                             f"host {c['host_files'][0]:,} files"
                                             for mode, c in check.items()) for check in checks)},
        ],
        notes=[
            f"The host is {host_kind}; the host's folder is emptied directly on disk (and `os.sync()`) before each "
            "first run. Its writes share the master's disk, so the first run's time follows the disk's load.",
            "rsync copies between local folders with no HTTP and no per-file round trip: a floor, not a rival. "
            "It copies to a new folder each round (deleted after the round), after an `os.sync()`. "
            + (f"Its first copy spent {', '.join(f'{s:.2f}' for s in rsync_system)} s of system CPU (round by round): "
               "creating files in the kernel, whose cost varies a lot on a shared virtual machine; the first run of "
               "`resto_resync` pays the same cost through the host's writes." if rsync
               else "rsync is not installed here: its rows are n/a."),
            "An in-sync run is the listing of the master (the last row of the first table) plus either one GET per "
            "folder of the host (8 threads; a JSON listing of its files with their sizes) or one HEAD per file "
            "(8 threads; the GIL and the HTTP client's per-request cost bound it, not the network). A listing also "
            "makes the first run cheaper: it does not ask about each missing file.",
        ],
    )


if __name__ == "__main__":
    main()
