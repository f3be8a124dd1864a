"""One piece of a conversion: its HDF5 file, written (or reused when it verifies) by one task.

Each piece is written to its own HDF5 file with the final chunk shape and
filters, so assembly copies the already-compressed chunks and never
re-encodes. Piece files keep the block digests of their rows: the tensor
checksum is combined from them, and a re-run reuses a piece only when its rows
hash to them again. ``WorkDir`` holds the pieces of one conversion.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import TEMP_MARK, atomic_output
from ..formats import open_dataset
from ..formats.base import Reader
from ..formats.checksum import BlockHasher, block_rows
from ..formats.chunks import dataset_options
from ..formats.hdf5 import create_file, require_h5py
from .plan import ConversionPlan, ShardTask
from .writer import write_rows

log = logging.getLogger(__name__)

ATTR_DIGESTS = "block_digests"


@dataclass
class ShardResult:
    shard_id: str
    rows: int
    digests: list[str]
    file_bytes: int
    seconds: float
    reused: bool
    worker_pid: int
    worker_peak_rss: int


# --- one shard ------------------------------------------------------------------------


def _source(dataset_dir: str) -> Reader:
    """The PT sources, mapped for one task and closed after it.

    Not cached per worker: a long-lived worker (a cluster, a reused local Ray) would keep serving the
    mapping of files that were replaced since (a new dataset written to the same path), and every page a
    worker ever touched would stay in its RSS. Mapping a file again costs milliseconds.
    """
    return open_dataset(dataset_dir, storage_format="pt", use_mmap=True)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def shard_digests(path: Path, task: ShardTask) -> list[str] | None:
    """The shard's block digests if its file is complete and its rows hash to them, else None."""
    h5py = require_h5py()
    try:
        with h5py.File(path, "r", locking=False) as f:
            dset = f[task.job.h5_path]
            recorded = [bytes(d).hex() for d in dset.attrs[ATTR_DIGESTS].reshape(-1, 32)] if dset.size else []
            if dset.shape[0] != task.shard.stop - task.shard.start:
                return None
            job = task.job
            hasher = BlockHasher(block_rows(job.shape, job.dtype.itemsize), job.nbytes // max(job.shape[0], 1))
            step = block_rows(job.shape, job.dtype.itemsize)
            for a in range(0, dset.shape[0], step):
                hasher.update(dset[a : a + step])
            got = [d.hex() for d in hasher.finish()]
    except (OSError, KeyError, ValueError) as exc:
        log.info("shard %s cannot be reused (%s)", path.name, exc)
        return None
    return got if got == recorded else None


def write_shard(task: ShardTask, inject_failure: str | None = None) -> ShardResult:
    """Write (or reuse, if it verifies) one shard file; published atomically under ``work_dir``."""
    started = time.perf_counter()
    require_h5py()  # before any work, when h5py is missing
    path = Path(task.work_dir) / task.shard.file_name
    if path.exists():
        digests = shard_digests(path, task)
        if digests is not None:
            return ShardResult(
                task.shard.shard_id,
                task.shard.stop - task.shard.start,
                digests,
                path.stat().st_size,
                time.perf_counter() - started,
                True,
                os.getpid(),
                _peak_rss(),
            )
        log.warning("shard %s does not verify; rewriting it", path)
    if inject_failure is not None and not Path(inject_failure).exists():
        Path(inject_failure).touch()  # fails once: the retry finds the marker
        raise OSError(f"injected failure writing shard {task.shard.shard_id}")
    job, shard = task.job, task.shard
    opts = dataset_options(job.shape, job.dtype, task.compression, task.compression_opts, task.shuffle)
    rows = shard.stop - shard.start
    if opts:
        opts["maxshape"] = (None,) + job.shape[1:]  # lets a short last shard keep the full chunk shape
    # The shard is built in memory (it is bounded by the shard size) and written with plain file I/O:
    # HDF5 cannot recover from a write failing mid-file (ENOSPC at close leaves the library in a state
    # that segfaults the process later, h5py#914), so a full or failing disk must fail here, cleanly.
    image = io.BytesIO()
    with create_file(image) as f:
        dset = f.create_dataset(job.h5_path, shape=(rows,) + job.shape[1:], dtype=job.dtype, **opts)
        hasher = BlockHasher(block_rows(job.shape, job.dtype.itemsize), job.nbytes // max(job.shape[0], 1))
        with _source(task.dataset_dir) as source:
            write_rows(dset, source, job, shard.start, shard.stop, hasher, dest_start=0)
        digests = hasher.finish()
        dset.attrs[ATTR_DIGESTS] = np.frombuffer(b"".join(digests), dtype=np.uint8)
        dset.attrs["start"], dset.attrs["stop"] = shard.start, shard.stop
    with atomic_output(path) as temp:
        try:
            with open(temp, "wb") as out:
                out.write(image.getbuffer())
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror or str(exc), str(temp)) from exc
    del image
    return ShardResult(
        shard.shard_id,
        rows,
        [d.hex() for d in digests],
        path.stat().st_size,
        time.perf_counter() - started,
        False,
        os.getpid(),
        _peak_rss(),
    )


# --- the work directory ------------------------------------------------------------------


class WorkDir:
    """The shard directory of one conversion, locked against a second concurrent conversion."""

    def __init__(self, path: Path, plan: ConversionPlan):
        self.path = path
        self.plan = plan
        self._lock_fd: int | None = None

    def __enter__(self) -> WorkDir:
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.path / "lock", os.O_CREAT | os.O_RDWR)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RuntimeError(f"another conversion is running on {self.path} (its lock is held)") from None
        plan_file = self.path / "plan.json"
        previous = json.loads(plan_file.read_text()).get("key") if plan_file.exists() else None
        for p in self.path.iterdir():
            stale_shard = p.suffix == ".h5" and previous != self.plan.key
            if TEMP_MARK in p.name or stale_shard:  # dead writers' temps; shards of another plan
                p.unlink()
        if previous != self.plan.key:
            with atomic_output(plan_file) as temp:
                temp.write_text(json.dumps({"key": self.plan.key, **self.plan._body()}, default=str))
        return self

    def existing_shards(self) -> int:
        return sum(1 for s in self.plan.shards if (self.path / s.file_name).exists())

    def __exit__(self, *exc: object) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
