#!/usr/bin/env python
"""Benchmark PT -> HDF5 conversion: upstream's way, the single-process writer, and Ray (1 worker, all cores).

    python scripts/bench_convert.py --size 2GB --out /tmp/jr-bench
    python scripts/bench_convert.py --quick          # 200MB, for trying the script

Synthesises one upstream-layout PT dataset (``--size``, D=768, n_neg=12) and,
for gzip, lzf and none (``--codecs``), converts it four ways, each in a fresh interpreter:

(a) upstream-style: ``torch.load`` each tensor whole, ``create_dataset(data=...,
    compression=c)`` without shuffle, keyword ids as one int32 dataset per pair
    (UPSTREAM.md section 4);
(b) ``jasper_ray.convert_pt_to_hdf5``: one process, streaming row blocks;
(c) ``jasper_ray.convert`` on a local Ray with 1 CPU (``num_cpus=1``);
(d) ``jasper_ray.convert`` on a local Ray with every core;

and, for gzip, one (b) per core at once: what this machine can run in parallel of
the writer's work, the ceiling (d) is measured against (a note under the table).

Printed (stdout, markdown): wall seconds (for Ray: including Ray's start by
``convert``, which is shown apart; (d) is then run again on the Ray up), MB/s
of PT source, output size and saving, the speedup over (a), the shard phase,
the chunk-copy assembly and its share of the wall time, the driver's peak RSS
(VmHWM of its process) and one worker's peak RSS (``ru_maxrss`` of the busiest
worker, from the shard results). Then a scaling model built from the measured
per-shard times and assembly time. Progress goes
to stderr. The data lives in ``--out/bench-convert-<pid>`` and is removed at the
end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import heapq
import logging
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import (  # noqa: E402
    fmt_bytes,
    fmt_pct,
    fmt_ratio,
    print_table,
    proc_status,
    record,
    run_fresh,
    setup_logging,
    upstream_convert,
    w_synth,  # noqa: E402, F401 - run_fresh calls them by name
)

log = logging.getLogger("bench.convert")
SCRIPT = Path(__file__).resolve()

DIM = 768
N_NEG = 12
COMPRESSIONS = ("gzip", "lzf", None)
METHODS = {
    "upstream": "(a) upstream-style",
    "single": "(b) single-process writer",
    "ray1": "(c) Ray, 1 worker",
    "rayN": "(d) Ray, all cores",
}
SPEEDUP_TARGET = 1.7
# Ray gzip with every core against the single-process writer (b) (issue 15; on 2 cores).
WRITER_SPEEDUP_TARGET = 1.8
# Assembly's share of the wall time: compressed, one process moves every chunk; uncompressed, the pieces wrote
# their rows in place and assembly is metadata only (NOTE [in-place assembly] in conversion/pieces).
ASSEMBLY_SHARE_TARGET = {"gzip": 0.15, "lzf": 0.15, "none": 0.05}
# A worker's peak over an idle one: its shard's source pages + the shard's compressed image, the keyword
# lists (upstream's pickle cannot be read in part: the keyword tasks load it whole) and this much for code
# paged in by the first task and the allocator's retained heap.
WORKER_RSS_SHARDS = 2
WORKER_RSS_ALLOWANCE = 64 << 20
MODEL_WORKERS = (1, 2, 8, 32, 128)


def worker_growth(run: dict[str, Any]) -> int:
    """How far the busiest worker's peak RSS rose above an idle worker's with the same imports."""
    return run["worker_peak_rss"] - run["worker_idle_rss"]


def codec(compression: str | None) -> str:
    return compression or "none"


# ======================================================================================
# Workers: each runs in a fresh interpreter through run_fresh; imports first, then times.
# ======================================================================================


def w_convert(method: str, src: str, output: str, compression: str | None, shard_bytes: int) -> dict[str, Any]:
    """One conversion in this (fresh) process; wall time measured around the call, validation off for all."""

    def worker_baseline() -> tuple[int, int]:
        """Runs in a Ray worker (nested: pickled by value): its VmRSS with the shard task's imports, no shard."""
        import importlib

        for name in ("h5py", "torch", "jasper_ray.conversion.pieces"):
            importlib.import_module(name)
        with open("/proc/self/status") as f:
            rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        return os.getpid(), rss

    t0 = time.perf_counter()
    import h5py  # noqa: F401
    import torch  # noqa: F401

    from jasper_ray.conversion.writer import convert_pt_to_hdf5
    from jasper_ray.formats import open_dataset

    # What each Ray worker pays once, in its first shard task (jasper_ray imports torch lazily).
    result: dict[str, Any] = {"import_seconds": time.perf_counter() - t0}
    src_dir, out = Path(src), Path(output)
    result["source_bytes"] = open_dataset(src_dir, "pt").nbytes_on_disk()
    result["base_rss"] = proc_status()["VmRSS"]
    if method.startswith("ray"):
        import tracemalloc

        import ray

        from jasper_ray.conversion.parallel import convert
        from jasper_ray.conversion.plan import plan_conversion
        from jasper_ray.schema import KEYWORD_IDS

        tracemalloc.start()
        keyword_lists = torch.load(src_dir / KEYWORD_IDS.pt_file, weights_only=True)
        result["keyword_list_bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        del keyword_lists
        reader = open_dataset(src_dir, "pt", use_mmap=True)
        t0 = time.perf_counter()  # what the first piece waits for: the keyword lists are parsed beside the pieces
        plan_conversion(reader, compression, piece_bytes=shard_bytes, keywords=False)
        result["plan_seconds"] = time.perf_counter() - t0
        plan = plan_conversion(reader, compression, piece_bytes=shard_bytes)
        workers = 1 if method == "ray1" else os.cpu_count() or 1
        kwargs: dict[str, Any] = dict(
            compression=compression,
            num_workers=workers,
            shard_bytes=shard_bytes,
            output=out,
            progress=False,
            validate=False,
            force=True,  # timed: never the up-to-date no-op
            keep_ray=True,
        )
        try:
            # Ray started by convert (as `jasper-ray convert` has it), then, for all cores, again on the Ray up
            # (a running cluster): that run's timeline and pieces are reported.
            t0, called_at, cpu0 = time.perf_counter(), time.time(), time.process_time()
            report = convert(src_dir, **kwargs)
            seconds, returned_at = time.perf_counter() - t0, time.time() - called_at
            ray_start, up_seconds, cpu_driver = report.ray_start_seconds, seconds, time.process_time() - cpu0
            if method == "rayN":
                t0, called_at, cpu0 = time.perf_counter(), time.time(), time.process_time()
                report = convert(src_dir, **kwargs)
                up_seconds, returned_at = time.perf_counter() - t0, time.time() - called_at
                cpu_driver = time.process_time() - cpu0
            # A worker's RSS with the shard task's imports and no shard: the floor its peak is measured from.
            probe = ray.remote(num_cpus=1)(worker_baseline)
            idle = min(rss for _, rss in ray.get([probe.remote() for _ in range(workers)]))
        finally:
            ray.shutdown()
        results = list(report.results.values())  # in order of completion
        busiest = max(results, key=lambda r: r.worker_peak_rss)
        result.update(
            seconds=seconds,
            ray_start=ray_start,
            convert_seconds=up_seconds if method == "rayN" else seconds - ray_start,  # (c): Ray's start taken off
            assembly=report.assembly_seconds,
            shard_phase=report.seconds - report.ray_start_seconds - report.assembly_seconds,
            workers=workers,
            shards=report.shards,
            shard_runs=[(r.seconds, r.worker_pid) for r in results],
            shard_raw_bytes=max(
                c.nbytes * (p.stop - p.start) // max(c.shape[0], 1) for c in plan.columns for p in plan.pieces_of(c)
            ),
            worker_peak_rss=busiest.worker_peak_rss,
            worker_idle_rss=idle,
            worker_pids=len({r.worker_pid for r in results}),
            cpu_seconds=sum(r.cpu_seconds for r in results) + cpu_driver,
            # The timeline: when the first task began after convert() was called, when the last one ended.
            first_task_at=min(r.started_at for r in results) - called_at,
            last_task_end=max(r.started_at + r.seconds for r in results) - called_at,
            task_seconds=sum(r.seconds for r in results),
            returned_at=returned_at,
            driver_cpu_seconds=cpu_driver,
        )
    else:
        t0, cpu0 = time.perf_counter(), time.process_time()
        if method == "single":
            convert_pt_to_hdf5(src_dir, compression, output=out, validate=False, progress=False, force=True)
        else:
            upstream_convert(src_dir, out, compression)
        result["seconds"], result["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - cpu0
    result["output_bytes"] = out.stat().st_size
    result["driver_peak_rss"] = proc_status()["VmHWM"]
    return result


# ======================================================================================
# The scaling model
# ======================================================================================


def makespan(shard_seconds: list[float], workers: int) -> float:
    """Time to run the shards on ``workers`` (longest first onto the least-loaded worker)."""
    loads = [0.0] * min(workers, max(1, len(shard_seconds)))
    heapq.heapify(loads)
    for t in sorted(shard_seconds, reverse=True):
        heapq.heappush(loads, heapq.heappop(loads) + t)
    return max(loads)


def split_warmup(run: dict[str, Any]) -> tuple[list[float], float]:
    """Per-shard times without the worker start-up that each worker's first shard carries, and that start-up.

    A worker imports torch & co. in its first task; the cold import time of the driver's process
    (measured the same way) stands for it.
    """
    warmup, seen, shards = run["import_seconds"], set(), []
    for seconds, pid in run["shard_runs"]:
        if pid not in seen:
            seen.add(pid)
            seconds = max(0.0, seconds - warmup)
        shards.append(seconds)
    return shards, warmup


def scaling_rows(run: dict[str, Any], upstream_seconds: float) -> tuple[list[list[str]], list[str]]:
    """Amdahl with a cap: serial = plan + assembly; parallel = the shards scheduled on W workers (+ start-up)."""
    shards, warmup = split_warmup(run)
    serial = run["plan_seconds"] + run["assembly"]

    def predicted(w: int) -> float:
        return serial + warmup + makespan(shards, w)

    one = predicted(1)
    record(
        "convert_model",
        codec="gzip",
        workers=list(MODEL_WORKERS),
        predicted_seconds=[predicted(w) for w in MODEL_WORKERS],
        serial_seconds=serial,
        startup_seconds=warmup,
        shards=len(shards),
    )
    rows, prev, stop_at = [], None, None
    for w in MODEL_WORKERS:
        t = predicted(w)
        if prev is not None and stop_at is None and one / t < prev[1] * 1.10:
            stop_at = prev[0]  # going past it gains < 10%
        prev = (w, one / t)
        rows.append(
            [
                str(w),
                f"{t:.2f} s",
                fmt_ratio(one / t),
                fmt_ratio(upstream_seconds / t),
                fmt_pct(100 * serial / t),
                f"{makespan(shards, w):.2f} s",
            ]
        )
    floor = serial + warmup + max(shards)
    notes = [
        f"model: T(W) = the plan before the first piece {run['plan_seconds']:.2f} s + assembly "
        f"{run['assembly']:.2f} s (serial) + worker "
        f"start-up {warmup:.2f} s (once, in parallel) + the {len(shards)} shard times of the 1-worker run "
        f"(sum {sum(shards):.1f} s, longest {max(shards):.2f} s) scheduled longest-first on W workers; "
        "ray.init left out (a cluster is already up); 'vs (a)' divides the measured upstream-style time",
        f"limit: {fmt_ratio(one / floor)} once every shard has its own worker (W >= {len(shards)} shards: "
        f"longest shard + serial part + start-up = {floor:.2f} s); the serial part alone would cap it at "
        f"{fmt_ratio(one / serial) if serial else 'inf'}",
        (
            f"stops scaling at about {stop_at} workers (the next step in the table gains < 10%)"
            if stop_at
            else f"still scaling at {MODEL_WORKERS[-1]} workers"
        )
        + ": the number of shards and the longest shard cap it; smaller shards move that cap, the assembly "
        "(one process moving every compressed byte, bound by one disk) does not: past that, --layout sharded, "
        "which skips it",
        "assumes the filesystem of the sources and shards keeps up with W readers and writers, and per-shard "
        "times as measured with one worker (no contention for memory bandwidth or disk)",
    ]
    return rows, notes


# ======================================================================================
# The driver
# ======================================================================================


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path):
        from jasper_ray.tools.synth import pairs_for_size, parse_size

        self.args = args
        self.work = work
        self.src = work / "src"
        self.n_pairs = pairs_for_size(parse_size(args.size), DIM, N_NEG)
        self.shard_bytes = parse_size(args.shard_size)
        self.runs: dict[tuple[str | None, str], dict[str, Any]] = {}
        self.capacity = 0.0  # seconds of one writer per core at once (writers_side_by_side); 0: not measured
        self.compressions = [c for c in COMPRESSIONS if codec(c) in args.codecs.split(",")]

    def synth(self) -> None:
        log.info("synthesising %d pairs (D=%d, n_neg=%d) into %s", self.n_pairs, DIM, N_NEG, self.src)
        r = run_fresh(SCRIPT, "w_synth", out=str(self.src), n_pairs=self.n_pairs, dim=DIM, n_neg=N_NEG, seed=0)
        log.info("synthesised in %.1f s", r["seconds"])

    def convert_all(self) -> None:
        for compression in self.compressions:
            for method in METHODS:
                output = self.work / f"{method}.{codec(compression)}.h5"
                log.info("%s, %s ...", METHODS[method], codec(compression))
                r = run_fresh(
                    SCRIPT,
                    "w_convert",
                    method=method,
                    src=str(self.src),
                    output=str(output),
                    compression=compression,
                    shard_bytes=self.shard_bytes,
                )
                log.info("  %.1f s, %s", r["seconds"], fmt_bytes(r["output_bytes"]))
                self.runs[(compression, method)] = r
                output.unlink(missing_ok=True)
        if "gzip" in self.compressions and (os.cpu_count() or 1) > 1:
            self.capacity = self.writers_side_by_side()

    def writers_side_by_side(self) -> float:
        """Wall time of one single-process gzip writer per core, all at once: what this machine can run in
        parallel of the writer's work (its cores, memory bandwidth, disk), the ceiling the Ray row is held to."""
        cores = os.cpu_count() or 1
        log.info("%d single-process writers at once, gzip ...", cores)
        outputs = [self.work / f"side-by-side-{i}.h5" for i in range(cores)]
        kwargs = dict(method="single", src=str(self.src), compression="gzip", shard_bytes=self.shard_bytes)
        with ThreadPoolExecutor(cores) as pool:  # each in a fresh interpreter of its own, started together
            runs = list(pool.map(lambda out: run_fresh(SCRIPT, "w_convert", output=str(out), **kwargs), outputs))
        seconds = max(r["seconds"] for r in runs)  # each timed as (b) is: its conversion, not its start-up
        for out in outputs:
            out.unlink(missing_ok=True)
        log.info("  %.1f s", seconds)
        record("convert_capacity", writers=cores, seconds=seconds, one_writer=self.runs[("gzip", "single")]["seconds"])
        return seconds

    def print_setup(self) -> None:
        src = next(iter(self.runs.values()))["source_bytes"] if self.runs else 0
        print(
            f"## bench_convert: {self.n_pairs} pairs, D={DIM}, n_neg={N_NEG}: {fmt_bytes(src)} of PT files; "
            f"shard size {fmt_bytes(self.shard_bytes)} (rounded up to whole 16 MiB checksum blocks); "
            f"{os.cpu_count()} cores\n",
            flush=True,
        )

    def print_tables(self) -> None:
        rows = []
        for compression in self.compressions:
            base = self.runs[(compression, "upstream")]["seconds"]
            for method, label in METHODS.items():
                r = self.runs[(compression, method)]
                ray = method.startswith("ray")
                record(
                    "convert",
                    codec=codec(compression),
                    method=method,
                    label=label,
                    seconds=r["seconds"],
                    workers=r.get("workers", 1),
                    ray_start_seconds=r.get("ray_start"),
                    source_bytes=r["source_bytes"],
                    output_bytes=r["output_bytes"],
                )
                rows.append(
                    [
                        codec(compression),
                        label,
                        f"{r['seconds']:.2f}",
                        f"{r['source_bytes'] / 1e6 / r['seconds']:.1f}",
                        fmt_bytes(r["output_bytes"]),
                        fmt_pct(100 * (1 - r["output_bytes"] / r["source_bytes"])),
                        fmt_ratio(base / r["seconds"]),
                        f"{r['ray_start']:.1f}" if ray else "-",
                        f"{r['shards']} / {r['shard_phase']:.2f} s" if ray else "-",
                        f"{r['assembly']:.2f} s ({fmt_pct(100 * r['assembly'] / r['seconds'])})" if ray else "-",
                        fmt_bytes(r["driver_peak_rss"]),
                        fmt_bytes(r["worker_peak_rss"]) if ray else "-",
                    ]
                )
        print_table(
            "PT -> HDF5 conversion",
            [
                "codec",
                "method",
                "wall s",
                "MB/s",
                "output",
                "saving",
                "vs (a)",
                "ray.init s",
                "shards / phase",
                "assembly (share)",
                "driver peak RSS",
                "worker peak RSS",
            ],
            rows,
            notes=self.target_notes(),
            align="llrrrrrrrrrr",
        )
        if "gzip" not in self.compressions:  # the model is of the gzip runs
            return
        model_rows, model_notes = scaling_rows(self.runs[("gzip", "ray1")], self.runs[("gzip", "upstream")]["seconds"])
        print_table(
            "Scaling model (gzip): predicted wall time and speedup",
            ["workers", "predicted", "vs 1 worker", "vs (a)", "serial share", "shard phase"],
            model_rows,
            notes=model_notes,
        )

    def target_notes(self) -> list[str]:
        def verdict(ok: bool) -> str:
            return "MET" if ok else "NOT MET"

        notes = [
            "wall s: what the user waits for, validation off everywhere; Ray rows include Ray's start by convert() "
            "(ray.init s: how long it took, while the plan was made) and worker start-up; MB/s of PT source; "
            "saving = 1 - output / source",
            "driver peak RSS = VmHWM of the converting process; worker peak RSS = ru_maxrss of the busiest worker "
            "(file-backed pages of the memory-mapped PT sources included)",
        ]
        if "gzip" in self.compressions:
            gz_a, gz_d = self.runs[("gzip", "upstream")], self.runs[("gzip", "rayN")]
            speedup = gz_a["seconds"] / gz_d["seconds"]
            notes.append(
                f"target: Ray with all cores >= {SPEEDUP_TARGET}x (a) for gzip: {fmt_ratio(speedup)} "
                f"({gz_a['seconds']:.1f} s -> {gz_d['seconds']:.1f} s): {verdict(speedup >= SPEEDUP_TARGET)}"
            )
            gz_b = self.runs[("gzip", "single")]
            with_init, up = gz_b["seconds"] / gz_d["seconds"], gz_b["seconds"] / gz_d["convert_seconds"]
            notes.append(
                f"target: Ray with all cores >= {WRITER_SPEEDUP_TARGET}x (b) the single-process writer for gzip: "
                f"{fmt_ratio(with_init)} with Ray's start ({gz_b['seconds']:.1f} s -> {gz_d['seconds']:.1f} s), "
                f"{fmt_ratio(up)} once Ray is up (convert() again, as on a running cluster: "
                f"{gz_d['convert_seconds']:.1f} s): {verdict(min(with_init, up) >= WRITER_SPEEDUP_TARGET)}"
            )
            work, cores = gz_d["cpu_seconds"], gz_d["workers"]
            notes.append(
                f"CPU time (gzip): the single-process writer {gz_b['cpu_seconds']:.1f} s; Ray, all cores: the tasks "
                f"{work - gz_d['driver_cpu_seconds']:.1f} s + the driver {gz_d['driver_cpu_seconds']:.1f} s = "
                f"{work / gz_b['cpu_seconds']:.2f}x the writer's, so {cores} cores can reach at most "
                f"{fmt_ratio(cores * gz_b['cpu_seconds'] / work)} of its speed (Ray's own processes not counted)"
            )
            if self.capacity:
                capacity = cores * gz_b["seconds"] / self.capacity
                notes.append(
                    f"this machine's capacity: {cores} single-process writers at once took {self.capacity:.1f} s "
                    f"against {gz_b['seconds']:.1f} s for one alone: {fmt_ratio(capacity)} of one writer's speed "
                    f"at most; Ray once up reached {fmt_ratio(up)} ({up / capacity:.0%} of it)"
                )
            span = gz_d["last_task_end"] - gz_d["first_task_at"]
            notes.append(
                f"timeline (gzip, all cores): the first task began {gz_d['first_task_at']:.1f} s after convert() was "
                f"called (the plan, worker start-up), the last ended at {gz_d['last_task_end']:.1f} s, "
                f"{gz_d['returned_at'] - gz_d['last_task_end']:.1f} s before convert() returned; between them the "
                f"{cores} workers were busy {gz_d['task_seconds'] / (cores * span):.0%} of the time"
            )
        for compression in self.compressions:
            r = self.runs[(compression, "rayN")]
            share, target = r["assembly"] / r["seconds"], ASSEMBLY_SHARE_TARGET[codec(compression)]
            how = "set checksums, rename (in place)" if compression is None else "chunk copy"
            notes.append(
                f"target: assembly ({how}) < {target:.0%} of the total ({codec(compression)}, all cores): "
                f"{r['assembly']:.2f} s of {r['seconds']:.2f} s = {fmt_pct(100 * share)} (of the conversion "
                f"without ray.init: {fmt_pct(100 * r['assembly'] / r['convert_seconds'])}): "
                f"{verdict(share < target)}"
            )
        worst = max((self.runs[(c, m)] for c in self.compressions for m in ("ray1", "rayN")), key=worker_growth)
        growth = worker_growth(worst)
        bound = WORKER_RSS_SHARDS * worst["shard_raw_bytes"] + worst["keyword_list_bytes"] + WORKER_RSS_ALLOWANCE
        notes.append(
            f"target: worker peak RSS bounded by the shard size, not the dataset size: the busiest worker peaked at "
            f"{fmt_bytes(worst['worker_peak_rss'])}, {fmt_bytes(growth)} above an idle worker with the same imports "
            f"({fmt_bytes(worst['worker_idle_rss'])}); bound {fmt_bytes(bound)} = {WORKER_RSS_SHARDS} x the largest "
            f"shard {fmt_bytes(worst['shard_raw_bytes'])} (its source pages + its compressed image) + the keyword "
            f"lists loaded whole {fmt_bytes(worst['keyword_list_bytes'])} + {fmt_bytes(WORKER_RSS_ALLOWANCE)} "
            f"(code, heap); dataset {fmt_bytes(worst['source_bytes'])}: {verdict(growth <= bound)}"
        )
        return notes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default=None, help="size of the PT dataset (default 2GB; 200MB with --quick)")
    p.add_argument("--shard-size", default=None, help="bytes of source per shard task (default 64MB; 16MB --quick)")
    p.add_argument("--out", default="/tmp/jr-bench", help="where to put the data (a per-run subdirectory)")
    p.add_argument("--quick", action="store_true", help="small, fast run for trying the script")
    p.add_argument("--keep", action="store_true", help="keep the generated data")
    p.add_argument("--codecs", default="gzip,lzf,none", help="the codecs to convert with (default: gzip,lzf,none)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.size = args.size or ("200MB" if args.quick else "2GB")
    args.shard_size = args.shard_size or ("16MB" if args.quick else "64MB")
    setup_logging(args.verbose)

    from jasper_ray.tools.synth import parse_size

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = parse_size(args.size)
    need = int(size * 3.2)  # PT + one output + the shards beside it while assembling
    free = shutil.disk_usage(out).free
    if free < need:
        log.error("%s has %s free; this run needs about %s", out, fmt_bytes(free), fmt_bytes(need))
        return 1
    work = out / f"bench-convert-{os.getpid()}"
    work.mkdir()
    log.info("working in %s (needs about %s of disk)", work, fmt_bytes(need))
    started = time.perf_counter()
    try:
        bench = Bench(args, work)
        bench.synth()
        bench.convert_all()
        bench.print_setup()
        bench.print_tables()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    log.info("done in %.0f s", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
