"""Verified reads: each checksum unit of a tensor is checked the first time a read touches it.

NOTE [first-touch verification]
A reader opened with ``verify="first-touch"`` (the default) keeps, per tensor
and per process, which of its units have been checked. A unit is a checksum
block (~16 MiB of rows) where the file records per-block digests (files this
version writes, shard files), a whole shard where only the manifest's shard
checksum is known, or the whole tensor for files of earlier versions that
record only the tensor's checksum. Before rows are handed out, every unit they
touch that is not yet checked is read whole, hashed and compared (its xxh3-128
where the file records one, NOTE [fast block digests] in checksum; its sha256
otherwise) and, for float tensors, scanned for NaN and inf (unless config.json
says ``"allow_nonfinite": true``), in one pass of cache-sized pieces; units are
checked on all cores at once. So a changed byte is never served: the read
that would have served it raises ``ChecksumError`` naming the file, tensor and
rows. Once every unit of a tensor is checked, reads cost one flag test.

What it does not cover: bytes changed after their unit was checked in this
process (a file rewritten under a running reader; reopen it), keyword ids and
split ids (validated whole at open), and PT files without a checksum sidecar
(NOTE [PT checksum sidecar] in pt_checksums: only their float values are
checked). ``verify="open"`` checks everything when the dataset is opened; ``verify="off"`` checks nothing when reading
(``jasper-ray verify`` still can). Each DataLoader worker checks the units it
touches itself (the state is per process).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import xxhash

from ..config import ALLOW_NONFINITE
from ..errors import ChecksumError, ValidationError
from ..schema import CONFIG_FILE
from .arrays import RowArray, will_need
from .checksum import block_digests, scan_rows
from .precision import BFLOAT16_BITS, decode

VerifyMode = Literal["first-touch", "open", "off"]
VERIFY_MODES: tuple[str, ...] = ("first-touch", "open", "off")


def check_verify_mode(verify: object) -> str:
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {list(VERIFY_MODES)}, got {verify!r}")
    return str(verify)


def check_finite(
    where: str, block: np.ndarray, first_row: int = 0, lowest: float | None = None, allow_nonfinite: bool = False
) -> None:
    """Every value finite (unless allowed) and not below ``lowest``; the error names the first bad position.

    Scanned in ``SCAN_BYTES`` pieces (a mask of a piece stays in the cache; one of a block would not). uint16
    rows are bfloat16 (NOTE [16-bit storage] in ``precision``), decoded a piece at a time."""
    bfloat16 = block.dtype == BFLOAT16_BITS
    if block.size == 0 or (block.dtype.kind != "f" and not bfloat16) or (allow_nonfinite and lowest is None):
        return
    pieces = scan_rows(block.shape[0], block[:1].nbytes)
    for a in pieces:
        part = block[a : a + pieces.step]
        part = decode(part) if bfloat16 else part
        if lowest is None and np.isfinite(part).all():
            continue
        _check_values(where, part, first_row + a, lowest, allow_nonfinite)


def _check_values(where: str, block: np.ndarray, first_row: int, lowest: float | None, allow_nonfinite: bool) -> None:
    ok = np.ones(block.shape, bool) if allow_nonfinite else np.isfinite(block)
    if lowest is not None:
        ok &= ~(block < lowest)  # NaN compares False: allowed NaNs pass the sign rule
    if ok.all():
        return
    pos = np.argwhere(~ok)[0]
    value = block[tuple(pos)]
    pos[0] += first_row
    position = int(pos[0]) if block.ndim == 1 else tuple(int(x) for x in pos)
    expected = "a finite value" if lowest is None else f"a finite value >= {lowest}"
    raise ValidationError(
        where,
        f"value {value}",
        f'{expected} (set "{ALLOW_NONFINITE}": true in {CONFIG_FILE} if the dataset really stores NaN or inf)',
        position,
    )


@dataclass(frozen=True)
class Unit:
    """Rows ``start:stop`` and what they must hash to: ``fast`` (the xxh3-128 of their bytes, checked where
    recorded), else ``digest`` (their sha256), else ``combined`` (the checksum of their ``block_rows`` blocks,
    hex), else nothing (values are checked only)."""

    start: int
    stop: int
    digest: bytes | None = None
    combined: str | None = None
    block_rows: int = 0
    fast: bytes | None = None
    finite: bool = False  # the writer found every value finite: rows matching a digest need no scan


def block_units(
    n_rows: int,
    block_rows: int,
    digests: Sequence[bytes] | None,
    first_row: int = 0,
    fast: Sequence[bytes] | None = None,
    finite: bool = False,
) -> list[Unit]:
    """One unit per checksum block of rows ``first_row : first_row + n_rows`` (``digests`` (sha256) and
    ``fast`` (xxh3-128) in block order, either absent; ``finite``: the writer found every value finite)."""
    step = max(1, block_rows)
    starts = range(0, n_rows, step)
    for found in (digests, fast):
        if found is not None and len(found) != len(starts):
            raise ValueError(f"{len(found)} block digests for {len(starts)} blocks of {step} rows")
    return [
        Unit(
            first_row + a,
            first_row + min(a + step, n_rows),
            None if digests is None else digests[i],
            fast=None if fast is None else fast[i],
            finite=finite and (digests is not None or fast is not None),
        )
        for i, a in enumerate(starts)
    ]


_POOL: tuple[int, ThreadPoolExecutor] | None = None


def _pool() -> ThreadPoolExecutor:
    """One thread per core, made again after a fork (threads do not survive it). hashlib and numpy release
    the GIL on large buffers, so units are checked in parallel."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (os.getpid(), ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="jasper-verify"))
    return _POOL[1]


class TouchGuard:
    """Which units of one tensor this process has checked; checks the rest as reads touch them."""

    def __init__(self, where: str, units: list[Unit], check_values: bool, row_bytes: int):
        self.where, self.units, self.check_values, self.row_bytes = where, units, check_values, row_bytes
        self.starts = np.array([u.start for u in units], dtype=np.int64)
        self.done = np.zeros(len(units), dtype=bool)
        self.all_done = not units

    def touch_rows(self, rows: RowArray, indices: np.ndarray) -> None:
        """Check every unit that rows ``indices`` (checked int64) fall in, if not checked yet."""
        if self.all_done or not len(indices):
            return
        units = np.searchsorted(self.starts, indices, side="right") - 1
        self._check(rows, np.unique(units[~self.done[units]]))

    def touch_range(self, rows: RowArray, start: int, stop: int) -> None:
        if self.all_done or stop <= start:
            return
        first, last = np.searchsorted(self.starts, [start, stop - 1], side="right") - 1
        units = np.arange(first, last + 1)
        self._check(rows, units[~self.done[units]])

    def _check(self, rows: RowArray, units: np.ndarray) -> None:
        if not len(units):
            return
        todo = [int(u) for u in units]
        results = list(_pool().map(lambda u: self._check_unit(rows, u), todo)) if len(todo) > 1 else []
        if not results:
            self._check_unit(rows, todo[0])
        self.done[todo] = True
        self.all_done = bool(self.done.all())

    def _check_unit(self, rows: RowArray, u: int) -> None:
        """Hash the unit and scan its values in one pass of ``SCAN_BYTES`` pieces (each read from memory once)."""
        unit = self.units[u]
        will_need(rows, unit.start, unit.stop)
        block = np.ascontiguousarray(rows[unit.start : unit.stop])
        if unit.fast is None and unit.digest is None and unit.combined is not None:  # an earlier version's file
            got = block_digests(block, unit.block_rows, self.row_bytes)
            if got.checksum() != unit.combined:
                self._changed(unit, "these rows")
            if self.check_values and got.finite is False:
                check_finite(self.where, block, unit.start)  # names the first bad value
            return
        hasher = xxhash.xxh3_128() if unit.fast is not None else hashlib.sha256() if unit.digest is not None else None
        check_values = self.check_values and not unit.finite  # values already seen finite, if the bytes match
        if hasher is None and not check_values:
            return
        bad_value: ValidationError | None = None  # raised after the hash: changed bytes are named as such
        pieces = scan_rows(len(block), self.row_bytes)
        for a in pieces:
            part = block[a : a + pieces.step]
            if hasher is not None:
                hasher.update(part.data.cast("B"))
            if check_values and bad_value is None:
                try:
                    check_finite(self.where, part, unit.start + a)
                except ValidationError as exc:
                    bad_value = exc
                    if hasher is None:
                        break
        if hasher is not None and hasher.digest() != (unit.fast if unit.fast is not None else unit.digest):
            self._changed(unit, f"checksum block {u}")
        if bad_value is not None:
            raise bad_value

    def _changed(self, unit: Unit, what: str) -> None:
        raise ChecksumError(
            f"{self.where}: rows {unit.start}:{unit.stop} ({what}) do not match the checksum recorded when they "
            "were written: the stored bytes changed, and none of them was served. Run `jasper-ray verify` on the "
            "dataset, then restore the file or reconvert."
        )
