"""The sharded HDF5 layout: ``dataset.shards/`` holding shard files and ``manifest.json``.

For clusters where each node should hold only its shards. The manifest is the
truth (rows, file sizes and checksums per shard), not HDF5 virtual datasets,
which read a missing source as zeros: a missing or truncated shard is an error
that names it. Each tensor is served as its shards' rows concatenated.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetFormatError, DatasetNotFoundError
from ..schema import KEYWORD_IDS, MANIFEST, SHARDS_DIR, SPLIT_H5_GROUP, TENSOR, split_h5_path
from .base import Reader, gather_rows
from .checksum import BlockHasher, combine
from .hdf5 import CHUNK_CACHE_BYTES, open_h5, serve_dataset


def read_manifest(shards_dir: Path) -> dict[str, Any]:
    path = shards_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetFormatError(f"{path}: unreadable shard manifest ({exc})") from exc
    if manifest.get("layout") != "sharded" or "tensors" not in manifest:
        raise DatasetFormatError(f"{path}: not a jasper_ray shard manifest")
    return manifest


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
        pieces = [
            np.asarray(arr[max(start, a) - a : min(stop, b) - a]) for a, b, arr in self.parts if a < stop and b > start
        ]
        return np.concatenate(pieces) if pieces else np.empty((0,) + self.shape[1:], self.dtype)

    def take_rows(self, indices: np.ndarray) -> np.ndarray:
        out = np.empty((len(indices),) + self.shape[1:], dtype=self.dtype)
        part_of = np.searchsorted(self.starts, indices, side="right") - 1
        for k in np.unique(part_of):
            a, _, arr = self.parts[k]
            sel = np.flatnonzero(part_of == k)
            local = indices[sel] - a
            out[sel] = gather_rows(arr, local)
        return out


class ShardedHDF5Reader(Reader):
    storage_format = "hdf5"

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        use_mmap: bool = True,
        shards_dir: str = SHARDS_DIR,
        chunk_cache_bytes: int = CHUNK_CACHE_BYTES,
    ):
        super().__init__(directory, use_mmap=use_mmap)
        self.shards_dir = self.path = self.directory / shards_dir
        self.chunk_cache_bytes = int(chunk_cache_bytes)
        self._manifest: dict[str, Any] | None = None
        self._files: dict[str, Any] | None = None

    _process_local = ("_files",)

    @property
    def manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            self._manifest = read_manifest(self.shards_dir)
            self._check_shards(self._manifest)
        return self._manifest

    def _check_shards(self, manifest: dict[str, Any]) -> None:
        for tensor in manifest["tensors"]:
            for shard in tensor["shards"]:
                path = self.shards_dir / shard["file"]
                where = f"shard {path} ({tensor['h5_path']} rows {shard['start']}:{shard['stop']})"
                if not path.is_file():
                    raise DatasetNotFoundError(
                        f"{where} is missing; the sharded dataset cannot be served. Restore the file or reconvert."
                    )
                if path.stat().st_size != shard["bytes"]:
                    raise DatasetFormatError(
                        f"{where} is corrupt: {path.stat().st_size} bytes, the manifest "
                        f"records {shard['bytes']}. Restore the file or reconvert."
                    )

    def _open(self) -> None:
        self._files = {}
        self.manifest  # noqa: B018 - checks every shard is there

    def _release(self) -> None:
        for f in (self._files or {}).values():
            try:
                f.close()
            except Exception:  # noqa: BLE001 - a handle inherited over fork may not close
                pass
        super()._release()

    def _tensor(self, h5_path: str) -> dict[str, Any] | None:
        return next((t for t in self.manifest["tensors"] if t["h5_path"] == h5_path), None)

    def _rows(self, h5_path: str) -> Any:
        self._ensure_open()
        tensor = self._tensor(h5_path)
        if tensor is None:
            raise DatasetNotFoundError(f"{self.shards_dir}: no tensor at {h5_path!r} in the manifest")
        parts = []
        per_shard_cache = self.chunk_cache_bytes // len(tensor["shards"])  # one budget for the tensor
        for shard in tensor["shards"]:
            path = self.shards_dir / shard["file"]
            handle = self._files.get(shard["file"])
            if handle is None:
                handle = self._files[shard["file"]] = open_h5(path)
            parts.append(
                (
                    shard["start"],
                    shard["stop"],
                    serve_dataset(path, handle[h5_path], self.use_mmap, per_shard_cache),
                )
            )
        if len(parts) == 1:
            return parts[0][2]
        return ConcatRows(parts, tuple(tensor["shape"]), np.dtype(tensor["dtype"]))

    def location(self, name: str) -> str:
        return f"{self.shards_dir}:{TENSOR[name].h5_path}"

    def location_keywords(self) -> str:
        return f"{self.shards_dir}:{KEYWORD_IDS.h5_group}"

    def location_split(self, split: str) -> str:
        return f"{self.shards_dir}:{split_h5_path(split)}"

    def has_tensor(self, name: str) -> bool:
        return self._tensor(TENSOR[name].h5_path) is not None

    def _load_array(self, name: str) -> Any:
        return self._rows(TENSOR[name].h5_path)

    def split_names(self) -> tuple[str, ...]:
        prefix = f"{SPLIT_H5_GROUP}/"
        return tuple(
            sorted(t["h5_path"][len(prefix) :] for t in self.manifest["tensors"] if t["h5_path"].startswith(prefix))
        )

    def _load_split(self, split: str) -> np.ndarray:
        return np.asarray(self._rows(split_h5_path(split))[0:None])

    def keyword_csr(self) -> tuple[Any, np.ndarray]:
        values = self._rows(KEYWORD_IDS.h5_values)
        offsets = np.asarray(self._rows(KEYWORD_IDS.h5_offsets)[0:None], dtype=np.int64)
        return values, offsets

    def _embedded_config(self) -> dict[str, Any] | None:
        return self.manifest.get("config")

    def source_fingerprint(self) -> dict[str, Any] | None:
        return self.manifest.get("source_fingerprint")

    def files(self) -> list[Path]:
        return [self.shards_dir / MANIFEST] + [
            self.shards_dir / s["file"] for t in self.manifest["tensors"] for s in t["shards"]
        ]

    def verify_checksums(self, on_block: Any = None) -> list[str]:
        """Recompute each shard's checksum from its rows; name every shard that does not match."""
        problems = []
        for tensor in self.manifest["tensors"]:
            dtype = np.dtype(tensor["dtype"])
            rows = tensor["checksum_block_rows"]
            row_bytes = dtype.itemsize * int(np.prod(tensor["shape"][1:], dtype=np.int64))
            for shard in tensor["shards"]:
                path = self.shards_dir / shard["file"]
                hasher = BlockHasher(rows, row_bytes)
                try:
                    with open_h5(path) as f:
                        dset = f[tensor["h5_path"]]
                        for a in range(0, dset.shape[0], rows):
                            block = dset[a : a + rows]
                            hasher.update(block)
                            if on_block is not None:
                                on_block(block.nbytes)
                except (OSError, KeyError, DatasetFormatError) as exc:
                    problems.append(f"shard {path} ({tensor['h5_path']}): cannot be read ({exc})")
                    continue
                if combine(hasher.finish()) != shard["checksum"]:
                    problems.append(
                        f"shard {path} ({tensor['h5_path']} rows {shard['start']}:{shard['stop']}): "
                        f"checksum does not match the manifest (the stored bytes changed)"
                    )
        return problems
