#!/usr/bin/env python
"""Why mapped gathers need aligned tensors: numpy's row gather from a tensor mapped at an offset its
dtype does not divide, against the same rows mapped aligned and against ``gather_rows``.

    python scripts/diag_gathers.py                  # 200,000 pairs' negatives, like a ~2.5 GB dataset
    python scripts/diag_gathers.py --rows 74285     # the 1 GB dataset of bench_actors

One file holds a [rows, 12] int64 tensor (hard negatives) and a [rows, 768]
float32 tensor (steering rows) twice: once at a 64-byte boundary, once 4
bytes past one (where h5py put upstream's negatives: unaligned for int64,
still aligned for float32, a control). Each method gathers 256
random rows (with repeats) into a preallocated array, interleaved round by
round; median over the rounds. The aligned
``np.take`` is the baseline.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import fmt_ratio, print_table  # noqa: E402

from jasper_ray.formats.base import gather_rows  # noqa: E402

ROWS_PER_GATHER, ROUNDS = 256, 200


def take(array: np.ndarray, indices: np.ndarray, out: np.ndarray) -> np.ndarray:
    return np.take(array, indices, axis=0, out=out, mode="clip")


def mapped(path: Path, offset: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape).view(np.ndarray)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    tensors = {
        "hard_negatives [P, 12] int64": rng.integers(0, 1 << 40, (args.rows, 12), dtype=np.int64),
        "steering [P, 768] float32": rng.standard_normal((args.rows, 768), dtype=np.float32),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tensors.bin"
        with open(path, "wb") as f:
            places = {}
            for name, array in tensors.items():
                for misalign in (0, 4):
                    start = -(-f.tell() // 64) * 64 + misalign
                    f.write(b"\0" * (start - f.tell()))
                    places[name, misalign] = start
                    f.write(array.tobytes())
        indices = [rng.integers(0, args.rows, ROWS_PER_GATHER) for _ in range(ROUNDS)]
        for name, array in tensors.items():
            aligned = mapped(path, places[name, 0], array.dtype.str, array.shape)
            unaligned = mapped(path, places[name, 4], array.dtype.str, array.shape)
            assert aligned.flags.aligned  # the +4 map is unaligned for int64, still aligned for float32
            out = np.empty((ROWS_PER_GATHER, *array.shape[1:]), array.dtype)
            methods = {
                "np.take, aligned map (baseline)": lambda idx, a=aligned, o=out: take(a, idx, o),
                "np.take, map 4 bytes off": lambda idx, a=unaligned, o=out: take(a, idx, o),
                "gather_rows, map 4 bytes off": lambda idx, a=unaligned, o=out: gather_rows(a, idx, o),
            }
            for method in methods.values():  # fault the pages in; check the values
                for idx in indices:
                    method(idx)
                assert np.array_equal(out, array[indices[-1]])
            times: dict[str, list[float]] = {m: [] for m in methods}
            fresh = {label: [rng.integers(0, args.rows, ROWS_PER_GATHER) for _ in range(ROUNDS)] for label in methods}
            for i in range(ROUNDS):
                for label, method in methods.items():
                    idx = fresh[label][i]  # rows of its own: none another method just pulled into the caches
                    t0 = time.perf_counter()
                    method(idx)
                    times[label].append(time.perf_counter() - t0)
            base = statistics.median(times["np.take, aligned map (baseline)"])
            for label, spent in times.items():
                median = statistics.median(spent)
                rows.append((name, label, f"{median * 1e6:.1f} us", fmt_ratio(median / base)))
    print_table(
        f"{ROWS_PER_GATHER}-row gathers from a memory-mapped file, {args.rows:,} rows per tensor",
        ["tensor", "method", "median per gather", "time vs aligned"],
        rows,
        notes=[
            'np.take with mode="clip", as gather_rows calls it (mode="raise" buffers the whole output)',
            f"{ROUNDS} rounds, methods interleaved within each round, each with random indices of its own (no "
            "method reads rows another just pulled into the caches); page cache warm",
            "4 bytes off: the tensor starts 4 bytes past a 64-byte boundary, where h5py put upstream's negatives; "
            "int64 is then unaligned and numpy copies it element by element (float32 stays aligned: a control); "
            "gather_rows copies unaligned rows as bytes",
        ],
    )


if __name__ == "__main__":
    main()
