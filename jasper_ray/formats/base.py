"""The reader contract that every storage format implements.

A reader holds a directory, a format name and options, never a handle: it
pickles as those, and opens its files lazily in whichever process uses it (a
fork is detected by pid and reopens). Arrays come back as numpy: memory-mapped
where the format allows, so opening costs nothing and reads touch only the
rows asked for. This module imports neither torch nor h5py nor Ray.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..config import read_config_file
from ..errors import DatasetNotFoundError
from ..schema import CONFIG_FILE, TENSOR, TENSORS


class RowArray(Protocol):
    """What a reader hands out per tensor: numpy arrays, memmaps, or chunked HDF5 rows."""

    shape: tuple[int, ...]
    dtype: np.dtype

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
    (``scripts/diag_gathers.py``).
    """
    take = getattr(arr, "take_rows", None)
    if take is not None:
        rows = take(indices)
        if out is None:
            return rows
        out[...] = rows
        return out
    arr = np.asarray(arr)
    if out is None:
        out = np.empty((len(indices), *arr.shape[1:]), dtype=arr.dtype)
    if not arr.flags.aligned and arr.flags.c_contiguous and len(arr):
        row_bytes = arr.nbytes // len(arr)
        arr, out_bytes = arr.view(np.uint8).reshape(len(arr), row_bytes), out.view(np.uint8)
        np.take(arr, indices, axis=0, out=out_bytes.reshape(len(indices), row_bytes), mode="clip")
        return out
    return np.take(arr, indices, axis=0, out=out, mode="clip")


def advise_huge_pages(arr: np.ndarray) -> None:
    """Ask Linux to map ``arr``'s file pages 2 MB at a time (``MADV_HUGEPAGE``).

    Random row gathers over 4 KB pages miss the TLB on nearly every row. With the advice the kernel
    reads the file ahead in 2 MB folios and maps them whole, whatever ``read_ahead_kb`` says (128 KB
    on many systems gives no 2 MB folios at all). Best effort: a no-op where unsupported.
    """
    if sys.platform != "linux" or not arr.nbytes or not hasattr(mmap, "MADV_HUGEPAGE"):
        return
    start = arr.__array_interface__["data"][0]
    first = start - start % mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(start + arr.nbytes - first), mmap.MADV_HUGEPAGE)


def is_mapped(arr: object) -> bool:
    """True when an array's memory is a file mapping (np.memmap or a view of one)."""
    while arr is not None:
        if isinstance(arr, (np.memmap, mmap.mmap)):
            return True
        arr = getattr(arr, "base", None)
    return False


class Reader(ABC):
    """Lazy, picklable access to one JASPER dataset in one storage format."""

    storage_format: str = ""

    def __init__(self, directory: str | os.PathLike, *, use_mmap: bool = True):
        self.directory = Path(directory)
        self.use_mmap = bool(use_mmap)
        self._opened_in: int | None = None
        self._arrays: dict[str, RowArray] = {}
        self._config: dict[str, Any] | None = None

    # --- per-process state -------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_opened_in=None, _arrays={})
        for key in self._process_local:
            state[key] = None
        return state

    # Attribute names subclasses keep per process (handles); dropped on pickle and fork.
    _process_local: tuple[str, ...] = ()

    def _ensure_open(self) -> None:
        pid = os.getpid()
        if self._opened_in != pid:
            self._arrays = {}
            for key in self._process_local:
                setattr(self, key, None)
            self._open()
            self._opened_in = pid

    def _open(self) -> None:  # noqa: B027 - formats without handles need nothing here
        """Open whatever handle the format keeps per process."""

    def close(self) -> None:
        """Drop every handle and mapping; the reader reopens on next use."""
        self._arrays = {}
        self._release()
        self._opened_in = None

    def _release(self) -> None:
        for key in self._process_local:
            setattr(self, key, None)

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.directory)!r}, use_mmap={self.use_mmap})"

    # --- tensors -------------------------------------------------------------
    def array(self, name: str) -> RowArray:
        """The tensor as a lazily-read array (memory-mapped where the format allows)."""
        self._ensure_open()
        arr = self._arrays.get(name)
        if arr is None:
            if name not in TENSOR:
                raise KeyError(f"unknown tensor {name!r}; known: {[s.name for s in TENSORS]}")
            arr = self._arrays[name] = self._load_array(name)
        return arr

    @abstractmethod
    def _load_array(self, name: str) -> RowArray: ...

    @abstractmethod
    def has_tensor(self, name: str) -> bool: ...

    @abstractmethod
    def location(self, name: str) -> str:
        """Where a tensor lives, for error messages (file, or file:path)."""

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.array(name).shape)

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self.array(name).dtype)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` as an array (a view of the mapping where there is one)."""
        return np.asarray(self.array(name)[start:stop])

    def take(self, name: str, indices: Sequence[int] | np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows at ``indices`` (any order, repeats allowed): a new array, or written into ``out``
        (C-contiguous, of the result's shape) and returned."""
        arr = self.array(name)
        return gather_rows(arr, check_indices(lambda: self.location(name), np.asarray(indices), arr.shape[0]), out)

    # --- splits ------------------------------------------------------------------
    @abstractmethod
    def split_names(self) -> tuple[str, ...]: ...

    @abstractmethod
    def _load_split(self, split: str) -> np.ndarray: ...

    @abstractmethod
    def location_split(self, split: str) -> str: ...

    def split(self, split: str) -> np.ndarray:
        """The pair ids of a split."""
        if split not in self.split_names():
            raise DatasetNotFoundError(
                f"Split {split!r} not found in {self.directory} ({self.storage_format}). "
                f"Valid splits are: {', '.join(self.split_names()) or 'none'}"
            )
        return self._load_split(split)

    # --- keyword ids ---------------------------------------------------------
    @abstractmethod
    def keyword_csr(self) -> tuple[RowArray, np.ndarray]:
        """All keyword ids as CSR: (values, offsets), pair p owns values[offsets[p]:offsets[p+1]]."""

    def keyword_ids(self, pairs: Sequence[int] | np.ndarray) -> list[np.ndarray]:
        """The keyword ids of each pair in ``pairs``."""
        values, offsets = self.keyword_csr()
        pairs = check_indices(self.location_keywords, np.asarray(pairs), len(offsets) - 1)
        if not len(pairs):
            return []
        starts, lengths = offsets[pairs], offsets[pairs + 1] - offsets[pairs]
        # One gather for all pairs (one chunk pass when compressed), then split.
        ends = np.cumsum(lengths)
        flat = np.repeat(starts - (ends - lengths), lengths) + np.arange(int(ends[-1]) if len(ends) else 0)
        return np.split(gather_rows(values, flat), ends[:-1])

    def n_keyword_pairs(self) -> int:
        return len(self.keyword_csr()[1]) - 1

    @abstractmethod
    def location_keywords(self) -> str: ...

    # --- config ------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """config.json beside the data wins; a format may carry its own copy."""
        if self._config is None:
            config = read_config_file(self.directory)
            if config is None:
                config = self._embedded_config()
            if config is None:
                raise DatasetNotFoundError(f"Config file not found: {self.directory / CONFIG_FILE}")
            self._config = config
        return self._config

    def _embedded_config(self) -> dict[str, Any] | None:
        return None

    def source_fingerprint(self) -> dict[str, Any] | None:
        """The fingerprint of the PT files this data was converted from (None for sources themselves)."""
        return None

    # --- sizes -------------------------------------------------------------------
    @abstractmethod
    def files(self) -> list[Path]:
        """The files this dataset's bytes live in (for sizes and mmap decisions)."""

    def nbytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.files() if p.exists())

    @property
    def n_pairs(self) -> int:
        """Rows of ``pair_index``: the number of question-source pairs."""
        return self.shape("pair_index")[0]
