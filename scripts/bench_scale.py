#!/usr/bin/env python
"""Benchmark the whole pipeline on a dataset larger than the machine's RAM: synth, convert, verify, one pass.

    python scripts/bench_scale.py --out /data/jr-scale                 # 30GB (needs ~2.1x that free)
    python scripts/bench_scale.py --size 200MB --out /tmp/jr-scale     # trying the script

Opt-in in ``jasper-ray bench`` (``--only scale``; never in the default set or
``--quick``). Every step is the user's command in a fresh process, as a user
types it (``python -m jasper_ray synth|convert|verify``; the pass is a short
``create_loader`` loop):

1. baseline: the single-process gzip writer (``convert --single-process``) on
   the first ``--baseline-size`` (2GB) of data: its own synth of that size,
   deleted after; then one such writer per Ray worker at once (``capacity``):
   what the machine runs in parallel, the ceiling of any parallel conversion;
2. ``synth --size``: the dataset;
3. ``convert --compression gzip --layout sharded`` on Ray (every core): the
   sharded layout, because one gzip ``dataset.h5`` needs its pieces and the
   file at once (about 2.9x the data with the sources), which does not fit
   the ~65 GB this is sized for; the command starts and stops its own Ray;
   then (``running``) the same command again with ``--address`` on a Ray
   already up, as on a cluster (a helper process keeps that Ray up, started
   as the command would start it; that Ray's processes count in the memory,
   the helper, standing in for ``ray start``, does not); then ``verify`` of
   it; then it is deleted;
4. ``convert --compression none`` on Ray: one contiguous ``dataset.h5``
   written in place by the tasks (about 2x the data with the sources);
5. one pass of random batches over the train split (``create_loader``,
   shuffled, batch 1024, dataset validation off: ``verify`` did it; mapped,
   as ``use_mmap=None`` chooses above 10 GiB: below, it loads the dataset).

Each step begins after ``os.sync()``, so that no step pays for the writeback
of the gigabytes the steps before it wrote. For each step: wall time, MB/s of
the dataset's PT bytes, and the peak owned memory (RssAnon: heap and copies,
not page cache) summed over the step's whole
process tree (Ray's GCS, raylet and workers are children of the converting
process), sampled every ``--interval`` seconds. Targets: owned memory of all
processes < 10% of the dataset in every step; Ray gzip conversion >= 1.8x the
single-process writer's MB/s, as the user waits for the commands (a Ray the
command starts, and a running one), and as a share of the capacity (from the
``--json`` reports). ``--skip capacity,running,verify,none,pass`` leaves the
capacity, step 3's running Ray and verify, 4 and 5 out. Free disk is checked first: without enough, the
script says how much it needs and stops (exit 1). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import fmt_bytes, fmt_pct, fmt_ratio, print_table, record, setup_logging  # noqa: E402

log = logging.getLogger("bench.scale")

DIM = 768
N_NEG = 12
OWNED_TARGET = 0.10  # of the dataset's bytes, summed over every process of a step
SPEEDUP_TARGET = 1.8  # Ray gzip against the single-process writer, MB/s
DISK_FACTOR = 2.1  # the sources and one uncompressed copy (synth's scratch; the in-place output), and a margin
BATCH = 1024
SKIPPABLE = ("capacity", "running", "verify", "none", "pass")
# Runs the commands given (a JSON list) at once; prints their JSON reports as one list; fails if one fails.
AT_ONCE = """
import json, subprocess, sys
procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for cmd in json.loads(sys.argv[1])]
outs = [p.communicate()[0] for p in procs]
if any(p.returncode for p in procs):
    sys.exit("a writer failed: " + repr([p.returncode for p in procs]))
print(json.dumps([json.loads(out) for out in outs]))
"""
# Keeps a local Ray up, started as the commands start theirs, until stdin closes; prints its address first.
RAY_HEAD = """
import sys, ray
from jasper_ray.ray_session import connect, shutdown
connect(num_cpus=int(sys.argv[1]))
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
shutdown()
"""
PASS = """
import sys, time
from jasper_ray import create_loader
loader = create_loader(sys.argv[1], "train", batch_size=int(sys.argv[2]), shuffle=True, validate=False, use_mmap=True)
n = 0
for batch in loader:
    n += int(next(iter(batch.values())).shape[0])
print(n)
"""


# --- memory of a process tree ---------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, of every process now visible in /proc."""
    out: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        out.setdefault(ppid, []).append(int(entry.name))
    return out


def _owned(pid: int) -> int:
    """RssAnon of ``pid`` in bytes (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:")), 0)
    except OSError:
        return 0


def tree_owned(root: int, with_root: bool = True) -> tuple[int, int]:
    """(RssAnon summed over ``root`` (unless not ``with_root``) and all its descendants, how many processes)."""
    children, pids, stack = _children(), [], [root]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        stack += children.get(pid, [])
    if not with_root:
        pids.remove(root)
    return sum(_owned(p) for p in pids), len(pids)


def run_step(
    cmd: list[str], interval: float, env: dict[str, str] | None = None, also: tuple[int, ...] = ()
) -> dict[str, Any]:
    """Run ``cmd`` (stdout kept, stderr passed through), sampling the owned memory of its tree (and of the
    descendants of ``also``: the processes of a Ray it uses); raise if it fails."""
    peak, peak_procs = 0, 0
    with tempfile.TemporaryFile("w+") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=sys.stderr, text=True, env=env)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak, peak_procs
            while not done.is_set():
                trees = [tree_owned(proc.pid)] + [tree_owned(pid, with_root=False) for pid in also]
                owned, n = sum(t[0] for t in trees), sum(t[1] for t in trees)
                peak, peak_procs = max(peak, owned), max(peak_procs, n)
                done.wait(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
        out.seek(0)
        stdout = out.read()
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {rc}: {stdout[-2000:]}")
    return {"seconds": seconds, "peak_owned": peak, "processes": peak_procs, "stdout": stdout}


# --- the run --------------------------------------------------------------------------------------


def jasper(*args: str) -> list[str]:
    return [sys.executable, "-m", "jasper_ray", *args]


@contextlib.contextmanager
def running_ray(workers: int) -> Iterator[tuple[str, dict[str, str], int]]:
    """A local Ray kept up by a helper process, as ``ray start`` would keep one up: (its address, the environment
    to reach it with, the helper's pid: its Ray's processes are its descendants, the helper itself stands in for
    nothing a cluster runs).
    Ray's token authentication unless the caller's RAY_AUTH_MODE says otherwise: the helper starts a Ray with
    it and the commands need the mode set to use it (NOTE [token authentication of the local Ray])."""
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen([sys.executable, "-c", RAY_HEAD, str(workers)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env, text=True)  # fmt: skip
    try:
        address = head.stdout.readline().strip() if head.stdout else ""
        if not address:
            raise RuntimeError(f"the helper that keeps a Ray up exited with code {head.wait()}")
        yield address, env, head.pid
    finally:
        head.communicate("", timeout=120)


def single_process_gzip(directory: Path, *extra: str) -> list[str]:
    """The single-process gzip writer's command (the baseline), its report on stdout."""
    return jasper("convert", str(directory), "--single-process", "--compression", "gzip", "--force", "--json", *extra)


def ray_workers(args: argparse.Namespace) -> int:
    return args.workers or os.cpu_count() or 1


def pt_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.suffix == ".pt" or p.name == "config.json")


class ScaleBench:
    def __init__(self, args: argparse.Namespace, work: Path):
        from jasper_ray.tools.synth import parse_size

        self.args, self.work = args, work
        self.size = parse_size(args.size)
        self.baseline_size = min(parse_size(args.baseline_size), self.size)
        self.steps: list[dict[str, Any]] = []
        self.dataset_bytes = 0
        self.workers = ray_workers(args)

    def step(self, name: str, label: str, cmd: list[str], nbytes: int | None = None, **how: Any) -> dict[str, Any]:
        log.info("%s ...", label)
        os.sync()  # the steps before wrote gigabytes: their writeback is not this step's work
        r = run_step(cmd, self.args.interval, **how)
        r.update(name=name, label=label, nbytes=nbytes if nbytes is not None else self.dataset_bytes)
        log.info("  %.1f s, peak owned memory %s over %d processes", r["seconds"], fmt_bytes(r["peak_owned"]),
                 r["processes"])  # fmt: skip
        self.steps.append(r)
        return r

    def side_by_side(self, base: Path, base_bytes: int) -> None:
        """One single-process writer per Ray worker, all at once on the baseline's data (each its own output):
        what this machine runs in parallel of the writer's work (cores, memory bandwidth, disk), the most any
        parallel conversion can reach here."""
        n = self.workers
        outputs = [str(self.work / f"side-by-side-{i}.h5") for i in range(n)]
        writers = [single_process_gzip(base, "-q", "--output", out) for out in outputs]
        self.step("capacity", f"{n} single-process writers at once (capacity)",
                  [sys.executable, "-c", AT_ONCE, json.dumps(writers)], n * base_bytes)  # fmt: skip
        for out in outputs:
            Path(out).unlink(missing_ok=True)

    def run(self) -> None:
        quiet = ["-q"]
        base = self.work / "baseline"
        self.step("baseline_synth", f"synth {fmt_bytes(self.baseline_size)} (baseline)",
                  jasper("synth", str(base), "--size", str(self.baseline_size), "--dim", str(DIM), "--neg",
                         str(N_NEG), *quiet), 0)  # fmt: skip
        base_bytes = pt_bytes(base)
        self.step("baseline", "single-process writer, gzip (baseline)",
                  single_process_gzip(base, *quiet), base_bytes)  # fmt: skip
        if "capacity" not in self.args.skip:
            self.side_by_side(base, base_bytes)
        shutil.rmtree(base)

        src = self.work / "src"
        synth = self.step("synth", f"synth {fmt_bytes(self.size)}",
                          jasper("synth", str(src), "--size", str(self.size), "--dim", str(DIM), "--neg", str(N_NEG),
                                 *quiet), 0)  # fmt: skip
        self.dataset_bytes = pt_bytes(src)
        synth["nbytes"] = self.dataset_bytes
        ray = ["--workers", str(self.workers)]  # a Ray flag: Ray at any size
        gzip = ["convert", str(src), "--compression", "gzip", "--layout", "sharded", "--force", "--json", *quiet]
        self.step("convert_gzip", "Ray, gzip, sharded", jasper(*gzip, *ray))
        skip = self.args.skip
        if "running" not in skip:
            shutil.rmtree(src / "dataset.shards")  # a new output, as the first conversion had
            with running_ray(self.workers) as (address, env, head):
                self.step("convert_gzip_running", "Ray, gzip, sharded, on a running Ray",
                          jasper(*gzip, "--address", address), env=env, also=(head,))  # fmt: skip
        if "verify" not in skip:
            self.step("verify_gzip", "verify (gzip, sharded)", jasper("verify", str(src), "--format", "hdf5", *quiet))
        shutil.rmtree(src / "dataset.shards")
        if "none" not in skip:
            self.step("convert_none", "Ray, none, one dataset.h5 (in place)",
                      jasper("convert", str(src), "--compression", "none", "--force", *ray, *quiet))  # fmt: skip
        if "pass" not in skip:
            self.step("pass", f"one pass of random batches ({BATCH})",
                      [sys.executable, "-c", PASS, str(src), str(BATCH)])  # fmt: skip

    def print_tables(self) -> None:
        rows, by_name = [], {s["name"]: s for s in self.steps}
        for s in self.steps:
            share = s["peak_owned"] / self.dataset_bytes if self.dataset_bytes else 0.0
            mb_s = s["nbytes"] / 1e6 / s["seconds"] if s["nbytes"] else None
            record("scale", step=s["name"], label=s["label"], seconds=s["seconds"], source_bytes=s["nbytes"],
                   mb_per_s=mb_s, peak_owned_bytes=s["peak_owned"], processes=s["processes"],
                   dataset_bytes=self.dataset_bytes)  # fmt: skip
            rows.append([
                s["label"], f"{s['seconds']:.1f}", f"{mb_s:.1f}" if mb_s else "-",
                fmt_bytes(s["nbytes"]) if s["nbytes"] else "-",
                fmt_bytes(s["peak_owned"]), fmt_pct(100 * share), str(s["processes"]),
            ])  # fmt: skip
        print(
            f"## bench_scale: {fmt_bytes(self.dataset_bytes)} of PT files (D={DIM}, n_neg={N_NEG}), "
            f"{os.cpu_count()} cores, {fmt_bytes(_ram())} RAM\n",
            flush=True,
        )
        print_table(
            f"Scale: {fmt_bytes(self.dataset_bytes)} dataset, every step in fresh processes",
            ["step", "wall s", "MB/s", "bytes", "peak owned memory (all processes)", "of the dataset", "processes"],
            rows,
            notes=self.notes(by_name),
            align="lrrrrrr",
        )

    def notes(self, by_name: dict[str, dict[str, Any]]) -> list[str]:
        def verdict(ok: bool) -> str:
            return "MET" if ok else "NOT MET"

        worst = max(self.steps, key=lambda s: s["peak_owned"])
        share = worst["peak_owned"] / self.dataset_bytes
        notes = [
            "peak owned memory: RssAnon (heap, copies; not the page cache of mapped files) summed over the step's "
            f"process tree (Ray's GCS, raylet and workers included), sampled every {self.args.interval} s; MB/s of "
            "the dataset's PT bytes (the baseline's: of its own); the gzip conversion writes the sharded layout "
            "(one gzip dataset.h5 needs its pieces and the file at once: ~2.9x the data on disk with the sources)",
            f"target: owned memory of all processes < {OWNED_TARGET:.0%} of the dataset in every step: the largest "
            f"was {worst['label']} at {fmt_bytes(worst['peak_owned'])} = {fmt_pct(100 * share)}: "
            f"{verdict(share < OWNED_TARGET)}",
        ]
        base, gz = by_name["baseline"], by_name["convert_gzip"]
        ray_start = json.loads(gz["stdout"])["ray_start_seconds"]

        def against_writer(step: dict[str, Any]) -> float:
            return (step["nbytes"] / step["seconds"]) / (base["nbytes"] / base["seconds"])

        ratio = against_writer(gz)
        record("scale_speedup", ray_gzip_mb_per_s=gz["nbytes"] / 1e6 / gz["seconds"],
               single_gzip_mb_per_s=base["nbytes"] / 1e6 / base["seconds"], ratio=ratio,
               ray_start_seconds=ray_start)  # fmt: skip
        notes.append(
            f"target: Ray gzip conversion >= {SPEEDUP_TARGET}x the single-process writer (MB/s; the writer on the "
            f"first {fmt_bytes(base['nbytes'])}), the commands as the user waits for them, the Ray command starting "
            f"and stopping its own Ray: {fmt_ratio(ratio)}: {verdict(ratio >= SPEEDUP_TARGET)}"
        )
        running = by_name.get("convert_gzip_running")
        if running is not None:
            on_running = against_writer(running)
            record("scale_speedup_running", ratio=on_running, seconds=running["seconds"])
            notes.append(
                f"the same, on a Ray already running (as on a cluster; the command connects with --address): "
                f"{fmt_ratio(on_running)}: {verdict(on_running >= SPEEDUP_TARGET)} (the first command's report gives "
                f"its Ray's start as {ray_start:.1f} s)"
            )
        if "capacity" in by_name:
            base_report = json.loads(base["stdout"])
            converting = running or gz  # its report's seconds: the conversion, the command's Ray start included
            report = json.loads(converting["stdout"])
            alone = (converting["nbytes"] / (report["seconds"] - report["ray_start_seconds"])) / (
                base["nbytes"] / base_report["seconds"]
            )
            writers = json.loads(by_name["capacity"]["stdout"])
            capacity = len(writers) * base_report["seconds"] / max(w["seconds"] for w in writers)
            record("scale_capacity", writers=len(writers), capacity=capacity, ray_share=alone / capacity,
                   ratio_reported=alone)  # fmt: skip
            notes.append(
                f"capacity: {len(writers)} single-process writers at once (each its own output of the baseline's "
                f"data) converted at {fmt_ratio(capacity)} one writer's MB/s (their reported seconds): the most any "
                f"parallel conversion reaches on this machine; Ray's conversion ({converting['label']}, its reported "
                f"seconds less any Ray start: {fmt_ratio(alone)} the writer's) reached "
                f"{fmt_pct(100 * alone / capacity)} of it"
            )
        return notes


def _ram() -> int:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) * 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--size", default=None, help="size of the PT dataset (default 30GB: more than RAM; 2GB with --quick)"
    )
    p.add_argument("--baseline-size", default="2GB", help="the single-process writer's dataset (default 2GB)")
    p.add_argument("--workers", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples (default 0.5)")
    p.add_argument("--out", default="/tmp/jr-bench", help="where to put the data (a per-run subdirectory)")
    p.add_argument("--quick", action="store_true", help="2GB by default, for trying the script")
    p.add_argument("--keep", action="store_true", help="keep the data of the last step")
    p.add_argument(
        "--skip",
        type=lambda text: {s.strip() for s in text.split(",") if s.strip()},
        default=set(),
        help=f"steps to leave out, comma-separated: {','.join(SKIPPABLE)} (the baseline, synth and the gzip "
        "conversion always run)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.size = args.size or ("2GB" if args.quick else "30GB")
    if args.skip - set(SKIPPABLE):
        p.error(f"--skip {','.join(sorted(args.skip))}: expected a subset of {','.join(SKIPPABLE)}")
    setup_logging(args.verbose)
    from jasper_ray.tools.synth import parse_size

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = parse_size(args.size)
    baseline = min(parse_size(args.baseline_size), size)
    writers = 0 if "capacity" in args.skip else ray_workers(args)
    # The baseline's data and its writers' outputs are gone before the dataset is made.
    need = max(int(DISK_FACTOR * size), (writers + 1) * baseline)
    free = shutil.disk_usage(out).free
    if free < need:
        print(
            f"bench_scale: {out} has {fmt_bytes(free)} free; a {fmt_bytes(size)} run needs about {fmt_bytes(need)} "
            f"({DISK_FACTOR}x: the PT files and one uncompressed copy at the peak). Free space, or give --out on a "
            "larger disk, or a smaller --size. Nothing was run.",
            file=sys.stderr,
        )
        return 1
    work = out / f"bench-scale-{os.getpid()}"
    work.mkdir()
    log.info("working in %s: %s free, this run needs about %s", work, fmt_bytes(free), fmt_bytes(need))
    started = time.perf_counter()
    try:
        bench = ScaleBench(args, work)
        bench.run()
        bench.print_tables()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    log.info("done in %.0f s", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
