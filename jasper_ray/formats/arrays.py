"""Row arrays: what readers hand out, and the helpers that gather from them.

Numpy only (no h5py, torch or Ray): a row array is a numpy array, a memory map,
or an object that gathers its own rows (``take_rows``: chunked HDF5 rows, a
tensor spread over shard files).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from .precision import decode, decoder, fused_gather, is_16bit


class RowArray(Protocol):
    """What a reader hands out per tensor: numpy arrays, memmaps, or chunked HDF5 rows."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype: ...

    def __getitem__(self, key: Any) -> np.ndarray: ...


def check_indices(where: str | Callable[[], str], indices: np.ndarray, n_rows: int) -> np.ndarray:
    """Indices as int64, or an IndexError naming ``where`` (a callable is only called on error)."""
    indices = np.asarray(indices)
    if indices.ndim != 1 or (indices.size and indices.dtype.kind not in "iu"):
        where = where() if callable(where) else where
        raise IndexError(f"{where}: indices must be a 1-D integer array, got shape {indices.shape} {indices.dtype}")
    if indices.size and (indices.min() < 0 or indices.max() >= n_rows):
        where = where() if callable(where) else where
        bad = indices[(indices < 0) | (indices >= n_rows)][0]
        raise IndexError(f"{where}: index {int(bad)} out of range [0, {n_rows})")
    return indices.astype(np.int64, copy=False)


def gather_rows(arr: RowArray, indices: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``arr[indices]`` (checked int64 indices) as a new array, or written into C-contiguous ``out``.

    Arrays that gather themselves (chunked HDF5 rows, shard parts) do; numpy arrays go through
    ``np.take`` (``mode="clip"``: the indices are checked, and ``mode="raise"`` would buffer all of
    ``out``). A mapped tensor that a writer placed at an offset its dtype is not aligned to is
    gathered as rows of bytes: numpy copies unaligned elements one by one, 20-70x slower
    (``scripts/diag_gathers.py``). 16-bit rows gathered into a float32 ``out`` are decoded on the
    way (NOTE [16-bit storage] in ``precision``).
    """
    if out is not None and out.dtype != arr.dtype and is_16bit(arr.dtype):
        return _gather_decoded(arr, indices, out)
    into = getattr(arr, "take_rows_into", None)
    if into is not None and out is not None:  # gathers straight into ``out`` (no copy of a copy)
        into(indices, out)
        return out
    take = getattr(arr, "take_rows", None)
    if take is not None:
        rows: np.ndarray = take(indices)
        if out is None:
            return rows
        out[...] = rows
        return out
    data = np.asarray(arr)
    if out is None:
        out = np.empty((len(indices), *data.shape[1:]), dtype=data.dtype)
    if not data.flags.aligned and data.flags.c_contiguous and len(data):
        row_bytes = data.nbytes // len(data)
        data, out_bytes = data.view(np.uint8).reshape(len(data), row_bytes), out.view(np.uint8)
        np.take(data, indices, axis=0, out=out_bytes.reshape(len(indices), row_bytes), mode="clip")
        return out
    return np.take(data, indices, axis=0, out=out, mode="clip")


# 16-bit rows are gathered in runs of about this many stored bytes, each decoded while it is in the core's cache.
DECODE_RUN_BYTES = 256 << 10


def _gather_decoded(arr: RowArray, indices: np.ndarray, out: np.ndarray) -> np.ndarray:
    """16-bit rows ``arr[indices]`` decoded into float32 ``out``, never a float32 copy of the table: mapped
    rows a run at a time through a buffer that stays in the cache; arrays that gather themselves decode per part."""
    if isinstance(arr, ConcatRows | LazyShard):
        return arr.take_rows_into(indices, out)
    if not isinstance(arr, np.ndarray) or out.dtype != np.float32 or not out.flags.c_contiguous or not len(indices):
        return decode(gather_rows(arr, indices), out)
    if fused_gather(arr, indices, out):
        return out
    table = arr
    if not arr.flags.aligned and arr.flags.c_contiguous:  # gathered as bytes (gather_rows says why)
        table = arr.view(np.uint8).reshape(len(arr), -1)
    run = max(1, DECODE_RUN_BYTES // max(1, table[:1].nbytes))
    buffer = np.empty((min(run, len(indices)), *table.shape[1:]), dtype=table.dtype)
    stored = buffer.view(arr.dtype).reshape(len(buffer), *arr.shape[1:])
    take, kernel = table.take, decoder(arr.dtype)
    for a in range(0, len(indices), run):  # the per-run cost: only these two calls
        n = min(run, len(indices) - a)
        take(indices[a : a + n], 0, buffer[:n], "clip")
        kernel(stored[:n], out[a : a + n])
    return out


def advise_huge_pages(arr: np.ndarray, dataset_bytes: int = 0) -> None:
    """Ask Linux to map ``arr``'s file pages 2 MB at a time (``MADV_HUGEPAGE``), or, where the dataset
    it belongs to (``dataset_bytes``) is larger than half the RAM, to read no more than it asks
    (``MADV_RANDOM``).

    Random row gathers over 4 KB pages miss the TLB on nearly every row. With the advice the kernel
    reads the file ahead in 2 MB folios and maps them whole, whatever ``read_ahead_kb`` says (128 KB
    on many systems gives no 2 MB folios at all). That pays while the file stays in the page cache;
    over a dataset larger than RAM each random row would read 2 MB from disk (a 30 GB dataset's pass
    ran at 0.8 GB/s of disk reads for a few MB/s of rows), so there the kernel is told to read the
    pages asked for, and scans in order read their blocks ahead (``will_need``). Best effort: a no-op where unsupported.
    """
    if sys.platform != "linux" or not arr.nbytes or not hasattr(mmap, "MADV_HUGEPAGE"):
        return
    start = arr.__array_interface__["data"][0]
    first = start - start % mmap.PAGESIZE
    fits = dataset_bytes <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    advice = mmap.MADV_HUGEPAGE if fits else mmap.MADV_RANDOM
    _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(start + arr.nbytes - first), advice)
    if fits:
        _RANDOM_MAPPINGS.pop(first, None)
    else:
        _RANDOM_MAPPINGS[first] = start + arr.nbytes


def will_need(rows: RowArray, start: int, stop: int) -> None:
    """Bring rows ``start:stop`` of a mapped array into memory now, read from disk in large I/Os: for the loops
    that scan a table in order (conversion, checksums, validation). A dataset larger than half the RAM is mapped
    ``MADV_RANDOM`` (``advise_huge_pages``), where each 4 KB page would be read by its own fault (a 30 GB
    dataset hashed at ~50 MB/s); its range is advised ``MADV_SEQUENTIAL``, populated (``MADV_POPULATE_READ``)
    and advised random again: ~870 MB/s from this machine's disk. Other mappings read ahead by themselves and
    are left alone. Best effort: a no-op where unsupported."""
    if not _RANDOM_MAPPINGS or not isinstance(rows, np.ndarray) or not rows.flags.c_contiguous:
        return
    stop = min(stop, rows.shape[0])
    if stop <= start:
        return
    row_bytes = rows.nbytes // len(rows)
    begin = rows.__array_interface__["data"][0] + start * row_bytes
    if not any(first <= begin < end for first, end in _RANDOM_MAPPINGS.items()):
        return
    first = begin - begin % mmap.PAGESIZE
    span = ctypes.c_void_p(first), ctypes.c_size_t(begin + (stop - start) * row_bytes - first)
    libc = _libc()
    libc.madvise(*span, mmap.MADV_SEQUENTIAL)
    libc.madvise(*span, _MADV_POPULATE_READ)
    libc.madvise(*span, mmap.MADV_RANDOM)


_MADV_POPULATE_READ = 22  # Linux 5.14+; refused (EINVAL) before: then the scan faults its pages in
# Where mappings advised MADV_RANDOM start and end (addresses): the ranges ``will_need`` reads ahead.
_RANDOM_MAPPINGS: dict[int, int] = {}
_libc_handle: list[Any] = []


def _libc() -> Any:
    if not _libc_handle:
        _libc_handle.append(ctypes.CDLL(None, use_errno=True))
    return _libc_handle[0]


def is_mapped(arr: object) -> bool:
    """True when an array's memory is a file mapping (np.memmap or a view of one)."""
    while arr is not None:
        if isinstance(arr, (np.memmap, mmap.mmap)):
            return True
        arr = getattr(arr, "base", None)
    return False


class ConcatRows:
    """One tensor's rows spread over consecutive shard arrays."""

    def __init__(self, parts: list[tuple[int, int, Any]], shape: tuple[int, ...], dtype: np.dtype):
        self.parts, self.shape, self.dtype = parts, shape, np.dtype(dtype)
        self.starts = np.array([p[0] for p in parts], dtype=np.int64)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, np.ndarray):
            return self.take_rows(key)
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError(f"ConcatRows supports row slices and index arrays, not {key!r}")
        start, stop, _ = key.indices(self.shape[0])
        _open_together([arr for a, b, arr in self.parts if a < stop and b > start])
        runs = [
            np.asarray(arr[max(start, a) - a : min(stop, b) - a]) for a, b, arr in self.parts if a < stop and b > start
        ]
        return np.concatenate(runs) if runs else np.empty((0,) + self.shape[1:], self.dtype)

    def take_rows(self, indices: np.ndarray) -> np.ndarray:
        return self.take_rows_into(indices, np.empty((len(indices),) + self.shape[1:], dtype=self.dtype))

    def take_rows_into(self, indices: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Rows ``indices`` into ``out``: each part's rows gathered in one pass, then placed (one scatter)."""
        part_of = np.searchsorted(self.starts, indices, side="right") - 1
        if len(indices) and part_of[0] == part_of[-1] and (part_of == part_of[0]).all():
            a, _, arr = self.parts[int(part_of[0])]
            return gather_rows(arr, indices - a, out)  # one part: gathered in place
        order = np.argsort(part_of, kind="stable")
        bounds = np.searchsorted(part_of[order], np.arange(len(self.parts) + 1))
        _open_together([self.parts[k][2] for k in range(len(self.parts)) if bounds[k + 1] > bounds[k]])
        gathered = np.empty_like(out)
        for k in range(len(self.parts)):
            lo, hi = int(bounds[k]), int(bounds[k + 1])
            if hi > lo:
                a, _, arr = self.parts[k]
                gather_rows(arr, indices[order[lo:hi]] - a, gathered[lo:hi])
        out[order] = gathered
        return out


# Shards fetched at once when one read needs several not yet opened: downloads overlap (pyarrow
# releases the GIL), as S3's guidance asks, instead of one file after another.
PARALLEL_OPENS = 8


def _open_together(parts: list[Any]) -> None:
    waiting = [p for p in parts if isinstance(p, LazyShard) and not p.is_open]
    if len(waiting) > 1:
        with ThreadPoolExecutor(min(PARALLEL_OPENS, len(waiting))) as pool:
            list(pool.map(LazyShard.rows, waiting))


class LazyShard:
    """One shard's rows, opened on first use: a reader whose shards come through a cache fetches only
    the shards it reads (a read task, an actor: the tables and its own pair rows)."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, nbytes: int, open_rows: Callable[[], RowArray]):
        self.shape, self.dtype, self.nbytes = shape, np.dtype(dtype), nbytes
        self._open_rows = open_rows
        self._rows: RowArray | None = None
        self.on_open: Callable[[LazyShard], None] | None = None

    def rows(self) -> RowArray:
        if self._rows is None:
            self._rows = self._open_rows()
            if self.on_open is not None:
                self.on_open(self)
        return self._rows

    @property
    def is_open(self) -> bool:
        return self._rows is not None

    def release(self) -> None:
        """Drop the mapping (a batch already gathered is a copy): an evicted file's space comes back."""
        self._rows = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self.rows()[key])

    def take_rows(self, indices: np.ndarray) -> np.ndarray:
        return gather_rows(self.rows(), indices)

    def take_rows_into(self, indices: np.ndarray, out: np.ndarray) -> np.ndarray:
        return gather_rows(self.rows(), indices, out)
