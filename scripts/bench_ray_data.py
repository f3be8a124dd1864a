#!/usr/bin/env python
"""Rows/s of ``read_jasper`` through ``iter_torch_batches`` against the peer a Ray user would pick, and Ray's ceilings.

    python scripts/bench_ray_data.py --size 1GB --out /tmp/jr-bench
    python scripts/bench_ray_data.py --quick          # 100MB
    python scripts/bench_ray_data.py --consumers 1,2,4,8   # streaming_split consumers (a 16-core machine)

One synthetic dataset (D=768, n_neg=12, upstream's PT layout), converted
beside its PT files to ``contiguous.h5`` (uncompressed, memory-mapped) and
``gzip.h5`` (the single-process writer). One local Ray (all CPUs, an object
store sized for the baseline). For the ``train`` split, each source is read
in full through ``iter_torch_batches(batch_size=256)`` (all ten columns):

- ``read_jasper`` on contiguous HDF5, gzip HDF5 and PT (mmap); each Dataset
  is made once and every round is its next pass (the next epoch), as in a
  training run;
- the peer: the same samples (read_jasper's epoch 0) written by Ray's
  ``write_parquet`` and read with ``ray.data.read_parquet`` (what a Ray user
  would otherwise store);
- ``n`` consumers: ``streaming_split(n)`` of the contiguous read_jasper
  Dataset, each shard iterated by its own Ray actor (as Ray Train's workers
  are); the rate is all consumers' rows over the time until the last is done;
- the in-memory baseline: the same samples (the local ``JASPERSteeringDataset``'s
  ``get_batch`` over the split) built in RAM first, put into Ray as Arrow
  blocks of the same size (``ray.data.from_arrow``): no I/O, no assembly,
  no task runs (the blocks are already in the object store);
- the ceiling of any Ray Data read: a datasource whose read tasks do no
  I/O and no assembly (each yields slices of one block of zeros of the same
  columns, built once per worker process), with read_jasper's number of
  tasks and block size. What it costs is Ray's: task scheduling, putting
  every block into the object store, and the executor's back-pressure.

Rounds interleave the sources (the order shuffled per round) so that load
from other processes hits all alike; each row reports its median round.
Time to first batch counts from the start of the pass (a Dataset already
made); rows/s counts every row over the whole pass. Targets: contiguous
HDF5 >= 3x read_parquet and >= 0.8x the no-work ceiling; 2 consumers >= 1.5x
one, where the cores allow.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from _bench_common import fmt_bytes, fmt_ms, fmt_rate, fmt_ratio, print_table, record, setup_logging  # noqa: E402

log = logging.getLogger("bench.ray_data")
DIM, N_NEG, BATCH = 768, 12, 256
GATHER_ROWS = 4096


def in_memory_columns(pt_dir: Path, split: str) -> dict[str, np.ndarray]:
    """Every sample of the split, as the local dataset gives them, in RAM, plus ``pair_id``."""
    import jasper_ray

    local = jasper_ray.JASPERSteeringDataset(pt_dir, split, storage_format="pt", validate=False)
    parts = []
    for a in range(0, len(local), GATHER_ROWS):
        batch = local.get_batch(np.arange(a, min(a + GATHER_ROWS, len(local))))
        parts.append({key: value.numpy() for key, value in batch.items()})
    columns = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    columns["pair_id"] = local.split_indices.numpy().copy()
    local.close()
    return columns


def baseline_dataset(columns: dict[str, np.ndarray], rows_per_block: int) -> Any:
    """The columns in Ray's object store as Arrow blocks of ``rows_per_block`` rows (tensor columns)."""
    import ray.data
    from ray.data.block import BlockAccessor

    n = len(columns["pair_id"])
    blocks = [
        BlockAccessor.batch_to_block({key: value[a : a + rows_per_block] for key, value in columns.items()})
        for a in range(0, n, rows_per_block)
    ]
    return ray.data.from_arrow(blocks)


_PREBUILT: dict[int, Any] = {}


def _prebuilt_rows(n_rows: int, rows_per_block: int, shapes: dict[str, tuple[tuple[int, ...], str]]):
    """A read task's body that does no work: slices of one block of zeros, built once per process."""
    from ray.data.block import BlockAccessor

    if rows_per_block not in _PREBUILT:
        zeros = {key: np.zeros((rows_per_block, *shape), dtype) for key, (shape, dtype) in shapes.items()}
        _PREBUILT[rows_per_block] = BlockAccessor.batch_to_block(zeros)
    block = _PREBUILT[rows_per_block]
    for a in range(0, n_rows, rows_per_block):
        yield block.slice(0, min(rows_per_block, n_rows - a))


def no_work_dataset(row: dict[str, np.ndarray], n: int, n_tasks: int, rows_per_block: int) -> Any:
    """A Ray Data read of ``n`` rows like ``row`` (one-row columns) in ``n_tasks`` tasks that read nothing."""
    import ray.data
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    shapes = {key: (value.shape[1:], value.dtype.str) for key, value in row.items()}
    row_bytes = sum(value.nbytes for value in row.values())

    class NoWork(Datasource):
        def estimate_inmemory_data_size(self) -> int:
            return n * row_bytes

        def get_read_tasks(self, parallelism: int, per_task_row_limit: Any = None, **_: Any) -> list[Any]:
            counts = [n * (k + 1) // parallelism - n * k // parallelism for k in range(parallelism)]
            return [
                ReadTask(
                    lambda rows=rows: _prebuilt_rows(rows, rows_per_block, shapes),
                    BlockMetadata(num_rows=rows, size_bytes=rows * row_bytes, input_files=None, exec_stats=None),
                )
                for rows in counts
                if rows
            ]

    return ray.data.read_datasource(NoWork(), override_num_blocks=n_tasks)


def _consume(shard: Any) -> dict[str, float]:
    """A pass over a Dataset or a ``streaming_split`` shard (then in an actor): rows, seconds to the first batch."""
    started = time.perf_counter()
    rows, first = 0, None
    for batch in shard.iter_torch_batches(batch_size=BATCH):
        if first is None:
            first = time.perf_counter() - started
        rows += len(batch["pair_id"])
    return {"rows": rows, "first": first or 0.0}


def one_pass(ds: Any) -> dict[str, float]:
    """One full pass over ``ds`` through iter_torch_batches, in this process: rows, first-batch and total seconds."""
    started = time.perf_counter()
    done = _consume(ds)
    return {**done, "total": time.perf_counter() - started}


class Consumer:
    """A consumer of one ``streaming_split`` shard, run as a Ray actor (as Ray Train's workers are): it stays
    up from round to round, so a round measures the epoch, not a worker process starting and importing torch."""

    def consume(self, shard: Any) -> dict[str, float]:
        return _consume(shard)


def split_pass(consumers: list[Any], shards: list[Any]) -> dict[str, float]:
    """One epoch of every shard, each consumed by its own actor at once: all rows over the time to the last."""
    import ray

    started = time.perf_counter()
    done = ray.get([c.consume.remote(shard) for c, shard in zip(consumers, shards)])
    total = time.perf_counter() - started
    return {"rows": sum(d["rows"] for d in done), "first": max(d["first"] for d in done), "total": total}


def write_peer(ds: Any, out: Path) -> Path:
    """The samples of one pass written by Ray's write_parquet (one file per block, as Ray writes them) into
    ``out``, the benchmark's own scratch folder, emptied first (a killed run leaves files there)."""
    shutil.rmtree(out, ignore_errors=True)
    ds.write_parquet(str(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default=None, help="size of the synthetic PT dataset (default 1GB; 100MB --quick)")
    parser.add_argument("--quick", action="store_true", help="100MB (unless --size is given)")
    parser.add_argument("--rounds", type=int, default=3, help="full passes per source (median reported)")
    parser.add_argument("--out", default=tempfile.gettempdir(), help="where the dataset is written")
    parser.add_argument("--object-store", default=None, help="Ray object store size (default: 2x the baseline)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic dataset")
    parser.add_argument("--consumers", default="1,2", help="streaming_split consumers to measure (comma-separated)")
    args = parser.parse_args()
    setup_logging()
    args.size = args.size or ("100MB" if args.quick else "1GB")
    consumers = [int(n) for n in args.consumers.split(",") if n.strip()]

    import ray
    from ray.data import DataContext

    import jasper_ray
    from jasper_ray.ray_data import COLUMNS, JasperDatasource, read_jasper, row_bytes
    from jasper_ray.tools.synth import pairs_for_size, parse_size

    n_pairs = pairs_for_size(parse_size(args.size), DIM, N_NEG)
    root = Path(args.out) / f"bench-ray-data-{n_pairs}"
    pt_dir = root / "pt"
    try:
        log.info("synthesising %d pairs (%s) in %s", n_pairs, args.size, pt_dir)
        jasper_ray.synth_dataset(pt_dir, n_pairs, DIM, N_NEG, seed=0)
        for name, compression in (("contiguous", None), ("gzip", "gzip")):
            log.info("converting to %s.h5", name)
            jasper_ray.convert_pt_to_hdf5(pt_dir, compression, output=pt_dir / f"{name}.h5", progress=False)
        disk = sum(p.stat().st_size for p in pt_dir.glob("*.pt"))

        log.info("building the in-memory baseline")
        columns = in_memory_columns(pt_dir, "train")
        n_rows = len(columns["pair_id"])
        sample_bytes = sum(v.nbytes for v in columns.values())
        assert sample_bytes == n_rows * row_bytes(COLUMNS, DIM, N_NEG)
        store = parse_size(args.object_store) if args.object_store else max(1 << 30, 2 * sample_bytes)
        log.info(
            "%d rows, %s of samples; starting Ray (object store %s)", n_rows, fmt_bytes(sample_bytes), fmt_bytes(store)
        )
        ray.init(
            address="local",
            num_cpus=os.cpu_count(),
            object_store_memory=store,
            include_dashboard=False,
            runtime_env={"env_vars": {"HDF5_USE_FILE_LOCKING": "FALSE", "OMP_NUM_THREADS": "1"}},
        )
        DataContext.get_current().enable_progress_bars = False
        contiguous = JasperDatasource(pt_dir / "contiguous.h5", "train")  # read_jasper's defaults
        n_tasks, rows_per_block = contiguous.default_num_tasks(os.cpu_count() or 1), contiguous.rows_per_block
        log.info("read_jasper's defaults here: %d read tasks, blocks of %d rows", n_tasks, rows_per_block)
        baseline = baseline_dataset(columns, rows_per_block)
        no_work = {key: value[:1].copy() for key, value in columns.items()}
        del columns

        jasper = {
            "contiguous": read_jasper(pt_dir / "contiguous.h5", "train"),
            "gzip": read_jasper(pt_dir / "gzip.h5", "train"),
            "pt": read_jasper(pt_dir, "train", storage_format="pt"),
        }
        log.info("writing the peer: read_jasper's epoch 0 through Ray's write_parquet")
        peer_dir = write_peer(read_jasper(pt_dir / "contiguous.h5", "train"), root / "parquet")
        peer_bytes = sum(p.stat().st_size for p in peer_dir.rglob("*.parquet"))
        split_of = {n: read_jasper(pt_dir / "contiguous.h5", "train").streaming_split(n) for n in consumers}
        actor = ray.remote(num_cpus=0)(Consumer)  # consumers hold no CPU: the read tasks need them
        actors = {n: [actor.remote() for _ in range(n)] for n in consumers}
        sources: dict[str, Callable[[], dict[str, float]]] = {
            "in-memory baseline (from_arrow)": lambda: one_pass(baseline),
            "ceiling: read tasks that do no work": lambda: one_pass(
                no_work_dataset(no_work, n_rows, n_tasks, rows_per_block)
            ),
            "reference: ray.data.read_parquet (the peer)": lambda: one_pass(ray.data.read_parquet(str(peer_dir))),
            "read_jasper HDF5 contiguous (mmap)": lambda: one_pass(jasper["contiguous"]),
            "read_jasper HDF5 gzip": lambda: one_pass(jasper["gzip"]),
            "read_jasper PT (mmap)": lambda: one_pass(jasper["pt"]),
            **{
                f"read_jasper HDF5 contiguous, {n} consumer{'s' if n > 1 else ''} (streaming_split, actors)": (
                    lambda n=n: split_pass(actors[n], split_of[n])
                )
                for n in consumers
            },
        }
        log.info("warm-up pass of each source")
        for run in sources.values():
            run()
        results: dict[str, list[dict[str, float]]] = {name: [] for name in sources}
        rng = random.Random(0)
        for r in range(args.rounds):
            order = list(sources)
            rng.shuffle(order)
            for name in order:
                result = sources[name]()
                assert result["rows"] == n_rows, (name, result["rows"], n_rows)
                results[name].append(result)
                log.info("round %d: %s: %.2f s, first batch %.3f s", r, name, result["total"], result["first"])

        def rate(name: str) -> float:
            return n_rows / statistics.median(x["total"] for x in results[name])

        for name in sources:
            record(
                "ray_data",
                source=name,
                rows_per_s=rate(name),
                first_batch_seconds=statistics.median(x["first"] for x in results[name]),
                rows=n_rows,
            )
        base = rate("in-memory baseline (from_arrow)")
        ref = rate("ceiling: read tasks that do no work")
        peer = rate("reference: ray.data.read_parquet (the peer)")
        one = rate(next(name for name in sources if ", 1 consumer " in name)) if 1 in consumers else None
        table = [
            (
                name,
                fmt_rate(rate(name), " rows/s"),
                fmt_bytes(rate(name) * sample_bytes / n_rows) + "/s",
                fmt_ratio(rate(name) / base),
                fmt_ratio(rate(name) / ref),
                fmt_ratio(rate(name) / peer),
                fmt_ratio(rate(name) / one) if one and "consumer" in name else "",
                fmt_ms(statistics.median(x["first"] for x in results[name])),
            )
            for name in sources
        ]
        print_table(
            f"Ray Data rows/s through iter_torch_batches(batch_size={BATCH}): {n_pairs} pairs "
            f"(PT files {disk / 1e9:.2f} GB), train split {n_rows} rows, D={DIM}, n_neg={N_NEG}",
            [
                "source",
                "rows/s",
                "sample bytes/s",
                "vs baseline",
                "vs no-work ceiling",
                "vs read_parquet",
                "vs 1 consumer",
                "first batch",
            ],
            table,
            notes=[
                f"all ten columns ({fmt_bytes(sample_bytes / n_rows)} per row); median of {args.rounds} full passes "
                "after a warm-up pass, sources interleaved; page cache warm",
                "first batch: from the start of the pass (each Dataset made once; every round is its next pass, "
                "the next epoch); consumers: the slowest consumer's",
                f"the peer: epoch 0's samples written by Ray's write_parquet ({fmt_bytes(peer_bytes)} on disk, "
                "Ray's default compression), read with ray.data.read_parquet's defaults",
                f"consumers: streaming_split(n) of one read_jasper Dataset, each shard iterated by its own actor "
                f"(num_cpus=0, kept across rounds); all rows over the time until the last is done; "
                f"{os.cpu_count()} CPUs are shared by the read tasks and the consumers",
                f"read_jasper's defaults here: {n_tasks} read tasks, blocks of {rows_per_block} rows "
                f"({fmt_bytes(rows_per_block * sample_bytes / n_rows)}); the no-work ceiling uses the same",
                "targets: read_jasper on contiguous HDF5 >= 3x read_parquet and >= 0.8x the no-work ceiling; "
                "2 consumers >= 1.5x one where the cores allow",
                f"Ray {ray.__version__}, {os.cpu_count()} CPUs, object store {fmt_bytes(store)}",
            ],
        )
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
