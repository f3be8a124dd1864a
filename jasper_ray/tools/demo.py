"""The main job on an embedded default: synthesise, convert in parallel, serve every way, report.

``jasper-ray demo`` needs no data and no cluster: it writes a synthetic dataset (upstream's PT layout),
converts it once on a local Ray (gzip, the storage format), serves it through the node-local cache (which
decompresses it once into a memory-mappable copy), then runs two
epochs of the train split through each loading path, the local ``JASPERSteeringDataset`` (DataLoader),
``read_jasper`` (Ray Data) and ``ShardedJasper`` (shard actors), and checks that each epoch delivered every
pair of the split exactly once. The first epoch's time includes the path's start-up (opening the files,
starting read tasks or actors); the second is the steady state, what a training run sees from then on.
``--dir s3://bucket/prefix`` (any ``pyarrow.fs`` URI) puts the converted dataset there and serves it from
there: with ``--address``, a cluster whose nodes share no filesystem.

The top floor but the CLI: it imports every front-end (Ray and torch), so only ``jasper-ray demo`` loads it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.data import DataContext

from ..conversion.parallel import convert
from ..formats import open_dataset
from ..local.loader import create_loader, set_epoch
from ..local.sampler import ResumableSampler
from ..ray_data import read_jasper
from ..ray_session import connect, shutdown
from ..schema import HDF5_FILE, PT_SUFFIX
from ..serve.client import ShardedJasper
from ..storage import is_uri
from .synth import pairs_for_size, parse_size, synth_dataset

log = logging.getLogger(__name__)
BATCH = 256
EPOCHS = 2  # the first includes start-up; the second is the steady state


@dataclass
class EpochResult:
    seconds: float
    samples: int
    complete: bool  # every pair of the split, exactly once

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else float("inf")


@dataclass
class PathResult:
    name: str
    epochs: list[EpochResult] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return len(self.epochs) == EPOCHS and all(e.complete for e in self.epochs)


@dataclass
class DemoSummary:
    directory: Path
    n_pairs: int
    split_size: int
    pt_bytes: int
    steps: list[tuple[str, float, str]] = field(default_factory=list)
    paths: list[PathResult] = field(default_factory=list)
    removed: bool = False  # the demo's own temporary directory, removed at its end

    @property
    def ok(self) -> bool:
        return all(p.complete for p in self.paths) and len(self.paths) == 3

    def table(self) -> str:
        lines = [
            f"jasper_ray demo in {self.directory}{' (removed at the end)' if self.removed else ''}: "
            f"{self.n_pairs} pairs, {self.pt_bytes / 1e6:.0f} MB of PT files",
            "",
            f"{'step':<40} {'seconds':>8}  result",
        ]
        lines += [f"{what:<40} {seconds:>8.2f}  {detail}" for what, seconds, detail in self.steps]
        lines += [
            "",
            f"{'train split through':<40} {'1st epoch (with start-up)':>27}  {'2nd epoch (steady)':>27}",
            f"{'':<40} {'seconds':>10} {'samples/s':>16}  {'seconds':>10} {'samples/s':>16}  whole split",
        ]
        for p in self.paths:
            timings = "  ".join(f"{e.seconds:>10.3f} {e.samples_per_s:>16,.0f}" for e in p.epochs)
            counts = ", ".join(f"{e.samples}/{self.split_size}" for e in p.epochs)
            lines.append(f"{p.name:<40} {timings}  {'yes' if p.complete else 'NO'} ({counts})")
        return "\n".join(lines)


Epochs = Generator[Iterable[Mapping[str, Any]], None, None]  # a path: its start-up, then one item per epoch


def _run_path(name: str, epochs: Epochs, split_ids: np.ndarray) -> PathResult:
    """Time each epoch that ``epochs`` yields; the first step of ``epochs`` starts the path, so the first
    epoch's time includes the start-up. The path is closed (actors stopped) whatever happens."""
    result = PathResult(name)
    want = np.sort(split_ids)
    with contextlib.closing(epochs):
        started = time.perf_counter()
        for batches in epochs:
            seen = [np.asarray(batch["pair_id"]) for batch in batches]
            seconds = time.perf_counter() - started
            ids = np.sort(np.concatenate(seen)) if seen else np.empty(0, np.int64)
            result.epochs.append(EpochResult(seconds, len(ids), np.array_equal(ids, want)))
            started = time.perf_counter()
    return result


def _local_epochs(directory: str | Path, split: np.ndarray, cache_dir: Path) -> Epochs:
    loader = create_loader(
        directory, "train", BATCH, drop_last=False, pin_memory=False, use_mmap=True, cache_dir=cache_dir
    )
    sampler = loader.sampler
    for epoch in range(EPOCHS):
        set_epoch(loader, epoch)
        # Pair ids are not part of upstream's sample: recover them from the sampler's order.
        order = sampler.epoch_indices() if isinstance(sampler, ResumableSampler) else np.arange(len(split))
        yield _with_pair_ids(loader, split[order])


def _with_pair_ids(batches: Iterable[dict[str, Any]], pair_ids: np.ndarray) -> Iterator[dict[str, Any]]:
    at = 0
    for batch in batches:
        n = len(batch["steering_variant"])
        yield {"pair_id": pair_ids[at : at + n], **batch}
        at += n


def _read_jasper_epochs(directory: str | Path, cache_dir: Path) -> Epochs:
    dataset = read_jasper(directory, "train", epoch=0, cache_dir=cache_dir)  # each pass over it is the next epoch
    for _ in range(EPOCHS):
        yield dataset.iter_torch_batches(batch_size=BATCH)


def _sharded_epochs(directory: str | Path, cpus: int, cache_dir: Path) -> Epochs:
    with ShardedJasper(
        directory, "train", batch_size=BATCH, num_shards=2, num_cpus=min(1.0, cpus / 4), cache_dir=str(cache_dir)
    ) as service:
        for epoch in range(EPOCHS):
            service.set_epoch(epoch)
            yield service


def run_demo(
    size: str = "1GB",
    *,
    workers: int | None = None,
    address: str | None = None,
    directory: str | os.PathLike | None = None,
    dim: int = 768,
    n_neg: int = 12,
    progress: bool = True,
) -> DemoSummary:
    """Synthesise ``size`` of data, convert it on Ray and read two epochs through each path; the summary
    says how long each epoch took and whether each delivered the whole split. ``directory`` may be a URI:
    the converted dataset goes there (the PT files and the cache go in a local temporary directory). Without a
    local ``directory``, the demo's own temporary directory (GBs: the PT files, dataset.h5, the cache's copy) is
    removed at its end."""
    remote = str(directory).rstrip("/") if directory is not None and is_uri(str(directory)) else None
    if directory and remote is None:
        return _run_demo(Path(directory), None, size, workers, address, dim, n_neg, progress)
    with tempfile.TemporaryDirectory(prefix="jasper-demo-") as temp:
        summary = _run_demo(Path(temp), remote, size, workers, address, dim, n_neg, progress)
    summary.removed = True
    return summary


def _run_demo(
    base: Path,
    remote: str | None,
    size: str,
    workers: int | None,
    address: str | None,
    dim: int,
    n_neg: int,
    progress: bool,
) -> DemoSummary:
    pt_dir, cache_dir = base / "pt", base / "cache"
    # Where the converted dataset lives and is served from: beside the PT files, or at the URI.
    store: str | Path = remote or pt_dir
    n_pairs = pairs_for_size(parse_size(size), dim, n_neg)

    t = time.perf_counter()
    synth_dataset(pt_dir, n_pairs, dim, n_neg, seed=0)
    pt_bytes = sum(p.stat().st_size for p in pt_dir.glob(f"*{PT_SUFFIX}"))
    summary = DemoSummary(base, n_pairs, 0, pt_bytes)
    summary.steps.append(("synthesise (upstream PT layout)", time.perf_counter() - t, f"D={dim}, n_neg={n_neg}"))

    started_ray = connect(address, num_cpus=workers)
    DataContext.get_current().enable_progress_bars = progress
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-stage INFO lines would bury the summary
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        output = f"{store}/{HDF5_FILE}" if remote else pt_dir / HDF5_FILE
        report = convert(pt_dir, compression="gzip", output=output, progress=progress, cache_dir=cache_dir)
        summary.steps.append(
            (
                f"convert on Ray, {cpus} CPUs -> gzip",
                report.seconds,
                f"{report.output_bytes / 1e6:.0f} MB ({report.saving_percent:.1f}% saved, "
                f"{report.mb_per_s:.0f} MB/s, {report.shards} shards; storage{', uploaded' if remote else ''})",
            )
        )
        t = time.perf_counter()
        with open_dataset(store, "hdf5", cache_dir=cache_dir, progress=progress) as served:
            split_ids = np.asarray(served.split("train"))
            mapped = served.nbytes_on_disk()
        summary.steps.append(
            (
                "fetch + decompress into the cache" if remote else "decompress into the node-local cache",
                time.perf_counter() - t,
                f"{mapped / 1e6:.0f} MB contiguous, checksums checked; memory-mapped from now on",
            )
        )
        summary.split_size = len(split_ids)
        for name, epochs in (
            ("local JASPERSteeringDataset (DataLoader)", _local_epochs(store, split_ids, cache_dir)),
            ("read_jasper (Ray Data)", _read_jasper_epochs(store, cache_dir)),
            ("ShardedJasper (2 shard actors)", _sharded_epochs(store, cpus, cache_dir)),
        ):
            summary.paths.append(_run_path(name, epochs, split_ids))
    finally:
        if started_ray:
            shutdown()
    return summary
