"""``jasper-ray convert``: PT to HDF5 on Ray or in one process, or with ``--dry-run`` only its plan.

The flags are checked before any work: one that the chosen way of converting would ignore is refused
(a ``UsageError``, exit 2). The plan of ``--dry-run`` is ``plan_conversion``'s, which needs no Ray.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

from ..conversion.parallel import convert, ray_worthwhile
from ..conversion.plan import PIECE_BYTES, ConversionPlan, default_output, plan_conversion
from ..conversion.publish import ASSEMBLY_MARGIN
from ..conversion.writer import ConversionReport, convert_pt_to_hdf5, nothing_to_do
from ..formats import open_dataset
from ..formats.chunks import check_options
from ..ray_session import require_ray
from ..schema import COMPRESSION_NONE, LAYOUT_SHARDED, LAYOUT_SINGLE
from ..storage import NodeCache, is_uri, locate
from .report import Report, UsageError, human_bytes, say

MODE_RAY = "ray"
MODE_SINGLE_PROCESS = "single-process"


def _ray_flags(args: argparse.Namespace) -> list[str]:
    """The flags given that only a conversion on Ray uses."""
    return [
        flag
        for flag, given in (
            ("--layout sharded", args.layout == LAYOUT_SHARDED),
            ("--workers", args.workers is not None),
            ("--address", args.address is not None),
            ("--shard-size", args.shard_size is not None),
        )
        if given
    ]


def choose_mode(args: argparse.Namespace) -> tuple[str, str | None]:
    """Ray or this process, and why when the choice was not asked for: as the Python API chooses
    (``ray_worthwhile``: Ray when it is installed and a session or cluster is there to use, or the PT
    files hold more than one piece). ``--single-process`` or a flag only Ray uses decides it."""
    if args.single_process:
        return MODE_SINGLE_PROCESS, None
    if _ray_flags(args):
        return MODE_RAY, None
    if is_uri(args.dir):
        return MODE_RAY, "a remote dataset"
    if ray_worthwhile(args.dir, _piece_bytes(args)):
        return MODE_RAY, "more than one piece of PT data (--shard-size), or a Ray session or cluster to use"
    return MODE_SINGLE_PROCESS, "one piece of PT data or less (--shard-size): quicker than starting Ray"


def check_flags(args: argparse.Namespace) -> None:
    """Refuse flags that would be silently ignored, or options the writer refuses (before any work)."""
    if args.single_process:
        ignored = _ray_flags(args)
        if ignored:
            raise UsageError(
                f"--single-process converts in this process, without Ray: {', '.join(ignored)} "
                "would not apply (drop --single-process to convert on Ray)"
            )
    if args.workers is not None and args.address is not None:
        raise UsageError("--workers sizes a local Ray; with --address the cluster's CPUs are used (drop one)")
    if args.no_shuffle and args.compression == COMPRESSION_NONE:
        raise UsageError("--no-shuffle turns off a filter of compressed data: it does not apply to --compression none")
    if args.level is not None and args.compression != "gzip":
        raise UsageError(f"--level sets the gzip level: it does not apply to --compression {args.compression}")
    try:
        check_options(_compression(args.compression), args.level, not args.no_shuffle)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _compression(text: str) -> str | None:
    return None if text == COMPRESSION_NONE else text


def _output(args: argparse.Namespace) -> str:
    """The output as the report names it: an absolute path, or a URI."""
    if args.output and is_uri(args.output):
        return str(args.output)
    if not args.output and is_uri(args.dir):
        return locate(args.dir).child(default_output(Path("."), args.layout).name).uri
    return os.path.abspath(Path(args.output) if args.output else default_output(Path(args.dir), args.layout))


def _piece_bytes(args: argparse.Namespace) -> int:
    return int(args.shard_size) if args.shard_size is not None else PIECE_BYTES


def run_convert(args: argparse.Namespace, report: Report) -> None:
    check_flags(args)
    f = report.fields
    f["dry_run"] = bool(args.dry_run)
    f["mode"], why = choose_mode(args)
    if why is not None and not args.dry_run:  # a dry run's plan line says it
        say(f"converting {'on Ray' if f['mode'] == MODE_RAY else 'in this process'}: {why}", args.quiet)
    f["output"] = _output(args)
    f["layout"] = args.layout
    f["compression"] = args.compression
    f["precision"] = args.precision
    if args.dry_run:
        dry_run(args, report)
        return
    if not args.force and not is_uri(args.dir) and not is_uri(f["output"]):  # before Ray starts
        shuffle, opts = not args.no_shuffle, (args.level, args.layout, _piece_bytes(args), args.precision)
        done = nothing_to_do(
            Path(args.dir), Path(f["output"]), _compression(args.compression), opts[0], shuffle, *opts[1:]
        )
        if done is not None:
            _report_result(done, report)
            return
    if f["mode"] == MODE_SINGLE_PROCESS:
        result = convert_pt_to_hdf5(
            args.dir,
            _compression(args.compression),
            args.level,
            not args.no_shuffle,
            output=args.output,
            progress=not args.quiet,
            cache_dir=args.cache_dir,
            force=args.force,
            precision=args.precision,
        )
    else:
        announce_ray(args)
        result = convert(
            args.dir,
            compression=_compression(args.compression),
            compression_opts=args.level,
            shuffle=not args.no_shuffle,
            num_workers=args.workers,
            address=args.address,
            layout=args.layout,
            shard_bytes=_piece_bytes(args),
            output=args.output,
            progress=not args.quiet,
            cache_dir=args.cache_dir,
            force=args.force,
            precision=args.precision,
        )
    _report_result(result, report)


def _report_result(result: ConversionReport, report: Report) -> None:
    report.fields.update(
        output=str(result.output) if is_uri(str(result.output)) else os.path.abspath(result.output),
        up_to_date=result.up_to_date,
        pieces=result.shards,
        pieces_reused=result.shards_reused,
        source_bytes=result.source_bytes,
        output_bytes=result.output_bytes,
        seconds=round(result.seconds, 3),
        ray_start_seconds=round(result.ray_start_seconds, 3),
        assembly_seconds=round(result.assembly_seconds, 3),
    )
    report.lines += result.lines()


def announce_ray(args: argparse.Namespace) -> None:
    """Say on stderr that Ray is starting ("starting Ray ..."), so its start-up of several seconds shows as
    what it is and not as a progress bar stuck at 0%. ``convert`` starts it while it plans, and stops it
    at the end (NOTE [planned while Ray starts] in conversion.parallel)."""
    try:
        ray = require_ray("Parallel conversion")
    except ImportError as exc:
        raise ImportError(f"{exc} Without Ray: jasper-ray convert --single-process.") from exc
    if ray.is_initialized():
        return
    address = args.address or os.environ.get("RAY_ADDRESS")
    cpus = args.workers or os.cpu_count()
    say(f"connecting to Ray at {address} ..." if address else f"starting Ray ({cpus} CPUs) ...", args.quiet)


# --- --dry-run ---------------------------------------------------------------------------------------


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem ``path`` will be written to (its nearest existing folder)."""
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def space_needed(plan: ConversionPlan, mode: str, layout: str) -> tuple[int, int]:
    """(bytes the output takes at most, bytes the disk must have free at the peak).

    The output holds every column's bytes, uncompressed at most (compression only shrinks them). On
    Ray with one compressed file, the part files stay until the file is assembled from them: twice that at
    the peak; uncompressed, the pieces write into the file in place (NOTE [in-place assembly]): once.
    """
    output = plan.total_bytes + ASSEMBLY_MARGIN
    both = mode == MODE_RAY and layout == LAYOUT_SINGLE and plan.compression is not None
    return output, 2 * output if both else output


def dry_run(args: argparse.Namespace, report: Report) -> None:
    """The plan, printed and reported: nothing is written, Ray is not started."""
    with open_dataset(args.dir, storage_format="pt", use_mmap=True, cache_dir=args.cache_dir) as reader:
        compression, shuffle = _compression(args.compression), not args.no_shuffle
        plan = plan_conversion(reader, compression, args.level, shuffle, _piece_bytes(args), args.precision)
        source_bytes = reader.nbytes_on_disk()
    output, needed = space_needed(plan, report.fields["mode"], args.layout)
    # A URI's output is written to a staging directory in the cache first, then uploaded.
    free = free_bytes(NodeCache.at(args.cache_dir).root if is_uri(_output(args)) else Path(_output(args)))
    # One process converts everything as one piece (its report says 1), each tensor whole.
    one = report.fields["mode"] == MODE_SINGLE_PROCESS
    tensors: list[dict[str, Any]] = [
        {"h5_path": c.h5_path, "source": c.source, "pieces": 1 if one else len(plan.pieces_of(c)), "bytes": c.nbytes}
        for c in plan.columns
    ]
    report.fields.update(
        pieces=1 if one else len(plan.pieces),
        piece_bytes=None if one else plan.piece_bytes,
        tensors=tensors,
        source_bytes=source_bytes,
        output_bytes_max=output,
        bytes_needed=needed,
        free_bytes=free,
        fits=free >= needed,
    )
    f = report.fields
    how = "in this process" if one else f"on Ray, {len(plan.pieces)} pieces"
    report.lines += [
        f"plan      {args.dir} -> {f['output']} ({args.layout}, {args.compression}, {how}); nothing written",
        f"read      {human_bytes(f['source_bytes'])} of PT files",
        f"write     at most {human_bytes(output)} (uncompressed; compression only shrinks it)",
        f"disk      needs {human_bytes(needed)} free at the peak, {human_bytes(free)} free: "
        + ("fits" if f["fits"] else "does NOT fit"),
        f"{'dataset':<32} {'pieces':>6} {'bytes':>10}",
    ]
    report.lines += [f"{t['h5_path']:<32} {t['pieces']:>6} {human_bytes(t['bytes']):>10}" for t in tensors]
    if not f["fits"]:
        report.problems.append(
            f"not enough space for {f['output']}: the conversion needs up to {human_bytes(needed)}, "
            f"{human_bytes(free)} are free"
        )
