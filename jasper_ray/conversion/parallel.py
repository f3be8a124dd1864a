"""Parallel PT -> HDF5 conversion on Ray: plan, schedule piece tasks, assemble.

Thin by design: the plan, the pieces, assembly and the manifest are in
``plan``, ``pieces`` and ``publish`` (no Ray there); ``tasks`` runs the pieces
on the Ray this module connects to (through ``ray_session``, so importing it
needs no Ray: ``ray_worthwhile`` asks). This module plans while Ray starts,
decides what goes where, and cleans up.

Where it runs: with no ``address`` and no ``RAY_ADDRESS``, a local Ray on this
machine with ``num_workers`` (default: all) CPUs; with ``address="auto"``, an
``ip:port`` or ``RAY_ADDRESS``, an existing cluster, and then the dataset
directory must be on a filesystem every node sees (NFS, Lustre, a shared
volume): tasks open the sources and write pieces by path.

``shard_bytes`` and the report's ``shards`` are the piece size and count (public
names from before the word "piece"; the sharded layout's files are the shards).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..atomic import fsync_path
from ..errors import ConversionError
from ..fingerprint import fingerprint_in_background
from ..formats import open_dataset
from ..formats.chunks import CompressionOpts, check_options
from ..formats.columns import Column, keyword_columns
from ..formats.precision import check_precision
from ..ray_session import connect, require_ray, shutdown
from ..schema import LAYOUT_SINGLE, LAYOUTS, MANIFEST, PRECISION_FLOAT32, SHARDS_DIR, piece_file
from ..storage import Location, locate
from ..storage.fetch import delete
from ..validate import check_structure, check_values, refused_nonfinite
from .pieces import PieceResult, WorkDir, save_keyword_csr
from .plan import PIECE_BYTES, ConversionPlan, Piece, PieceTask, default_output, plan_conversion, work_dir_for
from .publish import Assembly, allocate_in_place, finish_in_place, publish_sharded, publish_to_bucket
from .ranged import RangedTensor, RemoteOutput, RemoteSource, local_ranges, prepare_source
from .remote import is_remote_job, output_location, staged_output, staging_for
from .tasks import LaterTasks, run_pieces, warm_up
from .writer import ConversionReport, nothing_to_do, output_bytes

if TYPE_CHECKING:
    import pyarrow.fs as pafs

    from ..formats.base import Reader

log = logging.getLogger(__name__)


def _require_ray() -> ModuleType:
    try:
        return require_ray("Parallel conversion")
    except ImportError as exc:
        raise ImportError(f"{exc} Without Ray, jasper_ray.convert_pt_to_hdf5 converts in one process.") from exc


def ray_worthwhile(dataset_dir: str | os.PathLike, shard_bytes: int = PIECE_BYTES) -> bool:
    """Whether converting with Ray beats one process: Ray importable and running, a cluster named,
    or more than one piece of data (``shard_bytes``; a local Ray takes seconds to start)."""
    try:
        ray = _require_ray()
    except ImportError:
        return False
    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        return True
    return open_dataset(dataset_dir, storage_format="pt").nbytes_on_disk() > shard_bytes


# NOTE [planned while Ray starts]: starting a local Ray takes seconds (2.4-3.8 s on 2 cores), most of it waiting
# for its processes to come up, and the plan needs validation's checks and the keyword lists parsed (NOTE [keyword
# lists beside the pieces]). So the plan is made in a thread while this (main) thread starts Ray: ray.init
# installs signal handlers and must run here. A dataset that fails validation has then started Ray for nothing;
# it is shut down as the error leaves.
def _checked_plan(reader: Reader, validate: bool, *plan_args: Any) -> ConversionPlan:
    """The dataset's structure checked (NOTE [keyword lists beside the pieces]), its tensors and splits planned."""
    if validate:
        check_structure(reader)
    return plan_conversion(reader, *plan_args, keywords=False)


# NOTE [keyword lists beside the pieces]: two things in a conversion read values in this process, one after the
# other: the keyword lists, which must be parsed (torch's weights_only unpickler, in Python: ~5 us a pair, 0.75 s
# for 150k pairs, ~20 s at 50 GB), and validation's scans of the ids. Neither is needed to convert a tensor. So the
# plan thread first checks what the files' headers tell (the config, every dtype and shape: ``check_structure``)
# and plans the tensors and splits, whose pieces start at once; then checks the values, parses the keyword lists,
# and the keyword columns join the queue (``LaterTasks``), planned after the others (numbered last; the plan's key
# leaves them out). A dataset refused then is refused as a refused piece is: no new piece starts, those in flight
# are waited for, the error is raised and the work directory removed. Uncompressed into one file (NOTE [in-place
# assembly] in pieces), every column is allocated before the first piece, so the whole plan is waited for.
def _keyword_columns(reader: Reader, validate: bool, planned: Future) -> list[Column]:
    """The values checked, the keyword columns; nothing when the first step (``planned``, done before this began
    in the same thread) failed: its error is raised by the driver, which waits for this thread as it leaves."""
    if planned.exception() is not None:
        return []
    if validate:
        check_values(reader)
    return keyword_columns(reader)


def _sync_shard(work_dir: Path, result: PieceResult, in_flight_bytes: int) -> None:
    fsync_path(work_dir / piece_file(result.piece_id))


def convert(
    dataset_dir: str | os.PathLike,
    *,
    compression: str | None = "gzip",
    compression_opts: CompressionOpts = None,
    shuffle: bool = True,
    num_workers: int | None = None,
    address: str | None = None,
    layout: str = LAYOUT_SINGLE,
    shard_bytes: int = PIECE_BYTES,
    max_retries: int = 3,
    output: str | os.PathLike | None = None,
    progress: bool = True,
    validate: bool = True,
    keep_ray: bool = False,
    filesystem: pafs.FileSystem | None = None,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    precision: str = PRECISION_FLOAT32,
) -> ConversionReport:
    """Convert a PT dataset to HDF5 with Ray tasks: ``dataset.h5`` (``layout="single"``) or
    ``dataset.shards/`` + manifest (``layout="sharded"``).

    The work is cut into pieces of about ``shard_bytes`` of source data, one Ray
    task each. Resumable: pieces finished by an earlier, interrupted run with
    the same sources and options are verified and reused. The output appears
    complete or not at all; an output already converted from these PT files with these options (and
    this piece size, for the sharded layout) is left as it is, without starting Ray (the report says
    ``up_to_date``) unless ``force``. Source and output may be ``pyarrow.fs`` URIs (or paths inside
    ``filesystem``): the tasks read a remote source's rows by byte ranges and upload the shards of a remote
    sharded output themselves (``conversion.ranged``); a remote ``dataset.h5`` is assembled in this node's
    cache (``cache_dir``) and uploaded whole.
    ``precision`` ("float32", "float16", "bfloat16") is what the embedding and steering tensors are
    stored as (NOTE [16-bit storage] in ``formats.precision``).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'single' or 'sharded', got {layout!r}")
    check_options(compression, compression_opts, shuffle)
    check_precision(precision)
    options: dict[str, Any] = dict(
        compression=compression, compression_opts=compression_opts, shuffle=shuffle, num_workers=num_workers,
        address=address, layout=layout, shard_bytes=shard_bytes, max_retries=max_retries, progress=progress,
        validate=validate, keep_ray=keep_ray, force=force, precision=precision,
    )  # fmt: skip
    if not is_remote_job(dataset_dir, output, filesystem):
        dataset_dir = Path(dataset_dir)
        local = Path(output) if output is not None else default_output(dataset_dir, layout)
        return _convert(dataset_dir, local, **options)
    location = locate(dataset_dir, filesystem)
    source = prepare_source(location, cache_dir) if location.is_remote else None
    source_dir = source.local_dir if source is not None else Path(location.path)
    target = output_location(location, output, filesystem, layout)
    if target is None:
        return _convert(source_dir, Path(output or default_output(source_dir, layout)), source=source, **options)
    if layout == LAYOUT_SINGLE:  # assembled here, uploaded whole (NOTE [pieces in the bucket] in ranged)
        with staged_output(target, cache_dir, layout) as staged:
            report = _convert(source_dir, staged, source=source, **options)
    else:
        staging = staging_for(target, cache_dir)
        report = _convert(source_dir, staging / SHARDS_DIR, source=source, target=target, **options)
        shutil.rmtree(staging, ignore_errors=True)
    report.output = target.uri
    return report


def _convert(
    dataset_dir: Path,
    output: Path,
    *,
    compression: str | None,
    compression_opts: CompressionOpts,
    shuffle: bool,
    num_workers: int | None,
    address: str | None,
    layout: str,
    shard_bytes: int,
    max_retries: int,
    progress: bool,
    validate: bool,
    keep_ray: bool,
    force: bool,
    precision: str,
    source: RemoteSource | None = None,
    target: Location | None = None,
) -> ConversionReport:
    """``convert`` of local PT files (or a remote source's skeleton) into ``output`` (or the tasks' uploads to
    ``target``, a remote sharded layout; ``output`` then only holds the work directory and the manifest)."""
    ray = _require_ray()
    if not force and source is None and target is None:
        asked = (compression, compression_opts, shuffle, layout, shard_bytes, precision)
        done = nothing_to_do(dataset_dir, output, *asked)
        if done is not None:
            return done
    started = time.perf_counter()
    reader = source.reader() if source is not None else open_dataset(dataset_dir, storage_format="pt", use_mmap=True)
    log.info(
        "Converting PT format to HDF5 in %s (Ray, layout=%s)", source.location.uri if source else dataset_dir, layout
    )
    # Files are hashed whole while this validates and converts (NOTE [crc32 beside the work]); a remote source's
    # fingerprint (the objects' identities) is whole already.
    fingerprint, whole = (source.fingerprint, None) if source else fingerprint_in_background(reader.files())
    whole_fingerprint: Callable[[], dict[str, Any]] = whole.result if whole else lambda: fingerprint
    with contextlib.ExitStack() as stack:
        plan_thread = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="jasper_ray-plan"))
        planned = plan_thread.submit(
            _checked_plan, reader, validate, compression, compression_opts, shuffle, shard_bytes, precision,
            fingerprint,
        )  # fmt: skip
        keywords = plan_thread.submit(_keyword_columns, reader, validate, planned)  # NOTE [keyword lists beside ...]
        connecting = time.perf_counter()
        if connect(address, num_cpus=num_workers) and not keep_ray:  # NOTE [planned while Ray starts]
            stack.callback(shutdown)
        ray_start = time.perf_counter() - connecting
        warm_up(ray)  # NOTE [prestarted workers] in tasks
        plan = planned.result()
        in_place = layout == LAYOUT_SINGLE and compression is None  # NOTE [in-place assembly] in pieces
        if in_place:  # every column allocated first
            plan.add_columns(keywords.result())
        work = WorkDir(work_dir_for(output), plan)
        upload = RemoteOutput.beside(target, plan.key) if target is not None else None
        with work:
            try:
                offsets = allocate_in_place(plan, work.path) if in_place else None
                mapped: dict[str, RangedTensor] = {}

                def prepared(pieces: list[Piece]) -> list[PieceTask]:
                    tasks = plan.tasks(work.path, offsets, pieces)
                    if validate:
                        tasks = [replace(t, refuse_nonfinite=refused_nonfinite(reader, t.column)) for t in tasks]
                    if source is not None:
                        ranged = source.ranged
                        tasks = [replace(t, source=source.location, ranged=ranged.get(t.column.source)) for t in tasks]
                    else:  # NOTE [mapped sources] in ranged
                        new = [t.column for t in tasks if t.column.source not in mapped]
                        mapped.update(local_ranges(dataset_dir, reader, new))
                        tasks = [replace(t, ranged=mapped.get(t.column.source)) for t in tasks]
                    if upload is not None:
                        tasks = [replace(t, upload=upload) for t in tasks]
                    return tasks

                def keyword_tasks(found: list[Column]) -> list[PieceTask]:
                    pieces = plan.add_columns(found)
                    if source is None:  # NOTE [keyword lists once] in pieces
                        save_keyword_csr(reader, found, work.path)
                    return prepared(pieces)

                if source is None and in_place:  # the keyword columns are planned already
                    save_keyword_csr(reader, plan.columns, work.path)
                reused = work.existing_pieces()
                if reused:
                    log.info(
                        "resuming: %d of %d pieces are on disk from an earlier run; verifying them",
                        reused,
                        len(plan.pieces),
                    )
                if upload is not None:
                    delete(upload.target.child(MANIFEST))  # from here on a reader sees no dataset, never a mix
                tasks = prepared(plan.pieces)
                later = None if in_place else LaterTasks(keywords, keyword_tasks)
                run = functools.partial(
                    run_pieces, ray, tasks, max_retries=max_retries, progress=progress,
                    total_bytes=plan.total_bytes, later=later,
                )  # fmt: skip
                if layout == LAYOUT_SINGLE and not in_place:
                    with Assembly(plan, work.path, output) as assembly:
                        results = run(on_result=assembly.add)
                        pieces_done = time.perf_counter()
                        plan.source_fingerprint = whole_fingerprint()
                        assembly.finish(results)
                else:
                    shards = layout != LAYOUT_SINGLE and upload is None  # synced here (NOTE [unsynced pieces])
                    results = run(on_result=functools.partial(_sync_shard, work.path) if shards else None)
                    pieces_done = time.perf_counter()
                    plan.source_fingerprint = whole_fingerprint()
                if in_place:
                    finish_in_place(plan, work.path, output, results)
                elif upload is not None:
                    publish_to_bucket(plan, work.path, upload.target, results)
            except Exception:
                # A failure leaves nothing behind (the disk may be full). An interrupt or a crash
                # (KeyboardInterrupt, SIGKILL) keeps the finished pieces for a re-run to reuse.
                work.remove()
                raise
        if layout == LAYOUT_SINGLE or upload is not None:
            work.remove()
        else:
            publish_sharded(plan, work.path, output, results)
        assembled = time.perf_counter()
    report = ConversionReport(
        output,
        reader.nbytes_on_disk(),
        output_bytes(output) if upload is None else sum(r.file_bytes for r in results.values()),
        assembled - started,
        compression,
        len(plan.pieces),
        sum(r.reused for r in results.values()),
        assembled - pieces_done,
        results,
        ray_start_seconds=ray_start,
    )
    for line in report.lines():
        log.info(line)
    return report


__all__ = ["convert", "ConversionError", "ConversionPlan"]
