"""Sharded conversion, without Ray: the plan, one shard's file, assembly, and the manifest.

A plan splits every output dataset into row ranges aligned to checksum
blocks (themselves whole HDF5 chunks), of about ``shard_bytes`` each; small
tensors go whole. Each shard is written to its own HDF5 file with the final
chunk shape and filters, so assembly copies the already-compressed chunks
(``read_direct_chunk`` / ``write_direct_chunk``) and never re-encodes;
uncompressed shards are contiguous and copied as bytes. Shard files keep the
block digests of their rows: the tensor checksum is combined from them, and a
re-run reuses a shard only when its rows hash to them again.

The Ray layer (``ray_convert``) only schedules ``write_shard`` calls and
calls ``assemble_single`` / ``publish_sharded``; all format logic is here.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import TEMP_MARK, atomic_output, fsync_dir
from .checksum import BlockHasher, block_rows, combine
from .errors import DatasetFormatError
from .fingerprint import fingerprint
from .formats import open_dataset
from .formats.base import Reader
from .formats.hdf5 import create_file, dataset_options, map_contiguous, require_h5py
from .formats.sharded import MANIFEST, SHARDS_DIR
from .schema import FORMAT_VERSION, HDF5_FILE
from .writer import TensorJob, set_checksum, tensor_jobs, write_root_attrs, write_rows

log = logging.getLogger(__name__)

SHARD_BYTES = 256 << 20
ATTR_DIGESTS = "block_digests"


def work_dir_for(output: Path) -> Path:
    """Where shards of a conversion into ``output`` live until assembly (hidden: never auto-detected)."""
    return output.with_name(f".{output.name}.work")


@dataclass(frozen=True)
class Shard:
    shard_id: str
    h5_path: str
    start: int
    stop: int

    @property
    def file_name(self) -> str:
        return f"{self.shard_id}.h5"


@dataclass(frozen=True)
class ShardTask:
    """Everything one task needs: paths, names and integers, never data or handles."""

    dataset_dir: str
    work_dir: str
    shard: Shard
    job: TensorJob
    compression: str | None
    compression_opts: Any
    shuffle: bool


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


@dataclass
class ConversionPlan:
    dataset_dir: str
    compression: str | None
    compression_opts: Any
    shuffle: bool
    shard_bytes: int
    config: dict
    source_fingerprint: dict
    jobs: list[TensorJob]
    shards: list[Shard]
    key: str = field(default="")

    def __post_init__(self) -> None:
        if not self.key:
            body = json.dumps(self._body(), sort_keys=True, default=str)
            self.key = hashlib.sha256(body.encode()).hexdigest()[:16]

    def _body(self) -> dict[str, Any]:
        jobs = [
            {"h5_path": j.h5_path, "shape": list(j.shape), "dtype": j.dtype.str, "source": j.source} for j in self.jobs
        ]
        return {
            "format_version": FORMAT_VERSION,
            "compression": self.compression,
            "compression_opts": self.compression_opts,
            "shuffle": self.shuffle,
            "shard_bytes": self.shard_bytes,
            "config": self.config,
            "source_fingerprint": self.source_fingerprint,
            "jobs": jobs,
            "shards": [asdict(s) for s in self.shards],
        }

    def tasks(self, work_dir: Path) -> list[ShardTask]:
        job_of = {j.h5_path: j for j in self.jobs}
        return [
            ShardTask(
                self.dataset_dir,
                str(work_dir),
                s,
                job_of[s.h5_path],
                self.compression,
                self.compression_opts,
                self.shuffle,
            )
            for s in self.shards
        ]

    def shards_of(self, job: TensorJob) -> list[Shard]:
        return [s for s in self.shards if s.h5_path == job.h5_path]

    @property
    def total_bytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)


def plan_conversion(
    reader: Reader,
    compression: str | None = "gzip",
    compression_opts: Any = None,
    shuffle: bool = True,
    shard_bytes: int = SHARD_BYTES,
) -> ConversionPlan:
    """A deterministic plan: the same sources and options always give the same shards and key."""
    dataset_options((1, 1), np.dtype("float32"), compression, compression_opts, shuffle)  # reject bad options
    jobs = tensor_jobs(reader)
    shards = []
    for job in jobs:
        rows = job.shape[0]
        row_bytes = max(1, job.nbytes // max(rows, 1))
        block = block_rows(job.shape, job.dtype.itemsize)
        per_shard = block * max(1, shard_bytes // (block * row_bytes))
        starts = range(0, rows, per_shard) if rows else [0]
        for i, start in enumerate(starts):
            shards.append(
                Shard(
                    f"{len(shards):05d}-{job.h5_path.replace('/', '.')}-{i}",
                    job.h5_path,
                    start,
                    min(start + per_shard, rows),
                )
            )
    return ConversionPlan(
        str(reader.directory),
        compression,
        compression_opts,
        shuffle,
        int(shard_bytes),
        reader.config,
        fingerprint(reader.files()),
        jobs,
        shards,
    )


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


# --- assembly --------------------------------------------------------------------------------


def _chunk_offsets(rows: int, chunk_rows: int, ndim: int) -> Iterator[tuple[int, ...]]:
    for start in range(0, rows, chunk_rows):
        yield (start,) + (0,) * (ndim - 1)


def copy_shard(src: Any, dst: Any, dest_start: int, src_path: Path) -> int:
    """Copy a shard dataset into rows ``dest_start:`` of ``dst``: compressed chunks as they are, else bytes."""
    rows = src.shape[0]
    if dst.chunks is not None:
        for offset in _chunk_offsets(rows, dst.chunks[0], len(dst.shape)):
            mask, data = src.id.read_direct_chunk(offset)
            dst.id.write_direct_chunk((dest_start + offset[0],) + offset[1:], data, mask)
    elif rows:
        mapped = map_contiguous(src_path, src)
        step = max(1, (64 << 20) // max(1, mapped[:1].nbytes))
        for a in range(0, rows, step):
            dst[dest_start + a : dest_start + min(a + step, rows)] = mapped[a : a + step]
    return src.id.get_storage_size()


def check_free_space(output: Path, shard_bytes: int) -> None:
    """Refuse to start a file that cannot fit: HDF5 does not survive a disk filling up mid-write.

    The assembled file holds the shards' chunks and less metadata than they do, so the shard files'
    total (plus a margin) bounds it. A disk filled by someone else during assembly still fails in HDF5.
    """
    need = shard_bytes + (1 << 20)
    free = shutil.disk_usage(output.parent).free
    if free < need:
        raise OSError(
            errno.ENOSPC,
            f"No space left on device to assemble {output}: it needs up to {need / 2**20:.1f} MiB, "
            f"{free / 2**20:.1f} MiB are free",
        )


def assemble_single(
    plan: ConversionPlan,
    work_dir: Path,
    output: Path,
    results: dict[str, ShardResult],
    on_bytes: Callable[[int], Any] | None = None,
) -> None:
    """Build ``output`` from the shard files by chunk copy, publish it atomically."""
    h5py = require_h5py()
    check_free_space(output, sum((work_dir / s.file_name).stat().st_size for s in plan.shards))
    with atomic_output(output) as temp, create_file(temp) as f:
        write_root_attrs(f, plan.config, plan.source_fingerprint, plan.compression)
        for job in plan.jobs:
            opts = dataset_options(job.shape, job.dtype, plan.compression, plan.compression_opts, plan.shuffle)
            dst = f.create_dataset(job.h5_path, shape=job.shape, dtype=job.dtype, **opts)
            digests: list[bytes] = []
            for shard in plan.shards_of(job):
                path = work_dir / shard.file_name
                with h5py.File(path, "r", locking=False) as sf:
                    copied = copy_shard(sf[job.h5_path], dst, shard.start, path)
                digests += [bytes.fromhex(d) for d in results[shard.shard_id].digests]
                if on_bytes is not None:
                    on_bytes(copied)
            set_checksum(dst, job, digests)


# --- the sharded layout ------------------------------------------------------------------------


def manifest_for(plan: ConversionPlan, work_dir: Path, results: dict[str, ShardResult]) -> dict[str, Any]:
    tensors = []
    for job in plan.jobs:
        shards = plan.shards_of(job)
        digests = [bytes.fromhex(d) for s in shards for d in results[s.shard_id].digests]
        tensors.append(
            {
                "h5_path": job.h5_path,
                "shape": list(job.shape),
                "dtype": job.dtype.str,
                "checksum": combine(digests),
                "checksum_block_rows": block_rows(job.shape, job.dtype.itemsize),
                "shards": [
                    {
                        "file": s.file_name,
                        "start": s.start,
                        "stop": s.stop,
                        "bytes": (work_dir / s.file_name).stat().st_size,
                        "checksum": combine(bytes.fromhex(d) for d in results[s.shard_id].digests),
                    }
                    for s in shards
                ],
            }
        )
    return {
        "format_version": FORMAT_VERSION,
        "layout": "sharded",
        "compression": plan.compression or "none",
        "config": plan.config,
        "source_fingerprint": plan.source_fingerprint,
        "tensors": tensors,
    }


def publish_sharded(plan: ConversionPlan, work_dir: Path, final_dir: Path, results: dict[str, ShardResult]) -> None:
    """Turn the work directory into ``final_dir`` (shards + manifest) with directory renames."""
    manifest = manifest_for(plan, work_dir, results)
    for leftover in ("plan.json", "lock"):
        (work_dir / leftover).unlink(missing_ok=True)
    with atomic_output(work_dir / MANIFEST) as temp:
        temp.write_text(json.dumps(manifest, indent=1))
    old = final_dir.with_name(f".{final_dir.name}.old{TEMP_MARK}{os.getpid()}")
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(work_dir, final_dir)
    fsync_dir(final_dir.parent)
    if old.exists():
        shutil.rmtree(old)


def read_manifest(shards_dir: Path) -> dict[str, Any]:
    path = shards_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetFormatError(f"{path}: unreadable shard manifest ({exc})") from exc
    if manifest.get("layout") != "sharded" or "tensors" not in manifest:
        raise DatasetFormatError(f"{path}: not a jasper_ray shard manifest")
    return manifest


def default_output(dataset_dir: Path, layout: str) -> Path:
    return dataset_dir / (HDF5_FILE if layout == "single" else SHARDS_DIR)
