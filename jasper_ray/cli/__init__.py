"""The ``jasper-ray`` command: synth | convert | inspect | verify | demo | bench.

The only floor that prints. Results go to stdout, the rest to stderr (NOTE [CLI streams] in
``report``); ``inspect``, ``verify`` and ``convert`` take ``--json``. Bad input ends with one line
on stderr and the exit code of docs/cli.md: 0 ok, 1 a data problem, 2 usage, 130 interrupted.

Modules: ``parser`` (every argument and its help), ``report`` (the JSON report, exit codes, the
streams), ``datasets`` (inspect, verify), ``convert``, ``tools`` (synth, demo). ``bench`` is here:
it finds the benchmark scripts of the source checkout relative to this file.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from ..storage import is_uri
from .convert import run_convert
from .datasets import run_inspect, run_verify
from .parser import build_parser, parse
from .report import (
    DATA_ERRORS,
    EXIT_DATA,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    Report,
    UsageError,
    error_line,
)
from .tools import run_checksum, run_demo, run_synth

log = logging.getLogger("jasper_ray")


def bench_report() -> ModuleType:
    """``scripts/bench_report.py`` of the source checkout this package runs from (benchmarks are not installed)."""
    scripts = Path(__file__).resolve().parents[2] / "scripts"
    if not (scripts / "bench_report.py").is_file():
        raise FileNotFoundError(
            f"benchmark scripts not found: {scripts} lacks bench_report.py "
            "(jasper-ray bench runs the scripts of a source checkout: install it with pip install -e from a clone)"
        )
    if str(scripts) not in sys.path:
        sys.path.insert(0, str(scripts))
    return importlib.import_module("bench_report")


def run_bench(args: argparse.Namespace) -> int:
    run = bench_report().run_bench

    scale = "tiny" if args.tiny else "quick" if args.quick else "full"
    command = ["jasper-ray bench"] + ([f"--{scale}"] if scale != "full" else [])
    command += [f"--only {args.only}"] if args.only else []
    command += [f"--size-scale {args.size_scale:g}"] if args.size_scale != 1.0 else []
    report = run(
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
    return EXIT_DATA if report.plot_errors else EXIT_OK


# Commands that fill a Report (text or --json), and commands that print as they go.
REPORTED: dict[str, Callable[[argparse.Namespace, Report], None]] = {
    "inspect": run_inspect,
    "verify": run_verify,
    "convert": run_convert,
}
PLAIN: dict[str, Callable[[argparse.Namespace], int]] = {
    "synth": run_synth,
    "checksum": run_checksum,
    "demo": run_demo,
    "bench": run_bench,
}


def _jsonable(value: Any) -> Any:
    """numpy scalars as Python numbers; anything else json cannot write, as text."""
    return value.item() if hasattr(value, "item") else str(value)


def _run_reported(args: argparse.Namespace, command: Callable[[argparse.Namespace, Report], None]) -> int:
    report = Report(args.command, args.dir if is_uri(args.dir) else os.path.abspath(args.dir))
    stdout = sys.stdout
    # NOTE [CLI streams]: under --json, whatever prints while the command runs goes to stderr.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        try:
            command(args, report)
        except BrokenPipeError:
            raise
        except DATA_ERRORS as exc:
            report.problems.append(str(exc))
    if report.problems:
        error_line(args.command, "; ".join(report.problems))
    if args.json:
        print(json.dumps(report.document(), indent=2, default=_jsonable), file=stdout)
    else:
        for line in report.lines:
            print(line, file=stdout)
    return EXIT_OK if report.ok else EXIT_DATA


def _main(argv: list[str] | None) -> int:
    try:
        args = parse(argv)
    except SystemExit as exc:  # --help and --version (0), or a usage error argparse has printed (2)
        return EXIT_OK if exc.code is None else exc.code if isinstance(exc.code, int) else EXIT_USAGE
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        if args.command in REPORTED:
            code = _run_reported(args, REPORTED[args.command])
        else:
            code = PLAIN[args.command](args)
        sys.stdout.flush()  # a reader that went away shows here, inside the handler below
        return code
    except BrokenPipeError:
        raise
    except UsageError as exc:
        error_line(args.command, str(exc))
        return EXIT_USAGE
    except DATA_ERRORS as exc:
        error_line(args.command, str(exc))
        return EXIT_DATA
    except KeyboardInterrupt:
        print(f"jasper-ray {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    """``jasper-ray``: run one subcommand, return its exit code."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # stdout's reader went away (``jasper-ray inspect DIR | head``): what it wanted, it has.
        # Python's documented way (library/signal, "Note on SIGPIPE"): point stdout at devnull, so the
        # flush at exit cannot fail again, and end quietly.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


__all__ = ["bench_report", "build_parser", "main"]
