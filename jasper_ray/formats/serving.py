"""The serving copy: an HDF5 file (or shard) with every dataset contiguous, so it memory-maps.

Compressed HDF5 is for storage: a gathered batch decodes whole chunks per row
(0.003x of a mapped file). The node-local cache turns a compressed file into
this copy once, on first use, checking every recorded checksum on the bytes it
decoded (checksums cover the logical rows, not the encoding, so the same
values hold for both). A file already contiguous is only checked.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ChecksumError
from ..schema import ATTR_CHECKSUM, ATTR_CHECKSUM_BLOCK_ROWS, ATTR_COMPRESSION, COMPRESSION_NONE
from .checksum import BlockHasher, combine, row_nbytes
from .hdf5 import open_h5
from .hdf5_writer import BLOCK_BYTES, create_file


def _datasets(f: Any) -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    f.visititems(lambda name, obj: found.append((name, obj)) if hasattr(obj, "shape") else None)
    return found


def is_mappable(f: Any) -> bool:
    """Every dataset stored contiguous (no chunks, no filters): the file serves through ``np.memmap`` as it is."""
    return all(d.chunks is None for _, d in _datasets(f))


def _block_rows(dset: Any) -> int:
    return int(dset.attrs.get(ATTR_CHECKSUM_BLOCK_ROWS, max(1, dset.shape[0] if dset.shape else 1)))


def _stream(
    dset: Any, where: str, write: Callable[[int, np.ndarray], object] | None, on_bytes: Callable[[int], object] | None
) -> None:
    """Read ``dset`` in whole checksum blocks, hand each to ``write``, and check the recorded checksum."""
    recorded = dset.attrs.get(ATTR_CHECKSUM)
    if not dset.shape:  # a scalar: nothing to check, copied whole
        if write is not None:
            write(0, dset[()])
        return
    rows = _block_rows(dset)
    per_block = max(1, BLOCK_BYTES // max(1, rows * row_nbytes(dset.shape, dset.dtype))) * rows
    hasher = BlockHasher(rows, row_nbytes(dset.shape, dset.dtype))
    for start in range(0, dset.shape[0], per_block):
        try:
            block = dset[start : start + per_block]
        except OSError as exc:  # h5py cannot decode a damaged compressed chunk
            raise ChecksumError(f"{where}: tensor {dset.name} cannot be decoded near row {start} ({exc})") from exc
        if recorded is not None:
            hasher.update(block)
        if write is not None:
            write(start, block)
        if on_bytes is not None:
            on_bytes(block.nbytes)
    if recorded is not None:
        got = combine(hasher.finish())
        if got != recorded:
            raise ChecksumError(
                f"{where}: tensor {dset.name}: checksum {got[:16]}... does not match the recorded "
                f"{str(recorded)[:16]}... (the bytes fetched are corrupt; nothing was cached)"
            )


def check_file(path: Path, where: str, on_bytes: Callable[[int], object] | None = None) -> None:
    """Recompute every recorded checksum of the HDF5 file at ``path``; ``ChecksumError`` naming ``where``."""
    with open_h5(path) as f:
        for _, dset in _datasets(f):
            _stream(dset, where, None, on_bytes)


def serving_copy(src: Path, dest: Path, where: str, on_bytes: Callable[[int], object] | None = None) -> bool:
    """Make ``dest`` the contiguous, checked copy of ``src``; returns False (``dest`` untouched) when
    ``src`` is already contiguous (then ``check_file`` it and use it as it is)."""
    with open_h5(src) as f:
        if is_mappable(f):
            return False
        with create_file(dest) as out:
            for key, value in f.attrs.items():
                out.attrs[key] = value
            if ATTR_COMPRESSION in f.attrs:
                out.attrs[ATTR_COMPRESSION] = COMPRESSION_NONE

            def visit(name: str, obj: Any) -> None:
                if not hasattr(obj, "shape"):
                    group = out.require_group(name)
                    for key, value in obj.attrs.items():
                        group.attrs[key] = value
                    return
                copy = out.create_dataset(name, shape=obj.shape, dtype=obj.dtype)
                for key, value in obj.attrs.items():
                    copy.attrs[key] = value

                def write(start: int, block: np.ndarray) -> None:
                    if obj.shape:
                        copy[start : start + len(block)] = block
                    else:
                        copy[()] = block

                _stream(obj, where, write, on_bytes)

            f.visititems(visit)
    return True
