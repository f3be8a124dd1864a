"""The HDF5 writer: every HDF5 file jasper_ray writes is made here.

A file gets aligned objects (``hdf5_files.ALIGNMENT``), the chunk policy
(``chunks.dataset_options``), its datasets streamed in row blocks from any row
array (a dataset larger than RAM converts: readers hand out mapped or chunked
rows), a sha256 per dataset (``checksum``), the config and source fingerprint
as root attributes, and an atomic publish (temp name, fsync, rename).

A conversion's pieces are *part files*: rows ``start:stop`` of one dataset,
with the final file's chunk shape and filters and the block digests of their
rows, written into disk space reserved for their largest size first
(``write_part``; ``HDF5Writer``'s ``size_bound``); assembly moves their compressed chunks into the final file
without re-encoding (``HDF5Writer.copy_part``). Layout in ``hdf5``'s docstring;
names in ``schema``. h5py is imported on first use (``require_h5py``).
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from ..atomic import atomic_output, start_writeback
from ..schema import (
    ATTR_BLOCK_DIGESTS,
    ATTR_CHECKSUM,
    ATTR_CHECKSUM_BLOCK_ROWS,
    ATTR_COMPRESSION,
    ATTR_CONFIG,
    ATTR_FAST_DIGESTS,
    ATTR_FINGERPRINT,
    ATTR_FINITE,
    ATTR_FORMAT_VERSION,
    ATTR_LAYOUT,
    ATTR_PIECE_START,
    ATTR_PIECE_STOP,
    ATTR_PRECISION,
    COMPRESSION_NONE,
    FORMAT_VERSION,
    KEYWORD_IDS,
    LAYOUT_CSR,
    PRECISION_FLOAT32,
    SPLIT_DTYPE,
    TENSOR,
    split_h5_path,
)
from .arrays import RowArray, will_need
from .base import Reader, Writer
from .checksum import (
    SHA256_SIZE,
    BlockDigests,
    BlockHasher,
    block_digests,
    block_rows,
    digests_attr,
    row_nbytes,
    split_digests,
)
from .chunks import CompressionOpts, check_options, dataset_options
from .columns import Column, columns
from .hdf5 import map_contiguous, require_h5py
from .hdf5_files import begin_file, create_file, file_size_bound, write_plainly
from .precision import check_precision, encode, is_16bit, mark_precision, precision_of, stored_dtype
from .verified import check_finite

# Rows are streamed in blocks of about this many bytes (whole chunks).
BLOCK_BYTES = 64 << 20
# Block digests kept per dataset (attributes: HDF5's compact attributes hold < 64 KiB each, so up to ~30 GiB of
# a tensor); a larger tensor keeps only its checksum, and first-touch reads check it whole.
MAX_BLOCK_DIGESTS = 1800
COPY_BYTES = 64 << 20  # uncompressed part files are copied in runs of about this many bytes


def row_blocks(n_rows: int, row_bytes: int, align: int, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, int]]:
    """Row ranges of about ``block_bytes``, aligned to ``align`` rows (whole chunks)."""
    rows = max(align, (block_bytes // max(row_bytes, 1)) // align * align)
    for start in range(0, n_rows, rows):
        yield start, min(start + rows, n_rows)


def write_rows(
    dset: Any,
    rows: RowArray,
    start: int,
    stop: int,
    hasher: BlockHasher | None = None,
    block_bytes: int = BLOCK_BYTES,
    on_block: Callable[[int], object] | None = None,
    dest_start: int | None = None,
    refuse_nonfinite: str = "",
) -> int:
    """Copy ``rows[start:stop]`` into ``dset`` (at ``dest_start``, default ``start``) in blocks of whole chunks,
    each cast to the dataset's dtype (float rows into a 16-bit dataset: encoded, NOTE [16-bit storage] in
    ``precision``) and fed to ``hasher``; return the number of rows. ``refuse_nonfinite``: a value that is not
    finite raises a ValidationError naming it there (NOTE [floats checked as written] in ``validate``)."""
    row_bytes = row_nbytes(tuple(dset.shape), dset.dtype)
    align = dset.chunks[0] if dset.chunks else 1
    offset = (start if dest_start is None else dest_start) - start
    precision = precision_of(dset.dtype) if is_16bit(dset.dtype) and np.dtype(rows.dtype).kind == "f" else None
    where = str(getattr(dset, "name", "") or getattr(dset, "path", "")).lstrip("/")
    for a, b in row_blocks(stop - start, row_bytes, align, block_bytes):
        will_need(rows, start + a, start + b)
        if precision is None:
            block = np.ascontiguousarray(rows[start + a : start + b], dtype=dset.dtype)
        else:
            block = encode(rows[start + a : start + b], precision, where, start + a)
        if hasher is not None:
            hasher.update(block)
        if refuse_nonfinite and (hasher is None or hasher.digests.finite is False):
            check_finite(refuse_nonfinite, block, start + a)
        dset[offset + start + a : offset + start + b] = block
        if on_block is not None:
            on_block(block.nbytes)
    return stop - start


class HDF5Writer(Writer):
    """Writes ``path`` (``dataset.h5``, or a part file), published when the block succeeds.

    HDF5 cannot recover from a write failing mid-file (ENOSPC at close leaves the library in a state that
    segfaults the process later, h5py#914). So a writer that knows the most its file can take names it,
    ``size_bound``: that much disk is reserved before HDF5 writes a byte (``atomic.reserve_space``), and
    HDF5 trims the file to its end when it closes it. Where nothing can be reserved, a file small enough to
    hold in RAM (``in_memory_fallback``: a conversion's piece) is built there and written with plain file
    I/O at the end, where a full disk fails cleanly; others are written as they go. Not ``durable``:
    published unsynced. ``on_bytes`` gets the bytes of each block written (a progress bar).
    ``precision``: how ``write_tensor`` and ``write_from`` store the reducible tensors (NOTE [16-bit
    storage] in ``precision``); ``write_column`` stores the given dtype.
    """

    storage_format = "hdf5"

    def __init__(
        self,
        path: str | os.PathLike,
        compression: str | None = "gzip",
        compression_opts: CompressionOpts = None,
        shuffle: bool = True,
        *,
        block_bytes: int = BLOCK_BYTES,
        on_bytes: Callable[[int], object] | None = None,
        size_bound: int | None = None,
        in_memory_fallback: bool = False,
        precision: str = PRECISION_FLOAT32,
        durable: bool = True,
    ):
        check_options(compression, compression_opts, shuffle)
        self.precision = check_precision(precision)
        self.path = Path(path)
        self.compression, self.compression_opts, self.shuffle = compression, compression_opts, shuffle
        self.block_bytes, self.on_bytes = block_bytes, on_bytes
        self.size_bound, self.in_memory_fallback = size_bound, in_memory_fallback
        self.durable = durable
        self._file: Any = None
        self._dataset: Any = None  # the last dataset created, open until the next one exists (see create_dataset)
        self._image: io.BytesIO | None = None
        self._temp = self.path
        self._publish = contextlib.ExitStack()

    def __enter__(self) -> HDF5Writer:
        with contextlib.ExitStack() as stack:
            self._temp = temp = stack.enter_context(atomic_output(self.path, self.durable))
            reserved = begin_file(temp, self.size_bound)
            if self.size_bound is not None and not reserved and self.in_memory_fallback:
                self._image = io.BytesIO()
                self._file = create_file(self._image)
            else:
                self._file = stack.enter_context(create_file(temp, reopen=True))  # HDF5 trims it at close
            self._publish = stack.pop_all()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        file, self._file = self._file, None
        image, self._image = self._image, None
        if image is not None:
            file.close()  # the image is complete only now
            if exc_type is None:
                try:
                    write_plainly(self._temp, image.getbuffer())
                except BaseException:
                    self._publish.__exit__(*sys.exc_info())  # removes the temp file
                    raise
        elif exc_type is not None:
            # h5py objects go before the file: a dataset freed after its file failed to close (a full disk)
            # segfaults the process (h5py#914).
            self._dataset = None
            gc.collect()
        try:
            self._publish.__exit__(exc_type, exc, tb)  # closes the file, then publishes or removes it
        finally:
            self._dataset = None

    @property
    def file(self) -> Any:
        """The open ``h5py.File`` (inside the ``with`` block only)."""
        if self._file is None:
            raise RuntimeError(f"{self.path}: the writer is not open (use it in a with block)")
        return self._file

    # --- the Writer contract ----------------------------------------------------------------
    def write_config(self, config: Mapping[str, Any], source_fingerprint: Mapping[str, Any] | None = None) -> None:
        """Root attributes: format version, config, source fingerprint, compression, precision (16-bit only:
        float32 files stay byte for byte what earlier versions wrote); the keyword group's layout."""
        f = self.file
        f.attrs[ATTR_FORMAT_VERSION] = FORMAT_VERSION
        f.attrs[ATTR_CONFIG] = json.dumps(dict(config))
        f.attrs[ATTR_FINGERPRINT] = json.dumps(dict(source_fingerprint) if source_fingerprint is not None else None)
        f.attrs[ATTR_COMPRESSION] = self.compression or COMPRESSION_NONE
        if self.precision != PRECISION_FLOAT32:
            f.attrs[ATTR_PRECISION] = self.precision
        f.require_group(KEYWORD_IDS.h5_group).attrs[ATTR_LAYOUT] = LAYOUT_CSR

    def write_tensor(self, name: str, rows: RowArray) -> None:
        self.write_column(TENSOR[name].h5_path, rows, stored_dtype(name, self.precision))

    def write_keyword_ids(self, values: RowArray, offsets: np.ndarray) -> None:
        """CSR under the keyword group: ``values``, then ``offsets``."""
        self.write_column(KEYWORD_IDS.h5_values, values, KEYWORD_IDS.dtype)
        self.write_column(KEYWORD_IDS.h5_offsets, offsets, np.dtype("int64"))

    def write_split(self, split: str, ids: RowArray) -> None:
        self.write_column(split_h5_path(split), ids, SPLIT_DTYPE)

    def write_from(self, reader: Reader, source_fingerprint: Mapping[str, Any] | None = None) -> None:
        """All of ``reader``'s dataset, in the file's group order (``columns``), the config last (as converted)."""
        for column in columns(reader, self.precision):
            self.write_column(column.h5_path, column.rows(reader), column.dtype)
        self.write_config(reader.config, source_fingerprint)

    # --- datasets ------------------------------------------------------------------------------
    def create_dataset(self, h5_path: str, shape: tuple[int, ...], dtype: np.dtype, rows: int | None = None) -> Any:
        """A dataset for a tensor of ``shape``, with the chunk policy. ``rows`` makes it hold only that many
        rows (a part), with the whole tensor's chunk shape and filters: then a short last part keeps whole
        chunks (it is resizable along rows) and assembly can copy the chunks as they are."""
        opts = dataset_options(shape, dtype, self.compression, self.compression_opts, self.shuffle)
        if rows is not None and opts:
            opts["maxshape"] = (None,) + shape[1:]
        stored = shape if rows is None else (rows,) + shape[1:]
        dset = mark_precision(self.file.create_dataset(h5_path, shape=stored, dtype=dtype, **opts))
        # The previous dataset stays open until this one exists: closing a dataset flushes its chunk cache,
        # and when that happens decides where HDF5 puts the chunks. Kept so, files stay byte for byte
        # what earlier versions wrote.
        self._dataset = dset
        return dset

    def write_column(self, h5_path: str, rows: RowArray, dtype: np.dtype, refuse_nonfinite: str = "") -> Any:
        """A whole dataset from ``rows`` (streamed in blocks), with its checksum (``write_rows``)."""
        shape = tuple(rows.shape)
        dset = self.create_dataset(h5_path, shape, dtype)
        hasher = BlockHasher.for_tensor(shape, dtype)
        written = self._block_written
        write_rows(dset, rows, 0, shape[0], hasher, self.block_bytes, written, refuse_nonfinite=refuse_nonfinite)
        self.set_checksum(dset, hasher.finish())
        # Its chunks reach the file now, where a failing write (a full disk) raises here: left to the next
        # dataset's creation it would fail inside h5py's object cleanup, unraised, and crash later (h5py#914).
        dset.id.flush()
        return dset

    def _send_to_disk(self) -> None:
        """A block or a part is in the file: the disk starts on it (``start_writeback``) while more is written,
        so publishing the file waits on its last blocks only (an fsync of 1 GB written as fast as this waits
        0.5 s). Not for files published unsynced, nor for an image in memory."""
        if self.durable and self._image is None:
            start_writeback(self.file.id.get_vfd_handle())

    def _block_written(self, nbytes: int) -> None:
        self._send_to_disk()
        if self.on_bytes is not None:
            self.on_bytes(nbytes)

    @staticmethod
    def set_checksum(dset: Any, digests: BlockDigests) -> None:
        """The dataset's checksum, combined from the digests of its blocks (in row order), and the block
        digests themselves (what first-touch reads check: NOTE [fast block digests] in checksum)."""
        dset.attrs[ATTR_CHECKSUM] = digests.checksum()
        dset.attrs[ATTR_CHECKSUM_BLOCK_ROWS] = block_rows(tuple(dset.shape), dset.dtype.itemsize)
        if len(digests.sha256) <= MAX_BLOCK_DIGESTS:
            set_block_digests(dset, digests)

    def copy_part(self, dset: Any, part: Path, dest_start: int) -> int:
        """Rows of part file ``part`` into ``dset`` from ``dest_start``: compressed chunks as they are stored
        (never re-encoded), uncompressed rows as bytes. Returns the part's stored bytes."""
        h5py = require_h5py()
        with h5py.File(part, "r", locking=False) as f:
            src = f[dset.name]
            rows = src.shape[0]
            if dset.chunks is not None:
                rest, read, write = (0,) * (len(dset.shape) - 1), src.id.read_direct_chunk, dset.id.write_direct_chunk
                for start in range(0, rows, dset.chunks[0]):  # ~30 us a chunk: no h5py properties in the loop
                    mask, data = read((start, *rest))
                    write((dest_start + start, *rest), data, mask)
            elif rows:
                mapped = map_contiguous(part, src)
                source = mapped if mapped is not None else src
                step = max(1, COPY_BYTES // max(1, row_nbytes(tuple(src.shape), src.dtype)))
                for a in range(0, rows, step):
                    dset[dest_start + a : dest_start + min(a + step, rows)] = source[a : a + step]
            stored = int(src.id.get_storage_size())
        self._send_to_disk()
        return stored


# --- part files -------------------------------------------------------------------------------------


def write_part(
    path: Path,
    column: Column,
    rows: RowArray,
    start: int,
    stop: int,
    compression: str | None,
    compression_opts: CompressionOpts = None,
    shuffle: bool = True,
    durable: bool = True,
    refuse_nonfinite: str = "",
) -> BlockDigests:
    """Write rows ``start:stop`` of ``column`` (``rows`` is the whole source array) as a part file (``write_rows``);
    return their block digests (``start`` is block-aligned, so they are the tensor's own). Synced if ``durable``."""
    bound = file_size_bound([(column.shape, column.dtype, stop - start)])
    with HDF5Writer(
        path, compression, compression_opts, shuffle, size_bound=bound, in_memory_fallback=True, durable=durable
    ) as writer:
        dset = writer.create_dataset(column.h5_path, column.shape, column.dtype, rows=stop - start)
        hasher = BlockHasher.for_tensor(column.shape, column.dtype)
        write_rows(dset, rows, start, stop, hasher, dest_start=0, refuse_nonfinite=refuse_nonfinite)
        digests = hasher.finish()
        set_block_digests(dset, digests)
        dset.attrs[ATTR_PIECE_START], dset.attrs[ATTR_PIECE_STOP] = start, stop
    return digests


def set_block_digests(dset: Any, digests: BlockDigests) -> None:
    """Both kinds of block digests as attributes of ``dset`` (the fast ones where there are any), and whether
    every value hashed was finite."""
    dset.attrs[ATTR_BLOCK_DIGESTS] = digests_attr(digests.sha256)
    if digests.fast:
        dset.attrs[ATTR_FAST_DIGESTS] = digests_attr(digests.fast)
    if digests.finite:
        dset.attrs[ATTR_FINITE] = np.uint8(1)


def part_digests(path: Path, column: Column, start: int, stop: int) -> BlockDigests | None:
    """The block digests of a complete part file whose rows hash to the sha256 digests it records, else None
    (the fast ones recomputed: a part written by an earlier version has none).

    Raises what reading raises (OSError, KeyError, ValueError) for a file that is not a readable part."""
    h5py = require_h5py()
    with h5py.File(path, "r", locking=False) as f:
        dset = f[column.h5_path]
        recorded = split_digests(dset.attrs[ATTR_BLOCK_DIGESTS], SHA256_SIZE) if dset.size else []
        if dset.shape[0] != stop - start:
            return None
        item = column.dtype.itemsize
        got = block_digests(dset, block_rows(column.shape, item), row_nbytes(column.shape, column.dtype))
    return got if got.sha256 == recorded else None
