"""``jasper-ray``: synth | convert | inspect | verify | demo | bench.

The only module that prints. Bad input ends with a one-line error on stderr
and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from types import ModuleType

from tqdm.auto import tqdm

from .conversion.parallel import convert
from .conversion.writer import convert_pt_to_hdf5
from .errors import ChecksumError
from .formats import open_dataset
from .formats.base import Reader, is_mapped
from .schema import COMPRESSION_NONE, HDF5_FILE, LAYOUT_SINGLE, LAYOUTS, PT_SUFFIX, SHARDS_DIR, TENSORS
from .tools.synth import pairs_for_size, parse_size, synth_dataset
from .validate import validate_dataset

log = logging.getLogger("jasper_ray")


def _cmd_synth(args: argparse.Namespace) -> int:
    n_pairs = pairs_for_size(parse_size(args.size), args.dim, args.neg) if args.size else args.pairs
    started = time.perf_counter()
    out = synth_dataset(args.out, n_pairs, args.dim, args.neg, args.seed)
    nbytes = sum(p.stat().st_size for p in out.iterdir() if p.suffix == PT_SUFFIX)
    print(
        f"wrote {n_pairs} pairs (D={args.dim}, n_neg={args.neg}, seed={args.seed}) to {out}: "
        f"{nbytes / 1e6:.1f} MB in {time.perf_counter() - started:.1f} s"
    )
    return 0


def _compression(text: str) -> str | None:
    return None if text.lower() in (COMPRESSION_NONE, "") else text


def _cmd_convert(args: argparse.Namespace) -> int:
    compression, shuffle = _compression(args.compression), not args.no_shuffle
    if args.single_process:
        report = convert_pt_to_hdf5(args.dir, compression, args.level, shuffle, progress=not args.quiet)
    else:
        report = convert(
            args.dir,
            compression=compression,
            compression_opts=args.level,
            shuffle=shuffle,
            num_workers=args.workers,
            address=args.address,
            layout=args.layout,
            shard_bytes=parse_size(args.shard_size),
            progress=not args.quiet,
        )
    for line in report.lines():
        print(line)
    return 0


def _describe_storage(reader: Reader, name: str) -> str:
    arr = reader.array(name)
    if is_mapped(arr) or (reader.storage_format == "pt" and reader.use_mmap):
        return "mmap"
    dset = getattr(arr, "dset", None)
    if dset is not None:
        return f"chunks={dset.chunks} {dset.compression}{'+shuffle' if dset.shuffle else ''}"
    return "in RAM"


def _cmd_inspect(args: argparse.Namespace) -> int:
    reader = open_dataset(args.dir, storage_format=args.format, use_mmap=True)
    print(f"dataset   {reader.directory}")
    print(f"format    {reader.storage_format} ({reader.nbytes_on_disk() / 1e6:.1f} MB on disk)")
    cfg = reader.config
    print(
        f"config    embedding_dim={cfg.get('embedding_dim')} n_neg={cfg.get('n_neg')} "
        f"steering_probabilities={json.dumps(cfg.get('steering_probabilities'))}"
    )
    print(f"splits    {', '.join(f'{s}={len(reader.split(s))}' for s in reader.split_names())}")
    print(f"{'tensor':<27} {'shape':<18} {'dtype':<8} storage")
    for spec in TENSORS:
        print(
            f"{spec.name:<27} {str(reader.shape(spec.name)):<18} {str(reader.dtype(spec.name)):<8} "
            f"{_describe_storage(reader, spec.name)}"
        )
    values, offsets = reader.keyword_csr()
    print(f"{'pair_keyword_ids':<27} {len(offsets) - 1} pairs, {values.shape[0]} ids")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    reader = open_dataset(args.dir, storage_format=args.format, use_mmap=True)
    if reader.storage_format == "hdf5":
        with tqdm(
            total=reader.nbytes_on_disk(), unit="B", unit_scale=True, desc="checksums", disable=args.quiet
        ) as bar:
            problems = reader.verify_checksums(on_block=bar.update)
        if problems:
            raise ChecksumError("; ".join(problems))
    validate_dataset(reader, progress=not args.quiet)
    print(f"ok: {reader.directory} ({reader.storage_format}) matches its checksums and the schema")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .tools.demo import run_demo  # lazy: the demo imports torch and Ray

    summary = run_demo(
        args.size,
        workers=args.workers,
        address=args.address,
        directory=args.dir,
        dim=args.dim,
        n_neg=args.neg,
        progress=not args.quiet,
    )
    print(summary.table())
    return 0 if summary.ok else 1


def bench_report() -> ModuleType:
    """``scripts/bench_report.py`` of the source checkout this package runs from (benchmarks are not installed)."""
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    if not (scripts / "bench_report.py").is_file():
        raise FileNotFoundError(
            f"benchmark scripts not found: {scripts} lacks bench_report.py "
            "(jasper-ray bench runs the scripts of a source checkout: install it with pip install -e from a clone)"
        )
    if str(scripts) not in sys.path:
        sys.path.insert(0, str(scripts))
    return importlib.import_module("bench_report")


def _cmd_bench(args: argparse.Namespace) -> int:
    run_bench = bench_report().run_bench

    scale = "tiny" if args.tiny else "quick" if args.quick else "full"
    command = ["jasper-ray bench"] + ([f"--{scale}"] if scale != "full" else [])
    command += [f"--only {args.only}"] if args.only else []
    command += [f"--size-scale {args.size_scale:g}"] if args.size_scale != 1.0 else []
    report = run_bench(
        args.out,
        only=args.only,
        scale=scale,
        size_scale=args.size_scale,
        work_dir=args.work_dir,
        command=" ".join(command),
        announce=None if args.quiet else lambda text: print(f"jasper-ray bench: {text}", file=sys.stderr, flush=True),
    )
    for error in report.plot_errors:
        print(f"jasper-ray bench: {error}", file=sys.stderr)
    if report.failed:
        names = ", ".join(f"{r.script} (exit code {r.returncode})" for r in report.failed)
        raise RuntimeError(f"{names} failed; the report of the rest is in {report.directory / 'report.md'}")
    print(f"wrote {report.directory / 'report.md'}")
    return 1 if report.plot_errors else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jasper-ray", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic dataset in upstream's PT layout")
    p.add_argument("out")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--pairs", type=int, default=2000)
    size.add_argument("--size", help="target size on disk, e.g. 2GB (sets --pairs)")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--neg", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("convert", help="convert a PT dataset to HDF5 beside it, in parallel on Ray")
    p.add_argument("dir")
    p.add_argument("--compression", default="gzip", help="gzip, lzf or none")
    p.add_argument("--level", type=int, default=None, help="gzip level (compression_opts)")
    p.add_argument("--no-shuffle", action="store_true", help="turn off the shuffle filter")
    p.add_argument("--workers", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--address", default=None, help="an existing Ray cluster ('auto', ip:port; or set RAY_ADDRESS)")
    p.add_argument(
        "--layout",
        default=LAYOUT_SINGLE,
        choices=LAYOUTS,
        help=f"one {HDF5_FILE}, or {SHARDS_DIR}/ + manifest",
    )
    p.add_argument(
        "--shard-size",
        default="256MB",
        help="bytes of source data per conversion task, a piece (at least one 16 MiB checksum block)",
    )
    p.add_argument("--single-process", action="store_true", help="convert in this process, without Ray")
    p.set_defaults(func=_cmd_convert)

    for name, func, text in (
        ("inspect", _cmd_inspect, "show what a dataset holds and how it is stored"),
        ("verify", _cmd_verify, "recompute checksums and validate against the schema"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("dir")
        p.add_argument("--format", default="auto", choices=("auto", "pt", "hdf5"))
        p.set_defaults(func=func)

    p = sub.add_parser("demo", help="synthesise, convert on Ray, serve an epoch every way; print what happened")
    p.add_argument(
        "--size",
        default=os.environ.get("JASPER_DEMO_SIZE", "1GB"),
        help="synthetic dataset size (PT files), e.g. 50MB, 1GB (default: $JASPER_DEMO_SIZE or 1GB)",
    )
    p.add_argument("--workers", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--address", default=None, help="an existing Ray cluster (or set RAY_ADDRESS)")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--neg", type=int, default=12)
    p.add_argument("--dir", help="where to write (default: a new temporary directory)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("bench", help="run the benchmark scripts; write a report with their tables and plots")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--quick", action="store_true", help="each script's --quick sizes (about 5 minutes)")
    scale.add_argument("--tiny", action="store_true", help="the test suite's scale: end to end, numbers meaningless")
    p.add_argument("--only", default=None, help="a comma-separated subset of formats,loader,convert,ray_data,actors")
    p.add_argument(
        "--size-scale", type=float, default=1.0, help="multiply each script's dataset size (of the scale) by this"
    )
    p.add_argument("--out", default="bench-report", help="the report's directory (default: bench-report)")
    p.add_argument("--work-dir", default=None, help="where the scripts write their datasets (default: the temp dir)")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError, KeyError, RuntimeError) as exc:
        print(f"jasper-ray {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"jasper-ray {args.command}: interrupted", file=sys.stderr)
        return 130
