"""``jasper-ray synth``, ``jasper-ray checksum`` and ``jasper-ray demo``: the front of ``jasper_ray.tools``."""

from __future__ import annotations

import argparse
import json
import time

from ..formats.pt import write_pt_checksums
from ..schema import PT_SUFFIX
from ..tools.synth import pairs_for_size, synth_dataset
from .report import EXIT_DATA, EXIT_OK


def run_synth(args: argparse.Namespace) -> int:
    n_pairs = pairs_for_size(args.size, args.dim, args.neg) if args.size else args.pairs
    started = time.perf_counter()
    out = synth_dataset(args.out, n_pairs, args.dim, args.neg, args.seed, progress=not args.quiet)
    nbytes = sum(p.stat().st_size for p in out.iterdir() if p.suffix == PT_SUFFIX)
    print(
        f"wrote {n_pairs} pairs (D={args.dim}, n_neg={args.neg}, seed={args.seed}) to {out}: "
        f"{nbytes / 1e6:.1f} MB in {time.perf_counter() - started:.1f} s"
    )
    return EXIT_OK


def run_checksum(args: argparse.Namespace) -> int:
    """NOTE [PT checksum sidecar] in formats.pt_checksums."""
    started = time.perf_counter()
    out = write_pt_checksums(args.dir)
    n = len(json.loads(out.read_text())["tensors"])
    print(f"wrote {out}: block digests of {n} tensors in {time.perf_counter() - started:.1f} s")
    return EXIT_OK


def run_demo(args: argparse.Namespace) -> int:
    from ..tools import demo  # lazy: the demo imports torch and Ray

    summary = demo.run_demo(
        args.size,
        workers=args.workers,
        address=args.address,
        directory=args.dir,
        dim=args.dim,
        n_neg=args.neg,
        progress=not args.quiet,
    )
    print(summary.table())
    return EXIT_OK if summary.ok else EXIT_DATA
