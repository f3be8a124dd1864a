#!/usr/bin/env python
"""Benchmark jasper_ray's storage formats against upstream's ways and a raw memmap.

    python scripts/bench_formats.py --size 2GB --out /tmp/jr-bench
    python scripts/bench_formats.py --quick            # 100MB, fewer repetitions

Synthesises two upstream-layout PT datasets (``--size`` and ``--size``/8,
D=768, n_neg=12), converts them, and prints markdown tables (stdout only;
progress goes to stderr):

1. conversion: MB/s, output size and peak memory of our converter (gzip, lzf,
   none) against an upstream-style converter (whole-tensor ``torch.load`` +
   ``create_dataset(data=...)``, one keyword dataset per pair);
2. open time (fresh subprocess, page cache warm) for PT, PT+mmap, HDF5 gzip,
   HDF5 contiguous+mmap and upstream's full load, at both sizes;
3. 512-random-row gathers through ``reader.take`` against a raw ``np.memmap``
   of the same bytes;
4. reading every pair's keyword ids: our CSR against upstream's per-pair datasets;
5. memory (RssAnon / RssFile / VmRSS) of a full pass over the train split;
6. read verification's cost (``_bench_verify``);
7. storage precision (``_bench_precision``): dataset.h5 size per precision and codec (small dataset), and
   memory-mapped batched samples/s of float32 storage against float16 / bfloat16 (big dataset).

Every table carries its baseline row, measured in the same run. Data lives in
``--out/bench-formats-<pid>`` and is removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import (  # noqa: E402
    PeakTracker,
    fmt_bytes,
    fmt_ms,
    fmt_pct,
    fmt_rate,
    fmt_ratio,
    interleaved_timings,
    print_table,
    proc_status,
    record,
    run_fresh,
    setup_logging,
    timings,
    upstream_convert,
    w_synth,  # noqa: E402, F401 - run_fresh calls them by name
)

log = logging.getLogger("bench.formats")
SCRIPT = Path(__file__).resolve()

DIM = 768
N_NEG = 12
COMPRESSIONS = ("gzip", "lzf", None)
OPEN_TARGET_S = 0.050
GATHER_TARGET = 0.8
RSS_TARGET = 0.05


def codec_name(compression: str | None) -> str:
    return compression or "none"


def our_h5(directory: Path, compression: str | None) -> Path:
    return directory / f"dataset.{codec_name(compression)}.h5"


def upstream_h5(directory: Path, compression: str | None) -> Path:
    return directory / f"upstream.{codec_name(compression)}.h5"


# ======================================================================================
# Workers: each runs in a fresh interpreter through run_fresh, imports first, then times.
# ======================================================================================


def pt_source_bytes(directory: Path) -> int:
    from jasper_ray.formats.pt import PTReader

    return PTReader(directory).nbytes_on_disk()


class Sampler:
    """A thread sampling /proc/self/status every ``interval`` s, for peak RssAnon (there is no HWM for it)."""

    def __init__(self, interval: float = 0.02):
        self.tracker = PeakTracker()
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.tracker.sample()

    def __enter__(self) -> PeakTracker:
        self._thread.start()
        return self.tracker

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.tracker.sample()


def w_convert(kind: str, src: str, output: str, compression: str | None) -> dict[str, Any]:
    import h5py  # noqa: F401
    import torch  # noqa: F401

    from jasper_ray.conversion.writer import convert_pt_to_hdf5

    src_dir, out = Path(src), Path(output)
    with Sampler() as tracker:
        t0 = time.perf_counter()
        if kind == "ours":
            convert_pt_to_hdf5(src_dir, compression, output=out, validate=False, progress=False, force=True)
        else:
            upstream_convert(src_dir, out, compression)
        seconds = time.perf_counter() - t0
    hwm = proc_status()["VmHWM"] - tracker.base["VmRSS"]
    return {
        "seconds": seconds,
        "output_bytes": out.stat().st_size,
        "source_bytes": pt_source_bytes(src_dir),
        "peak_anon": tracker.peak["RssAnon"],
        "peak_rss": max(hwm, tracker.peak["VmRSS"]),
    }


def w_validate(src: str) -> dict[str, Any]:
    from jasper_ray.formats import open_dataset
    from jasper_ray.validate import validate_dataset

    reader = open_dataset(src, storage_format="pt", use_mmap=True)
    t0 = time.perf_counter()
    validate_dataset(reader, progress=False)
    return {"seconds": time.perf_counter() - t0}


# Open variants: key -> (label, what is timed).
OPEN_VARIANTS: dict[str, tuple[str, str]] = {
    "upstream": (
        "upstream-style full load (baseline)",
        "torch.load 13 tensors whole (no mmap) + train split, as upstream's loader",
    ),
    "pt": ("PT, use_mmap=False", "torch.load 13 tensors whole + train split"),
    "pt-mmap": ("PT + mmap", "torch.load(mmap=True) 13 tensors + train split"),
    "h5-gzip-full": ("HDF5 gzip, use_mmap=False", "h5py open, read + decompress 13 tensors + train split"),
    "h5-gzip-lazy": ("HDF5 gzip, lazy chunks (use_mmap=True)", "h5py open, 13 lazy chunked arrays + train split"),
    "h5-none-mmap": ("HDF5 contiguous + mmap", "h5py open, np.memmap 13 tensors + train split"),
}


def open_target(directory: Path, kind: str) -> tuple[Path, str, bool]:
    """(path to open, storage format, use_mmap) for an open variant."""
    return {
        "pt": (directory, "pt", False),
        "pt-mmap": (directory, "pt", True),
        "h5-gzip-full": (our_h5(directory, "gzip"), "hdf5", False),
        "h5-gzip-lazy": (our_h5(directory, "gzip"), "hdf5", True),
        "h5-none-mmap": (our_h5(directory, None), "hdf5", True),
    }[kind]


def w_open(kind: str, directory: str) -> dict[str, Any]:
    """Open a dataset in one of OPEN_VARIANTS' ways, up to the first ``shape`` of one tensor."""
    import gc

    import h5py  # noqa: F401
    import torch

    from jasper_ray.formats import open_dataset
    from jasper_ray.schema import CONFIG_FILE, KEYWORD_IDS, TENSORS, split_pt_file

    directory_p = Path(directory)
    gc.collect()
    base = proc_status()
    t0 = time.perf_counter()
    if kind == "upstream":
        json.loads((directory_p / CONFIG_FILE).read_text())
        files = [s.pt_file for s in TENSORS] + [split_pt_file("train")]
        loaded = {name: torch.load(directory_p / name, map_location="cpu", weights_only=True) for name in files}
        shape = tuple(loaded["steering_centroid.pt"].shape)
        seconds = time.perf_counter() - t0
        # Upstream also unpickles the keyword lists (with weights_only=False, which we never run): timed apart.
        t1 = time.perf_counter()
        torch.load(directory_p / KEYWORD_IDS.pt_file, weights_only=True)
        keywords_seconds = time.perf_counter() - t1
    else:
        path, storage_format, use_mmap = open_target(directory_p, kind)
        reader = open_dataset(path, storage_format=storage_format, use_mmap=use_mmap)
        for spec in TENSORS:
            reader.array(spec.name)
        reader.split("train")
        shape = reader.shape("steering_centroid")
        seconds = time.perf_counter() - t0
        keywords_seconds = 0.0
    after = proc_status()
    assert len(shape) == 2
    return {
        "seconds": seconds,
        "keywords_seconds": keywords_seconds,
        "rss": after["VmRSS"] - base["VmRSS"],
        "anon": after["RssAnon"] - base["RssAnon"],
    }


# Full-pass variants: key -> (label, path builder).
PASS_VARIANTS: dict[str, str] = {
    "upstream": "upstream-style: all tensors loaded into RAM (baseline)",
    "pt-mmap": "PT + mmap",
    "h5-none-mmap": "HDF5 contiguous + mmap",
    "h5-gzip-lazy": "HDF5 gzip, lazy chunks",
}


class InRam:
    """Upstream's way: every tensor torch.load-ed whole; gathers index RAM."""

    def __init__(self, directory: Path):
        import torch

        from jasper_ray.schema import TENSORS, split_pt_file

        self.arrays = {
            s.name: torch.load(directory / s.pt_file, map_location="cpu", weights_only=True).numpy() for s in TENSORS
        }
        self._train = torch.load(directory / split_pt_file("train"), weights_only=True).numpy()
        self.files = [directory / s.pt_file for s in TENSORS]

    def split(self, name: str) -> np.ndarray:
        return self._train

    def take(self, name: str, idx: np.ndarray) -> np.ndarray:
        return self.arrays[name][idx]

    def nbytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.files)


def w_pass(kind: str, directory: str, batch: int, seed: int, max_batches: int) -> dict[str, Any]:
    """One pass over the train split in shuffled batches, gathering what a training batch needs.

    Per batch of pair ids: pair_index, question rows, source rows, hard negative
    ids and their source rows, the three steering rows. Memory is sampled while
    the batch is alive.
    """
    import gc

    import h5py  # noqa: F401
    import torch  # noqa: F401

    from jasper_ray.formats import open_dataset

    directory_p = Path(directory)
    gc.collect()
    tracker = PeakTracker()
    t0 = time.perf_counter()
    if kind == "upstream":
        reader: Any = InRam(directory_p)
    else:
        path, storage_format, use_mmap = open_target(directory_p, kind)
        reader = open_dataset(path, storage_format=storage_format, use_mmap=use_mmap)
    train = reader.split("train")
    order = np.random.default_rng(seed).permutation(train)
    n_batches = -(-len(order) // batch)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    pairs = rows = 0
    for b in range(n_batches):
        ids = order[b * batch : (b + 1) * batch]
        index = reader.take("pair_index", ids)
        negatives = reader.take("hard_negatives", ids)
        got = [
            reader.take("question_embs", index[:, 0]),
            reader.take("source_embs", index[:, 1]),
            reader.take("source_embs", negatives.ravel()),
            reader.take("steering_centroid", ids),
            reader.take("steering_keyword_weighted", ids),
            reader.take("steering_residual", ids),
        ]
        tracker.sample()
        pairs += len(ids)
        rows += sum(len(g) for g in got)
        del got
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "pairs": pairs,
        "rows": rows,
        "batches": n_batches,
        "full": n_batches * batch >= len(order),
        "dataset_bytes": reader.nbytes_on_disk(),
        "peak": tracker.peak,
    }


# Gather methods: each factory returns (gather(idx) -> rows, the mapped ndarray to pre-fault or None).


def _raw_memmap(path: Path, offset: int, shape: tuple[int, ...], dtype: Any) -> tuple[Any, Any]:
    mm = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    return mm.__getitem__, mm


def _in_ram(path: Path, offset: int, shape: tuple[int, ...], dtype: Any) -> tuple[Any, Any]:
    arr = np.array(np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape))
    return arr.__getitem__, None


def _via_reader(path: Path, storage_format: str, name: str) -> tuple[Any, Any]:
    from jasper_ray.formats import open_dataset

    reader = open_dataset(path, storage_format=storage_format, use_mmap=True)
    arr = reader.array(name)
    return partial(reader.take, name), (arr if isinstance(arr, np.ndarray) else None)


def _fancy(dset: Any, idx: np.ndarray) -> np.ndarray:
    return dset[np.unique(idx)]


def _h5py_fancy(path: Path, h5_path: str, handles: list[Any]) -> tuple[Any, Any]:
    import h5py

    f = h5py.File(path, "r", locking=False)
    handles.append(f)
    return partial(_fancy, f[h5_path]), None


# ======================================================================================
# Sections (driver side)
# ======================================================================================


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path):
        from jasper_ray.tools.synth import pairs_for_size, parse_size

        self.args = args
        self.work = work
        self.big_bytes = parse_size(args.size)
        self.small_bytes = self.big_bytes // args.small_div
        self.big = work / "big"
        self.small = work / "small"
        self.pairs = {
            self.big: pairs_for_size(self.big_bytes, DIM, N_NEG),
            self.small: pairs_for_size(self.small_bytes, DIM, N_NEG),
        }
        self.label = {self.big: args.size, self.small: f"{args.size}/{args.small_div}"}

    # --- setup ---------------------------------------------------------------------------
    def synth(self) -> None:
        for i, directory in enumerate((self.big, self.small)):
            log.info("synthesising %s: %d pairs (D=%d, n_neg=%d)", directory, self.pairs[directory], DIM, N_NEG)
            r = run_fresh(
                SCRIPT,
                "w_synth",
                out=str(directory),
                n_pairs=self.pairs[directory],
                dim=DIM,
                n_neg=N_NEG,
                seed=self.args.seed + i,
            )
            log.info("  %s PT bytes in %.1f s", fmt_bytes(pt_source_bytes(directory)), r["seconds"])

    def print_setup(self) -> None:
        import h5py
        import torch

        with open("/proc/meminfo") as f:
            ram = int(f.readline().split()[1]) * 1024
        rows = [
            ["machine", f"{os.cpu_count()} CPUs, {fmt_bytes(ram)} RAM, {platform.platform()}"],
            [
                "versions",
                f"python {platform.python_version()}, torch {torch.__version__}, h5py {h5py.__version__} "
                f"(HDF5 {h5py.version.hdf5_version}), numpy {np.__version__}",
            ],
        ]
        for d in (self.big, self.small):
            rows.append(
                [
                    f"dataset {self.label[d]}",
                    f"{self.pairs[d]:,} pairs, D={DIM}, n_neg={N_NEG}, PT files {fmt_bytes(pt_source_bytes(d))}",
                ]
            )
        rows.append(["page cache", "warm: every file was just written or read; nothing is dropped between runs"])
        print_table("Setup", ["", "value"], rows, align="ll")

    # --- conversion ------------------------------------------------------------------------
    def convert(self) -> None:
        results = {}
        for compression in COMPRESSIONS:
            for kind in ("upstream", "ours"):
                out = (upstream_h5 if kind == "upstream" else our_h5)(self.big, compression)
                log.info("converting %s with %s converter, %s", self.big, kind, codec_name(compression))
                r = run_fresh(
                    SCRIPT, "w_convert", kind=kind, src=str(self.big), output=str(out), compression=compression
                )
                log.info("  %.1f s, %s", r["seconds"], fmt_bytes(r["output_bytes"]))
                results[kind, compression] = r
                if kind == "upstream" and compression != "gzip" and not self.args.keep:
                    out.unlink()  # only upstream's gzip file is read later (keyword table)
        for compression in ("gzip", None):  # the small dataset's files, for the open table
            log.info("converting %s (%s) for the open-time table", self.small, codec_name(compression))
            run_fresh(
                SCRIPT,
                "w_convert",
                kind="ours",
                src=str(self.small),
                output=str(our_h5(self.small, compression)),
                compression=compression,
            )
        log.info("validating %s (what `jasper-ray convert` runs before converting)", self.big)
        validation = run_fresh(SCRIPT, "w_validate", src=str(self.big))["seconds"]

        rows = []
        for compression in COMPRESSIONS:
            base = results["upstream", compression]
            for kind in ("upstream", "ours"):
                r = results[kind, compression]
                label = "upstream-style (baseline)" if kind == "upstream" else "jasper_ray convert_pt_to_hdf5"
                layout = {
                    ("upstream", "gzip"): "gzip, no shuffle, auto chunks",
                    ("upstream", "lzf"): "lzf, no shuffle, auto chunks",
                    ("upstream", None): "contiguous",
                    ("ours", "gzip"): "gzip + shuffle, 64 KiB row chunks",
                    ("ours", "lzf"): "lzf + shuffle, 64 KiB row chunks",
                    ("ours", None): "contiguous (memory-maps)",
                }[kind, compression]
                mbs = r["source_bytes"] / 1e6 / r["seconds"]
                rows.append(
                    [
                        label,
                        layout,
                        f"{r['seconds']:.1f} s",
                        f"{mbs:.1f}",
                        fmt_ratio(base["seconds"] / r["seconds"]),
                        fmt_bytes(r["output_bytes"]),
                        f"{r['output_bytes'] / r['source_bytes']:.3f}",
                        fmt_bytes(r["peak_anon"]),
                        fmt_bytes(r["peak_rss"]),
                    ]
                )
        src = results["ours", "gzip"]["source_bytes"]
        print_table(
            f"Conversion of the {self.label[self.big]} dataset ({fmt_bytes(src)} of PT files, "
            f"{self.pairs[self.big]:,} pairs)",
            [
                "converter",
                "layout",
                "wall time",
                "MB/s",
                "speed vs upstream (same codec)",
                "output",
                "size / PT",
                "peak RssAnon growth",
                "peak RSS growth",
            ],
            rows,
            notes=[
                "MB/s = PT bytes (all .pt files the dataset consists of) / wall time; wall time covers open, "
                "keyword CSR build, all writes and (ours only) fsync + atomic rename. Each run is a fresh subprocess.",
                "Upstream-style = UPSTREAM.md section 4 reimplemented: torch.load each tensor whole, "
                "create_dataset(data=..., compression=codec) without shuffle, one int32 dataset per pair under "
                "pair_data/keyword_ids/, no fsync.",
                f"Ours ran with validate=False; the validation it runs by default took {validation:.2f} s more "
                "(a chunked scan over the mmap'd PT files).",
                "Peak RssAnon is sampled every 20 ms by a thread; peak RSS is VmHWM (it includes mmap'd source "
                "pages, which are page cache, not owned memory).",
            ],
            align="llrrrrrrr",
        )

    # --- open time ---------------------------------------------------------------------------
    def open_times(self) -> None:
        reps = self.args.open_reps
        res: dict[tuple[str, Path], list[dict[str, Any]]] = {}
        for directory in (self.small, self.big):
            for kind in OPEN_VARIANTS:
                log.info("open %s (%s) x%d", kind, self.label[directory], reps)
                res[kind, directory] = [
                    run_fresh(SCRIPT, "w_open", kind=kind, directory=str(directory)) for _ in range(reps)
                ]

        def med(kind: str, d: Path, key: str = "seconds") -> float:
            return float(np.median([r[key] for r in res[kind, d]]))

        for directory in (self.small, self.big):
            for kind, (label, _) in OPEN_VARIANTS.items():
                opened = directory if kind in ("upstream", "pt", "pt-mmap") else open_target(directory, kind)[0]
                record(
                    "formats_open",
                    format=kind,
                    label=label,
                    mmap=kind in ("pt-mmap", "h5-none-mmap", "h5-gzip-lazy"),
                    size_label=self.label[directory],
                    pairs=self.pairs[directory],
                    dataset_bytes=pt_source_bytes(directory),
                    file_bytes=pt_source_bytes(directory) if opened == directory else opened.stat().st_size,
                    seconds=med(kind, directory),
                    rss=med(kind, directory, "rss"),
                    anon=med(kind, directory, "anon"),
                )

        rows = []
        for kind, (label, what) in OPEN_VARIANTS.items():
            s, b = med(kind, self.small), med(kind, self.big)
            rng = [r["seconds"] for r in res[kind, self.big]]
            mmap = kind in ("pt-mmap", "h5-none-mmap", "h5-gzip-lazy")
            rows.append(
                [
                    label,
                    what,
                    fmt_ms(s),
                    f"{fmt_ms(b)} ({fmt_ms(min(rng))}-{fmt_ms(max(rng))})",
                    fmt_ratio(b / s),
                    fmt_ratio(med("upstream", self.big) / b),
                    fmt_bytes(med(kind, self.big, "anon")),
                    fmt_bytes(med(kind, self.big, "rss")),
                    ("yes" if b < OPEN_TARGET_S else "NO") if mmap else "-",
                ]
            )
        print_table(
            f"Open time, {self.label[self.small]} vs {self.label[self.big]} "
            f"({self.pairs[self.small]:,} vs {self.pairs[self.big]:,} pairs)",
            [
                "format",
                "what is timed",
                f"open {self.label[self.small]}",
                f"open {self.label[self.big]} (min-max)",
                "big / small",
                f"speed-up vs upstream ({self.label[self.big]})",
                f"RssAnon growth ({self.label[self.big]})",
                f"RSS growth ({self.label[self.big]})",
                "< 50 ms",
            ],
            rows,
            notes=[
                f"Median of {reps} runs, each in a fresh Python process after its imports (torch, h5py, "
                "jasper_ray); timed from open_dataset up to and including the first reader.shape() of "
                "steering_centroid.",
                "Page cache WARM (files were just written/read): a cold read from disk makes the full loads slower; "
                "the mmap opens read only metadata either way.",
                "Keyword ids are lazy in our readers (not in these times; see the keyword table). Upstream's "
                "loader also unpickles pair_keyword_ids.pt: with weights_only=True (upstream uses "
                "weights_only=False, which jasper_ray never runs) that took a further "
                f"{fmt_ms(med('upstream', self.small, 'keywords_seconds'))} / "
                f"{fmt_ms(med('upstream', self.big, 'keywords_seconds'))}, left out of its row so the rows compare "
                "like for like.",
                "Target: opening with mmap < 50 ms and not growing with dataset size (big / small ~1x).",
            ],
            align="llrrrrrrc",
        )

    # --- gathers -----------------------------------------------------------------------------
    def gathers(self) -> None:
        import h5py

        from jasper_ray.schema import TENSOR

        args = self.args
        contiguous, gzip_file, lzf_file = our_h5(self.big, None), our_h5(self.big, "gzip"), our_h5(self.big, "lzf")
        rows = []
        for name in ("steering_centroid", "question_embs"):
            h5_path = TENSOR[name].h5_path
            with h5py.File(contiguous, "r", locking=False) as f:
                d = f[h5_path]
                raw = (contiguous, d.id.get_offset(), d.shape, d.dtype)
            n = raw[2][0]
            rng = np.random.default_rng(args.seed)
            idx_sets = [rng.integers(0, n, args.batch) for _ in range(args.gather_reps + 1)]  # [0]: check/warm-up
            handles: list[Any] = []
            makers = [
                ("raw np.memmap of the contiguous HDF5 bytes (baseline)", partial(_raw_memmap, *raw)),
                ("in-RAM ndarray (what a full load serves; reference)", partial(_in_ram, *raw)),
                ("PT + mmap, reader.take", partial(_via_reader, self.big, "pt", name)),
                ("HDF5 contiguous + mmap, reader.take", partial(_via_reader, contiguous, "hdf5", name)),
                ("HDF5 gzip (ChunkedRows), reader.take", partial(_via_reader, gzip_file, "hdf5", name)),
                ("HDF5 lzf (ChunkedRows), reader.take", partial(_via_reader, lzf_file, "hdf5", name)),
                ("HDF5 gzip, h5py fancy indexing (sorted unique)", partial(_h5py_fancy, gzip_file, h5_path, handles)),
                (
                    "HDF5 contiguous, h5py fancy indexing (sorted unique)",
                    partial(_h5py_fancy, contiguous, h5_path, handles),
                ),
            ]
            expected = _raw_memmap(*raw)[1]
            labels, fns, mappings = [], [], []
            for label, make in makers:
                fn, mapping = make()
                check = idx_sets[0]
                want = expected[np.unique(check)] if "fancy" in label else expected[check]
                if not np.array_equal(fn(check), want):
                    raise AssertionError(f"{label} returned different rows than the raw memmap for {name}")
                labels.append(label)
                fns.append(fn)
                mappings.append(mapping)
            log.info("gathers from %s: %d methods x %d reps, fresh mappings", name, len(fns), args.gather_reps)
            fresh = interleaved_timings(fns, idx_sets[1:], stride=3, seed=args.seed)
            for mapping in mappings:  # fault every mapping in: the steady state of a long run
                if mapping is not None:
                    for a in range(0, n, 16384):
                        np.asarray(mapping[a : a + 16384]).max()
            log.info("gathers from %s: steady state", name)
            steady = interleaved_timings(fns, idx_sets[1:], stride=3, seed=args.seed + 1)
            for f in handles:
                f.close()
            del fns, mappings
            for i, label in enumerate(labels):
                ratio = steady[0].median / steady[i].median
                target = "-"
                if label.startswith(("PT + mmap", "HDF5 contiguous + mmap")):
                    target = "yes" if ratio >= GATHER_TARGET else "NO"
                rows.append(
                    [
                        name if i == 0 else "",
                        label,
                        fmt_rate(args.batch / fresh[i].median, " rows/s"),
                        fmt_ratio(fresh[0].median / fresh[i].median),
                        fmt_rate(args.batch / steady[i].median, " rows/s"),
                        fmt_ratio(ratio),
                        f"{steady[i].median * 1e3:.3f} ms",
                        target,
                    ]
                )
        print_table(
            f"{args.batch}-random-row gathers, {self.label[self.big]} dataset "
            f"(steering_centroid {self.pairs[self.big]:,} rows x {DIM}; question_embs)",
            [
                "tensor",
                "method",
                "fresh mapping",
                "vs raw",
                "steady state",
                "vs raw",
                "median / gather (steady)",
                ">= 0.8x raw",
            ],
            rows,
            notes=[
                f"Rows/s = {args.batch} / median time of one gather over {args.gather_reps} repetitions, each with "
                f"fresh random indices (with repeats) from np.random.default_rng({args.seed}). Every method gets the "
                "same index arrays, interleaved: round i runs every method once, in a shuffled order, so load from "
                "other processes hits all alike; method j reads array (i + 3j) mod reps, so no method reads rows "
                "another just pulled into the CPU caches (the raw memmap and the contiguous HDF5 map the same "
                "pages). Each method is first checked against the raw memmap.",
                "Fresh mapping: right after opening (each first touch of a page costs a minor fault, page cache "
                "warm). Steady state: after faulting the whole mapping in (what a long training run sees); for "
                "non-mapped methods the second timing run (chunk cache as left by the first).",
                "h5py fancy indexing needs sorted unique indices, so it gets np.unique(idx) (included in its time).",
                "Target: HDF5 contiguous and PT + mmap at >= 0.8x the raw memmap (steady state column).",
            ],
            align="llrrrrrc",
        )

    # --- keyword ids -----------------------------------------------------------------------------
    def keywords(self) -> None:
        import h5py

        from jasper_ray.formats import open_dataset
        from jasper_ray.schema import KEYWORD_IDS

        n = self.pairs[self.big]
        upstream_file = upstream_h5(self.big, "gzip")
        all_pairs = np.arange(n)

        def upstream_read(_: int) -> Any:
            with h5py.File(upstream_file, "r", locking=False) as f:
                return [list(f[KEYWORD_IDS.h5_group][str(i)][:]) for i in range(n)]

        def reader(path: Path, fmt: str) -> Any:
            return open_dataset(path, storage_format=fmt, use_mmap=True)

        def csr_all(path: Path, fmt: str) -> Any:
            def run(_: int) -> Any:
                values, offsets = reader(path, fmt).keyword_csr()
                return np.asarray(values[0 : len(values)]), offsets

            return run

        def lists_all(path: Path, fmt: str) -> Any:
            return lambda _: reader(path, fmt).keyword_ids(all_pairs)

        cases = [
            ("upstream per-pair datasets, read as upstream does (baseline)", "upstream .h5 (gzip)", upstream_read),
            (
                "upstream per-pair datasets, our HDF5Reader.keyword_csr()",
                "upstream .h5 (gzip)",
                csr_all(upstream_file, "hdf5"),
            ),
            ("CSR, keyword_csr() (values + offsets)", "ours gzip", csr_all(our_h5(self.big, "gzip"), "hdf5")),
            ("CSR, keyword_ids(all pairs) (list of arrays)", "ours gzip", lists_all(our_h5(self.big, "gzip"), "hdf5")),
            ("CSR, keyword_csr() (values + offsets)", "ours contiguous", csr_all(our_h5(self.big, None), "hdf5")),
            (
                "CSR, keyword_ids(all pairs) (list of arrays)",
                "ours contiguous",
                lists_all(our_h5(self.big, None), "hdf5"),
            ),
            ("pickled list of lists -> CSR, keyword_csr()", "PT", csr_all(self.big, "pt")),
            ("pickled list of lists -> CSR, keyword_ids(all pairs)", "PT", lists_all(self.big, "pt")),
        ]
        expected = upstream_read(0)
        results = []
        for label, layout, fn in cases:
            log.info("keyword ids: %s, %s", layout, label)
            out = fn(-1)  # untimed: correctness check (and warms h5py's metadata structures like every run after)
            if isinstance(out, tuple):
                values, offsets = out
                ok = len(offsets) == n + 1 and all(
                    list(values[offsets[p] : offsets[p + 1]]) == expected[p] for p in range(0, n, max(1, n // 997))
                )
            else:
                ok = len(out) == n and all(list(out[p]) == expected[p] for p in range(0, n, max(1, n // 997)))
            if not ok:
                raise AssertionError(f"keyword ids differ from upstream's for {layout}: {label}")
            results.append((label, layout, timings(fn, self.args.kw_reps, max_seconds=self.args.max_method_s)))
        base = results[0][2].median
        rows = [
            [label, layout, fmt_ms(t.median), fmt_rate(n / t.median, " pairs/s"), fmt_ratio(base / t.median), str(t.n)]
            for label, layout, t in results
        ]
        print_table(
            f"Reading every pair's keyword ids, {self.label[self.big]} dataset ({n:,} pairs)",
            ["how", "file", "time", "pairs/s", "speed-up vs upstream", "reps"],
            rows,
            notes=[
                "Each repetition opens a fresh reader (or h5py.File) and reads all pairs' ids; median of the reps "
                "(fewer reps when one is slow). Page cache warm; one untimed run first checks the ids against "
                "upstream's.",
                "Upstream's read: [list(f['pair_data/keyword_ids'][str(i)][:]) for i in range(N)].",
            ],
            align="llrrrr",
        )

    # --- full pass memory --------------------------------------------------------------------
    def full_pass(self) -> None:
        results = {}
        for kind in PASS_VARIANTS:
            max_batches = self.args.gzip_pass_batches if kind == "h5-gzip-lazy" else 0
            log.info("full pass over train: %s%s", kind, f" (first {max_batches} batches)" if max_batches else "")
            results[kind] = run_fresh(
                SCRIPT,
                "w_pass",
                kind=kind,
                directory=str(self.big),
                batch=self.args.batch,
                seed=self.args.seed,
                max_batches=max_batches,
            )
        base = results["upstream"]["peak"]["RssAnon"]
        rows = []
        for kind, label in PASS_VARIANTS.items():
            r = results[kind]
            peak, size = r["peak"], r["dataset_bytes"]
            anon_share = peak["RssAnon"] / size
            record(
                "formats_pass",
                format=kind,
                label=label,
                dataset_bytes=size,
                pairs=r["pairs"],
                seconds=r["seconds"],
                full=r["full"],
                peak_anon=peak["RssAnon"],
                peak_file=peak["RssFile"],
                peak_rss=peak["VmRSS"],
            )
            rows.append(
                [
                    label,
                    fmt_bytes(size),
                    f"{r['pairs']:,}" + ("" if r["full"] else f" (first {r['batches']} batches)"),
                    f"{r['seconds']:.1f} s",
                    fmt_rate(r["pairs"] / r["seconds"], " pairs/s"),
                    f"{fmt_bytes(peak['RssAnon'])} ({fmt_pct(100 * anon_share)})",
                    fmt_ratio(peak["RssAnon"] / base) if base else "-",
                    fmt_bytes(peak["RssFile"]),
                    f"{fmt_bytes(peak['VmRSS'])} ({fmt_pct(100 * peak['VmRSS'] / size)})",
                    "-" if kind == "upstream" else ("yes" if anon_share < RSS_TARGET else "NO"),
                ]
            )
        print_table(
            f"Memory of a pass over the train split, {self.label[self.big]} dataset, batches of {self.args.batch}",
            [
                "format",
                "dataset files",
                "pairs",
                "time",
                "pairs/s",
                "peak RssAnon growth (% of files)",
                "anon vs upstream",
                "peak RssFile growth",
                "peak VmRSS growth (% of files)",
                "anon < 5%",
            ],
            rows,
            notes=[
                "Each row is a fresh subprocess: open, then the train split in a seeded random order; per batch "
                "pair_index, question rows, source rows, 12 negatives' source rows and the three steering rows. "
                "Growth = max over batches (sampled while the batch is alive) of /proc/self/status minus its value "
                "before opening. Time includes opening (the full load, for upstream).",
                "RssAnon is memory the process owns (copies, heap): the 5% target refers to it. RssFile is "
                "mmap'd file pages (page cache) the pass touched: shared with other processes and reclaimable by "
                "the kernel under pressure, so it counts in VmRSS without being owned; it approaches the bytes "
                "touched.",
                "Anon growth includes the batch's own output arrays (~13 rows x D x 4 B per pair), which is "
                "independent of dataset size.",
            ],
            align="lrrrrrrrrc",
        )


def verify_table(big: Path, args: argparse.Namespace, rounds: int = 2) -> None:
    """Read verification (issue 17): whole passes of raw gathers with verify="first-touch" against "off",
    on the big dataset's contiguous HDF5 and its memory-mapped PT files."""
    import _bench_verify as bv

    results = {
        "HDF5 contiguous": bv.measure("gathers", bv.reader_epoch(our_h5(big, None), "hdf5", args.batch, 0), rounds),
        bv.PT_LABEL: bv.measure("gathers", bv.reader_epoch(big, "pt", args.batch, 0), rounds),
    }
    bv.table(
        "formats_verify",
        f"Read verification: whole passes of {args.batch}-pair gathers (w_pass's reads), first and second pass",
        results,
        [bv.PT_NOTE],
    )


def precision_tables(bench: Bench, rounds: int = 2) -> None:
    """Half-precision storage (issue 19): sizes on the small dataset (ratios do not depend on size), batched
    samples/s on the big one's uncompressed conversions at each precision."""
    import _bench_precision as bp

    label = f"{bench.pairs[bench.small]} pairs ({bench.label[bench.small]} of PT files)"
    bp.size_table("formats_precision_size", bench.small, bench.work / "precision-sizes", label)
    files = bp.contiguous_files(bench.big, bench.work / "precision")
    bp.rate_table(
        "formats_precision",
        f"Storage precision: batched samples/s memory-mapped, batches of {bench.args.batch} assembled from the "
        f"reader, {bench.pairs[bench.big]} pairs ({bench.label[bench.big]})",
        bp.rates(files, bp.assembly_epoch, bench.args.batch, rounds),
        [
            "float16 served as float32 decodes with numpy's cast here (no torch imported, as in read_jasper's tasks "
            "and the shard actors); through the local loader torch's (bench_loader's precision table)"
        ],
    )
    for directory in files.values():
        shutil.rmtree(directory)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default=None, help="size of the big dataset (default 2GB; 100MB with --quick)")
    p.add_argument("--out", default="/tmp/jr-bench", help="where to put the data (a per-run subdirectory)")
    p.add_argument("--quick", action="store_true", help="small, fast run for trying the script")
    p.add_argument("--small-div", type=int, default=8, help="the small dataset is --size divided by this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=512, help="rows per gather / pairs per batch")
    p.add_argument("--gather-reps", type=int, default=None, help="repetitions per gather method (default 50)")
    p.add_argument("--open-reps", type=int, default=None, help="fresh processes per open variant (default 3)")
    p.add_argument("--kw-reps", type=int, default=3, help="repetitions per keyword read")
    p.add_argument("--max-method-s", type=float, default=30.0, help="stop repeating a method after this long")
    p.add_argument(
        "--gzip-pass-batches",
        type=int,
        default=None,
        help="batches in the gzip memory pass (0 = full pass; default 20, full with --quick)",
    )
    p.add_argument(
        "--sections",
        default="convert,open,gather,keywords,pass,verify,precision",
        help="comma-separated subset of convert,open,gather,keywords,pass,verify,precision (convert always runs)",
    )
    p.add_argument("--keep", action="store_true", help="keep the generated data")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.size = args.size or ("100MB" if args.quick else "2GB")
    args.gather_reps = args.gather_reps or (30 if args.quick else 50)
    args.open_reps = args.open_reps or (2 if args.quick else 3)
    if args.gzip_pass_batches is None:
        args.gzip_pass_batches = 0 if args.quick else 20
    setup_logging(args.verbose)
    sections = set(args.sections.split(","))

    from jasper_ray.tools.synth import parse_size

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = parse_size(args.size)
    # PT + 3 of ours + upstream gzip (+ its lzf/none while measured) for big; PT + 2 for small.
    need = int(size * 8.2 + 3.2 * size / args.small_div)  # + the precision section's conversions
    free = shutil.disk_usage(out).free
    if free < need:
        log.error("%s has %s free; this run needs about %s", out, fmt_bytes(free), fmt_bytes(need))
        return 1
    work = out / f"bench-formats-{os.getpid()}"
    work.mkdir()
    log.info("working in %s (needs about %s of disk)", work, fmt_bytes(need))
    started = time.perf_counter()
    try:
        bench = Bench(args, work)
        bench.synth()
        bench.print_setup()
        bench.convert()
        if "open" in sections:
            bench.open_times()
        if "gather" in sections:
            bench.gathers()
        if "keywords" in sections:
            bench.keywords()
        if "pass" in sections:
            bench.full_pass()
        if "verify" in sections:
            verify_table(bench.big, args)
        if "precision" in sections:
            precision_tables(bench)
    finally:
        if args.keep:
            log.info("kept the data in %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
            log.info("removed %s", work)
    log.info("done in %.0f s", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
