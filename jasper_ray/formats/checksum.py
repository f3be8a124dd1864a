"""Tensor checksums that do not depend on how the tensor was written, and the one way to verify them.

A tensor's checksum is the sha256 of the concatenated sha256 digests of its
fixed row blocks (``block_rows`` rows each, ~16 MiB, a whole number of HDF5
chunks). The single-process writer, each parallel conversion piece (whose
boundaries are block-aligned) and ``verify`` all get the same value, so pieces
can be checksummed in parallel and combined without rereading anything.

NOTE [fast block digests]
Beside each block's sha256, ``BlockHasher`` records its xxh3-128 (``fast_digest``):
first-touch reads check that one (``formats.verified``), because sha256 runs at
~1.7 GB/s a core and made a first epoch cost ~2x an unverified one, where
xxh3-128 runs at ~20 GB/s (crc32: ~2.4-5.5 GB/s, measured on this machine).
It guards against changed bytes (disk, copy, a stray write), not against someone
who rewrites the file: they could rewrite its digests too. The hasher also notes
whether every value it hashed was finite (``BlockDigests.finite``): a writer
records that, and a block whose digest matches holds those same values, so
first-touch reads skip its NaN/inf scan. The tensor checksums
``jasper-ray verify`` recomputes stay sha256, as users were promised. Files
without fast digests (earlier versions) are checked with their sha256 digests.

``verify_checksums`` is written once, here: a reader lists what it recorded
(``RecordedChecksum``: where, how to open the rows, block rows, the value) and
this module rehashes. No h5py here: the rows are any row-sliceable array.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import xxhash

from ..errors import DatasetFormatError
from .arrays import RowArray, will_need
from .chunks import rows_per_chunk
from .precision import BFLOAT16_BITS

BLOCK_BYTES = 16 << 20
SHA256_SIZE = 32
FAST_DIGEST_SIZE = 16  # xxh3-128
# Values are scanned (and hashed, on first touch) this many bytes at a time: pieces that stay in the core's
# cache between the hash and the scan, and no mask the size of a block.
SCAN_BYTES = 512 << 10


def block_rows(shape: tuple[int, ...], itemsize: int) -> int:
    """Rows per checksum block: a multiple of the HDF5 chunk rows, about ``BLOCK_BYTES``."""
    chunk = rows_per_chunk(shape, itemsize)
    row_bytes = max(1, itemsize * int(np.prod(shape[1:], dtype=np.int64)))
    return chunk * max(1, BLOCK_BYTES // (chunk * row_bytes))


def row_nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Bytes of one row of a tensor of ``shape`` and ``dtype``."""
    return np.dtype(dtype).itemsize * int(np.prod(shape[1:], dtype=np.int64))


def fast_digest(data: bytes | memoryview) -> bytes:
    """The fast digest of a block's bytes (NOTE [fast block digests])."""
    return xxhash.xxh3_128_digest(data)


def scan_rows(n_rows: int, row_bytes: int) -> range:
    """Starts of ``SCAN_BYTES`` pieces of ``n_rows`` rows (at least one row each)."""
    return range(0, n_rows, max(1, SCAN_BYTES // max(1, row_bytes)))


def all_finite(values: np.ndarray) -> bool:
    """No NaN or inf in ``values`` (any float array; uint16: bfloat16 bits, whose NaN and inf have every exponent
    bit set), scanned in ``SCAN_BYTES`` pieces."""
    flat = np.ascontiguousarray(values).reshape(-1)
    pieces = scan_rows(flat.size, flat.dtype.itemsize)
    if flat.dtype == BFLOAT16_BITS:
        top = np.uint16(0x7F80)
        return all(((flat[a : a + pieces.step] & top) != top).all() for a in pieces)
    return all(np.isfinite(flat[a : a + pieces.step]).all() for a in pieces)


@dataclass
class BlockDigests:
    """Per-block digests of a run of rows, in block order: ``sha256`` (what tensor checksums combine) and
    ``fast`` (xxh3-128, what first-touch reads check; empty where a writer recorded none); ``finite``: whether
    every value hashed was finite (None: not floats, or not known)."""

    sha256: list[bytes] = field(default_factory=list)
    fast: list[bytes] = field(default_factory=list)
    finite: bool | None = None

    def __add__(self, other: BlockDigests) -> BlockDigests:
        """The digests of this run followed by ``other`` (fast digests only if both have them)."""
        if not (self.sha256 or self.fast):
            return other
        if not (other.sha256 or other.fast):
            return self
        fast = self.fast + other.fast if bool(self.fast) == bool(other.fast) else []
        finite = None if self.finite is None or other.finite is None else self.finite and other.finite
        return BlockDigests(self.sha256 + other.sha256, fast, finite)

    def checksum(self) -> str:
        """The checksum of these rows (``combine`` of the sha256 digests)."""
        return combine(self.sha256)

    def to_hex(self) -> tuple[list[str], list[str]]:
        """As hex strings (Ray results, JSON)."""
        return [d.hex() for d in self.sha256], [d.hex() for d in self.fast]

    @classmethod
    def from_hex(cls, sha256: Iterable[str], fast: Iterable[str] = (), finite: bool | None = None) -> BlockDigests:
        return cls([bytes.fromhex(d) for d in sha256], [bytes.fromhex(d) for d in fast], finite)


def split_digests(raw: object, size: int, n_blocks: int | None = None) -> list[bytes] | None:
    """Digests of ``size`` bytes from a stored attribute (uint8 array), or None where it is absent or does
    not hold ``n_blocks`` of them (a record that does not fit is never taken as a match)."""
    if raw is None:
        return None
    flat = np.asarray(raw, dtype=np.uint8).ravel()
    if flat.size % size or (n_blocks is not None and flat.size // size != n_blocks):
        return None
    return [bytes(d) for d in flat.reshape(-1, size)]


def digests_attr(digests: list[bytes]) -> np.ndarray:
    """Digests as a stored attribute (uint8 array; ``split_digests`` reads it back)."""
    return np.frombuffer(b"".join(digests), dtype=np.uint8)


class BlockHasher:
    """Digests per block of ``block_rows`` rows (NOTE [fast block digests]), fed any sequence of consecutive
    row ranges; ``sha256=False`` keeps only the fast ones."""

    def __init__(self, block_rows: int, row_bytes: int, sha256: bool = True):
        self.block_bytes = max(1, block_rows * row_bytes)
        self.digests = BlockDigests()
        self._h = hashlib.sha256() if sha256 else None
        self._x = xxhash.xxh3_128()
        self._filled = 0

    @classmethod
    def for_tensor(cls, shape: tuple[int, ...], dtype: np.dtype, sha256: bool = True) -> BlockHasher:
        """The hasher of a whole tensor, or of any block-aligned run of its rows."""
        return cls(block_rows(shape, np.dtype(dtype).itemsize), row_nbytes(shape, dtype), sha256)

    def update(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows)
        if (rows.dtype.kind == "f" or rows.dtype == BFLOAT16_BITS) and self.digests.finite is not False:
            self.digests.finite = all_finite(rows)
        data = rows.data.cast("B")
        pos = 0
        while pos < len(data):
            take = min(self.block_bytes - self._filled, len(data) - pos)
            if self._h is not None:
                self._h.update(data[pos : pos + take])
            self._x.update(data[pos : pos + take])
            self._filled += take
            pos += take
            if self._filled == self.block_bytes:
                self._end_block()

    def _end_block(self) -> None:
        if self._h is not None:
            self.digests.sha256.append(self._h.digest())
            self._h = hashlib.sha256()
        self.digests.fast.append(self._x.digest())
        self._x.reset()
        self._filled = 0

    def finish(self) -> BlockDigests:
        if self._filled:
            self._end_block()
        return self.digests


def combine(digests: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for d in digests:
        h.update(d)
    return h.hexdigest()


def block_digests(
    rows: RowArray, block_rows: int, row_bytes: int, on_block: Callable[[int], object] | None = None
) -> BlockDigests:
    """The digests of ``rows``, read ``block_rows`` at a time (``on_block`` gets each block's bytes)."""
    hasher = BlockHasher(block_rows, row_bytes)
    for start in range(0, rows.shape[0], block_rows):
        will_need(rows, start, start + block_rows)
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
                    got = block_digests(rows, entry.block_rows, entry.row_bytes, count).checksum()
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
