"""Single-process conversion: streams the PT files into one ``dataset.h5`` with the HDF5 writer.

Sources are read in row blocks through the reader (memory-mapped), so a
dataset larger than RAM converts. Every dataset gets the sha256 of its logical
bytes; the file gets the config and the fingerprint of its PT sources; it is
written under a temporary name and published by rename only when complete and
synced (all of that is ``formats.hdf5_writer.HDF5Writer``). This module adds
validation, upstream's progress lines and the report. No Ray here.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from ..fingerprint import fingerprint_in_background
from ..formats import open_dataset
from ..formats.base import Reader
from ..formats.chunks import CompressionOpts, check_options
from ..formats.columns import GROUP_ORDER, columns
from ..formats.hdf5 import require_h5py
from ..formats.hdf5_files import file_size_bound
from ..formats.hdf5_writer import BLOCK_BYTES, HDF5Writer
from ..formats.precision import check_precision
from ..formats.pt import PTReader
from ..schema import HDF5_FILE, LAYOUT_SINGLE, PRECISION_FLOAT32
from ..storage import locate
from ..validate import refused_nonfinite, validate_dataset
from .plan import PIECE_BYTES
from .ranged import prepare_source
from .remote import convert_staged, is_remote_job, output_location, staged_output
from .up_to_date import why_convert

if TYPE_CHECKING:
    import pyarrow.fs as pafs
from .publish import check_free_space

log = logging.getLogger(__name__)

# Upstream's progress lines, one per top-level group of the file, in the file's group order.
GROUP_MESSAGES = dict(
    zip(
        GROUP_ORDER,
        (
            "Converting embeddings...",
            "Converting pair data...",
            "Converting negatives...",
            "Converting steering tensors...",
            "Converting split indices...",
        ),
    )
)


def _progress(total: int, enabled: bool, desc: str) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled)


@dataclass
class ConversionReport:
    """What a conversion did: sizes, wall time, and for Ray conversions the pieces, reuse and assembly time.

    ``shards`` and ``shards_reused`` count pieces (units of conversion work): public names from before
    the word "piece" (``results`` maps piece ids to their ``PieceResult``).
    """

    output: Path | str  # a URI when the output went to object storage
    source_bytes: int
    output_bytes: int
    seconds: float
    compression: str | None
    shards: int = 1
    shards_reused: int = 0
    assembly_seconds: float = 0.0
    results: dict[str, Any] = field(default_factory=dict, repr=False)
    up_to_date: bool = False  # the output already matched its sources and the options: nothing was converted
    ray_start_seconds: float = 0.0  # starting (or connecting to) Ray, while the plan was made; 0 when it was up

    @property
    def saving_percent(self) -> float:
        """Size saved against the PT files, in percent (negative when the output is larger)."""
        return (1 - self.output_bytes / self.source_bytes) * 100 if self.source_bytes else 0.0

    @property
    def mb_per_s(self) -> float:
        """PT megabytes converted per second of wall time."""
        return self.source_bytes / 1e6 / self.seconds if self.seconds else float("inf")

    def lines(self) -> list[str]:
        first = (
            f"Up to date: {self.output} holds these PT files converted with these options; nothing converted "
            "(force=True or --force converts again)"
            if self.up_to_date
            else f"Conversion complete. HDF5 file saved to {self.output}"
        )
        return [
            first,
            f"File sizes: PT format={self.source_bytes / 2**20:.1f} MB, HDF5={self.output_bytes / 2**20:.1f} MB "
            f"(compression: {self.saving_percent:.1f}%)",
            f"Wall time: {self.seconds:.2f} s ({self.mb_per_s:.1f} MB/s)"
            + (f", Ray's start {self.ray_start_seconds:.2f} s of it" if self.ray_start_seconds > 0 else "")
            + (
                f", {self.shards} shards ({self.shards_reused} reused), assembly {self.assembly_seconds:.2f} s"
                if self.shards > 1
                else ""
            ),
        ]


def output_bytes(output: Path) -> int:
    """Bytes of a converted output: the file, or the sharded layout's files."""
    return output.stat().st_size if output.is_file() else sum(p.stat().st_size for p in output.iterdir())


def nothing_to_do(
    dataset_dir: Path,
    output: Path,
    compression: str | None,
    compression_opts: CompressionOpts,
    shuffle: bool,
    layout: str = LAYOUT_SINGLE,
    piece_bytes: int = PIECE_BYTES,
    precision: str = PRECISION_FLOAT32,
) -> ConversionReport | None:
    """The report of a conversion whose output is already up to date (``up_to_date.why_convert``), else None."""
    started = time.perf_counter()
    reason = why_convert(dataset_dir, output, layout, compression, compression_opts, shuffle, piece_bytes, precision)
    if reason is not None:
        log.info("converting: %s", reason)
        return None
    source_bytes = sum(p.stat().st_size for p in PTReader(dataset_dir).files() if p.is_file())
    report = ConversionReport(
        output, source_bytes, output_bytes(output), time.perf_counter() - started, compression, 0, up_to_date=True
    )
    for line in report.lines():
        log.info(line)
    return report


def convert_pt_to_hdf5(
    dataset_dir: str | os.PathLike,
    compression: str | None = "gzip",
    compression_opts: CompressionOpts = None,
    shuffle: bool = True,
    *,
    output: str | os.PathLike | None = None,
    validate: bool = True,
    progress: bool = True,
    block_bytes: int = BLOCK_BYTES,
    filesystem: pafs.FileSystem | None = None,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    precision: str = PRECISION_FLOAT32,
) -> ConversionReport:
    """Convert a PT dataset directory into ``dataset.h5`` beside it, in one process.

    The PT files are kept. A crash leaves the previous ``dataset.h5`` (or
    none), never a partial file. An output already converted from these PT files with these options
    is left as it is (the report says ``up_to_date``) unless ``force``. Source and output may be
    ``pyarrow.fs`` URIs (or paths inside ``filesystem``): a remote source's rows are read by byte ranges as
    they are written (NOTE [ranged sources] in ``conversion.ranged``), a remote output is written in the
    node-local cache (``cache_dir``) and uploaded whole (``conversion.remote``). ``precision`` ("float32",
    "float16", "bfloat16") is what the embedding and steering tensors are stored as (NOTE [16-bit storage]
    in ``formats.precision``).
    """
    require_h5py()  # before any work, when h5py is missing
    check_options(compression, compression_opts, shuffle)  # bad options fail before any work
    check_precision(precision)
    options: dict[str, Any] = dict(
        compression_opts=compression_opts, shuffle=shuffle, validate=validate, progress=progress,
        block_bytes=block_bytes, precision=precision,
    )  # fmt: skip
    if is_remote_job(dataset_dir, output, filesystem):
        location = locate(dataset_dir, filesystem)
        if not location.is_remote:  # a local source into a remote output
            return convert_staged(
                convert_pt_to_hdf5, dataset_dir, output=output, filesystem=filesystem, cache_dir=cache_dir,
                compression=compression, force=force, **options,
            )  # fmt: skip
        source = prepare_source(location, cache_dir)
        target = output_location(location, output, filesystem, LAYOUT_SINGLE)
        if target is None:
            return _write(source.reader(), source.fingerprint, Path(str(output)), compression, **options)
        with staged_output(target, cache_dir, LAYOUT_SINGLE) as staged:
            report = _write(source.reader(), source.fingerprint, staged, compression, **options)
        report.output = target.uri
        return report
    dataset_dir = Path(dataset_dir)
    output = Path(output) if output is not None else dataset_dir / HDF5_FILE
    up_to_date = (
        None
        if force
        else nothing_to_do(dataset_dir, output, compression, compression_opts, shuffle, precision=precision)
    )
    if up_to_date is not None:
        return up_to_date
    reader = open_dataset(dataset_dir, storage_format="pt", use_mmap=True)
    return _write(reader, fingerprint_in_background(reader.files())[1], output, compression, **options)


def _write(
    reader: Reader,
    source_fingerprint: dict[str, Any] | Future,
    output: Path,
    compression: str | None,
    *,
    compression_opts: CompressionOpts,
    shuffle: bool,
    validate: bool,
    progress: bool,
    block_bytes: int,
    precision: str,
) -> ConversionReport:
    """``reader``'s PT dataset into ``output``: mapped local files, or a remote source's ranged rows; with
    ``validate``, the float tables are checked as they are written (NOTE [floats checked as written])."""
    log.info("Converting PT format to HDF5 in %s", reader.directory)
    if validate:  # float tables: checked as written (NOTE [floats checked as written] in validate)
        validate_dataset(reader, progress=progress)
    started = time.perf_counter()
    found = columns(reader, precision)
    bound = file_size_bound((c.shape, c.dtype, c.shape[0]) for c in found)  # reserved first (HDF5Writer)
    check_free_space(output, bound, "write")  # first: its message says what is needed and what is free
    with (
        _progress(sum(c.nbytes for c in found), progress, "convert") as bar,
        HDF5Writer(
            output,
            compression,
            compression_opts,
            shuffle,
            block_bytes=block_bytes,
            on_bytes=bar.update,
            size_bound=bound,
            precision=precision,
        ) as w,
    ):
        group = None
        for column in found:
            if column.group != group:
                group = column.group
                log.info(GROUP_MESSAGES[group])
            refuse = refused_nonfinite(reader, column) if validate else ""
            w.write_column(column.h5_path, column.rows(reader), column.dtype, refuse_nonfinite=refuse)
        done = source_fingerprint.result() if isinstance(source_fingerprint, Future) else source_fingerprint
        w.write_config(reader.config, done)  # last: NOTE [crc32 beside the work] in fingerprint
    report = ConversionReport(
        output, reader.nbytes_on_disk(), output.stat().st_size, time.perf_counter() - started, compression
    )
    for line in report.lines():
        log.info(line)
    return report


__all__ = ["convert_pt_to_hdf5", "ConversionReport"]
