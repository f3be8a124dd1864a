"""Serving a dataset through the node-local cache: which files it needs, and how each is checked.

``storage`` moves and keeps bytes; this module knows what they are. A remote
dataset (any ``pyarrow.fs`` URI) always goes through the cache; a local
compressed one does when a cache directory is given. Per layout:

- ``dataset.h5``: fetched whole in parallel ranges, every recorded checksum
  checked, decompressed into a contiguous copy when compressed;
- the sharded layout: the manifest now, each shard file on first use (so a
  read task or an actor holds only the tables and its own pair rows), checked
  against the manifest's checksum and made contiguous; pair-row shards are
  evictable under ``cache_limit``, the tables (which negatives point into) never;
- PT files: fetched whole (they record no checksums: the cache key is the
  objects' ETag, size and modification time).
"""

from __future__ import annotations

import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from ..errors import DatasetNotFoundError
from ..schema import COMPRESSION_NONE, CONFIG_FILE, HDF5_FILE, HDF5_SUFFIXES, MANIFEST, PT_SUFFIX, SHARDS_DIR, TENSORS
from ..storage import Location, NodeCache, download, remote_identity
from ..storage.fetch import discard_part, listing
from .hdf5 import open_h5
from .hdf5_files import file_size_bound, new_file
from .manifest import ManifestShard
from .serving import check_file, is_mappable, serving_copy
from .sharded import read_manifest

log = logging.getLogger(__name__)

WHOLE_DIR = "whole"  # in a dataset's cache directory: tensors kept whole, one contiguous file each
PARALLEL_FETCHES = 8

StorageFormat = Literal["pt", "hdf5"]

# Shards of these tensors hold pair rows: the cache may evict them. Everything else stays whole.
PAIR_H5_PATHS = frozenset(s.h5_path for s in TENSORS if s.rows == "P")


def _bar(total: int, what: str, enabled: bool = True) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=what, disable=not enabled, leave=False)


def _local_identity(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _identity(location: Location) -> dict[str, Any]:
    if location.is_remote:
        return remote_identity(location).as_dict()
    return _local_identity(location.local_path)


def _fetch_raw(location: Location, part: Path, identity: dict[str, Any], bar: tqdm) -> Path:
    """The source bytes as a local file: ``part`` (downloaded, resumable) if remote, else the file itself."""
    if not location.is_remote:
        return location.local_path
    return download(location, part, int(identity["size"]), identity, on_bytes=bar.update)


def cached_hdf5(
    cache: NodeCache,
    dataset_dir: Path,
    location: Location,
    rel: str,
    identity: dict[str, Any],
    *,
    evictable: bool = False,
    progress: bool = True,
) -> Path:
    """The checked, contiguous local copy of the HDF5 file at ``location``, made once per node."""
    size = int(identity["size"])

    def build(temp: Path, part: Path) -> None:
        try:
            with _bar(size, f"fetch {location.name()}", progress and location.is_remote) as bar:
                raw = _fetch_raw(location, part, identity, bar)
            with _bar(_logical_bytes(raw), f"decompress {location.name()}", progress) as bar:
                if serving_copy(raw, temp, location.uri, on_bytes=bar.update):
                    return
            check_file(raw, location.uri)
            if location.is_remote:
                os.replace(raw, temp)
            else:
                shutil.copyfile(raw, temp)
        finally:
            discard_part(part)

    # A compressed source grows when decompressed: room for about twice its size is asked for.
    return cache.get(dataset_dir, rel, identity, build, nbytes=2 * size, evictable=evictable)


def _logical_bytes(path: Path) -> int:
    """Bytes of every dataset of an HDF5 file, decompressed (what the serving copy's bar counts)."""
    found: list[int] = []
    with open_h5(path) as f:
        f.visititems(lambda _, obj: found.append(obj.size * obj.dtype.itemsize) if hasattr(obj, "shape") else None)
    return sum(found)


def cached_file(cache: NodeCache, dataset_dir: Path, location: Location, rel: str, progress: bool = True) -> Path:
    """A remote file fetched as it is (PT files, config.json, the manifest), checked by identity only."""
    identity = _identity(location)

    def build(temp: Path, part: Path) -> None:
        with _bar(int(identity["size"]), f"fetch {location.name()}", progress) as bar:
            os.replace(_fetch_raw(location, part, identity, bar), temp)
        discard_part(part)

    return cache.get(dataset_dir, rel, identity, build, nbytes=int(identity["size"]))


@dataclass(frozen=True)
class ShardFiles:
    """Where the sharded reader finds each shard file: fetched and made contiguous on first use.

    Picklable (a location and a cache), so a reader that travels to a worker, task or actor fetches
    its shards on its own node.
    """

    location: Location  # the dataset directory (remote, or local compressed)
    cache: NodeCache
    dataset_dir: Path
    progress: bool = False

    @property
    def cache_limit(self) -> int | None:
        return self.cache.limit

    def keeps_whole(self, h5_path: str) -> bool:
        return h5_path not in PAIR_H5_PATHS

    def path(self, h5_path: str, file: str, nbytes: int, checksum: str) -> Path:
        rel = f"{SHARDS_DIR}/{file}"
        identity = {"size": nbytes, "checksum": checksum}
        return cached_hdf5(
            self.cache,
            self.dataset_dir,
            self.location.child(rel),
            rel,
            identity,
            evictable=h5_path in PAIR_H5_PATHS,
            progress=self.progress,
        )

    def whole(self, h5_path: str, shape: tuple[int, ...], dtype: np.dtype, shards: list[ManifestShard]) -> Path:
        """A tensor that stays whole (a table: any pair's negatives point into it) as one contiguous copy:
        its shards fetched together, checked, and laid end to end, so a gather is one mapped ``take``."""
        rel = f"{WHOLE_DIR}/{h5_path.replace('/', '.')}{HDF5_SUFFIXES[0]}"
        identity = {"shards": [s.checksum for s in shards], "shape": list(shape), "dtype": np.dtype(dtype).str}

        def build(temp: Path, part: Path) -> None:
            with ThreadPoolExecutor(min(PARALLEL_FETCHES, len(shards))) as pool:
                copies = list(pool.map(lambda s: self.path(h5_path, s.file, s.bytes, s.checksum), shards))
            with new_file(temp, file_size_bound([(shape, dtype, shape[0])])) as out:
                dset = out.create_dataset(h5_path, shape=shape, dtype=dtype)
                for shard, copy in zip(shards, copies):
                    with open_h5(copy) as f:
                        dset[shard.start : shard.stop] = f[h5_path][...]
            for shard in shards:  # the whole copy replaces them
                self.cache.discard(self.dataset_dir, f"{SHARDS_DIR}/{shard.file}")

        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        return self.cache.get(self.dataset_dir, rel, identity, build, nbytes=2 * nbytes)


def localize(
    location: Location,
    cache: NodeCache,
    options: dict[str, Any],
    *,
    storage_format: str = "auto",
    progress: bool = True,
) -> tuple[Path, StorageFormat | None]:
    """The local directory that serves the dataset at ``location``, and the format served from the cache
    (None: the dataset's own local files, which need no copy). ``options`` gains what the reader needs
    (a ``ShardFiles`` for the sharded layout)."""
    asked = location.uri
    if location.path.endswith(HDF5_SUFFIXES):
        options.setdefault("file_name", location.name())
        location = location.parent()
    dataset_dir = cache.dataset_dir(location.uri)
    if not location.is_remote:
        return _localize_compressed(location, cache, dataset_dir, options, progress)
    try:
        names = listing(location)
    except DatasetNotFoundError as exc:  # (refused credentials pass through as RemoteAccessError)
        raise DatasetNotFoundError(f"Dataset not found: {asked} ({exc})") from exc
    if not names:
        raise DatasetNotFoundError(f"Dataset not found: {asked} (no objects under {location.uri})")
    if asked != location.uri and options["file_name"] not in names:
        raise DatasetNotFoundError(f"HDF5 file not found: {asked}")
    dataset_dir.mkdir(parents=True, exist_ok=True)
    h5_name = str(options.get("file_name", HDF5_FILE))
    if storage_format in ("auto", "hdf5") and h5_name in names:
        h5 = location.child(h5_name)
        cached_hdf5(cache, dataset_dir, h5, h5_name, _identity(h5), progress=progress)
        return dataset_dir, "hdf5"
    if storage_format in ("auto", "hdf5") and SHARDS_DIR in names:
        manifest = location.child(f"{SHARDS_DIR}/{MANIFEST}")
        cached_file(cache, dataset_dir, manifest, f"{SHARDS_DIR}/{MANIFEST}", progress)
        options["shard_files"] = ShardFiles(location, cache, dataset_dir, progress)
        return dataset_dir, "hdf5"
    pt = sorted(n for n in names if n.endswith(PT_SUFFIX) or n == CONFIG_FILE)
    if storage_format == "hdf5" or not any(n.endswith(PT_SUFFIX) for n in pt):
        raise DatasetNotFoundError(
            f"No dataset files found at {location.uri}. "
            f"Expected {h5_name}, {SHARDS_DIR}/{MANIFEST} or *{PT_SUFFIX} files"
        )
    for name in pt:
        cached_file(cache, dataset_dir, location.child(name), name, progress)
    return dataset_dir, "pt"


def _localize_compressed(
    location: Location, cache: NodeCache, dataset_dir: Path, options: dict[str, Any], progress: bool
) -> tuple[Path, StorageFormat | None]:
    """A local dataset given a cache: its compressed HDF5 made contiguous there (anything mappable stays)."""
    directory = location.local_path
    h5_name = str(options.get("file_name", HDF5_FILE))
    if (directory / h5_name).is_file():
        with open_h5(directory / h5_name) as f:
            if is_mappable(f):
                return directory, None
        dataset_dir.mkdir(parents=True, exist_ok=True)
        h5 = location.child(h5_name)
        cached_hdf5(cache, dataset_dir, h5, h5_name, _identity(h5), progress=progress)
        return dataset_dir, "hdf5"
    if (directory / SHARDS_DIR / MANIFEST).is_file():
        if read_manifest(directory / SHARDS_DIR).get("compression") == COMPRESSION_NONE:
            return directory, None
        dataset_dir.mkdir(parents=True, exist_ok=True)
        rel = f"{SHARDS_DIR}/{MANIFEST}"
        manifest = directory / rel
        identity = _local_identity(manifest)

        def build(temp: Path, part: Path) -> None:
            shutil.copyfile(manifest, temp)

        cache.get(dataset_dir, rel, identity, build, nbytes=identity["size"])
        options["shard_files"] = ShardFiles(location, cache, dataset_dir, progress)
        return dataset_dir, "hdf5"
    return directory, None  # PT files map as they are
