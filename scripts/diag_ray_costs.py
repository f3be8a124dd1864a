#!/usr/bin/env python
"""What Ray itself costs here: starting and stopping it, read_jasper's block size, an object-store put, an
actor call.

    python scripts/diag_ray_costs.py                # 1GB dataset for the block-size rows
    python scripts/diag_ray_costs.py --size 256MB

Four tables (the first three with their baseline measured in the same run):

- a local Ray started as ``ray_session.connect`` starts it and stopped by
  ``ray.shutdown`` against ``ray_session.shutdown`` (NOTE [the monitor's
  second]), each in a fresh interpreter, the two ways alternating;
- read_jasper on contiguous HDF5 with its default blocks (Ray's target size,
  128 MiB) against the 32 MiB blocks it used before;
- ``ray.put`` of 32 MiB arrays, three passes (the serialisation copy every
  block a read task yields pays);
- the client CPU of one actor call, one at a time and pipelined.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import fmt_bytes, fmt_rate, fmt_ratio, print_table, setup_logging  # noqa: E402

DIM, N_NEG, BATCH = 768, 12, 256
MIB = 1 << 20


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# One start and stop in a fresh interpreter; argv[1] names the stop ("ray" or "jasper_ray"). Prints the seconds.
START_STOP = """if True:
    import sys, time, ray
    from jasper_ray import ray_session
    started = time.perf_counter()
    ray_session.connect(num_cpus=1)
    ray.get(ray.remote(lambda: 0).remote())
    stopping = time.perf_counter()
    ray.shutdown() if sys.argv[1] == "ray" else ray_session.shutdown()
    print(stopping - started, time.perf_counter() - stopping)
"""


def start_stop(rounds: int) -> None:
    ways = {"ray.shutdown() (baseline)": "ray", "ray_session.shutdown()": "jasper_ray"}
    seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, how in ways.items():
            run = subprocess.run(
                [sys.executable, "-c", START_STOP, how], capture_output=True, text=True, check=True, timeout=300
            )
            start, stop = map(float, run.stdout.split()[-2:])
            seconds[name].append((start, stop))
    base = statistics.median(stop for _, stop in next(iter(seconds.values())))
    rows = []
    for name, runs in seconds.items():
        stop = statistics.median(s for _, s in runs)
        rows.append((name, f"{statistics.median(s for s, _ in runs):.2f} s", f"{stop:.2f} s", fmt_ratio(base / stop)))
    print_table(
        "A local Ray, started as ray_session.connect starts it (and one task run), then stopped",
        ["stopped by", "start + first task (median)", "stop (median)", "stop, faster than baseline"],
        rows,
        notes=[f"median of {rounds} fresh interpreters each, the two ways alternating"],
    )


def block_sizes(ray, directory: Path, rounds: int) -> None:
    from jasper_ray.ray_data import COLUMNS, JasperDatasource, read_jasper, row_bytes

    cpus = int(ray.cluster_resources()["CPU"])
    per_row = row_bytes(COLUMNS, DIM, N_NEG)
    default = JasperDatasource(directory / "dataset.h5", "train")
    old_rows = (32 * MIB) // per_row
    old_tasks = max(1, 2 * cpus, -(-len(default.ids) * per_row // (64 * MIB)))  # the old MIN_TASK_BYTES rule
    ways = {
        f"default: {default.rows_per_block} rows a block, {default.default_num_tasks(cpus)} tasks (baseline)": {},
        f"before: {old_rows} rows a block (32 MiB), {old_tasks} tasks": {
            "rows_per_block": old_rows,
            "override_num_blocks": old_tasks,
        },
    }
    rates: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(rounds + 1):
        for name, kwargs in ways.items():
            started, rows = time.perf_counter(), 0
            for batch in read_jasper(directory / "dataset.h5", "train", **kwargs).iter_torch_batches(batch_size=BATCH):
                rows += len(batch["pair_id"])
            if r:  # round 0 warms up
                rates[name].append(rows / (time.perf_counter() - started))
    base = statistics.median(next(iter(rates.values())))
    print_table(
        f"read_jasper block size: {len(default.ids)} rows of {fmt_bytes(per_row)}, iter_torch_batches({BATCH})",
        ["blocks", "rows/s (median)", "vs default"],
        [
            (name, fmt_rate(statistics.median(v), " rows/s"), fmt_ratio(statistics.median(v) / base))
            for name, v in rates.items()
        ],
        notes=[f"median of {rounds} passes after a warm-up pass, ways alternating; {cpus} CPUs"],
    )


def puts(ray) -> None:
    array = np.ones(32 * MIB // 8)
    rows = []
    for label in ("pass 1", "pass 2", "pass 3"):
        started = time.perf_counter()
        refs = [ray.put(array) for _ in range(64)]
        seconds = time.perf_counter() - started
        rows.append((label, fmt_rate(64 * array.nbytes / seconds / 1e9, " GB/s")))
        del refs
        time.sleep(0.5)  # let the store free them
    print_table("ray.put of 64 arrays of 32 MiB, from this process", ["pass", "throughput"], rows)


def actor_calls(ray) -> None:
    @ray.remote(num_cpus=0)
    class Echo:
        def call(self, requests: list) -> int:
            return len(requests)

    actor = Echo.remote()
    ray.get(actor.call.remote([]))
    requests = [(np.arange(128), "psm_name", slice(0, 128)) for _ in range(4)]  # a fill_many call's arguments
    n, rows = 2000, []
    for label in ("one at a time (ray.get each)", "pipelined (all submitted, then ray.get)"):
        cpu, started = _cpu(), time.perf_counter()
        if label.startswith("one"):
            for _ in range(n):
                ray.get(actor.call.remote(requests))
        else:
            ray.get([actor.call.remote(requests) for _ in range(n)])
        wall = time.perf_counter() - started
        rows.append((label, f"{wall / n * 1e6:.0f} µs", f"{(_cpu() - cpu) / n * 1e6:.0f} µs"))
    print_table(
        f"One actor call ({n} calls with a fill_many call's arguments)",
        ["how", "wall per call", "client CPU per call"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GB", help="synthetic dataset for the block-size rows")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stop-rounds", type=int, default=3, help="fresh interpreters per way of stopping Ray")
    parser.add_argument("--out", default=tempfile.gettempdir())
    args = parser.parse_args()
    setup_logging()

    import ray
    from ray.data import DataContext

    import jasper_ray
    from jasper_ray.tools.synth import pairs_for_size, parse_size

    start_stop(args.stop_rounds)
    n_pairs = pairs_for_size(parse_size(args.size), DIM, N_NEG)
    directory = Path(args.out) / f"diag-ray-costs-{n_pairs}"
    try:
        jasper_ray.synth_dataset(directory, n_pairs, DIM, N_NEG, seed=0)
        jasper_ray.convert_pt_to_hdf5(directory, None, progress=False)
        ray.init(
            address="local",
            num_cpus=os.cpu_count(),
            object_store_memory=4 << 30,
            include_dashboard=False,
            runtime_env={"env_vars": {"HDF5_USE_FILE_LOCKING": "FALSE", "OMP_NUM_THREADS": "1"}},
        )
        DataContext.get_current().enable_progress_bars = False
        block_sizes(ray, directory, args.rounds)
        puts(ray)
        actor_calls(ray)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
