"""Publishing a conversion: pieces assembled into ``dataset.h5``, or renamed into the sharded layout.

Assembly copies the pieces' already-compressed chunks (``read_direct_chunk`` /
``write_direct_chunk``) and never re-encodes; uncompressed pieces are
contiguous and copied as bytes. The sharded layout is the work directory
itself, renamed into place with its manifest written last.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..atomic import TEMP_MARK, atomic_output, fsync_dir
from ..formats.checksum import block_rows, combine
from ..formats.chunks import dataset_options
from ..formats.hdf5 import create_file, map_contiguous, require_h5py
from ..schema import FORMAT_VERSION, MANIFEST
from .pieces import ShardResult
from .plan import ConversionPlan
from .writer import set_checksum, write_root_attrs

# --- assembly --------------------------------------------------------------------------------


def _chunk_offsets(rows: int, chunk_rows: int, ndim: int) -> Iterator[tuple[int, ...]]:
    for start in range(0, rows, chunk_rows):
        yield (start,) + (0,) * (ndim - 1)


def copy_shard(src: Any, dst: Any, dest_start: int, src_path: Path) -> int:
    """Copy a shard dataset into rows ``dest_start:`` of ``dst``: compressed chunks as they are, else bytes."""
    rows = src.shape[0]
    if dst.chunks is not None:
        for offset in _chunk_offsets(rows, dst.chunks[0], len(dst.shape)):
            mask, data = src.id.read_direct_chunk(offset)
            dst.id.write_direct_chunk((dest_start + offset[0],) + offset[1:], data, mask)
    elif rows:
        mapped = map_contiguous(src_path, src)
        step = max(1, (64 << 20) // max(1, mapped[:1].nbytes))
        for a in range(0, rows, step):
            dst[dest_start + a : dest_start + min(a + step, rows)] = mapped[a : a + step]
    return src.id.get_storage_size()


def check_free_space(output: Path, shard_bytes: int) -> None:
    """Refuse to start a file that cannot fit: HDF5 does not survive a disk filling up mid-write.

    The assembled file holds the shards' chunks and less metadata than they do, so the shard files'
    total (plus a margin) bounds it. A disk filled by someone else during assembly still fails in HDF5.
    """
    need = shard_bytes + (1 << 20)
    free = shutil.disk_usage(output.parent).free
    if free < need:
        raise OSError(
            errno.ENOSPC,
            f"No space left on device to assemble {output}: it needs up to {need / 2**20:.1f} MiB, "
            f"{free / 2**20:.1f} MiB are free",
        )


def assemble_single(
    plan: ConversionPlan,
    work_dir: Path,
    output: Path,
    results: dict[str, ShardResult],
    on_bytes: Callable[[int], Any] | None = None,
) -> None:
    """Build ``output`` from the shard files by chunk copy, publish it atomically."""
    h5py = require_h5py()
    check_free_space(output, sum((work_dir / s.file_name).stat().st_size for s in plan.shards))
    with atomic_output(output) as temp, create_file(temp) as f:
        write_root_attrs(f, plan.config, plan.source_fingerprint, plan.compression)
        for job in plan.jobs:
            opts = dataset_options(job.shape, job.dtype, plan.compression, plan.compression_opts, plan.shuffle)
            dst = f.create_dataset(job.h5_path, shape=job.shape, dtype=job.dtype, **opts)
            digests: list[bytes] = []
            for shard in plan.shards_of(job):
                path = work_dir / shard.file_name
                with h5py.File(path, "r", locking=False) as sf:
                    copied = copy_shard(sf[job.h5_path], dst, shard.start, path)
                digests += [bytes.fromhex(d) for d in results[shard.shard_id].digests]
                if on_bytes is not None:
                    on_bytes(copied)
            set_checksum(dst, job, digests)


# --- the sharded layout ------------------------------------------------------------------------


def manifest_for(plan: ConversionPlan, work_dir: Path, results: dict[str, ShardResult]) -> dict[str, Any]:
    tensors = []
    for job in plan.jobs:
        shards = plan.shards_of(job)
        digests = [bytes.fromhex(d) for s in shards for d in results[s.shard_id].digests]
        tensors.append(
            {
                "h5_path": job.h5_path,
                "shape": list(job.shape),
                "dtype": job.dtype.str,
                "checksum": combine(digests),
                "checksum_block_rows": block_rows(job.shape, job.dtype.itemsize),
                "shards": [
                    {
                        "file": s.file_name,
                        "start": s.start,
                        "stop": s.stop,
                        "bytes": (work_dir / s.file_name).stat().st_size,
                        "checksum": combine(bytes.fromhex(d) for d in results[s.shard_id].digests),
                    }
                    for s in shards
                ],
            }
        )
    return {
        "format_version": FORMAT_VERSION,
        "layout": "sharded",
        "compression": plan.compression or "none",
        "config": plan.config,
        "source_fingerprint": plan.source_fingerprint,
        "tensors": tensors,
    }


def publish_sharded(plan: ConversionPlan, work_dir: Path, final_dir: Path, results: dict[str, ShardResult]) -> None:
    """Turn the work directory into ``final_dir`` (shards + manifest) with directory renames."""
    manifest = manifest_for(plan, work_dir, results)
    for leftover in ("plan.json", "lock"):
        (work_dir / leftover).unlink(missing_ok=True)
    with atomic_output(work_dir / MANIFEST) as temp:
        temp.write_text(json.dumps(manifest, indent=1))
    old = final_dir.with_name(f".{final_dir.name}.old{TEMP_MARK}{os.getpid()}")
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(work_dir, final_dir)
    fsync_dir(final_dir.parent)
    if old.exists():
        shutil.rmtree(old)
