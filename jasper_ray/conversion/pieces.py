"""One piece of a conversion: its part file, written (or reused when it verifies) by one task.

Each piece is written to its own part file with the final chunk shape and
filters (``formats.hdf5_writer.write_part``), so assembly copies the
already-compressed chunks and never re-encodes. Part files keep the block
digests of their rows: the tensor checksum is combined from them, and a re-run
reuses a piece only when its rows hash to them again. ``WorkDir`` holds the
pieces of one conversion. No Ray here: the Ray driver runs ``write_piece``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..atomic import TEMP_MARK, atomic_output, writer_tag
from ..faults import fail_once
from ..formats import open_dataset
from ..formats.base import Reader
from ..formats.hdf5 import require_h5py
from ..formats.hdf5_writer import part_digests, write_part
from ..schema import HDF5_SUFFIX, LOCK_FILE, PLAN_FILE
from .plan import ConversionPlan, PieceTask

log = logging.getLogger(__name__)


@dataclass
class PieceResult:
    piece_id: str
    rows: int
    digests: list[str]  # hex: results travel back through Ray and into the manifest
    file_bytes: int
    seconds: float
    reused: bool
    worker_pid: int
    worker_peak_rss: int


# --- one piece ------------------------------------------------------------------------------


def _source(dataset_dir: str) -> Reader:
    """The PT sources, mapped for one task and closed after it.

    Not cached per worker: a long-lived worker (a cluster, a reused local Ray) would keep serving the
    mapping of files that were replaced since (a new dataset written to the same path), and every page a
    worker ever touched would stay in its RSS. Mapping a file again costs milliseconds.
    """
    return open_dataset(dataset_dir, storage_format="pt", use_mmap=True)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def piece_digests(path: Path, task: PieceTask) -> list[str] | None:
    """The piece's block digests if its file is complete and its rows hash to them, else None."""
    try:
        digests = part_digests(path, task.column, task.piece.start, task.piece.stop)
    except (OSError, KeyError, ValueError) as exc:
        log.info("piece %s cannot be reused (%s)", path.name, exc)
        return None
    return None if digests is None else [d.hex() for d in digests]


def write_piece(task: PieceTask) -> PieceResult:
    """Write (or reuse, if it verifies) one piece's part file; published atomically under ``work_dir``."""
    started = time.perf_counter()
    require_h5py()  # before any work, when h5py is missing
    piece = task.piece
    path = Path(task.work_dir) / piece.file_name
    digests = piece_digests(path, task) if path.exists() else None
    reused = digests is not None
    if digests is None:
        if path.exists():
            log.warning("piece %s does not verify; rewriting it", path)
        fail_once(piece.piece_id, f"injected failure writing piece {piece.piece_id}")
        with _source(task.dataset_dir) as source:
            rows = task.column.rows(source)
            written = write_part(
                path, task.column, rows, piece.start, piece.stop, task.compression, task.compression_opts, task.shuffle
            )
        digests = [d.hex() for d in written]
    return PieceResult(
        piece.piece_id,
        piece.stop - piece.start,
        digests,
        path.stat().st_size,
        time.perf_counter() - started,
        reused,
        os.getpid(),
        _peak_rss(),
    )


# --- the work directory ------------------------------------------------------------------


class WorkDir:
    """The piece directory of one conversion, locked against a second concurrent conversion."""

    def __init__(self, path: Path, plan: ConversionPlan):
        self.path = path
        self.plan = plan
        self._lock_fd: int | None = None

    def __enter__(self) -> WorkDir:
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.path / LOCK_FILE, os.O_CREAT | os.O_RDWR)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self._lock_fd, 256).decode(errors="replace").strip() or "unknown"
            os.close(self._lock_fd)
            raise RuntimeError(
                f"another conversion is running on {self.path} (its lock is held by {holder}: host.pid.start)"
            ) from None
        # Who holds it, for the message a second conversion gets (NOTE [writer tags] in atomic).
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, writer_tag().encode(), 0)
        plan_file = self.path / PLAN_FILE
        previous = json.loads(plan_file.read_text()).get("key") if plan_file.exists() else None
        for p in self.path.iterdir():
            stale_piece = p.suffix == HDF5_SUFFIX and previous != self.plan.key
            if TEMP_MARK in p.name or stale_piece:  # dead writers' temps; pieces of another plan
                p.unlink()
        if previous != self.plan.key:
            with atomic_output(plan_file) as temp:
                temp.write_text(json.dumps({"key": self.plan.key, **self.plan._body()}, default=str))
        return self

    def existing_pieces(self) -> int:
        return sum(1 for p in self.plan.pieces if (self.path / p.file_name).exists())

    def __exit__(self, *exc: object) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
