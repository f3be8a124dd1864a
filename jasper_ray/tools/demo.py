"""The main job on an embedded default: synthesise, convert in parallel, serve every way, report.

``jasper-ray demo`` needs no data and no cluster: it writes a synthetic dataset (upstream's PT layout),
converts it on a local Ray (gzip, the storage format; and contiguous, the serving format), then runs one
epoch of the train split through each loading path, the local ``JASPERSteeringDataset`` (DataLoader),
``read_jasper`` (Ray Data) and ``ShardedJasper`` (shard actors), and checks that each delivered every
pair of the split exactly once.

The top floor but the CLI: it imports every front-end (Ray and torch), so only ``jasper-ray demo`` loads it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.data import DataContext

from ..conversion.parallel import convert
from ..formats import open_dataset
from ..local.dataset import JASPERSteeringDataset
from ..local.loader import create_loader
from ..ray_data import read_jasper
from ..ray_session import connect
from ..schema import HDF5_FILE, PT_SUFFIX
from ..serve.client import ShardedJasper
from .synth import pairs_for_size, parse_size, synth_dataset

log = logging.getLogger(__name__)
BATCH = 256


@dataclass
class PathResult:
    name: str
    seconds: float
    samples: int
    complete: bool

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else float("inf")


@dataclass
class DemoSummary:
    directory: Path
    n_pairs: int
    split_size: int
    pt_bytes: int
    steps: list[tuple[str, float, str]] = field(default_factory=list)
    paths: list[PathResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(p.complete for p in self.paths) and len(self.paths) == 3

    def table(self) -> str:
        lines = [
            f"jasper_ray demo in {self.directory}: {self.n_pairs} pairs, {self.pt_bytes / 1e6:.0f} MB of PT files",
            "",
            f"{'step':<40} {'seconds':>8}  result",
        ]
        lines += [f"{what:<40} {seconds:>8.2f}  {detail}" for what, seconds, detail in self.steps]
        lines += ["", f"{'one epoch of train through':<40} {'seconds':>8}  {'samples/s':>10}  whole split"]
        lines += [
            f"{p.name:<40} {p.seconds:>8.2f}  {p.samples_per_s:>10,.0f}  "
            f"{'yes' if p.complete else 'NO'} ({p.samples}/{self.split_size})"
            for p in self.paths
        ]
        return "\n".join(lines)


def _epoch(name: str, batches: Iterable[Mapping[str, Any]], split_ids: np.ndarray) -> PathResult:
    started = time.perf_counter()
    seen = []
    for batch in batches:
        seen.append(np.asarray(batch["pair_id"]))
    seconds = time.perf_counter() - started
    ids = np.sort(np.concatenate(seen)) if seen else np.empty(0, np.int64)
    return PathResult(name, seconds, len(ids), np.array_equal(ids, np.sort(split_ids)))


def _local_batches(directory: Path) -> Iterator[dict[str, Any]]:
    loader = create_loader(directory, "train", BATCH, drop_last=False, pin_memory=False, use_mmap=True)
    split = JASPERSteeringDataset(directory, "train", validate=False).split_indices.numpy()
    order = iter(loader.sampler)
    for batch in loader:  # pair ids are not part of upstream's sample: recover them from the sampler's order
        positions = [next(order) for _ in range(len(batch["steering_variant"]))]
        yield {"pair_id": split[positions], **batch}


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
    """Synthesise ``size`` of data, convert it on Ray and read one epoch through each path; the summary
    says how long each took and whether each delivered the whole split."""
    base = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="jasper-demo-"))
    pt_dir, serve_dir = base / "pt", base / "serve"
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
        for compression, output, purpose in (
            ("gzip", pt_dir / HDF5_FILE, "storage"),
            (None, serve_dir / HDF5_FILE, "serving, memory-maps"),
        ):
            report = convert(pt_dir, compression=compression, output=output, progress=progress)
            summary.steps.append(
                (
                    f"convert on Ray, {cpus} CPUs -> {compression or 'contiguous'}",
                    report.seconds,
                    f"{report.output_bytes / 1e6:.0f} MB ({report.saving_percent:.1f}% saved, "
                    f"{report.mb_per_s:.0f} MB/s, {report.shards} shards; {purpose})",
                )
            )
        split_ids = open_dataset(serve_dir, "hdf5").split("train")
        summary.split_size = len(split_ids)
        summary.paths.append(_epoch("local JASPERSteeringDataset (DataLoader)", _local_batches(serve_dir), split_ids))
        summary.paths.append(
            _epoch(
                "read_jasper (Ray Data)",
                read_jasper(serve_dir, "train").iter_torch_batches(batch_size=BATCH),
                split_ids,
            )
        )
        with ShardedJasper(serve_dir, "train", batch_size=BATCH, num_shards=2, num_cpus=min(1.0, cpus / 4)) as service:
            summary.paths.append(_epoch("ShardedJasper (2 shard actors)", service, split_ids))
    finally:
        if started_ray:
            ray.shutdown()
    return summary
