"""The sharded HDF5 layout: ``dataset.shards/`` holding shard files and ``manifest.json``.

For clusters where each node should hold only its shards. The manifest is the
truth (rows, file sizes and checksums per shard), not HDF5 virtual datasets,
which read a missing source as zeros: a missing or truncated shard is an error
that names it. Each tensor is served as its shards' rows concatenated.

The manifest and its checks are in ``manifest`` (names re-exported here).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import DatasetFormatError, DatasetNotFoundError
from ..schema import (
    ATTR_BLOCK_DIGESTS,
    KEYWORD_IDS,
    MANIFEST,
    SHARDS_DIR,
    SPLIT_H5_GROUP,
    TENSOR,
    split_h5_path,
)
from .arrays import ConcatRows, LazyShard, RowArray
from .base import Reader
from .checksum import SHA256_SIZE, RecordedChecksum, row_nbytes, split_digests
from .hdf5 import CHUNK_CACHE_BYTES, open_h5, serve_dataset
from .manifest import Manifest, ManifestShard, ManifestTensor, read_manifest, write_manifest
from .verified import Unit, block_units

__all__ = [
    "ConcatRows",
    "LazyShard",
    "Manifest",
    "ManifestShard",
    "ManifestTensor",
    "ShardedHDF5Reader",
    "read_manifest",
    "write_manifest",
]


_OPENED_LOCK = threading.Lock()


class ShardSource(Protocol):
    """Where shard files come from when they are not in the dataset directory (the node-local cache)."""

    cache_limit: int | None

    def path(self, h5_path: str, file: str, nbytes: int, checksum: str) -> Path:
        """The local, checked copy of shard ``file`` (fetched on first use)."""
        ...

    def keeps_whole(self, h5_path: str) -> bool:
        """Whether the tensor is kept whole (one copy of all its shards, never evicted)."""
        ...

    def whole(self, h5_path: str, shape: tuple[int, ...], dtype: np.dtype, shards: list[ManifestShard]) -> Path:
        """The local, checked copy of the whole tensor, its shards end to end."""
        ...


@contextlib.contextmanager
def _dataset_in(path: Path | Callable[[], Path], h5_path: str) -> Iterator[RowArray]:
    """One dataset of a shard file (or of what ``path()`` fetches), open for the block."""
    with open_h5(path if isinstance(path, Path) else path()) as f:
        yield f[h5_path]


class ShardedHDF5Reader(Reader):
    storage_format = "hdf5"

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        use_mmap: bool = True,
        shards_dir: str = SHARDS_DIR,
        chunk_cache_bytes: int = CHUNK_CACHE_BYTES,
        shard_files: ShardSource | None = None,
    ):
        super().__init__(directory, use_mmap=use_mmap)
        self.shard_files = shard_files  # None: the shard files are in shards_dir
        self.shards_dir = self.path = self.directory / shards_dir
        self.chunk_cache_bytes = int(chunk_cache_bytes)
        self._manifest: dict[str, Any] | None = None
        self._layout: Manifest | None = None
        self._files: dict[str, Any] = {}
        self._mapped: OrderedDict[int, LazyShard] | None = None

    # Read per process (and reread after close): a pickled reader carries paths, never the manifest.
    _process_local = ("_files", "_manifest", "_layout", "_mapped")

    @property
    def manifest(self) -> dict[str, Any]:
        """manifest.json as read (every shard it lists checked present, at its recorded size)."""
        self._ensure_open()
        if self._manifest is None:  # pragma: no cover - _open reads it
            raise DatasetFormatError(f"{self.shards_dir / MANIFEST}: not read")
        return self._manifest

    @property
    def layout(self) -> Manifest:
        """The manifest, parsed."""
        self._ensure_open()
        if self._layout is None:  # pragma: no cover - _open reads it
            raise DatasetFormatError(f"{self.shards_dir / MANIFEST}: not read")
        return self._layout

    def _check_shards(self, layout: Manifest) -> None:
        for tensor in layout.tensors:
            for shard in tensor.shards:
                path = self.shards_dir / shard.file
                where = f"shard {path} ({tensor.h5_path} rows {shard.start}:{shard.stop})"
                if not path.resolve().is_relative_to(self.shards_dir.resolve()):
                    raise DatasetFormatError(
                        f"{where} resolves to {path.resolve()}, outside {self.shards_dir} (a symlink out of the "
                        "dataset); every shard file must lie in the shards directory"
                    )
                if not path.is_file():
                    raise DatasetNotFoundError(
                        f"{where} is missing; the sharded dataset cannot be served. Restore the file or reconvert."
                    )
                if path.stat().st_size != shard.bytes:
                    raise DatasetFormatError(
                        f"{where} is corrupt: {path.stat().st_size} bytes, the manifest "
                        f"records {shard.bytes}. Restore the file or reconvert."
                    )

    def _open(self) -> None:
        self._files, self._mapped = {}, OrderedDict()
        manifest = read_manifest(self.shards_dir)
        layout = Manifest.from_json(manifest)
        if self.shard_files is None:  # shards through a cache are checked when they are fetched
            self._check_shards(layout)
        self._manifest, self._layout = manifest, layout

    def _release(self) -> None:
        for f in (self._files or {}).values():
            try:
                f.close()
            except Exception:  # noqa: BLE001 - a handle inherited over fork may not close
                pass
        super()._release()

    def _tensor(self, h5_path: str) -> ManifestTensor | None:
        return next((t for t in self.layout.tensors if t.h5_path == h5_path), None)

    def _rows(self, h5_path: str) -> RowArray:
        tensor = self._tensor(h5_path)
        if tensor is None:
            raise DatasetNotFoundError(f"{self.shards_dir}: no tensor at {h5_path!r} in the manifest")
        parts: list[tuple[int, int, Any]] = []
        per_shard_cache = self.chunk_cache_bytes // len(tensor.shards)  # one budget for the tensor
        if self.shard_files is not None and len(tensor.shards) > 1 and self.shard_files.keeps_whole(h5_path):
            path = self.shard_files.whole(h5_path, tuple(tensor.shape), np.dtype(tensor.dtype), tensor.shards)
            handle = self._files[f"whole:{h5_path}"] = open_h5(path)
            return serve_dataset(path, handle[h5_path], self.use_mmap, self.chunk_cache_bytes)
        if self.shard_files is not None:
            row_bytes = row_nbytes(tuple(tensor.shape), np.dtype(tensor.dtype))
            for shard in tensor.shards:
                opener = functools.partial(self._open_shard, tensor.h5_path, shard, per_shard_cache)
                shape = (shard.stop - shard.start, *tensor.shape[1:])
                lazy = LazyShard(shape, np.dtype(tensor.dtype), row_bytes * shape[0], opener)
                lazy.on_open = self._opened
                parts.append((shard.start, shard.stop, lazy))
        for shard in tensor.shards if self.shard_files is None else ():
            path = self.shards_dir / shard.file
            handle = self._files.get(shard.file)
            if handle is None:
                handle = self._files[shard.file] = open_h5(path)
            parts.append(
                (shard.start, shard.stop, serve_dataset(path, handle[h5_path], self.use_mmap, per_shard_cache))
            )
        if len(parts) == 1:
            return parts[0][2]
        return ConcatRows(parts, tuple(tensor.shape), np.dtype(tensor.dtype))

    def _open_shard(self, h5_path: str, shard: ManifestShard, cache_bytes: int) -> RowArray:
        assert self.shard_files is not None
        for attempt in range(3):  # another process may evict the copy between its fetch and our open
            path = self.shard_files.path(h5_path, shard.file, shard.bytes, shard.checksum)
            try:
                handle = open_h5(path)
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        rows = serve_dataset(path, handle[h5_path], self.use_mmap, cache_bytes)
        if isinstance(rows, np.ndarray):
            handle.close()  # mapped (a cached copy is contiguous) or read: no handle to keep
        else:
            self._files[f"{h5_path}@{shard.file}"] = handle
        return rows

    def _opened(self, shard: LazyShard) -> None:
        """Keep this process's mapped shards within the cache limit: the least recently opened go first."""
        with _OPENED_LOCK:  # shards of one read open in threads (arrays._open_together)
            mapped = self._mapped if self._mapped is not None else OrderedDict()
            self._mapped = mapped
            mapped[id(shard)] = shard
            limit = self.shard_files.cache_limit if self.shard_files is not None else None
            while limit is not None and len(mapped) > 1 and sum(s.nbytes for s in mapped.values()) > limit // 2:
                mapped.popitem(last=False)[1].release()

    def location(self, name: str) -> str:
        return f"{self.shards_dir}:{TENSOR[name].h5_path}"

    def location_keywords(self) -> str:
        return f"{self.shards_dir}:{KEYWORD_IDS.h5_group}"

    def location_split(self, split: str) -> str:
        return f"{self.shards_dir}:{split_h5_path(split)}"

    def has_tensor(self, name: str) -> bool:
        return self._tensor(TENSOR[name].h5_path) is not None

    def _load_array(self, name: str) -> RowArray:
        return self._rows(TENSOR[name].h5_path)

    def split_names(self) -> tuple[str, ...]:
        prefix = f"{SPLIT_H5_GROUP}/"
        return tuple(sorted(t.h5_path[len(prefix) :] for t in self.layout.tensors if t.h5_path.startswith(prefix)))

    def _load_split(self, split: str) -> np.ndarray:
        return np.asarray(self._rows(split_h5_path(split))[0:None])

    def keyword_csr(self) -> tuple[RowArray, np.ndarray]:
        values = self._rows(KEYWORD_IDS.h5_values)
        offsets = np.asarray(self._rows(KEYWORD_IDS.h5_offsets)[0:None], dtype=np.int64)
        return values, offsets

    def _embedded_config(self) -> dict[str, Any] | None:
        return self.layout.config

    def source_fingerprint(self) -> dict[str, Any] | None:
        return self.layout.source_fingerprint

    def files(self) -> list[Path]:
        return [self.shards_dir / MANIFEST] + [self.shards_dir / s.file for t in self.layout.tensors for s in t.shards]

    def _units(self, name: str) -> list[Unit] | None:
        """Per block where the manifest records fast digests (this version) or a local shard file its sha256
        block digests (earlier ones), else per shard (the manifest's checksum)."""
        tensor = self._tensor(TENSOR[name].h5_path)
        if tensor is None:
            return None
        units: list[Unit] = []
        rows = tensor.checksum_block_rows
        for shard in tensor.shards:
            n = shard.stop - shard.start
            fast = None if shard.block_xxh3_128 is None else [bytes.fromhex(d) for d in shard.block_xxh3_128]
            handle = self._files.get(shard.file) if self.shard_files is None and fast is None else None
            recorded = handle[tensor.h5_path].attrs.get(ATTR_BLOCK_DIGESTS) if handle else None
            sha256 = split_digests(recorded, SHA256_SIZE, -(-n // max(1, rows)))
            if fast is not None or sha256 is not None:
                units += block_units(n, rows, sha256, shard.start, fast, shard.all_finite is True)
            else:
                units.append(Unit(shard.start, shard.stop, combined=shard.checksum, block_rows=rows))
        return units

    def recorded_checksums(self) -> list[RecordedChecksum]:
        """Each shard's checksum of its rows, from the manifest."""
        found = []
        for tensor in self.layout.tensors:
            row_bytes = row_nbytes(tuple(tensor.shape), np.dtype(tensor.dtype))
            for shard in tensor.shards:
                path = self.shards_dir / shard.file
                if self.shard_files is None:
                    where: Path | functools.partial[Path] = path
                else:  # fetched (and checked against this checksum) when verify opens it
                    where = functools.partial(
                        self.shard_files.path, tensor.h5_path, shard.file, shard.bytes, shard.checksum
                    )
                found.append(
                    RecordedChecksum(
                        f"shard {path} ({tensor.h5_path} rows {shard.start}:{shard.stop})",
                        functools.partial(_dataset_in, where, tensor.h5_path),
                        tensor.checksum_block_rows,
                        row_bytes,
                        shard.checksum,
                        shard.stop - shard.start,
                    )
                )
        return found
