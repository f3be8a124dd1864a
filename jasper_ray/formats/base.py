"""The reader and writer contracts that every storage format implements.

A reader holds a directory, a format name and options, never a handle: it
pickles as those, and opens its files lazily in whichever process uses it (a
fork is detected by pid and reopens). Arrays come back as numpy: memory-mapped
where the format allows, so opening costs nothing and reads touch only the
rows asked for.

A writer is a context manager: it publishes what it wrote atomically when the
block ends without an error, and leaves nothing behind when it raises. Tensors
go in by schema name from any row array (a reader's lazily read arrays work:
a format that can stream, streams, so a dataset larger than RAM converts).

The floor above ``schema``: this module imports neither torch nor h5py nor Ray,
and holds no caching or cleanup policy (each format owns its own).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import numpy as np

from ..config import allows_nonfinite, read_config_file
from ..errors import ChecksumError, DatasetFormatError, DatasetNotFoundError
from ..schema import CONFIG_FILE, PRECISION_DTYPES, PRECISION_FLOAT32, TENSOR, TENSORS
from .arrays import RowArray, advise_huge_pages, check_indices, gather_rows, is_mapped, will_need
from .checksum import RecordedChecksum, block_rows, row_nbytes, verify_checksums
from .precision import BFLOAT16_BITS, is_16bit, precision_of
from .verified import TouchGuard, Unit, VerifyMode, block_units, check_finite

__all__ = [
    "Reader",
    "RecordedChecksum",
    "RowArray",
    "Writer",
    "advise_huge_pages",
    "check_indices",
    "gather_rows",
    "is_mapped",
]


class Reader(ABC):
    """Lazy, picklable access to one JASPER dataset in one storage format."""

    storage_format: str = ""

    def __init__(self, directory: str | os.PathLike, *, use_mmap: bool = True):
        self.directory = Path(directory)
        # Where the data lives, for messages: the file or folder a format keeps it in (PT: the directory).
        self.path = self.directory
        self.use_mmap = bool(use_mmap)
        # "first-touch" (NOTE [first-touch verification] in verified), "open" or "off"; open_dataset sets it.
        self.verify: VerifyMode = "first-touch"
        self._opened_in: int | None = None
        self._arrays: dict[str, RowArray] = {}
        self._guards: dict[str, TouchGuard | None] = {}
        self._config: dict[str, Any] | None = None

    # --- per-process state -------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_opened_in=None, _arrays={}, _guards={})
        for key in self._process_local:
            state[key] = None
        return state

    # Attribute names subclasses keep per process (handles); dropped on pickle and fork.
    _process_local: tuple[str, ...] = ()

    def _ensure_open(self) -> None:
        pid = os.getpid()
        if self._opened_in != pid:
            self._arrays, self._guards = {}, {}
            for key in self._process_local:
                setattr(self, key, None)
            self._open()
            self._opened_in = pid

    def _open(self) -> None:  # noqa: B027 - formats without handles need nothing here
        """Open whatever handle the format keeps per process."""

    def close(self) -> None:
        """Drop every handle and mapping; the reader reopens on next use."""
        self._arrays, self._guards = {}, {}
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
        """The stored dtype (a 16-bit reducible tensor's: NOTE [16-bit storage] in ``precision``)."""
        return np.dtype(self.array(name).dtype)

    @property
    def precision(self) -> str:
        """The precision the reducible tensors are stored at (``schema.PRECISIONS``): one per dataset."""
        found = {
            self.dtype(s.name) for s in TENSORS if s.reducible and self.has_tensor(s.name) and self.shape(s.name)[0]
        }
        known = [d for d in found if d in PRECISION_DTYPES.values()]
        if len(known) > 1:
            raise DatasetFormatError(
                f"{self.path}: the embedding and steering tensors are stored at several precisions "
                f"({sorted(precision_of(d) for d in known)}); reconvert with one --precision"
            )
        return precision_of(known[0]) if known else PRECISION_FLOAT32

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` as stored (a view of the mapping where there is one), checked
        (NOTE [first-touch verification])."""
        arr = self.array(name)
        a, b, _ = slice(start, stop).indices(arr.shape[0])
        will_need(arr, a, b)  # a range is read whole: read it ahead (mappings of large datasets are MADV_RANDOM)
        guard = self._guard(name)
        if guard is not None:
            guard.touch_range(arr, a, b)
        return np.asarray(arr[start:stop])

    def take(self, name: str, indices: Sequence[int] | np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows at ``indices`` (any order, repeats allowed): a new array, or written into ``out``
        (C-contiguous, of the result's shape) and returned; checked (NOTE [first-touch verification]).
        16-bit rows come as float32 (the schema's dtype), or as stored into an ``out`` of the stored dtype."""
        arr = self.array(name)
        idx = check_indices(lambda: self.location(name), np.asarray(indices), arr.shape[0])
        guard = self._guard(name)
        if guard is not None:
            guard.touch_rows(arr, idx)
        if out is None and is_16bit(arr.dtype) and TENSOR[name].reducible:
            out = np.empty((len(idx), *arr.shape[1:]), dtype=TENSOR[name].dtype)
        return gather_rows(arr, idx, out)

    def _guard(self, name: str) -> TouchGuard | None:
        """What checks reads of ``name`` on first touch in this process (None: nothing to check)."""
        if self.verify != "first-touch":
            return None
        if name not in self._guards:
            arr = self.array(name)
            shape, dtype = tuple(arr.shape), np.dtype(arr.dtype)
            units = self._units(name)
            is_float = dtype.kind == "f" or (dtype == BFLOAT16_BITS and TENSOR[name].reducible)
            check_values = is_float and not self._allows_nonfinite()
            if units is None and check_values:
                units = block_units(shape[0], block_rows(shape, dtype.itemsize), None)
            self._guards[name] = (
                TouchGuard(self.location(name), units, check_values, row_nbytes(shape, dtype)) if units else None
            )
        return self._guards[name]

    def _allows_nonfinite(self) -> bool:
        """config.json's opt-out; a dataset without a config (an upstream file alone) allows nothing."""
        try:
            return allows_nonfinite(self.config)
        except DatasetNotFoundError:
            return False

    def _units(self, name: str) -> list[Unit] | None:
        """The checksum units the format recorded for tensor ``name`` (None: it recorded none)."""
        return None

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

    # --- checksums -----------------------------------------------------------------
    def recorded_checksums(self) -> list[RecordedChecksum]:
        """Every checksum the stored data carries (none for formats that record none, like PT)."""
        return []

    def verify_checksums(self, on_block: Callable[[int], object] | None = None) -> list[str]:
        """Recompute every recorded checksum; one message per place that does not match (none: all is well).

        ``on_block`` gets the bytes of each block read (a progress bar's ``update``)."""
        return verify_checksums(self.recorded_checksums(), on_block)

    def check_all(self) -> None:
        """Every recorded checksum and every float value, now (``verify="open"``); raises at the first problem."""
        problems = self.verify_checksums()
        if problems:
            raise ChecksumError(f"{problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        if self._allows_nonfinite():
            return
        for spec in TENSORS:
            if spec.dtype.kind == "f" and self.has_tensor(spec.name):
                shape = self.shape(spec.name)
                step = max(1, block_rows(shape, spec.dtype.itemsize))
                rows = self.array(spec.name)
                for a in range(0, shape[0], step):
                    will_need(rows, a, a + step)
                    check_finite(self.location(spec.name), np.asarray(rows[a : a + step]), a)

    @property
    def n_pairs(self) -> int:
        """Rows of ``pair_index``: the number of question-source pairs."""
        return self.shape("pair_index")[0]


W = TypeVar("W", bound="Writer")


class Writer(ABC):
    """Writes one dataset in one storage format: ``with SomeWriter(...) as w: w.write_config(...); ...``.

    The block publishes on success and leaves nothing on error; what "atomic" covers is the format's
    unit (HDF5: the whole file; PT: each file, upstream's layout having no single file to publish).
    Write the config first; then tensors, keyword ids and splits (``write_from`` writes all of a reader's
    dataset in the layout's order).
    """

    storage_format: str = ""

    def __enter__(self: W) -> W:
        return self

    def __exit__(  # noqa: B027 - a format that publishes file by file has nothing left to do
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Publish what was written when the block succeeded (``exc_type`` is None), else discard it."""

    @abstractmethod
    def write_config(self, config: Mapping[str, Any], source_fingerprint: Mapping[str, Any] | None = None) -> None:
        """The dataset's config, and the fingerprint of the files it is converted from where the format
        records one (PT files are sources: they record none)."""

    @abstractmethod
    def write_tensor(self, name: str, rows: RowArray) -> None:
        """The tensor ``name`` (a schema name) from any row array."""

    @abstractmethod
    def write_keyword_ids(self, values: RowArray, offsets: np.ndarray) -> None:
        """Every pair's keyword ids, given as CSR (a reader's ``keyword_csr()``)."""

    @abstractmethod
    def write_split(self, split: str, ids: RowArray) -> None:
        """The pair ids of a split."""

    def write_from(self, reader: Reader, source_fingerprint: Mapping[str, Any] | None = None) -> None:
        """All of ``reader``'s dataset: config, tensors in schema order, keyword ids, splits."""
        self.write_config(reader.config, source_fingerprint)
        for spec in TENSORS:
            self.write_tensor(spec.name, reader.array(spec.name))
        self.write_keyword_ids(*reader.keyword_csr())
        for split in reader.split_names():
            self.write_split(split, reader.split(split))
