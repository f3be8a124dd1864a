"""One piece of a conversion: its part file, written (or reused when it verifies) by one task.

Each piece is written to its own part file with the final chunk shape and
filters (``formats.hdf5_writer.write_part``), so assembly copies the
already-compressed chunks and never re-encodes. Part files keep the block
digests of their rows: the tensor checksum is combined from them, and a re-run
reuses a piece only when its rows hash to them again. ``WorkDir`` holds the
pieces of one conversion. No Ray here: the Ray driver runs ``write_piece``.

NOTE [in-place assembly]: uncompressed (``compression=None``) into one
``dataset.h5``, there are no part files. The driver allocates the final file in
the work directory first, every dataset contiguous at a known offset
(``publish.allocate_in_place``), and each piece writes its rows there in place
(``formats.serving.Contiguous``, plain ``pwrite``), hashing them as it writes.
Pieces are cut on checksum block boundaries (``plan.piece_ranges``), so a
piece's block digests are the tensor's own, exactly what a part file would
record: no digest is computed after the writes. A piece syncs its rows, then
leaves a record of its digests (``<piece>.done``); a re-run after a killed
driver finds the file and the records, and reuses a piece when its rows in the
file hash to its record again. Assembly is then metadata only: checksum
attributes, fsync and one rename (``publish.finish_in_place``). The file is
published only by that rename, so a killed driver or task leaves the hidden
work directory (locked, its lock naming host.pid.start), never a half
``dataset.h5``.

NOTE [keyword lists once]: upstream stores keyword ids as pickled lists of
lists; unpickling them (``weights_only``) costs more than converting them, and
every keyword piece would do it again. The driver, which reads them for the
plan, leaves their CSR arrays in the work directory (``save_keyword_csr``)
and the keyword pieces map those. Never in a shard directory: removed before
the sharded layout is published.

NOTE [unsynced pieces]: a task publishes its part file by rename without
fsync: on 2 cores an fsync in the task leaves its core idle for ~8% of the
piece's time. The driver, idle otherwise, syncs what must last while the other
tasks go on: each shard of the sharded layout as it returns; for one
``dataset.h5``, only the file the parts are copied into. A part file that a
crash left torn is no danger: a re-run reuses a piece only when its rows hash
to the digests it records.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import TEMP_MARK, atomic_output, writer_tag
from ..faults import fail_once
from ..formats import open_dataset
from ..formats.arrays import RowArray
from ..formats.base import Reader
from ..formats.checksum import BlockDigests, BlockHasher, block_digests, block_rows, row_nbytes
from ..formats.columns import KEYWORD_SOURCE, Column
from ..formats.hdf5 import require_h5py
from ..formats.hdf5_writer import part_digests, write_part, write_rows
from ..formats.serving import Contiguous
from ..schema import HDF5_FILE, HDF5_SUFFIX, LOCK_FILE, PLAN_FILE
from ..storage.fetch import fetched_bytes
from .plan import ConversionPlan, PieceTask
from .ranged import ranged_rows, recorded_piece, remote_rows, upload_piece

# The preallocated file of an in-place conversion, in the work directory, and a finished piece's record beside it.
IN_PLACE_FILE = HDF5_FILE
RECORD_SUFFIX = ".done"
KEYWORD_CSR_PREFIX = "keyword_ids."


def record_file(piece_id: str) -> str:
    return f"{piece_id}{RECORD_SUFFIX}"


log = logging.getLogger(__name__)


@dataclass
class PieceResult:
    piece_id: str
    rows: int
    digests: list[str]  # hex sha256 per checksum block: results travel back through Ray and into the manifest
    file_bytes: int
    seconds: float
    reused: bool
    worker_pid: int
    worker_peak_rss: int
    fast_digests: list[str] = field(default_factory=list)  # hex xxh3-128 per block (NOTE [fast block digests])
    fetched_bytes: int = 0  # read from object storage by the task (a remote source's rows)
    finite: bool | None = None  # every value finite (floats)
    cpu_seconds: float = 0.0  # the task's CPU time (user + system), to tell work from waiting on a busy machine
    started_at: float = 0.0  # time.time() when the task began: a conversion's timeline (idle workers, the tail)

    def block_digests(self) -> BlockDigests:
        return BlockDigests.from_hex(self.digests, self.fast_digests, self.finite)


# --- one piece ------------------------------------------------------------------------------


def _source(dataset_dir: str) -> Reader:
    """The PT sources, mapped for one task and closed after it.

    Not cached per worker: a long-lived worker (a cluster, a reused local Ray) would keep serving the
    mapping of files that were replaced since (a new dataset written to the same path), and every page a
    worker ever touched would stay in its RSS. Mapping a file again costs milliseconds.
    """
    return open_dataset(dataset_dir, storage_format="pt", use_mmap=True)


def keyword_csr_file(column: Column) -> str | None:
    """The work directory's file of a keyword column's CSR array (NOTE [keyword lists once]), else None."""
    return f"{KEYWORD_CSR_PREFIX}{column.source_name}.npy" if column.source_kind == KEYWORD_SOURCE else None


def save_keyword_csr(reader: Reader, columns: list[Column], work_dir: Path) -> None:
    """The keyword columns' CSR arrays as ``.npy`` files in the work directory (NOTE [keyword lists once])."""
    for column in columns:
        name = keyword_csr_file(column)
        if name is not None:
            with atomic_output(work_dir / name, durable=False) as temp, open(temp, "wb") as out:
                np.save(out, np.asarray(column.rows(reader)), allow_pickle=False)


@contextlib.contextmanager
def _rows(task: PieceTask) -> Iterator[RowArray]:
    """The whole source array of the task's column (read lazily): the driver's keyword CSR arrays, byte ranges
    of the PT files (mapped, or ranged GETs: NOTE [mapped sources] in ranged), or the files opened by torch."""
    saved = keyword_csr_file(task.column)
    if saved is not None and (Path(task.work_dir) / saved).exists():
        yield np.load(Path(task.work_dir) / saved, mmap_mode="r", allow_pickle=False)
        return
    if task.ranged is not None:
        yield ranged_rows(task.ranged)
        return
    if task.source is not None:
        with remote_rows(task.source, task.column) as rows:
            yield rows
        return
    with _source(task.dataset_dir) as source:
        yield task.column.rows(source)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def piece_digests(path: Path, task: PieceTask) -> BlockDigests | None:
    """The piece's block digests if its file is complete and its rows hash to them, else None."""
    try:
        return part_digests(path, task.column, task.piece.start, task.piece.stop)
    except (OSError, KeyError, ValueError) as exc:
        log.info("piece %s cannot be reused (%s)", path.name, exc)
        return None


def in_place_target(task: PieceTask) -> Contiguous:
    """The piece's rows in the work directory's preallocated file (NOTE [in-place assembly])."""
    assert task.in_place_offset is not None
    column = task.column
    whole = Contiguous(str(Path(task.work_dir) / IN_PLACE_FILE), task.in_place_offset, column.shape, column.dtype)
    return whole.rows(task.piece.start, task.piece.stop)


def in_place_digests(task: PieceTask) -> BlockDigests | None:
    """The digests of an in-place piece whose rows in the file hash to its recorded sha256 digests again, else
    None."""
    record = Path(task.work_dir) / record_file(task.piece.piece_id)
    if not record.exists():
        return None
    try:
        recorded = json.loads(record.read_text())
        column = task.column
        rows = block_rows(column.shape, column.dtype.itemsize)
        got = block_digests(in_place_target(task), rows, row_nbytes(column.shape, column.dtype))
    except (OSError, ValueError) as exc:
        log.info("piece %s cannot be reused (%s)", task.piece.piece_id, exc)
        return None
    return got if got.to_hex()[0] == recorded else None


def write_in_place(task: PieceTask) -> BlockDigests:
    """Write the piece's rows into the preallocated file, sync them, record their digests; return them."""
    piece, column = task.piece, task.column
    target = in_place_target(task)
    hasher = BlockHasher.for_tensor(column.shape, column.dtype)
    with _rows(task) as rows:
        write_rows(target, rows, piece.start, piece.stop, hasher, dest_start=0, refuse_nonfinite=task.refuse_nonfinite)
    target.sync()
    digests = hasher.finish()
    with atomic_output(Path(task.work_dir) / record_file(piece.piece_id)) as temp:
        temp.write_text(json.dumps(digests.to_hex()[0]))
    return digests


def write_piece(task: PieceTask) -> PieceResult:
    """Write (or reuse, if it verifies) one piece: its part file, published atomically under ``work_dir``, its
    rows in place (``task.in_place_offset``, NOTE [in-place assembly]), or its shard uploaded (``task.upload``)."""
    started, cpu_started, started_at = time.perf_counter(), time.process_time(), time.time()
    fetched = fetched_bytes()
    require_h5py()  # before any work, when h5py is missing
    if task.upload is not None:
        with tempfile.TemporaryDirectory(prefix="jasper-piece-") as tmp:
            digests, reused, nbytes = _bucket_piece(task, Path(tmp) / task.piece.file_name)
    else:
        digests, reused, nbytes = _local_piece(task)
    sha256, fast = digests.to_hex()
    return PieceResult(
        task.piece.piece_id,
        task.piece.stop - task.piece.start,
        sha256,
        nbytes,
        time.perf_counter() - started,
        reused,
        os.getpid(),
        _peak_rss(),
        fast_digests=fast,
        fetched_bytes=fetched_bytes() - fetched,
        finite=digests.finite,
        cpu_seconds=time.process_time() - cpu_started,
        started_at=started_at,
    )


def _local_piece(task: PieceTask) -> tuple[BlockDigests, bool, int]:
    """(digests, reused, bytes) of a piece written here: a part file or rows in place."""
    piece = task.piece
    in_place = task.in_place_offset is not None
    path = Path(task.work_dir) / piece.file_name
    if in_place:
        digests = in_place_digests(task)
    else:
        digests = piece_digests(path, task) if path.exists() else None
        if digests is None and path.exists():
            log.warning("piece %s does not verify; rewriting it", path)
    reused = digests is not None
    if digests is None:
        fail_once(piece.piece_id, f"injected failure writing piece {piece.piece_id}")
        digests = write_in_place(task) if in_place else _write_part_file(task, path)
    nbytes = (piece.stop - piece.start) * row_nbytes(task.column.shape, task.column.dtype)
    return digests, reused, nbytes if in_place else path.stat().st_size


def _bucket_piece(task: PieceTask, path: Path) -> tuple[BlockDigests, bool, int]:
    """(digests, reused, bytes) of a shard in object storage (NOTE [pieces in the bucket] in ranged)."""
    assert task.upload is not None
    piece = task.piece
    recorded = recorded_piece(task.upload, piece.piece_id, piece.file_name, path)
    if recorded is not None:
        found = piece_digests(path, task)
        if found is not None and found.to_hex()[0] == recorded:
            return found, True, path.stat().st_size
        log.warning("shard %s in the bucket does not verify; rewriting it", piece.file_name)
    fail_once(piece.piece_id, f"injected failure writing piece {piece.piece_id}")
    digests = _write_part_file(task, path)
    upload_piece(task.upload, piece.piece_id, path, digests.to_hex()[0])
    return digests, False, path.stat().st_size


def _write_part_file(task: PieceTask, path: Path) -> BlockDigests:
    piece = task.piece
    with _rows(task) as rows:
        return write_part(
            path,
            task.column,
            rows,
            piece.start,
            piece.stop,
            task.compression,
            task.compression_opts,
            task.shuffle,
            durable=False,  # NOTE [unsynced pieces]
            refuse_nonfinite=task.refuse_nonfinite,
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
            stale_piece = p.suffix in (HDF5_SUFFIX, RECORD_SUFFIX) and previous != self.plan.key
            saved = p.name.startswith(KEYWORD_CSR_PREFIX)  # rewritten by every driver (NOTE [keyword lists once])
            if TEMP_MARK in p.name or stale_piece or saved:  # dead writers' temps; pieces of another plan
                p.unlink()
        if previous != self.plan.key:
            with atomic_output(plan_file) as temp:
                temp.write_text(json.dumps({"key": self.plan.key, **self.plan._body()}, default=str))
        return self

    def existing_pieces(self) -> int:
        """Pieces an earlier run finished: part files, or records of rows written in place."""
        names = {p.name for p in self.path.iterdir()}
        return sum(1 for p in self.plan.pieces if p.file_name in names or record_file(p.piece_id) in names)

    def __exit__(self, *exc: object) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
