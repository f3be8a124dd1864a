"""Single-process HDF5 writer: streams any reader into one ``dataset.h5``.

Sources are read in row blocks through the reader (memory-mapped), so a
dataset larger than RAM converts. Every dataset gets the sha256 of its logical
bytes; the file gets the config and the fingerprint of its PT sources. The
file is written under a temporary name and published by rename only when
complete and synced. The parallel converter builds on the same pieces
(``tensor_jobs``, ``write_rows``, ``dataset_options``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_output
from ..fingerprint import fingerprint
from ..formats import open_dataset
from ..formats.base import Reader
from ..formats.checksum import BlockHasher, block_rows, combine
from ..formats.chunks import dataset_options
from ..formats.hdf5 import create_file, require_h5py
from ..schema import (
    ATTR_CHECKSUM,
    ATTR_CHECKSUM_BLOCK_ROWS,
    ATTR_CONFIG,
    ATTR_FINGERPRINT,
    ATTR_FORMAT_VERSION,
    ATTR_LAYOUT,
    FORMAT_VERSION,
    HDF5_FILE,
    KEYWORD_IDS,
)
from .plan import GROUP_MESSAGES, TensorJob, tensor_jobs

log = logging.getLogger(__name__)

BLOCK_BYTES = 64 << 20


def read_rows(reader: Reader, job: TensorJob, start: int, stop: int) -> np.ndarray:
    kind, _, name = job.source.partition(":")
    if kind == "tensor":
        block = reader.read(name, start, stop)
    elif kind == "split":
        block = reader.split(name)[start:stop]
    else:
        values, offsets = reader.keyword_csr()
        block = np.asarray((values if name == "values" else offsets)[start:stop])
    return np.ascontiguousarray(block, dtype=job.dtype)


def row_blocks(n_rows: int, row_bytes: int, align: int, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, int]]:
    """Row ranges of about ``block_bytes``, aligned to ``align`` rows (whole chunks)."""
    rows = max(align, (block_bytes // max(row_bytes, 1)) // align * align)
    for start in range(0, n_rows, rows):
        yield start, min(start + rows, n_rows)


def write_rows(
    dset: Any,
    reader: Reader,
    job: TensorJob,
    start: int,
    stop: int,
    hasher: BlockHasher | None = None,
    block_bytes: int = BLOCK_BYTES,
    on_block: Any = None,
    dest_start: int | None = None,
) -> int:
    """Copy rows ``start:stop`` of ``job`` from ``reader`` into ``dset`` (at ``dest_start``, default ``start``)."""
    row_bytes = job.nbytes // max(job.shape[0], 1)
    align = dset.chunks[0] if dset.chunks else 1
    offset = (start if dest_start is None else dest_start) - start
    for a, b in row_blocks(stop - start, row_bytes, align, block_bytes):
        block = read_rows(reader, job, start + a, start + b)
        if hasher is not None:
            hasher.update(block)
        dset[offset + start + a : offset + start + b] = block
        if on_block is not None:
            on_block(block.nbytes)
    return stop - start


def new_hasher(job: TensorJob) -> BlockHasher:
    return BlockHasher(block_rows(job.shape, job.dtype.itemsize), job.nbytes // max(job.shape[0], 1))


def set_checksum(dset: Any, job: TensorJob, digests: list[bytes]) -> None:
    dset.attrs[ATTR_CHECKSUM] = combine(digests)
    dset.attrs[ATTR_CHECKSUM_BLOCK_ROWS] = block_rows(job.shape, job.dtype.itemsize)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled)


@dataclass
class ConversionReport:
    """What a conversion did: sizes, wall time, and for Ray conversions the shards, reuse and assembly time."""

    output: Path
    source_bytes: int
    output_bytes: int
    seconds: float
    compression: str | None
    shards: int = 1
    shards_reused: int = 0
    assembly_seconds: float = 0.0
    results: dict = field(default_factory=dict, repr=False)

    @property
    def saving_percent(self) -> float:
        """Size saved against the PT files, in percent (negative when the output is larger)."""
        return (1 - self.output_bytes / self.source_bytes) * 100 if self.source_bytes else 0.0

    @property
    def mb_per_s(self) -> float:
        """PT megabytes converted per second of wall time."""
        return self.source_bytes / 1e6 / self.seconds if self.seconds else float("inf")

    def lines(self) -> list[str]:
        return [
            f"Conversion complete. HDF5 file saved to {self.output}",
            f"File sizes: PT format={self.source_bytes / 2**20:.1f} MB, HDF5={self.output_bytes / 2**20:.1f} MB "
            f"(compression: {self.saving_percent:.1f}%)",
            f"Wall time: {self.seconds:.2f} s ({self.mb_per_s:.1f} MB/s)"
            + (
                f", {self.shards} shards ({self.shards_reused} reused), assembly {self.assembly_seconds:.2f} s"
                if self.shards > 1
                else ""
            ),
        ]


def write_root_attrs(f: Any, config: dict, source_fingerprint: dict, compression: str | None) -> None:
    f.attrs[ATTR_FORMAT_VERSION] = FORMAT_VERSION
    f.attrs[ATTR_CONFIG] = json.dumps(config)
    f.attrs[ATTR_FINGERPRINT] = json.dumps(source_fingerprint)
    f.attrs["compression"] = compression or "none"
    f.require_group(KEYWORD_IDS.h5_group).attrs[ATTR_LAYOUT] = "csr"


def convert_pt_to_hdf5(
    dataset_dir: str | os.PathLike,
    compression: str | None = "gzip",
    compression_opts: Any = None,
    shuffle: bool = True,
    *,
    output: str | os.PathLike | None = None,
    validate: bool = True,
    progress: bool = True,
    block_bytes: int = BLOCK_BYTES,
) -> ConversionReport:
    """Convert a PT dataset directory into ``dataset.h5`` beside it, in one process.

    The PT files are kept. A crash leaves the previous ``dataset.h5`` (or
    none), never a partial file.
    """
    require_h5py()  # before any work, when h5py is missing
    from ..validate import validate_dataset

    dataset_dir = Path(dataset_dir)
    output = Path(output) if output is not None else dataset_dir / HDF5_FILE
    dataset_options((1, 1), np.dtype("float32"), compression, compression_opts, shuffle)  # reject bad options early
    reader = open_dataset(dataset_dir, storage_format="pt", use_mmap=True)
    log.info("Converting PT format to HDF5 in %s", dataset_dir)
    if validate:
        validate_dataset(reader, progress=progress)
    started = time.perf_counter()
    jobs = tensor_jobs(reader)
    with (
        atomic_output(output) as temp,
        create_file(temp) as f,
        _progress(sum(j.nbytes for j in jobs), progress, "convert") as bar,
    ):
        write_root_attrs(f, reader.config, fingerprint(reader.files()), compression)
        group = None
        for job in jobs:
            if job.h5_path.split("/")[0] != group:
                group = job.h5_path.split("/")[0]
                log.info(GROUP_MESSAGES[group])
            opts = dataset_options(job.shape, job.dtype, compression, compression_opts, shuffle)
            dset = f.create_dataset(job.h5_path, shape=job.shape, dtype=job.dtype, **opts)
            hasher = new_hasher(job)
            write_rows(dset, reader, job, 0, job.shape[0], hasher, block_bytes, bar.update)
            set_checksum(dset, job, hasher.finish())
    report = ConversionReport(
        output, reader.nbytes_on_disk(), output.stat().st_size, time.perf_counter() - started, compression
    )
    for line in report.lines():
        log.info(line)
    return report


__all__ = ["convert_pt_to_hdf5", "ConversionReport", "write_rows"]
