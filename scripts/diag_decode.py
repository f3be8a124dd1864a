#!/usr/bin/env python
"""Where the time of a decoding gather goes: a batch's negatives (6144 random rows of 768) gathered from a
memory-mapped float32 table into a float32 batch, against the same rows from 16-bit tables decoded on the way
(``gather_rows``: the compiled kernel's one pass where it was built), the two passes it falls back to, and their
parts alone: the 16-bit gather, each decode kernel, writing the batch at all.

    python scripts/diag_decode.py                   # a 59,426-row source table, as in the 1 GB dataset
    python scripts/diag_decode.py --batches 3       # batches written in turn: none stays in the caches

One file holds the table at float32, float16 and bfloat16 (64-byte aligned, advised as the HDF5 reader
advises its maps). Each round runs every method once on indices of its own, writing one of ``--batches``
float32 batches in turn (1: the same memory each time, as the benchmarks' loops get it back from malloc);
the median over rounds of the thread's CPU time (not wall time: the VM is shared; a method waiting for a
core is not charged). A part alone works on a run of rows already in the cache, run by run over the
batch, as ``gather_rows`` does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import fmt_ratio, print_table  # noqa: E402

import jasper_ray.formats.arrays as arrays  # noqa: E402
from jasper_ray.formats.arrays import advise_huge_pages, gather_rows  # noqa: E402
from jasper_ray.formats.precision import _numpy_cast, _shift, _torch_cast, compiled_gather, encode  # noqa: E402

ROWS, DIM = 6144, 768  # 512 pairs x 12 negatives, D=768


def runs(indices: np.ndarray, row_bytes: int) -> list[slice]:
    """The runs ``gather_rows`` cuts ``indices`` into (``arrays.DECODE_RUN_BYTES`` of stored rows each)."""
    run = max(1, arrays.DECODE_RUN_BYTES // row_bytes)
    return [slice(a, min(a + run, len(indices))) for a in range(0, len(indices), run)]


def parts(table: np.ndarray, kernel: Callable[[np.ndarray, np.ndarray], object]) -> dict[str, Callable]:
    """The gather alone and the decode alone, run by run, as ``gather_rows`` runs them."""
    buffer = np.empty((max(1, arrays.DECODE_RUN_BYTES // table[:1].nbytes), DIM), table.dtype)
    buffer[...] = table[: len(buffer)]

    def gather(idx: np.ndarray, out: np.ndarray) -> None:
        for r in runs(idx, table[:1].nbytes):
            table.take(idx[r], 0, buffer[: r.stop - r.start], "clip")

    def decode(idx: np.ndarray, out: np.ndarray) -> None:
        for r in runs(idx, table[:1].nbytes):
            kernel(buffer[: r.stop - r.start], out[r])

    def both(idx: np.ndarray, out: np.ndarray) -> None:
        for r in runs(idx, table[:1].nbytes):
            table.take(idx[r], 0, buffer[: r.stop - r.start], "clip")
            kernel(buffer[: r.stop - r.start], out[r])

    return {"gather alone": gather, "decode alone": decode, "two passes": both}


def main() -> None:
    parser = argparse.ArgumentParser(description=str(__doc__).splitlines()[0])
    parser.add_argument("--rows", type=int, default=59_426)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--batches", type=int, default=1)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((args.rows, DIM)) / np.sqrt(DIM)).astype(np.float32)
    stored = {"float32": values, "float16": encode(values, "float16"), "bfloat16": encode(values, "bfloat16")}
    batches = [np.ones((ROWS, DIM), np.float32) for _ in range(args.batches)]  # written: no page faults later
    with tempfile.TemporaryDirectory() as tmp:
        path, places = Path(tmp) / "tables.bin", {}
        with open(path, "wb") as f:
            for name, array in stored.items():
                f.write(b"\0" * (-f.tell() % 64))
                places[name] = f.tell()
                f.write(array.tobytes())
        tables = {
            name: np.memmap(path, array.dtype, "r", offset=places[name], shape=array.shape).view(np.ndarray)
            for name, array in stored.items()
        }
        for table in tables.values():
            advise_huge_pages(table, path.stat().st_size)  # as the HDF5 reader maps them
        f32, f16, bf16 = tables["float32"], tables["float16"], tables["bfloat16"]
        f32_parts = parts(f32, lambda run, out: np.copyto(out, run))

        def widen_left_shift(b: np.ndarray, o: np.ndarray) -> None:
            np.left_shift(b, np.uint32(16), out=o.view(np.uint32), dtype=np.uint32)

        f16_parts, bf16_parts = parts(f16, _torch_cast()), parts(bf16, _shift)
        one_pass = "one pass, compiled" if compiled_gather is not None else "two passes: no compiled kernel here"
        methods: dict[str, Callable[[np.ndarray, np.ndarray], object]] = {
            "float32 table: np.take into the batch (baseline)": lambda idx, out: f32.take(idx, 0, out, "clip"),
            "float32: rows in the cache copied into the batch": f32_parts["decode alone"],
            f"float16 table: gather_rows ({one_pass})": lambda idx, out: gather_rows(f16, idx, out),
            "float16 table: two passes (16-bit gather, torch's cast)": f16_parts["two passes"],
            "float16: the 16-bit gather alone": f16_parts["gather alone"],
            "float16: torch's cast alone": f16_parts["decode alone"],
            "float16: numpy's cast alone": parts(f16, _numpy_cast)["decode alone"],
            f"bfloat16 table: gather_rows ({one_pass})": lambda idx, out: gather_rows(bf16, idx, out),
            "bfloat16 table: two passes (16-bit gather, widening cast)": bf16_parts["two passes"],
            "bfloat16: the 16-bit gather alone": bf16_parts["gather alone"],
            "bfloat16: widening cast alone": bf16_parts["decode alone"],
            "bfloat16: numpy's left_shift alone": parts(bf16, widen_left_shift)["decode alone"],
        }
        idx = rng.integers(0, args.rows, ROWS)
        assert np.array_equal(gather_rows(bf16, idx, batches[0]), (bf16[idx].astype(np.uint32) << 16).view("f4"))
        assert np.array_equal(gather_rows(f16, idx, batches[0]), f16[idx].astype(np.float32))
        times: dict[str, list[float]] = {m: [] for m in methods}
        for r in range(args.rounds + 1):
            for i, (label, method) in enumerate(methods.items()):
                idx, out = rng.integers(0, args.rows, ROWS), batches[(r + i) % len(batches)]
                t0 = time.thread_time()
                method(idx, out)
                if r:  # round 0 maps the pages
                    times[label].append(time.thread_time() - t0)
    base = statistics.median(times[next(iter(methods))])
    rows = [
        [label, f"{statistics.median(spent) * 1e3:.2f} ms", fmt_ratio(statistics.median(spent) / base)]
        for label, spent in times.items()
    ]
    print_table(
        f"Decoding gathers: {ROWS} random rows of {DIM} into a float32 batch, {args.rows:,}-row tables mapped",
        ["method", "median CPU time", "vs float32 np.take"],
        rows,
        notes=[
            f"{args.rounds} rounds, methods interleaved; CPU time of the thread; batches written in turn: "
            f"{args.batches} ({args.batches * ROWS * DIM * 4 >> 20} MB); page cache warm; runs of "
            f"{arrays.DECODE_RUN_BYTES >> 10} KiB of stored rows",
            "two passes (the fallback where no C compiler built the kernel): a 16-bit gather into a run buffer, "
            "then its decode into the batch, run by run; a part alone: one of the two; the two passes cost at "
            "least the sum of their parts",
        ],
        align="lrr",
    )


if __name__ == "__main__":
    main()
