"""Making new HDF5 files: where their objects start, and disk reserved for them before HDF5 writes.

HDF5 cannot recover from a write that fails mid-file (ENOSPC at close leaves the library in a state that
segfaults the process later, h5py#914). So a file jasper_ray makes starts as the empty file ``create_file``
makes, written with plain I/O, where a full disk fails cleanly; then, where its writer knows the most the file
can take (``file_size_bound``), that much disk is reserved (``atomic.reserve_space``) before HDF5 reopens the
file. Within it no write of HDF5's can meet a full disk, and HDF5 trims the unused rest when it closes the file.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..atomic import reserve_space
from .checksum import row_nbytes
from .chunks import rows_per_chunk
from .hdf5 import require_h5py

# Where each object of a file we write starts: a multiple of 64 bytes, so a mapped tensor is aligned
# for its dtype (numpy gathers unaligned int64 rows through a slow path, 20-70x slower) and its rows
# start on cache lines. HDF5 pads up to 63 bytes per object.
ALIGNMENT = 64
# What metadata can take beyond the chunks and their index (file_size_bound): a dataset's headers and attributes
# (at most hdf5_writer.MAX_BLOCK_DIGESTS block digests), and a file's superblock, groups and root attributes.
DATASET_METADATA_BYTES, FILE_METADATA_BYTES = 256 << 10, 1 << 20


def write_plainly(path: Path, data: bytes | memoryview) -> None:
    """``data`` as the whole of ``path``, with plain file I/O; an error names the file."""
    try:
        with open(path, "wb") as out:
            out.write(data)
    except OSError as err:
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err


@functools.cache
def empty_file_image() -> bytes:
    """The bytes of a new, empty HDF5 file as ``create_file`` makes it."""
    image = io.BytesIO()
    create_file(image).close()
    return image.getvalue()


def create_file(target: str | os.PathLike | BinaryIO, reopen: bool = False) -> Any:
    """A new HDF5 file for writing (``reopen``: one ``begin_file`` started), with ``ALIGNMENT``; unlocked
    (NOTE [prestarted workers], conversion.tasks)."""
    mode = "r+" if reopen else "w"
    return require_h5py().File(target, mode, alignment_threshold=1, alignment_interval=ALIGNMENT, locking=False)


def begin_file(path: Path, size_bound: int | None = None) -> bool:
    """Start a new HDF5 file at ``path`` as ``create_file`` makes it empty, written with plain I/O (a full disk
    fails here, outside HDF5: h5py#914), and reserve ``size_bound`` bytes of disk for it where the file system
    can (then True; HDF5 trims the rest when it closes the file). Open it with ``create_file(path, reopen=True)``:
    begun so, with or without a reservation, a file comes out the same, byte for byte."""
    write_plainly(path, empty_file_image())
    return size_bound is not None and reserve_space(path, size_bound)


def new_file(path: Path, size_bound: int) -> Any:
    """A new HDF5 file at ``path``, open for writing, in ``size_bound`` bytes of disk reserved where the file
    system can (``begin_file``): HDF5 then meets no full disk while it stays within them."""
    begin_file(path, size_bound)
    return create_file(path, reopen=True)


def file_size_bound(datasets: Iterable[tuple[tuple[int, ...], Any, int]]) -> int:
    """The most bytes a file of these datasets can take, each given as (its tensor's shape, dtype, rows held):
    their whole chunks uncompressed (HDF5 stores a chunk its filters would grow as it is), chunk indexes,
    each dataset's headers and attributes, and the file's own metadata (superblock, groups, root attributes)."""
    total = FILE_METADATA_BYTES
    for shape, dtype, rows in datasets:
        if shape:
            chunk = rows_per_chunk(shape, np.dtype(dtype).itemsize)
            stored = -(-rows // chunk) * chunk * row_nbytes(shape, np.dtype(dtype))
        else:
            stored = np.dtype(dtype).itemsize
        total += stored + stored // 256 + DATASET_METADATA_BYTES  # index, alignment: ~110 B a 64 KiB chunk
    return total
