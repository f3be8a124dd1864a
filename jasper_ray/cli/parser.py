"""The arguments of ``jasper-ray``: every subcommand, every option, each with its help.

Declarations only: ``main`` (``jasper_ray.cli``) maps ``args.command`` to the function that runs it.
docs/cli.md is the long form of this file; a test checks that it names every option here.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping
from typing import NoReturn

from .. import __version__
from ..schema import (
    COMPRESSION_NONE,
    HDF5_FILE,
    LAYOUT_SINGLE,
    LAYOUTS,
    PRECISION_FLOAT32,
    PRECISIONS,
    PT_CHECKSUMS,
    SHARDS_DIR,
)
from ..storage import CACHE_ENV
from ..tools.synth import parse_size
from .report import EXIT_USAGE

DESCRIPTION = "Store, convert and serve the JASPER steering dataset."
EPILOG = """\
exit codes:
  0    ok
  1    a data problem: the dataset is missing, corrupt or invalid, a checksum does not match;
       or something the command needs is not there (a library, Ray, disk space)
  2    usage: bad arguments, or flags that do not go together
  130  interrupted

Results go to stdout (with --json, one JSON document); progress, status lines and errors to stderr.
Reference: docs/cli.md."""

COMPRESSIONS = ("gzip", "lzf", COMPRESSION_NONE)
SIZE_EXAMPLES = "e.g. 50MB, 2GB, 1GiB"


class Parser(argparse.ArgumentParser):
    """argparse, with the project's one-line errors: ``jasper-ray convert: error: ... (see ... --help)``."""

    commands: Mapping[str, argparse.ArgumentParser]  # the subcommands' parsers by name (on the top one)

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments; an option no parser knows is refused by its subcommand's parser, which names it."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.commands.get(args.command, parser).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _checked(convert: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse ``type`` that turns the converter's ValueError into argparse's usage error."""

    def parse(text: str) -> object:
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return parse


def _whole(text: str, low: int, high: int | None, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low or (high is not None and value > high):
        raise ValueError(f"expected {what}, got {text!r}")
    return value


def _positive(text: str) -> int:
    return _whole(text, 1, None, "a positive whole number")


def _level(text: str) -> int:
    return _whole(text, 0, 9, "a gzip level from 0 to 9")


def _size_text(text: str) -> str:
    parse_size(text)  # refuses what is not a size
    return text


POSITIVE = _checked(_positive)
LEVEL = _checked(_level)
SIZE = _checked(parse_size)  # bytes (int)
SIZE_TEXT = _checked(_size_text)  # the text, once it is known to be a size


def _common() -> Parser:
    """``-q`` and ``-v`` after the subcommand. SUPPRESS: left out, they keep what the top level set."""
    common = Parser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log what happens (INFO level)"
    )
    common.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars or status lines"
    )
    return common


def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON report on stdout, nothing else (schema: docs/cli.md); progress stays on stderr",
    )


def _dataset(
    p: argparse.ArgumentParser, what: str = "the dataset directory, or a URI (s3://, gs://, hdfs://, file://)"
) -> None:
    p.add_argument("dir", metavar="DIR", help=what)
    _cache_dir(p)


def _cache_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir",
        metavar="PATH",
        default=None,
        help=f"node-local cache for remote or compressed datasets (default: ${CACHE_ENV} or ~/.cache/jasper_ray)",
    )


def build_parser() -> Parser:
    parser = Parser(
        prog="jasper-ray",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens (INFO level)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or status lines")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of:")
    parser.commands = sub.choices
    common = [_common()]

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".", parents=common)

    p = command("synth", "write a synthetic dataset in upstream's PT layout")
    p.add_argument("out", metavar="OUT", help="the directory to write the PT files and config.json to")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--pairs", type=POSITIVE, default=2000, help="question-source pairs to write (default: 2000)")
    size.add_argument("--size", type=SIZE, help=f"target size of the PT files instead of --pairs, {SIZE_EXAMPLES}")
    p.add_argument("--dim", type=POSITIVE, default=768, help="embedding dimension D (default: 768)")
    p.add_argument("--neg", type=POSITIVE, default=12, help="hard negatives per pair, n_neg (default: 12)")
    p.add_argument("--seed", type=int, default=0, help="random seed: one seed, the same bytes (default: 0)")

    p = command("checksum", f"record the block digests of a PT dataset's tensors in DIR/{PT_CHECKSUMS}")
    p.add_argument("dir", metavar="DIR", help="a local directory of PT files (upstream's layout, or your own)")

    p = command("convert", "convert a PT dataset to HDF5 beside it: on Ray, or in this process when it is small")
    _dataset(p, "the dataset directory (upstream's PT files), or a URI (s3://, gs://, hdfs://, file://)")
    p.add_argument(
        "--output",
        metavar="PATH",
        default=None,
        help=f"where to write (default: DIR/{HDF5_FILE}, or DIR/{SHARDS_DIR} with --layout sharded)",
    )
    p.add_argument("--compression", default="gzip", choices=COMPRESSIONS, help="codec (default: gzip)")
    p.add_argument("--level", type=LEVEL, metavar="0-9", default=None, help="gzip level (default: h5py's, 4)")
    p.add_argument("--no-shuffle", action="store_true", help="turn off HDF5's byte-shuffle filter")
    p.add_argument(
        "--precision",
        default=PRECISION_FLOAT32,
        choices=PRECISIONS,
        help="what the embedding and steering tensors are stored as; bfloat16 as uint16 bits, readers give "
        "float32 unless asked (default: float32; docs/formats.md)",
    )
    p.add_argument(
        "--layout",
        default=LAYOUT_SINGLE,
        choices=LAYOUTS,
        help=f"one file ({HDF5_FILE}), or a shard file per piece in {SHARDS_DIR}/ with a manifest (default: single)",
    )
    p.add_argument("--workers", type=POSITIVE, metavar="N", default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument(
        "--address", default=None, help="an existing Ray cluster: 'auto' or host:port (default: $RAY_ADDRESS)"
    )
    p.add_argument(
        "--shard-size",
        type=SIZE,
        metavar="SIZE",
        default=None,
        help="source bytes per piece, one Ray task each (default: 256MB; at least one 16 MiB checksum block)",
    )
    p.add_argument(
        "--single-process",
        action="store_true",
        help="convert in this process, without Ray (refuses --workers, --address, --shard-size, --layout sharded)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (pieces, bytes to read and write, free space, whether it fits); write nothing",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="convert even when the output is up to date (already converted from these PT files, same options)",
    )
    _json(p)

    for name, text in (
        ("inspect", "show what a dataset holds and how it is stored"),
        ("verify", "recompute the recorded checksums and validate against the schema"),
    ):
        p = command(name, text)
        _dataset(p)
        p.add_argument(
            "--format",
            default="auto",
            choices=("auto", "pt", "hdf5"),
            help="which copy to read (default: auto, the HDF5 one unless its PT sources changed)",
        )
        _json(p)

    p = command("demo", "synthesise, convert on Ray, serve an epoch every way; print what happened")
    p.add_argument(
        "--size",
        type=SIZE_TEXT,
        default=os.environ.get("JASPER_DEMO_SIZE", "1GB"),
        help=f"synthetic dataset size (PT files), {SIZE_EXAMPLES} (default: $JASPER_DEMO_SIZE or 1GB)",
    )
    p.add_argument("--workers", type=POSITIVE, metavar="N", default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--address", default=None, help="an existing Ray cluster (default: $RAY_ADDRESS)")
    p.add_argument("--dim", type=POSITIVE, default=768, help="embedding dimension D (default: 768)")
    p.add_argument("--neg", type=POSITIVE, default=12, help="hard negatives per pair, n_neg (default: 12)")
    p.add_argument(
        "--dir",
        metavar="DIR",
        help="where to write (default: a new temporary directory); a URI (s3://...) takes the converted dataset",
    )

    p = command("bench", "run the benchmark scripts; write a report with their tables and plots")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--quick", action="store_true", help="each script's --quick sizes (about 5 minutes)")
    scale.add_argument(
        "--tiny",
        action="store_true",
        help="the test suite's scale: end to end, two scripts at a time, numbers meaningless",
    )
    p.add_argument(
        "--only",
        default=None,
        help="a comma-separated subset of formats,loader,convert,ray_data,actors,remote (default: all six), "
        "or scale (opt-in: a dataset larger than RAM, ~65 GB of disk)",
    )
    p.add_argument(
        "--size-scale", type=float, default=1.0, help="multiply each script's dataset size (of the scale) by this"
    )
    p.add_argument("--out", default="bench-report", help="the report's directory (default: bench-report)")
    p.add_argument("--work-dir", default=None, help="where the scripts write their datasets (default: the temp dir)")
    return parser
