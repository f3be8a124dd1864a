"""The node-local cache: verified local copies of remote (or compressed) dataset files, memory-mappable.

Layout under the cache root (``cache_dir=``; default ``$JASPER_RAY_CACHE`` or
``~/.cache/jasper_ray``): one directory per dataset, named by a hash of its
URI, holding the copies at their dataset-relative paths (so the directory opens
like any local dataset), and ``.jasper_cache/`` with, per copy, its entry
(``meta/<path>.json``: the identity of what it was made from, its size,
whether it may be evicted), its lock and its resumable part file.

A copy is served only while its entry's identity equals the source's now (a
changed object is fetched again). Copies are made under a per-file lock (one
download per node however many processes ask), checked by the caller's
``build`` before they are published by rename; a failed build leaves nothing.
With ``limit=``, copies marked evictable (pair-row pieces) go least recently
used first; the cache deletes only files it has an entry for.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import fsync_path
from ..errors import CacheError
from .fetch import ensure_free
from .lock import file_lock

log = logging.getLogger(__name__)

CACHE_ENV = "JASPER_RAY_CACHE"
STATE_DIR = ".jasper_cache"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "jasper_ray")


@dataclass(frozen=True)
class Entry:
    """One published copy: its file, what it was made from, and whether eviction may take it."""

    dataset_dir: Path
    rel: str
    meta: Path
    identity: dict[str, Any]
    nbytes: int
    evictable: bool

    @property
    def path(self) -> Path:
        return self.dataset_dir / self.rel


@dataclass(frozen=True)
class NodeCache:
    """A cache root and its size limit (bytes; None: only the disk bounds it). Picklable: paths and numbers."""

    root: Path
    limit: int | None = None

    @classmethod
    def at(cls, cache_dir: str | os.PathLike | None = None, limit: int | None = None) -> NodeCache:
        if limit is not None and int(limit) <= 0:
            raise ValueError(f"cache_limit must be a positive number of bytes, got {limit!r}")
        return cls(
            Path(cache_dir) if cache_dir is not None else default_cache_dir(), None if limit is None else int(limit)
        )

    def dataset_dir(self, uri: str) -> Path:
        """Where copies of the dataset at ``uri`` live: a readable stem and a hash of the whole URI."""
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", uri.rstrip("/").rsplit("/", 1)[-1])[:48] or "dataset"
        return self.root / f"{stem}-{hashlib.sha256(uri.encode()).hexdigest()[:16]}"

    def _state(self, dataset_dir: Path, kind: str, rel: str, suffix: str) -> Path:
        return dataset_dir / STATE_DIR / kind / f"{rel}{suffix}"

    def cached(self, dataset_dir: Path, rel: str, identity: dict[str, Any]) -> Path | None:
        """The published copy of ``rel`` made from ``identity``, marked used now; None if there is none."""
        meta = self._state(dataset_dir, "meta", rel, ".json")
        final = dataset_dir / rel
        try:
            entry = json.loads(meta.read_text())
        except (OSError, ValueError):
            return None
        if entry.get("identity") != identity or not final.is_file():
            return None
        try:
            os.utime(meta)  # least recently used = oldest entry mtime
        except OSError:
            pass
        return final

    def get(
        self,
        dataset_dir: Path,
        rel: str,
        identity: dict[str, Any],
        build: Callable[[Path, Path], None],
        *,
        nbytes: int,
        evictable: bool = False,
    ) -> Path:
        """The local copy of ``rel``: the cached one if its identity matches, else made by ``build``.

        ``build(temp, part)`` writes the verified copy to ``temp`` (``part`` is a stable scratch path for
        a resumable download); it raises to refuse (e.g. ``ChecksumError``), and nothing it wrote stays
        but ``part``. ``nbytes`` is the copy's expected size (room is made for it first).
        """
        found = self.cached(dataset_dir, rel, identity)
        if found is not None:
            return found
        with file_lock(self._state(dataset_dir, "locks", rel, ".lock")):
            found = self.cached(dataset_dir, rel, identity)  # another process made it while we waited
            if found is not None:
                return found
            final = dataset_dir / rel
            meta = self._state(dataset_dir, "meta", rel, ".json")
            part = self._state(dataset_dir, "parts", rel, ".part")
            temp = self._state(dataset_dir, "tmp", rel, f".{socket.gethostname()}-{os.getpid()}")
            for p in (final, meta, part, temp):
                p.parent.mkdir(parents=True, exist_ok=True)
            self.make_room(nbytes, evictable, what=str(final))
            meta.unlink(missing_ok=True)  # an old copy stops being served before it is replaced
            try:
                build(temp, part)
                with open(temp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(temp, final)
            except OSError as exc:
                if exc.errno == errno.ENOSPC and not isinstance(exc, CacheError):
                    raise CacheError(
                        errno.ENOSPC,
                        f"disk full in {self.root} while making {final} (nothing was kept). Free space there, "
                        "or give cache_dir= (CLI --cache-dir) on a larger disk.",
                    ) from exc
                raise
            finally:
                temp.unlink(missing_ok=True)
            entry = {"identity": identity, "bytes": final.stat().st_size, "evictable": evictable, "made": time.time()}
            tmp_meta = meta.with_name(meta.name + ".tmp")
            tmp_meta.write_text(json.dumps(entry))
            os.replace(tmp_meta, meta)
            fsync_path(final.parent)
            log.info("cache: made %s (%d bytes)", final, entry["bytes"])
            return final

    def discard(self, dataset_dir: Path, rel: str) -> None:
        """Delete one copy this cache made (its entry first, so it is never served half)."""
        with file_lock(self._state(dataset_dir, "locks", rel, ".lock")):
            self._state(dataset_dir, "meta", rel, ".json").unlink(missing_ok=True)
            (dataset_dir / rel).unlink(missing_ok=True)

    def entries(self) -> list[Entry]:
        """Every published copy under the root."""
        found = []
        for dataset_dir in self.root.iterdir() if self.root.is_dir() else ():
            meta_root = dataset_dir / STATE_DIR / "meta"
            for meta in meta_root.rglob("*.json"):
                try:
                    entry = json.loads(meta.read_text())
                except (OSError, ValueError):
                    continue
                rel = meta.relative_to(meta_root).as_posix()[: -len(".json")]
                found.append(
                    Entry(
                        dataset_dir,
                        rel,
                        meta,
                        entry.get("identity", {}),
                        int(entry.get("bytes", 0)),
                        bool(entry.get("evictable")),
                    )
                )
        return found

    def make_room(self, nbytes: int, evictable: bool, what: str) -> None:
        """Evict least recently used evictable copies until ``nbytes`` more fit the limit and the disk."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.limit is not None:
            entries = self.entries()
            used = sum(e.nbytes for e in entries)
            if used + nbytes > self.limit:
                pinned = sum(e.nbytes for e in entries if not e.evictable)
                needed = pinned + nbytes
                if needed > self.limit:
                    raise CacheError(
                        errno.ENOSPC,
                        f"cache_limit={self.limit} bytes is too small for {what}: the embedding tables and other "
                        f"copies that must stay whole take {pinned} bytes, and this copy {nbytes}; "
                        f"give cache_limit of at least {needed} bytes.",
                    )
                for entry in sorted((e for e in entries if e.evictable), key=_mtime):
                    if used + nbytes <= self.limit:
                        break
                    if self._evict(entry):
                        used -= entry.nbytes
        ensure_free(self.root, nbytes, what)

    def _evict(self, entry: Entry) -> bool:
        """Delete one copy (not while another process is making it): entry first, so it is never served half."""
        lock = self._state(entry.dataset_dir, "locks", entry.rel, ".lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            log.info("cache: evicting %s (%d bytes)", entry.path, entry.nbytes)
            entry.meta.unlink(missing_ok=True)
            entry.path.unlink(missing_ok=True)  # a process that maps it keeps its pages until it unmaps
            return True
        finally:
            os.close(fd)


def _mtime(entry: Entry) -> float:
    try:
        return entry.meta.stat().st_mtime
    except OSError:
        return 0.0
