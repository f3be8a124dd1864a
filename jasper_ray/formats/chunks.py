"""The chunk policy every HDF5 writer uses: whole-row chunks when compressed, contiguous (mappable) when not.

Kept apart from the HDF5 reader and writer (no h5py here) because checksum
blocks are whole chunks: ``checksum`` needs the chunk shape, and the HDF5
layer needs checksums.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CHUNK_TARGET_BYTES = 64 << 10
# What h5py takes as ``compression_opts``: gzip's level, or a codec's tuple; None for the codec's default.
CompressionOpts = int | tuple[int, ...] | None


def rows_per_chunk(shape: tuple[int, ...], itemsize: int, target_bytes: int = CHUNK_TARGET_BYTES) -> int:
    """Whole-row chunks of about ``target_bytes``: one random row costs one small chunk."""
    row_bytes = itemsize * int(np.prod(shape[1:], dtype=np.int64))
    return int(max(1, min(max(shape[0], 1), target_bytes // max(row_bytes, 1))))


def dataset_options(
    shape: tuple[int, ...],
    dtype: np.dtype,
    compression: str | None,
    compression_opts: CompressionOpts = None,
    shuffle: bool = True,
) -> dict[str, Any]:
    """``create_dataset`` keyword arguments: contiguous when uncompressed (so it maps), row chunks otherwise."""
    if compression is not None and compression not in ("gzip", "lzf"):
        raise ValueError(f"compression must be 'gzip', 'lzf' or None, got {compression!r}")
    if compression is None or 0 in shape:
        # Nothing to compress in an empty tensor (a [0, D] keyword table), and HDF5 refuses
        # a chunk larger than a zero-length axis: store it contiguous.
        return {}
    chunks = (rows_per_chunk(shape, np.dtype(dtype).itemsize),) + tuple(max(1, s) for s in shape[1:])
    opts: dict[str, Any] = {"chunks": chunks, "compression": compression, "shuffle": bool(shuffle)}
    if compression_opts is not None:
        opts["compression_opts"] = compression_opts
    return opts


def check_options(compression: str | None, compression_opts: CompressionOpts = None, shuffle: bool = True) -> None:
    """Refuse bad compression options before any work or file (``dataset_options`` raises)."""
    dataset_options((1, 1), np.dtype("float32"), compression, compression_opts, shuffle)
