"""Read verification's cost (issue 17): the first epoch (every checksum block checked on first touch) and a
later epoch (steady state), each against ``verify="off"`` in the same run.

Shared by ``bench_loader.py`` (through the local DataLoader) and ``bench_formats.py`` (raw reader gathers).
Every variant opens a fresh reader (fresh mappings, nothing verified yet); the page cache is warm for all.
Variants run interleaved (off, first-touch, off, first-touch ...) so load from other processes hits both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from _bench_common import fmt_rate, fmt_ratio, print_table, record

log = logging.getLogger("bench.verify")
MODES = ("off", "first-touch")
FIRST_EPOCH_TARGET, STEADY_TARGET = 1.5, 1.05
# synth writes the PT checksum sidecar (NOTE [PT checksum sidecar]): PT reads check block digests too
PT_LABEL = "PT + mmap (checksum sidecar)"
PT_NOTE = "PT files: first-touch checks the blocks recorded in pt_checksums.json (synth writes it), as for HDF5"


def _epochs(make_epoch: Callable[[str], Callable[[], int]], mode: str) -> tuple[float, float]:
    """Samples/s of a first and a second epoch over one freshly opened dataset."""
    epoch = make_epoch(mode)
    rates = []
    for _ in range(2):
        t0 = time.perf_counter()
        n = epoch()
        rates.append(n / (time.perf_counter() - t0))
    return rates[0], rates[1]


def measure(
    name: str, make_epoch: Callable[[str], Callable[[], int]], rounds: int
) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    for r in range(rounds):
        for mode in MODES:
            log.info("%s: verify=%s, round %d", name, mode, r + 1)
            out[mode].append(_epochs(make_epoch, mode))
    return out


def table(
    bench: str, title: str, results: dict[str, dict[str, list[tuple[float, float]]]], notes: Iterable[str]
) -> None:
    rows = []

    def ok(mode: str, first_x: float, steady_x: float) -> str:
        if mode == "off":
            return "-"
        return "yes" if first_x <= FIRST_EPOCH_TARGET and steady_x <= STEADY_TARGET else "NO"

    for name, by_mode in results.items():
        off = by_mode["off"]
        for mode in MODES:
            ratios = []
            for r, (first, steady) in enumerate(by_mode[mode]):
                first_x, steady_x = off[r][0] / first, off[r][1] / steady  # time ratios vs off (1.00 = free)
                ratios.append((first_x, steady_x))
                record(bench, path=name, verify=mode, round=r + 1, first_epoch_per_s=first, steady_per_s=steady)
                rates = [fmt_rate(first), fmt_ratio(first_x), fmt_rate(steady), fmt_ratio(steady_x)]
                rows.append([name, mode, r + 1, *rates, ok(mode, first_x, steady_x)])
            if len(ratios) > 1:  # the median round of each column: what a loaded machine's noise hides least
                first, steady = (float(np.median([x[i] for x in by_mode[mode]])) for i in (0, 1))
                first_x, steady_x = (float(np.median([x[i] for x in ratios])) for i in (0, 1))
                rates = [fmt_rate(first), fmt_ratio(first_x), fmt_rate(steady), fmt_ratio(steady_x)]
                rows.append([name, mode, "median", *rates, ok(mode, first_x, steady_x)])
    print_table(
        title,
        ["data", "verify", "round", "1st epoch", "time vs off", "2nd epoch", "time vs off", "within targets"],
        rows,
        notes=[
            f"targets: first epoch <= {FIRST_EPOCH_TARGET}x the time of verify='off', later epochs <= {STEADY_TARGET}x",
            "each round opens a fresh dataset per mode (fresh mappings, no block checked yet); page cache warm",
            "median: of each column over the rounds (ratios per round first)",
            *notes,
        ],
    )


def reader_epoch(directory: Path, storage_format: str, batch: int, seed: int) -> Callable[[str], Callable[[], int]]:
    """A pass of raw gathers over the train split: what one training batch reads (bench_formats' w_pass)."""
    from jasper_ray.formats import open_dataset

    def make(mode: str) -> Callable[[], int]:
        reader = open_dataset(directory, storage_format, use_mmap=True, verify=mode)
        order = np.random.default_rng(seed).permutation(reader.split("train"))

        def epoch() -> int:
            for b in range(0, len(order), batch):
                ids = order[b : b + batch]
                index = reader.take("pair_index", ids)
                negatives = reader.take("hard_negatives", ids)
                reader.take("question_embs", index[:, 0])
                reader.take("source_embs", index[:, 1])
                reader.take("source_embs", negatives.ravel())
                for name in ("steering_centroid", "steering_keyword_weighted", "steering_residual"):
                    reader.take(name, ids)
            return len(order)

        return epoch

    return make


def loader_epoch(directory: Path, storage_format: str, batch: int, workers: int) -> Callable[[str], Callable[[], int]]:
    """An epoch of ``create_loader`` (shuffled, batched) over the train split."""
    import jasper_ray

    def make(mode: str) -> Callable[[], int]:
        loader: Any = jasper_ray.create_loader(
            directory,
            "train",
            batch_size=batch,
            num_workers=workers,
            storage_format=storage_format,
            use_mmap=True,
            validate=False,
            verify=mode,
            persistent_workers=workers > 0,
        )

        def epoch() -> int:
            return sum(len(b["steering_variant"]) for b in loader)

        return epoch

    return make


def main() -> None:
    """Only the verification tables of bench_loader.py and bench_formats.py, on one dataset of ``--size``."""
    import shutil

    from _bench_common import section_alone

    args, n_pairs = section_alone(str(main.__doc__))
    import jasper_ray
    from jasper_ray.tools.synth import synth_dataset

    root = Path(args.out) / f"bench-verify-{n_pairs}"
    pt, contiguous = root / "pt", root / "contiguous"
    try:
        synth_dataset(pt, n_pairs, 768, 12, seed=0)
        contiguous.mkdir(parents=True)
        jasper_ray.convert_pt_to_hdf5(pt, None, output=contiguous / "dataset.h5", progress=False)
        shutil.copy(pt / "config.json", contiguous / "config.json")
        title = f"{n_pairs} pairs, D=768, n_neg=12 ({args.size})"
        table(
            "loader_verify",
            f"Read verification through create_loader (batch 256, 0 workers), {title}",
            {
                "HDF5 contiguous (mmap)": measure("loader", loader_epoch(contiguous, "hdf5", 256, 0), args.rounds),
                PT_LABEL: measure("loader", loader_epoch(pt, "pt", 256, 0), args.rounds),
            },
            [PT_NOTE],
        )
        table(
            "formats_verify",
            f"Read verification: whole passes of 512-pair gathers (bench_formats' w_pass reads), {title}",
            {
                "HDF5 contiguous": measure("gathers", reader_epoch(contiguous, "hdf5", 512, 0), args.rounds),
                PT_LABEL: measure("gathers", reader_epoch(pt, "pt", 512, 0), args.rounds),
            },
            [PT_NOTE],
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
