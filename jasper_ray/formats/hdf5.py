"""The HDF5 layout and its reader (the writer is ``hdf5_writer``).

Layout (``dataset.h5``): the seed's tree (``embeddings/questions``,
``pair_data/index``, ``negatives/hard``, ``steering/centroid``,
``splits/train`` ...; paths in ``schema``), keyword ids as CSR under
``pair_data/keyword_ids/{values,offsets}``, config and source fingerprint as
root attributes, a sha256 of the logical bytes on each dataset.

Uncompressed tensors are stored contiguous and served through ``np.memmap``
at ``dset.id.get_offset()``: real zero-copy mapping. Compressed tensors use
whole-row chunks and are gathered chunk by chunk through h5py's chunk cache.
Files written by upstream's converter (``negatives/hardnegatives``, one
keyword dataset per pair, splits only as ``{split}_idx.pt``) read too.
h5py is imported on first use (``require_h5py``), so importing this costs nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import ChecksumError, DatasetFormatError, DatasetNotFoundError
from ..schema import (
    ATTR_BLOCK_DIGESTS,
    ATTR_CHECKSUM,
    ATTR_CHECKSUM_BLOCK_ROWS,
    ATTR_CONFIG,
    ATTR_FAST_DIGESTS,
    ATTR_FINGERPRINT,
    ATTR_FINITE,
    ATTR_FORMAT_VERSION,
    ATTR_LAYOUT,
    FORMAT_VERSION,
    HDF5_FILE,
    KEYWORD_IDS,
    LAYOUT_CSR,
    SPLIT_H5_GROUP,
    TENSOR,
    TENSORS,
    TensorSpec,
    split_h5_path,
)
from .arrays import RowArray, advise_huge_pages, check_indices
from .base import Reader
from .checksum import FAST_DIGEST_SIZE, SHA256_SIZE, RecordedChecksum, row_nbytes, split_digests
from .pt import PTReader
from .verified import Unit, block_units

# The top-level groups a JASPER file has (ours and upstream's): a file with none of them is foreign.
GROUP_NAMES = tuple(dict.fromkeys(s.h5_path.split("/")[0] for s in TENSORS))
CHUNK_CACHE_BYTES = 32 << 20  # per reader, shared out over the datasets it gathers from
FILE_CHUNK_CACHE_BYTES = 1 << 20


def require_h5py() -> ModuleType:
    try:
        import h5py  # lazy: readers of PT data, and processes that only plan, never load h5py
    except ImportError as exc:  # pragma: no cover - exercised only without h5py
        raise ImportError("HDF5 format requested but h5py is not installed. Install with: pip install h5py") from exc
    return h5py


# --- reading --------------------------------------------------------------------------


class ChunkedRows:
    """Row access to a chunked (compressed) HDF5 dataset that reads whole chunks.

    h5py's point selection costs milliseconds per call; reading each needed
    chunk once through the chunk cache and gathering in numpy is far cheaper.
    """

    def __init__(self, dset: Any):
        self.dset = dset
        self.shape = dset.shape
        self.dtype = dset.dtype
        self.chunk_rows = dset.chunks[0]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, np.ndarray) and key.dtype.kind in "iu":
            return self.take_rows(key)
        return self._read(key)

    def _read(self, key: Any) -> np.ndarray:
        """``dset[key]``; a chunk that does not decode is named (h5py says only "filter returned failure")."""
        try:
            return self.dset[key]
        except OSError as exc:
            rows = f"rows {key.start}:{key.stop}" if isinstance(key, slice) else f"rows {key!r}"
            raise ChecksumError(
                f"{self.dset.file.filename}:{self.dset.name}: {rows} cannot be decoded: a damaged compressed chunk "
                f"({exc}). Run `jasper-ray verify` on the dataset, then restore the file or reconvert."
            ) from exc

    def take_rows(self, indices: np.ndarray) -> np.ndarray:
        out = np.empty((len(indices),) + self.shape[1:], dtype=self.dtype)
        if len(indices) == 0:
            return out
        order = np.argsort(indices, kind="stable")
        sorted_idx = indices[order]
        chunk_of = sorted_idx // self.chunk_rows
        bounds = np.flatnonzero(np.diff(chunk_of)) + 1
        starts = np.concatenate(([0], bounds))
        stops = np.concatenate((bounds, [len(sorted_idx)]))
        for a, b in zip(starts.tolist(), stops.tolist()):
            first = int(chunk_of[a]) * self.chunk_rows
            block = self._read(slice(first, min(first + self.chunk_rows, self.shape[0])))
            out[order[a:b]] = block[sorted_idx[a:b] - first]
        return out


def map_contiguous(path: Path, dset: Any) -> np.ndarray | None:
    """A read-only array mapped over a contiguous, unfiltered dataset; None if it cannot be mapped."""
    if dset.chunks is not None or dset.compression is not None or dset.dtype.kind not in "iuf":
        return None
    if dset.size == 0:
        return np.empty(dset.shape, dtype=dset.dtype)
    offset = dset.id.get_offset()
    if offset is None:  # never written: HDF5 would read fill values
        raise DatasetFormatError(f"{path}:{dset.name}: dataset has no data allocated (never written)")
    # A plain ndarray view of the map: same pages, without np.memmap's per-index Python overhead.
    mapped = np.memmap(path, dtype=dset.dtype, mode="r", offset=offset, shape=dset.shape).view(np.ndarray)
    advise_huge_pages(mapped, path.stat().st_size)
    return mapped


def with_chunk_cache(dset: Any, cache_bytes: int) -> Any:
    """``dset`` reopened with a chunk cache of its own. HDF5's file-level cache size applies to every
    dataset separately, so a file-wide budget has to be handed out per dataset."""
    h5py = require_h5py()
    chunk_bytes = int(np.prod(dset.chunks, dtype=np.int64)) * dset.dtype.itemsize
    dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
    # ~100 slots per cached chunk keeps hash collisions rare (h5py docs).
    dapl.set_chunk_cache(max(521, 100 * (cache_bytes // max(chunk_bytes, 1))), int(cache_bytes), 0.75)
    return h5py.Dataset(h5py.h5d.open(dset.file.id, dset.name.encode(), dapl))


def serve_dataset(path: Path, dset: Any, use_mmap: bool, chunk_cache_bytes: int = CHUNK_CACHE_BYTES) -> RowArray:
    """How a reader hands out one HDF5 dataset: mapped, chunk-gathered, or read into RAM.

    A chunk-gathered dataset gets a cache of up to a quarter of ``chunk_cache_bytes`` (no more than
    its own size), so a reader's caches stay near the budget however many tensors it touches."""
    mapped = map_contiguous(path, dset)
    if mapped is not None:
        return mapped if use_mmap else np.array(mapped)
    if dset.chunks is None or not use_mmap:
        return dset[...]
    return ChunkedRows(with_chunk_cache(dset, min(dset.size * dset.dtype.itemsize, chunk_cache_bytes // 4)))


def open_h5(path: Path) -> Any:
    """Open read-only, without HDF5 file locking (it fails on NFS/Lustre). The file-wide chunk cache is
    small: datasets read at random get their own (``serve_dataset``)."""
    h5py = require_h5py()
    cache = {"rdcc_nbytes": FILE_CHUNK_CACHE_BYTES, "rdcc_nslots": 521}
    try:
        try:
            return h5py.File(path, "r", locking=False, **cache)
        except OSError as exc:
            if "locking" not in str(exc):
                raise
            # The file is already open in this process with other locking flags; HDF5 wants them equal.
            return h5py.File(path, "r", **cache)
    except OSError as exc:
        if "truncated file" in str(exc):
            raise DatasetFormatError(
                f"{path}: the file is truncated ({exc}). Restore it or reconvert; a file rewritten in place "
                "while it is read is cut short (docs/troubleshooting.md)."
            ) from exc
        raise DatasetFormatError(f"{path}: not a readable HDF5 file ({exc})") from exc


def check_format_version(where: str | os.PathLike, version: object) -> None:
    """Refuse data written by a newer jasper_ray (it may mean something this reader would serve wrong)."""
    if isinstance(version, (int, np.integer)) and 1 <= int(version) <= FORMAT_VERSION:
        return
    shown = version.item() if isinstance(version, np.generic) else version
    raise DatasetFormatError(
        f"{where}: format version {shown!r}, this jasper_ray reads versions 1 to {FORMAT_VERSION}. "
        "Upgrade jasper_ray, or reconvert the PT files with this version."
    )


def json_attr(f: Any, name: str, path: Path) -> Any:
    """A root attribute holding JSON (None when absent), or an error naming the file and attribute."""
    raw = f.attrs.get(name)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (TypeError, ValueError) as exc:
        raise DatasetFormatError(
            f"{path}: root attribute {name!r} is not valid JSON ({exc}). Reconvert: jasper-ray convert {path.parent}"
        ) from exc


class HDF5Reader(Reader):
    storage_format = "hdf5"

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        use_mmap: bool = True,
        file_name: str = HDF5_FILE,
        chunk_cache_bytes: int = CHUNK_CACHE_BYTES,
    ):
        super().__init__(directory, use_mmap=use_mmap)
        self.path = self.directory / file_name
        self.chunk_cache_bytes = int(chunk_cache_bytes)
        self._file: Any = None
        self._keywords: tuple[RowArray, np.ndarray] | None = None
        self._pt_fallback: PTReader | None = None

    _process_local = ("_file", "_keywords")

    def _open(self) -> None:
        if not self.path.is_file():
            raise DatasetNotFoundError(f"HDF5 file not found: {self.path}")
        self._file = open_h5(self.path)
        version = self._file.attrs.get(ATTR_FORMAT_VERSION)
        if version is not None:  # upstream's files carry none
            check_format_version(self.path, version)
        if not any(g in self._file for g in GROUP_NAMES):
            found = sorted(self._file.keys())[:8]
            self._file.close()
            raise DatasetFormatError(
                f"{self.path}: an HDF5 file, but not a JASPER dataset: none of the groups {list(GROUP_NAMES)} "
                f"(found {found}). Convert a JASPER PT dataset with `jasper-ray convert`."
            )

    def _release(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # noqa: BLE001 - closing a handle inherited over fork may fail
                pass
        super()._release()

    @property
    def file(self) -> Any:
        self._ensure_open()
        return self._file

    def _resolve(self, spec: TensorSpec) -> str | None:
        for path in (spec.h5_path,) + spec.h5_aliases:
            if path in self.file:
                return path
        return None

    def location(self, name: str) -> str:
        path = self._resolve(TENSOR[name]) or TENSOR[name].h5_path
        return f"{self.path}:{path}"

    def location_keywords(self) -> str:
        return f"{self.path}:{KEYWORD_IDS.h5_group}"

    def location_split(self, split: str) -> str:
        if SPLIT_H5_GROUP in self.file:
            return f"{self.path}:{split_h5_path(split)}"
        return self._pt_splits().location_split(split)

    def has_tensor(self, name: str) -> bool:
        return self._resolve(TENSOR[name]) is not None

    def _dataset(self, h5_path: str, what: str) -> Any:
        try:
            return self.file[h5_path]
        except KeyError:
            raise DatasetNotFoundError(f"{self.path}: {what} not found at {h5_path!r}") from None

    def _load_array(self, name: str) -> RowArray:
        spec = TENSOR[name]
        path = self._resolve(spec)
        if path is None:
            tried = ", ".join(repr(p) for p in (spec.h5_path,) + spec.h5_aliases)
            raise DatasetNotFoundError(f"{self.path}: tensor {name!r} not found (looked for {tried})")
        return self._serve(self._dataset(path, f"tensor {name!r}"))

    def _serve(self, dset: Any) -> RowArray:
        return serve_dataset(self.path, dset, self.use_mmap, self.chunk_cache_bytes)

    def source_fingerprint(self) -> dict | None:
        found = json_attr(self.file, ATTR_FINGERPRINT, self.path)
        if found is not None and not isinstance(found, dict):
            raise DatasetFormatError(f"{self.path}: root attribute {ATTR_FINGERPRINT!r} is not a JSON object")
        return found

    def split_names(self) -> tuple[str, ...]:
        if SPLIT_H5_GROUP in self.file:
            return tuple(sorted(self.file[SPLIT_H5_GROUP].keys()))
        return self._pt_splits().split_names()

    def _pt_splits(self) -> PTReader:
        """Upstream's files keep splits only as ``{split}_idx.pt`` beside dataset.h5."""
        if self._pt_fallback is None:
            self._pt_fallback = PTReader(self.directory, use_mmap=False)
        return self._pt_fallback

    def _load_split(self, split: str) -> np.ndarray:
        if SPLIT_H5_GROUP in self.file:
            return self._dataset(split_h5_path(split), f"split {split!r}")[...]
        return self._pt_splits().split(split)

    def keyword_csr(self) -> tuple[RowArray, np.ndarray]:
        self._ensure_open()
        if self._keywords is None:
            group = self._dataset(KEYWORD_IDS.h5_group, "keyword ids")
            if self._is_csr(group):
                offsets = self.file[KEYWORD_IDS.h5_offsets][...].astype(np.int64, copy=False)
                self._keywords = (self._serve(self.file[KEYWORD_IDS.h5_values]), offsets)
            else:
                self._keywords = self._upstream_keywords(group)
        return self._keywords

    def keyword_ids(self, pairs: Sequence[int] | np.ndarray) -> list[np.ndarray]:
        self._ensure_open()
        group = self._dataset(KEYWORD_IDS.h5_group, "keyword ids")
        if self._keywords is None and not self._is_csr(group):
            # Upstream's one-dataset-per-pair layout: read only the pairs asked for.
            pairs = check_indices(self.location_keywords(), np.asarray(pairs), len(group))
            return [group[str(int(p))][...].astype(KEYWORD_IDS.dtype) for p in pairs]
        return super().keyword_ids(pairs)

    def _is_csr(self, group: Any) -> bool:
        """Ours (CSR: values + offsets), not upstream's one dataset per pair."""
        return bool(group.attrs.get(ATTR_LAYOUT) == LAYOUT_CSR or KEYWORD_IDS.h5_offsets in self.file)

    def _upstream_keywords(self, group: Any) -> tuple[np.ndarray, np.ndarray]:
        n = len(group)
        lists = []
        for p in range(n):
            if str(p) not in group:
                raise DatasetFormatError(
                    f"{self.location_keywords()}: pair {p} has no keyword dataset (expected '{p}')"
                )
            lists.append(group[str(p)][...])
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([len(x) for x in lists], out=offsets[1:])
        values = np.concatenate(lists).astype(KEYWORD_IDS.dtype) if lists else np.empty(0, KEYWORD_IDS.dtype)
        return values, offsets

    def _units(self, name: str) -> list[Unit] | None:
        """Per-block digests where the file records them (fast ones: this version's files; sha256: earlier
        ones), else the tensor's checksum as one unit (earlier still), else none (upstream's files)."""
        path = self._resolve(TENSOR[name])
        if path is None:
            return None
        dset = self.file[path]
        recorded = dset.attrs.get(ATTR_CHECKSUM)
        if recorded is None:
            return None
        rows = int(dset.attrs.get(ATTR_CHECKSUM_BLOCK_ROWS, max(1, dset.shape[0])))
        blocks = -(-dset.shape[0] // max(1, rows))
        sha256 = split_digests(dset.attrs.get(ATTR_BLOCK_DIGESTS), SHA256_SIZE, blocks)
        fast = split_digests(dset.attrs.get(ATTR_FAST_DIGESTS), FAST_DIGEST_SIZE, blocks)
        if sha256 is not None or fast is not None:
            return block_units(dset.shape[0], rows, sha256, fast=fast, finite=bool(dset.attrs.get(ATTR_FINITE, 0)))
        return [Unit(0, dset.shape[0], combined=str(recorded), block_rows=rows)]

    def recorded_checksums(self) -> list[RecordedChecksum]:
        """Every dataset that carries a checksum attribute (upstream's files carry none)."""
        found: list[RecordedChecksum] = []

        def visit(name: str, obj: Any) -> None:
            recorded = getattr(obj, "attrs", {}).get(ATTR_CHECKSUM)
            if recorded is None or not hasattr(obj, "shape"):
                return
            rows = int(obj.attrs.get(ATTR_CHECKSUM_BLOCK_ROWS, max(1, obj.shape[0])))

            def opened(dset: Any = obj) -> contextlib.AbstractContextManager[RowArray]:
                return contextlib.nullcontext(dset)

            found.append(
                RecordedChecksum(
                    f"{self.path}:{name}", opened, rows, row_nbytes(obj.shape, obj.dtype), recorded, int(obj.shape[0])
                )
            )

        self.file.visititems(visit)
        return found

    def _embedded_config(self) -> dict[str, Any] | None:
        found = json_attr(self.file, ATTR_CONFIG, self.path)
        if found is not None and not isinstance(found, dict):
            raise DatasetFormatError(f"{self.path}: root attribute {ATTR_CONFIG!r} is not a JSON object")
        return found

    def files(self) -> list[Path]:
        return [self.path]
