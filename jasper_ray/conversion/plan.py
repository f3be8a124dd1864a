"""The plan of a conversion: every output dataset cut into pieces of work.

A plan splits every output dataset into row ranges aligned to checksum
blocks (themselves whole HDF5 chunks), of about ``shard_bytes`` each; small
tensors go whole. The same sources and options always give the same pieces
and the same key, so an interrupted conversion can find and reuse what it
finished. Plans hold paths, names and integers only: they travel to Ray tasks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..fingerprint import fingerprint
from ..formats.base import Reader
from ..formats.checksum import block_rows
from ..formats.chunks import dataset_options
from ..schema import FORMAT_VERSION, HDF5_FILE, KEYWORD_IDS, SHARDS_DIR, SPLIT_DTYPE, TENSORS, split_h5_path

# Upstream's progress lines, one per top-level group, in its order.
GROUP_MESSAGES = {
    "embeddings": "Converting embeddings...",
    "pair_data": "Converting pair data...",
    "negatives": "Converting negatives...",
    "steering": "Converting steering tensors...",
    "splits": "Converting split indices...",
}


@dataclass(frozen=True)
class TensorJob:
    """One HDF5 dataset to write: where it goes and how to read its rows from the source."""

    h5_path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    source: str  # "tensor:<name>", "split:<name>", "keywords:values", "keywords:offsets"

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def tensor_jobs(reader: Reader) -> list[TensorJob]:
    """Every dataset of the output file, in upstream's group order."""
    jobs = [TensorJob(s.h5_path, reader.shape(s.name), s.dtype, f"tensor:{s.name}") for s in TENSORS]
    values, offsets = reader.keyword_csr()
    jobs.append(TensorJob(KEYWORD_IDS.h5_values, (len(values),), KEYWORD_IDS.dtype, "keywords:values"))
    jobs.append(TensorJob(KEYWORD_IDS.h5_offsets, (len(offsets),), np.dtype("int64"), "keywords:offsets"))
    for split in reader.split_names():
        jobs.append(TensorJob(split_h5_path(split), (len(reader.split(split)),), SPLIT_DTYPE, f"split:{split}"))
    order = list(GROUP_MESSAGES)
    return sorted(jobs, key=lambda j: order.index(j.h5_path.split("/")[0]))


SHARD_BYTES = 256 << 20
ATTR_DIGESTS = "block_digests"


def work_dir_for(output: Path) -> Path:
    """Where shards of a conversion into ``output`` live until assembly (hidden: never auto-detected)."""
    return output.with_name(f".{output.name}.work")


@dataclass(frozen=True)
class Shard:
    shard_id: str
    h5_path: str
    start: int
    stop: int

    @property
    def file_name(self) -> str:
        return f"{self.shard_id}.h5"


@dataclass(frozen=True)
class ShardTask:
    """Everything one task needs: paths, names and integers, never data or handles."""

    dataset_dir: str
    work_dir: str
    shard: Shard
    job: TensorJob
    compression: str | None
    compression_opts: Any
    shuffle: bool


@dataclass
class ConversionPlan:
    dataset_dir: str
    compression: str | None
    compression_opts: Any
    shuffle: bool
    shard_bytes: int
    config: dict
    source_fingerprint: dict
    jobs: list[TensorJob]
    shards: list[Shard]
    key: str = field(default="")

    def __post_init__(self) -> None:
        if not self.key:
            body = json.dumps(self._body(), sort_keys=True, default=str)
            self.key = hashlib.sha256(body.encode()).hexdigest()[:16]

    def _body(self) -> dict[str, Any]:
        jobs = [
            {"h5_path": j.h5_path, "shape": list(j.shape), "dtype": j.dtype.str, "source": j.source} for j in self.jobs
        ]
        return {
            "format_version": FORMAT_VERSION,
            "compression": self.compression,
            "compression_opts": self.compression_opts,
            "shuffle": self.shuffle,
            "shard_bytes": self.shard_bytes,
            "config": self.config,
            "source_fingerprint": self.source_fingerprint,
            "jobs": jobs,
            "shards": [asdict(s) for s in self.shards],
        }

    def tasks(self, work_dir: Path) -> list[ShardTask]:
        job_of = {j.h5_path: j for j in self.jobs}
        return [
            ShardTask(
                self.dataset_dir,
                str(work_dir),
                s,
                job_of[s.h5_path],
                self.compression,
                self.compression_opts,
                self.shuffle,
            )
            for s in self.shards
        ]

    def shards_of(self, job: TensorJob) -> list[Shard]:
        return [s for s in self.shards if s.h5_path == job.h5_path]

    @property
    def total_bytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)


def plan_conversion(
    reader: Reader,
    compression: str | None = "gzip",
    compression_opts: Any = None,
    shuffle: bool = True,
    shard_bytes: int = SHARD_BYTES,
) -> ConversionPlan:
    """A deterministic plan: the same sources and options always give the same shards and key."""
    dataset_options((1, 1), np.dtype("float32"), compression, compression_opts, shuffle)  # reject bad options
    jobs = tensor_jobs(reader)
    shards = []
    for job in jobs:
        rows = job.shape[0]
        row_bytes = max(1, job.nbytes // max(rows, 1))
        block = block_rows(job.shape, job.dtype.itemsize)
        per_shard = block * max(1, shard_bytes // (block * row_bytes))
        starts = range(0, rows, per_shard) if rows else [0]
        for i, start in enumerate(starts):
            shards.append(
                Shard(
                    f"{len(shards):05d}-{job.h5_path.replace('/', '.')}-{i}",
                    job.h5_path,
                    start,
                    min(start + per_shard, rows),
                )
            )
    return ConversionPlan(
        str(reader.directory),
        compression,
        compression_opts,
        shuffle,
        int(shard_bytes),
        reader.config,
        fingerprint(reader.files()),
        jobs,
        shards,
    )


def default_output(dataset_dir: Path, layout: str) -> Path:
    return dataset_dir / (HDF5_FILE if layout == "single" else SHARDS_DIR)
