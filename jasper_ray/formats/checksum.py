"""Tensor checksums that do not depend on how the tensor was written, and the one way to verify them.

A tensor's checksum is the sha256 of the concatenated sha256 digests of its
fixed row blocks (``block_rows`` rows each, ~16 MiB, a whole number of HDF5
chunks). The single-process writer, each parallel conversion piece (whose
boundaries are block-aligned) and ``verify`` all get the same value, so pieces
can be checksummed in parallel and combined without rereading anything.

``verify_checksums`` is written once, here: a reader lists what it recorded
(``RecordedChecksum``: where, how to open the rows, block rows, the value) and
this module rehashes. No h5py here: the rows are any row-sliceable array.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from ..errors import DatasetFormatError
from .arrays import RowArray
from .chunks import rows_per_chunk

BLOCK_BYTES = 16 << 20


def block_rows(shape: tuple[int, ...], itemsize: int) -> int:
    """Rows per checksum block: a multiple of the HDF5 chunk rows, about ``BLOCK_BYTES``."""
    chunk = rows_per_chunk(shape, itemsize)
    row_bytes = max(1, itemsize * int(np.prod(shape[1:], dtype=np.int64)))
    return chunk * max(1, BLOCK_BYTES // (chunk * row_bytes))


def row_nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Bytes of one row of a tensor of ``shape`` and ``dtype``."""
    return np.dtype(dtype).itemsize * int(np.prod(shape[1:], dtype=np.int64))


class BlockHasher:
    """Digests per block of ``block_rows`` rows, fed any sequence of consecutive row ranges."""

    def __init__(self, block_rows: int, row_bytes: int):
        self.block_bytes = max(1, block_rows * row_bytes)
        self.digests: list[bytes] = []
        self._h = hashlib.sha256()
        self._filled = 0

    @classmethod
    def for_tensor(cls, shape: tuple[int, ...], dtype: np.dtype) -> BlockHasher:
        """The hasher of a whole tensor, or of any block-aligned run of its rows."""
        return cls(block_rows(shape, np.dtype(dtype).itemsize), row_nbytes(shape, dtype))

    def update(self, rows: np.ndarray) -> None:
        data = np.ascontiguousarray(rows).data.cast("B")
        pos = 0
        while pos < len(data):
            take = min(self.block_bytes - self._filled, len(data) - pos)
            self._h.update(data[pos : pos + take])
            self._filled += take
            pos += take
            if self._filled == self.block_bytes:
                self.digests.append(self._h.digest())
                self._h, self._filled = hashlib.sha256(), 0

    def finish(self) -> list[bytes]:
        if self._filled:
            self.digests.append(self._h.digest())
            self._h, self._filled = hashlib.sha256(), 0
        return self.digests


def combine(digests: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for d in digests:
        h.update(d)
    return h.hexdigest()


def block_digests(
    rows: RowArray, block_rows: int, row_bytes: int, on_block: Callable[[int], object] | None = None
) -> list[bytes]:
    """The digests of ``rows``, read ``block_rows`` at a time (``on_block`` gets each block's bytes)."""
    hasher = BlockHasher(block_rows, row_bytes)
    for start in range(0, rows.shape[0], block_rows):
        block = np.asarray(rows[start : start + block_rows])
        hasher.update(block)
        if on_block is not None:
            on_block(block.nbytes)
    return hasher.finish()


@dataclass(frozen=True)
class RecordedChecksum:
    """One checksum a dataset recorded: what ``verify_checksums`` needs to recompute it.

    ``where`` names the place in messages; ``open_rows`` opens the stored rows (a context manager, so a
    file opened for the check is closed after it); ``n_rows`` is how many rows it holds, known without
    opening them (a progress bar's total).
    """

    where: str
    open_rows: Callable[[], contextlib.AbstractContextManager[RowArray]]
    block_rows: int
    row_bytes: int
    recorded: str
    n_rows: int

    @property
    def nbytes(self) -> int:
        """The bytes ``verify_checksums`` hashes here (uncompressed: what its ``on_block`` counts)."""
        return self.n_rows * self.row_bytes


def verify_checksums(
    recorded: Iterable[RecordedChecksum], on_block: Callable[[int], object] | None = None
) -> list[str]:
    """Recompute every recorded checksum; return one message per place that does not match or cannot be read."""
    problems = []
    for entry in recorded:
        done = 0

        def count(nbytes: int) -> None:
            nonlocal done
            done += nbytes
            if on_block is not None:
                on_block(nbytes)

        try:
            opened = entry.open_rows()
            with opened as rows:
                try:
                    got = combine(block_digests(rows, entry.block_rows, entry.row_bytes, count))
                except OSError as exc:  # h5py cannot decode a damaged compressed chunk
                    row = done // max(1, entry.row_bytes)
                    problems.append(f"{entry.where}: cannot be decoded near row {row} ({exc})")
                    continue
        except (OSError, KeyError, DatasetFormatError) as exc:
            problems.append(f"{entry.where}: cannot be read ({exc})")
            continue
        if got != entry.recorded:
            problems.append(
                f"{entry.where}: checksum {got[:16]}... does not match "
                f"the recorded {entry.recorded[:16]}... (the stored bytes changed)"
            )
    return problems
