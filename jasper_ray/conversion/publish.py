"""Publishing a conversion: pieces assembled into ``dataset.h5``, or renamed into the sharded layout.

Assembly moves the pieces' already-compressed chunks into the final file
(``HDF5Writer.copy_part``) and never re-encodes, each piece as soon as its task
returns (``Assembly``): the copying overlaps the other tasks. Uncompressed, there is nothing
to move: the pieces wrote their rows in place into a file allocated here first,
and assembly sets its checksums and renames it (NOTE [in-place assembly] in
``pieces``). The sharded layout is the work directory
itself, renamed into place with its manifest written last: each piece's part
file becomes a shard. Formats own the bytes (``formats.hdf5_writer``,
``formats.sharded``); this module decides what goes where.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

from ..atomic import TEMP_MARK, fsync_path, publish, remove_orphan_temps, writer_tag
from ..formats.checksum import BlockDigests, block_rows
from ..formats.hdf5 import open_h5, require_h5py
from ..formats.hdf5_writer import HDF5Writer
from ..formats.precision import mark_precision
from ..formats.serving import allocate_dataset
from ..formats.sharded import Manifest, ManifestShard, ManifestTensor, write_manifest
from ..schema import ATTR_FINGERPRINT, COMPRESSION_NONE, LOCK_FILE, MANIFEST, PLAN_FILE, old_dir_name
from ..storage import Location
from ..storage.fetch import delete, upload_file
from .pieces import IN_PLACE_FILE, KEYWORD_CSR_PREFIX, RECORD_SUFFIX, PieceResult
from .plan import ConversionPlan, Piece
from .ranged import RemoteOutput

log = logging.getLogger(__name__)

# --- assembly --------------------------------------------------------------------------------

# Bytes beyond the part files' total that an assembled file may need (its own metadata).
ASSEMBLY_MARGIN = 1 << 20


def check_free_space(output: Path, pieces_bytes: int, doing: str = "assemble") -> None:
    """Refuse to start a file that cannot fit: HDF5 does not survive a disk filling up mid-write.

    The assembled file holds the pieces' chunks and less metadata than they do, so the part files'
    total (plus a margin) bounds it; a file written in one process is bounded by its uncompressed bytes.
    A disk filled by someone else during the write still fails in HDF5 (docs/troubleshooting.md).
    """
    need = pieces_bytes + ASSEMBLY_MARGIN
    free = shutil.disk_usage(output.parent).free
    if free < need:
        raise OSError(
            errno.ENOSPC,
            f"No space left on device to {doing} {output}: it needs up to {need / 2**20:.1f} MiB, "
            f"{free / 2**20:.1f} MiB are free",
        )


def _digests(results: dict[str, PieceResult], pieces: list[Piece]) -> BlockDigests:
    return sum((results[p.piece_id].block_digests() for p in pieces), BlockDigests())


class Assembly:
    """``dataset.h5`` built from the part files while other pieces are still being written: each part's
    compressed chunks are copied in (``HDF5Writer.copy_part``, never re-encoded) as soon as its task returns,
    so the copying overlaps the tasks' compression and only the checksums, fsync and rename are left at the
    end. Published atomically by ``finish``; an error in the block removes the unfinished file.

    HDF5 does not survive a disk filling up mid-write (h5py#914): before each part, the free space must hold
    it and every piece still in flight (``in_flight_bytes``, their uncompressed size: a bound)."""

    def __init__(self, plan: ConversionPlan, work_dir: Path, output: Path):
        self.plan, self.work_dir, self.output = plan, work_dir, output
        options = plan.compression, plan.compression_opts, plan.shuffle
        self._writer = HDF5Writer(output, *options, precision=plan.precision)
        self._datasets: dict[str, Any] = {}
        self._pieces: dict[str, Piece] = {}

    def __enter__(self) -> Assembly:
        self._writer.__enter__()
        for column in self.plan.columns:  # in the file's order, as the single-process writer creates them
            self._dataset(column.h5_path)
        return self

    def _dataset(self, h5_path: str) -> Any:
        """The dataset at ``h5_path``, created on first use: columns planned late (NOTE [keyword lists beside
        the pieces] in parallel) come after the others."""
        if h5_path not in self._datasets:
            column = next(c for c in self.plan.columns if c.h5_path == h5_path)
            self._datasets[h5_path] = self._writer.create_dataset(h5_path, column.shape, column.dtype)
        return self._datasets[h5_path]

    def add(self, result: PieceResult, in_flight_bytes: int = 0) -> int:
        """Copy the finished piece's part file into the file; return its stored bytes."""
        if result.piece_id not in self._pieces:  # a piece planned since (NOTE [keyword lists beside the pieces])
            self._pieces = {p.piece_id: p for p in self.plan.pieces}
        piece = self._pieces[result.piece_id]
        part = self.work_dir / piece.file_name
        check_free_space(self.output, part.stat().st_size + in_flight_bytes)
        return self._writer.copy_part(self._dataset(piece.h5_path), part, piece.start)

    def finish(self, results: dict[str, PieceResult]) -> None:
        """Every dataset's checksum from its pieces' digests (each piece added before); the config and the
        plan's source fingerprint, whole by now (NOTE [crc32 beside the work] in fingerprint)."""
        for column in self.plan.columns:
            self._writer.set_checksum(self._datasets[column.h5_path], _digests(results, self.plan.pieces_of(column)))
        self._writer.write_config(self.plan.config, self.plan.source_fingerprint)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._datasets.clear()
        self._writer.__exit__(exc_type, exc, tb)


def _allocated(path: Path, plan: ConversionPlan) -> dict[str, int] | None:
    """Each column's offset in an earlier run's allocated file, if it holds every column of ``plan`` in place."""
    offsets = {}
    try:
        with open_h5(path) as f:
            for column in plan.columns:
                dset = f[column.h5_path]
                if dset.shape != column.shape or dset.dtype != column.dtype or dset.chunks is not None:
                    return None
                offset = dset.id.get_offset()
                if offset is None and dset.size:
                    return None
                offsets[column.h5_path] = int(offset or 0)
    except (OSError, KeyError) as exc:
        log.info("%s cannot be reused (%s): allocating it again", path, exc)
        return None
    return offsets


def allocate_in_place(plan: ConversionPlan, work_dir: Path) -> dict[str, int]:
    """The work directory's file for in-place pieces: config attributes, every column contiguous and allocated
    (its offset known); kept from an earlier run of the same plan. Returns each column's byte offset."""
    path = work_dir / IN_PLACE_FILE
    if path.exists() and (offsets := _allocated(path, plan)) is not None:
        return offsets
    for record in work_dir.glob(f"*{RECORD_SUFFIX}"):  # rows of another file
        record.unlink()
    check_free_space(path, plan.total_bytes, "allocate")
    offsets = {}
    with HDF5Writer(path, None, precision=plan.precision) as writer:
        writer.write_config(plan.config, plan.source_fingerprint)
        for column in plan.columns:
            dset = mark_precision(allocate_dataset(writer.file, column.h5_path, column.shape, column.dtype))
            offset = dset.id.get_offset()
            offsets[column.h5_path] = int(offset or 0)  # None: an empty tensor, no bytes
    return offsets


def finish_in_place(plan: ConversionPlan, work_dir: Path, output: Path, results: dict[str, PieceResult]) -> None:
    """Set the checksums of the file the pieces wrote in place and publish it as ``output``: metadata only."""
    path = work_dir / IN_PLACE_FILE
    with require_h5py().File(path, "r+", locking=False) as f:
        for column in plan.columns:
            HDF5Writer.set_checksum(f[column.h5_path], _digests(results, plan.pieces_of(column)))
        f.attrs[ATTR_FINGERPRINT] = json.dumps(plan.source_fingerprint)  # whole by now; allocated without crc32s
    remove_orphan_temps(output)
    publish(path, output)


# --- the sharded layout ------------------------------------------------------------------------


def manifest_for(plan: ConversionPlan, results: dict[str, PieceResult]) -> Manifest:
    """The manifest of the work directory's part files as shards."""
    tensors = []
    for column in plan.columns:
        pieces = plan.pieces_of(column)
        shards = []
        for p in pieces:
            digests = _digests(results, [p])
            size = results[p.piece_id].file_bytes
            fast = digests.to_hex()[1]
            shards.append(ManifestShard(p.file_name, p.start, p.stop, size, digests.checksum(), fast, digests.finite))
        checksum = _digests(results, pieces).checksum()
        rows = block_rows(column.shape, column.dtype.itemsize)
        tensors.append(ManifestTensor(column.h5_path, list(column.shape), column.dtype.str, checksum, rows, shards))
    return Manifest(
        compression=plan.compression or COMPRESSION_NONE,
        config=plan.config,
        source_fingerprint=plan.source_fingerprint,
        tensors=tensors,
        precision=plan.precision,
    )


def publish_sharded(plan: ConversionPlan, work_dir: Path, final_dir: Path, results: dict[str, PieceResult]) -> None:
    """Turn the work directory into ``final_dir`` (shards + manifest) with directory renames."""
    manifest = manifest_for(plan, results)
    for leftover in (PLAN_FILE, LOCK_FILE, *(p.name for p in work_dir.glob(f"{KEYWORD_CSR_PREFIX}*"))):
        (work_dir / leftover).unlink(missing_ok=True)
    write_manifest(work_dir, manifest)
    old = final_dir.with_name(old_dir_name(final_dir.name, f"{TEMP_MARK}{writer_tag()}"))
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(work_dir, final_dir)
    fsync_path(final_dir.parent)
    if old.exists():
        shutil.rmtree(old)


def publish_to_bucket(plan: ConversionPlan, work_dir: Path, target: Location, results: dict[str, PieceResult]) -> None:
    """The tasks uploaded the shards: the manifest goes last (readers see the whole dataset from then on),
    then the pieces' records are deleted (NOTE [pieces in the bucket] in ranged)."""
    write_manifest(work_dir, manifest_for(plan, results))
    upload_file(work_dir / MANIFEST, target.child(MANIFEST))
    delete(RemoteOutput.beside(target, plan.key).records, recursive=True)
