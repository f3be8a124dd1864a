#!/usr/bin/env python
"""Samples/s of the local torch path against upstream's per-sample algorithm and an in-RAM ceiling.

    python scripts/bench_loader.py --size 1GB --out /tmp/jr-bench
    python scripts/bench_loader.py --quick          # 100MB, fewer batches

One synthetic dataset (D=768, n_neg=12), converted to HDF5 gzip and HDF5
contiguous. For each storage (PT in RAM, PT+mmap, HDF5 contiguous (mmap),
HDF5 gzip) a DataLoader (batch 256, workers 0 and 2, fork) runs:
- batched: ``create_loader`` (``__getitems__`` + pass-through collate);
- per-sample: the same dataset with ``__getitems__`` hidden, so the DataLoader
  calls ``__getitem__`` per index and ``default_collate`` stacks;
and, once, the references measured in the same run:
- upstream-style: a short re-implementation of upstream's ``__getitem__``
  (tensors in RAM, one ``rng.choice`` and three ``.item()`` per sample);
- ceiling: ``assemble_batch`` over the same tensors in RAM, no DataLoader.
Throughput counts samples after the first (warm-up) batch; the page cache is warm.

A second table puts workers beside a training step: a consumer sleeps 0, 2 or 5 ms per batch (an
accelerator's step) over HDF5 contiguous (mmap), and for each step it reports the in-process loader
(0 workers: load and step in series), torch's workers (1 and 2; a plain DataLoader, each batch copied
into a fresh shared-memory segment), ``create_loader``'s slot workers (1 and 2; batches built in a
ring of shared-memory slots) and the overlap ceiling min(in-process rate, batch / step).

Then read verification's cost (``_bench_verify``), and storage precision (``_bench_precision``): the
in-process loader over uncompressed float32, float16 and bfloat16 conversions, served as float32 and as stored.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's jasper_ray, as bench_ray_data
from _bench_common import fmt_rate, fmt_ratio, print_table, record, setup_logging  # noqa: E402

import jasper_ray  # noqa: E402
from jasper_ray.assembly import assemble_batch  # noqa: E402
from jasper_ray.formats import open_dataset  # noqa: E402
from jasper_ray.local.batches import TensorSource  # noqa: E402
from jasper_ray.tools.synth import pairs_for_size, parse_size, synth_dataset  # noqa: E402

log = logging.getLogger("bench.loader")
BATCH = 256
VARIANT_NAMES = ("zero", "centroid", "keyword", "residual")


class PerSample(Dataset):
    """The dataset without ``__getitems__``: DataLoader falls back to one ``__getitem__`` per index."""

    def __init__(self, dataset: jasper_ray.JASPERSteeringDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[i]


class UpstreamStyle(Dataset):
    """Upstream's algorithm (UPSTREAM.md section 2): in-RAM tensors, one RNG draw and three .item() per sample."""

    def __init__(self, directory: Path, split: str, probs: dict[str, float], epoch: int = 0):
        load = lambda name: torch.load(directory / f"{name}.pt", weights_only=True)  # noqa: E731
        self.split_indices = load(f"{split}_idx")
        self.pair_index, self.question_embs, self.source_embs = (
            load("pair_index"),
            load("question_embs"),
            load("source_embs"),
        )
        self.hard_negatives, self.negative_tiers = load("hard_negatives"), load("negative_tiers")
        self.pair_cluster_id, self.pair_relevance = load("pair_cluster_id"), load("pair_relevance")
        self.centroid_distances = load("centroid_distances")
        self.steering = {
            "centroid": load("steering_centroid"),
            "keyword": load("steering_keyword_weighted"),
            "residual": load("steering_residual"),
        }
        self.probs = probs
        self.rng = np.random.default_rng(42 + epoch)

    def __len__(self) -> int:
        return len(self.split_indices)

    def __getitem__(self, idx: int):
        pair_idx = self.split_indices[idx].item()
        q_idx, s_idx = self.pair_index[pair_idx]
        q_idx, s_idx = q_idx.item(), s_idx.item()
        variant = self.rng.choice(list(self.probs.keys()), p=list(self.probs.values()))
        q = self.question_embs[q_idx]
        steering = torch.zeros(q.shape[0], dtype=q.dtype) if variant == "zero" else self.steering[variant][pair_idx]
        return {
            "question_emb": q,
            "target_source_emb": self.source_embs[s_idx],
            "steering": steering,
            "negative_embs": self.source_embs[self.hard_negatives[pair_idx]],
            "cluster_id": self.pair_cluster_id[pair_idx],
            "relevance": self.pair_relevance[pair_idx],
            "centroid_distance": self.centroid_distances[pair_idx],
            "steering_variant": torch.tensor(VARIANT_NAMES.index(variant), dtype=torch.long),
            "negative_tiers": self.negative_tiers[pair_idx],
        }


def throughput(batches, max_batches: int) -> float:
    """Samples/s over up to ``max_batches`` batches after the first."""
    it = iter(batches)
    next(it)
    n, t0 = 0, time.perf_counter()
    for i, batch in enumerate(it):
        n += len(batch["steering_variant"])
        if i + 1 >= max_batches:
            break
    return n / (time.perf_counter() - t0)


def loader(dataset: Dataset, workers: int, batched: bool) -> DataLoader:
    sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(0))
    return DataLoader(
        dataset,
        batch_size=BATCH,
        sampler=sampler,
        num_workers=workers,
        collate_fn=jasper_ray.collate if batched else default_collate,
        multiprocessing_context="fork" if workers else None,
        persistent_workers=False,
    )


def stepped(batches, max_batches: int, step_s: float) -> float:
    """``throughput`` with a consumer that sleeps ``step_s`` per batch (an accelerator's step)."""

    def consume():
        for batch in batches:
            yield batch
            if step_s:
                time.sleep(step_s)

    return throughput(consume(), max_batches)


STEPS_MS = (0, 2, 5)


def overlap_table(directory: Path, max_batches: int, rounds: int = 3) -> None:
    """In-process, torch's workers and slot workers against a consumer's step (module docstring)."""
    kwargs = dict(storage_format="hdf5", use_mmap=True)
    ways = [("in-process serial", 0), ("torch workers", 1), ("torch workers", 2), ("slot workers", 1)]
    ways.append(("slot workers", 2))
    runs: dict[tuple[str, int], dict[int, list[float]]] = {way: {step: [] for step in STEPS_MS} for way in ways}
    load_before = os.getloadavg()[0]
    for r in range(rounds):  # interleaved rounds, medians: load from other processes falls on every cell alike
        for step in STEPS_MS:
            for way, workers in random.Random(r * 10 + step).sample(ways, len(ways)):
                log.info("overlap round %d: %s, %d workers, %d ms step", r + 1, way, workers, step)
                if way == "torch workers":
                    ds = jasper_ray.JASPERSteeringDataset(directory, "train", validate=False, **kwargs)
                    batches = loader(ds, workers, batched=True)
                else:
                    batches = jasper_ray.create_loader(
                        directory, "train", BATCH, num_workers=workers,
                        multiprocessing_context="fork" if workers else None, validate=False, **kwargs,
                    )  # fmt: skip
                runs[(way, workers)][step].append(stepped(batches, max_batches, step / 1e3))
                if isinstance(batches, jasper_ray.ResumableLoader):
                    batches.close()
    # The step alone, no loading: how fast this machine sleeps the step now (a loaded machine oversleeps).
    one = jasper_ray.JASPERSteeringDataset(directory, "train", validate=False, **kwargs).get_batch(range(BATCH))
    alone = {step: stepped(itertools.repeat(one), max_batches, step / 1e3) for step in STEPS_MS}
    rates = {way: {step: statistics.median(r) for step, r in by_step.items()} for way, by_step in runs.items()}
    for (way, workers), by_step in rates.items():
        for step, rate in by_step.items():
            record("loader_overlap", path=way, workers=workers, step_ms=step, samples_per_s=rate)
    serial = rates[("in-process serial", 0)][0]
    top = {step: min(serial, BATCH / (step / 1e3)) if step else serial for step in STEPS_MS}
    for step in STEPS_MS:
        record("loader_overlap", path="overlap ceiling", workers=0, step_ms=step, samples_per_s=top[step])
    rows = [("overlap ceiling", "-", *(x for step in STEPS_MS for x in (fmt_rate(top[step]), "1.00x")))]
    alone_cells = [x for step in STEPS_MS for x in (fmt_rate(alone[step]), fmt_ratio(alone[step] / top[step]))]
    rows.append(("the step alone (no loading)", "-", *alone_cells))
    for (way, workers), by_step in rates.items():
        cells = [x for step in STEPS_MS for x in (fmt_rate(by_step[step]), fmt_ratio(by_step[step] / top[step]))]
        rows.append((way, workers, *cells))
    best = {step: max(rates[("slot workers", w)][step] for w in (1, 2)) for step in STEPS_MS}
    print_table(
        f"Workers beside a training step: samples/s, batch {BATCH}, HDF5 contiguous (mmap)",
        ["loader", "workers", *(x for step in STEPS_MS for x in (f"{step} ms step", "vs ceiling"))],
        rows,
        notes=[
            "the consumer sleeps the step per batch and touches nothing; ceiling: min(in-process rate, batch / step)",
            f"median of {rounds} interleaved rounds of {max_batches} timed batches per cell, after one warm-up batch "
            "(which absorbs the workers' start); fork workers, started anew for each cell",
            f"target: slot workers >= 0.9x the ceiling at a 5 ms step: {fmt_ratio(best[5] / top[5])} "
            f"-> {'met' if best[5] >= 0.9 * top[5] else 'NOT met'}",
            f"target: slot workers >= 0.7x the in-process rate with no step: {fmt_ratio(best[0] / serial)} "
            f"-> {'met' if best[0] >= 0.7 * serial else 'NOT met'}",
            "torch workers: a plain DataLoader(dataset, num_workers=N, collate_fn=jasper_ray.collate)",
            f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores",
        ],
    )


def verify_table(contiguous_dir: Path, pt_dir: Path, rounds: int = 2) -> None:
    """Read verification (issue 17): whole epochs of create_loader with verify="first-touch" against "off"."""
    import _bench_verify as bv

    results = {
        "HDF5 contiguous (mmap)": bv.measure("loader", bv.loader_epoch(contiguous_dir, "hdf5", BATCH, 0), rounds),
        bv.PT_LABEL: bv.measure("loader", bv.loader_epoch(pt_dir, "pt", BATCH, 0), rounds),
    }
    bv.table(
        "loader_verify",
        f"Read verification through create_loader (batch {BATCH}, 0 workers): first epoch and second epoch",
        results,
        [bv.PT_NOTE],
    )


def precision_table(pt_dir: Path, work: Path, n_pairs: int, rounds: int) -> None:
    """Half-precision storage (issue 19): create_loader over uncompressed conversions at each precision."""
    import _bench_precision as bp

    files = bp.contiguous_files(pt_dir, work)
    bp.rate_table(
        "loader_precision",
        f"Storage precision through create_loader (batch {BATCH}, 0 workers), {n_pairs} pairs, D=768, n_neg=12",
        bp.rates(files, bp.loader_epoch, BATCH, rounds),
        [f"served as float32: {bp.decode_note()}"],
    )
    shutil.rmtree(work, ignore_errors=True)


def ceiling(directory: Path, max_batches: int) -> float:
    """assemble_batch on tensors already in RAM, fed random batches directly: no DataLoader, no file."""
    reader = open_dataset(directory, "pt", use_mmap=False)
    source = TensorSource(reader)
    train = reader.split("train")
    rng = np.random.default_rng(0)
    variants = rng.integers(0, 4, BATCH)

    def batches():
        while True:
            yield assemble_batch(source, rng.choice(train, BATCH), variants)

    return throughput(batches(), max_batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default=None, help="dataset size (default 1GB; 100MB with --quick)")
    parser.add_argument("--out", default="/tmp")
    parser.add_argument("--batches", type=int, default=None, help="timed batches per row (default 60; 15 --quick)")
    parser.add_argument("--quick", action="store_true", help="100MB and 15 batches (unless given)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the workers table (median)")
    args = parser.parse_args()
    setup_logging()
    args.size = args.size or ("100MB" if args.quick else "1GB")
    args.batches = args.batches or (15 if args.quick else 60)
    n_pairs = pairs_for_size(parse_size(args.size), 768, 12)
    root = Path(args.out) / f"bench-loader-{n_pairs}"
    pt_dir, contiguous_dir = root / "pt", root / "contiguous"
    try:
        log.info("synthesising %d pairs (%s) in %s", n_pairs, args.size, root)
        synth_dataset(pt_dir, n_pairs, 768, 12, seed=0)
        jasper_ray.convert_pt_to_hdf5(pt_dir, "gzip", progress=False)
        contiguous_dir.mkdir(parents=True, exist_ok=True)
        jasper_ray.convert_pt_to_hdf5(pt_dir, None, output=contiguous_dir / "dataset.h5", progress=False)
        shutil.copy(pt_dir / "config.json", contiguous_dir / "config.json")
        disk = sum(p.stat().st_size for p in pt_dir.glob("*.pt"))

        storages = {
            "PT in RAM": dict(dataset_dir=pt_dir, storage_format="pt", use_mmap=False),
            "PT + mmap": dict(dataset_dir=pt_dir, storage_format="pt", use_mmap=True),
            "HDF5 contiguous (mmap)": dict(dataset_dir=contiguous_dir, storage_format="hdf5", use_mmap=True),
            "HDF5 gzip": dict(dataset_dir=pt_dir, storage_format="hdf5", use_mmap=True),
        }
        log.info("references")
        probs = jasper_ray.JASPERSteeringDataset(pt_dir, "train", storage_format="pt", validate=False).steering_probs
        upstream = {
            w: throughput(loader(UpstreamStyle(pt_dir, "train", probs), w, False), args.batches) for w in (0, 2)
        }
        top = ceiling(pt_dir, args.batches)
        record("loader", path="ceiling", storage="PT in RAM", workers=0, samples_per_s=top)
        for w in (0, 2):
            record("loader", path="upstream-style", storage="PT in RAM", workers=w, samples_per_s=upstream[w])
        rows = [
            (
                "in-RAM vectorised gather (ceiling)",
                "PT in RAM",
                "-",
                fmt_rate(top),
                fmt_ratio(top / upstream[0]),
                "1.00x",
            ),
        ]
        rows += [
            (
                "upstream-style per-sample",
                "PT in RAM",
                w,
                fmt_rate(upstream[w]),
                fmt_ratio(upstream[w] / upstream[0]),
                fmt_ratio(upstream[w] / top),
            )
            for w in (0, 2)
        ]
        for name, kwargs in storages.items():
            for workers in (0, 2):
                for batched in (True, False):
                    log.info("%s, %d workers, %s", name, workers, "batched" if batched else "per-sample")
                    ds = jasper_ray.JASPERSteeringDataset(split="train", validate=False, **kwargs)
                    rate = throughput(loader(ds if batched else PerSample(ds), workers, batched), args.batches)
                    record(
                        "loader",
                        path="batched" if batched else "per-sample",
                        storage=name,
                        workers=workers,
                        samples_per_s=rate,
                    )
                    rows.append(
                        (
                            "batched (__getitems__)" if batched else "per-sample (__getitem__)",
                            name,
                            workers,
                            fmt_rate(rate),
                            fmt_ratio(rate / upstream[0]),
                            fmt_ratio(rate / top),
                        )
                    )
        print_table(
            f"DataLoader samples/s, batch {BATCH}, {n_pairs} pairs, D=768, n_neg=12, PT files {disk / 1e9:.2f} GB",
            ["path", "storage", "workers", "samples/s", "vs upstream-style (0 workers)", "vs ceiling"],
            rows,
            notes=[
                f"{args.batches} timed batches per row after one warm-up batch; page cache warm; fork workers",
                "targets: batched >= 5x upstream-style; >= 0.5x ceiling on in-RAM and mmap'd data",
                f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads",
            ],
        )
        overlap_table(contiguous_dir, args.batches, args.rounds)
        verify_table(contiguous_dir, pt_dir, args.rounds)
        precision_table(pt_dir, root / "precision", n_pairs, args.rounds)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
