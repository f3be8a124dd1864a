"""Tensor checksums that do not depend on how the tensor was written.

A tensor's checksum is the sha256 of the concatenated sha256 digests of its
fixed row blocks (``block_rows`` rows each, ~16 MiB, a whole number of HDF5
chunks). The single-process writer, each parallel shard (whose boundaries
are block-aligned) and ``verify`` all get the same value, so shards can be
checksummed in parallel and combined without rereading anything.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

from .chunks import rows_per_chunk

BLOCK_BYTES = 16 << 20


def block_rows(shape: tuple[int, ...], itemsize: int) -> int:
    """Rows per checksum block: a multiple of the HDF5 chunk rows, about ``BLOCK_BYTES``."""
    chunk = rows_per_chunk(shape, itemsize)
    row_bytes = max(1, itemsize * int(np.prod(shape[1:], dtype=np.int64)))
    return chunk * max(1, BLOCK_BYTES // (chunk * row_bytes))


class BlockHasher:
    """Digests per block of ``block_rows`` rows, fed any sequence of consecutive row ranges."""

    def __init__(self, block_rows: int, row_bytes: int):
        self.block_bytes = max(1, block_rows * row_bytes)
        self.digests: list[bytes] = []
        self._h = hashlib.sha256()
        self._filled = 0

    def update(self, rows: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(rows)).cast("B")
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
