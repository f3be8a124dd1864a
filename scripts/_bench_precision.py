"""Half-precision storage (issue 19): size on disk per precision and codec, and memory-mapped batched samples/s of
float32 storage against float16 / bfloat16 storage served as float32 (decoded inside the gather) and as stored.

Shared by ``bench_formats.py`` (sizes, and batches assembled straight from the reader: ``assemble_batch`` over a
``ReaderSource``, what a read task or shard actor runs) and ``bench_loader.py`` (``create_loader``, 0 workers).
Every variant opens a fresh dataset and runs two epochs of the train split in a seeded order; the second is timed
(the first maps pages and checks each checksum block once). Variants run interleaved round by round, so load from
other processes hits all of them; each ratio is against float32 storage in the same round.

    python scripts/_bench_precision.py --size 1GB      # both tables of rates and the size table, alone
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _bench_common import fmt_bytes, fmt_rate, fmt_ratio, print_table, record

log = logging.getLogger("bench.precision")
PRECISIONS = ("float32", "float16", "bfloat16")
CODECS = (None, "gzip", "lzf")
# (stored precision, what it is served as): the float32 file is the baseline of every round.
VARIANTS = (
    ("float32", "float32"),
    ("float16", "float32"),
    ("float16", "float16"),
    ("bfloat16", "float32"),
    ("bfloat16", "bfloat16"),
)
DISK_TARGET, NATIVE_TARGET, FLOAT32_TARGET = 0.52, 1.5, 1.0


def decode_note() -> str:
    """How this install decodes 16-bit rows into float32 batches, for the tables' notes."""
    from jasper_ray.formats.precision import compiled_gather

    how = (
        "the compiled kernel gathers and decodes in one pass"
        if compiled_gather is not None
        else "no compiled kernel in this install (no C compiler): a 16-bit gather, then a decode pass"
    )
    return f"{how} (NOTE [16-bit gather kernel] in formats.precision; scripts/diag_decode.py times it)"


def convert(pt_dir: Path, out_dir: Path, precision: str, compression: str | None) -> Path:
    """``pt_dir`` converted at ``precision`` into a dataset directory of its own (dataset.h5 + config.json)."""
    import jasper_ray

    directory = out_dir / f"{precision}-{compression or 'none'}"
    directory.mkdir(parents=True, exist_ok=True)
    jasper_ray.convert_pt_to_hdf5(
        pt_dir, compression, output=directory / "dataset.h5", progress=False, precision=precision, force=True
    )
    shutil.copy(pt_dir / "config.json", directory / "config.json")
    return directory


def size_table(bench: str, pt_dir: Path, work: Path, label: str) -> None:
    """Bytes of dataset.h5 per precision and codec (converted in this process, removed after)."""
    sizes: dict[tuple[str, str | None], int] = {}
    for compression in CODECS:
        for precision in PRECISIONS:
            log.info("converting %s at %s, %s", pt_dir, precision, compression or "none")
            directory = convert(pt_dir, work, precision, compression)
            sizes[precision, compression] = (directory / "dataset.h5").stat().st_size
            shutil.rmtree(directory)
    rows = []
    for compression in CODECS:
        base = sizes["float32", compression]
        for precision in PRECISIONS:
            size = sizes[precision, compression]
            ratio, vs_none = size / base, size / sizes["float32", None]
            record(bench, precision=precision, codec=compression or "none", bytes=size, vs_float32=ratio)
            native = precision != "float32" and compression is None  # the target is native 16-bit storage's
            ok = ("yes" if ratio <= DISK_TARGET else "NO") if native else "-"
            rows.append([compression or "none", precision, fmt_bytes(size), fmt_ratio(ratio), fmt_ratio(vs_none), ok])
    print_table(
        f"Storage precision: dataset.h5 size on disk, {label}",
        ["codec", "precision", "size", "vs float32 (same codec)", "vs float32 none", f"none: <= {DISK_TARGET}x"],
        rows,
        notes=[
            "float16 and bfloat16 apply to the embedding tables and steering vectors; ids, tiers, relevance, "
            "distances, keyword ids and splits keep their dtypes (NOTE [16-bit storage] in formats.precision)",
            "synthetic embeddings (jasper-ray synth): how well a codec packs them depends on the data; the 16-bit "
            "sizes with no codec do not",
        ],
        align="llrrrc",
    )


def assembly_epoch(directory: Path, dtype: str, batch: int, seed: int) -> Callable[[], int]:
    """An epoch of batches assembled straight from the reader (memory-mapped), embeddings served as ``dtype``."""
    from jasper_ray.assembly import ReaderSource, assemble_batch, output_precision
    from jasper_ray.formats import open_dataset
    from jasper_ray.sampling import SteeringSchedule, steering_variants

    reader = open_dataset(directory, "hdf5", use_mmap=True)
    source = ReaderSource(reader, output_precision(dtype, reader.precision))
    probs = SteeringSchedule(reader.config).probs(0)
    order = np.random.default_rng(seed).permutation(reader.split("train"))

    def epoch() -> int:
        for b in range(0, len(order), batch):
            ids = order[b : b + batch]
            assemble_batch(source, ids, steering_variants(ids, 0, seed, probs))
        return len(order)

    return epoch


def loader_epoch(directory: Path, dtype: str, batch: int, seed: int) -> Callable[[], int]:
    """An epoch of ``create_loader`` (0 workers, shuffled), embeddings served as ``dtype``."""
    import jasper_ray

    loader = jasper_ray.create_loader(
        directory,
        "train",
        batch_size=batch,
        storage_format="hdf5",
        use_mmap=True,
        validate=False,
        seed=seed,
        dtype=dtype,
    )

    def epoch() -> int:
        return sum(len(b["steering_variant"]) for b in loader)

    return epoch


def rates(
    files: dict[str, Path], make_epoch: Callable[[Path, str, int, int], Callable[[], int]], batch: int, rounds: int
) -> list[list[float]]:
    """Per round, per variant: samples/s of the second epoch of a freshly opened dataset."""
    out = []
    for r in range(rounds):
        row = []
        for stored, served in VARIANTS:
            log.info("%s stored, served as %s: round %d", stored, served, r + 1)
            epoch = make_epoch(files[stored], served, batch, r)
            epoch()  # maps the pages, checks each checksum block once
            t0 = time.perf_counter()
            n = epoch()
            row.append(n / (time.perf_counter() - t0))
        out.append(row)
    return out


def rate_table(bench: str, title: str, measured: list[list[float]], notes: list[str]) -> None:
    rows = []
    for r, row in enumerate(measured):
        for (stored, served), rate in zip(VARIANTS, row):
            ratio = rate / row[0]
            record(bench, stored=stored, served=served, round=r + 1, samples_per_s=rate, vs_float32=ratio)
            target = NATIVE_TARGET if served != "float32" else FLOAT32_TARGET
            ok = "-" if stored == "float32" else ("yes" if ratio >= target else "NO")
            rows.append([stored, served, r + 1, fmt_rate(rate), fmt_ratio(ratio), f">= {target}x", ok])
    print_table(
        title,
        ["stored", "served as", "round", "samples/s", "vs float32 storage", "target", "met"],
        rows,
        notes=[
            f"targets: served as stored (16-bit) >= {NATIVE_TARGET}x float32 storage's samples/s; served as float32 "
            f">= {FLOAT32_TARGET}x (16-bit rows decoded inside the gather, no float32 copy of a table)",
            "second epoch of a fresh dataset each (the first maps pages and checks each block once); page cache "
            "warm; variants interleaved round by round; bfloat16 served as stored is uint16 bits (torch.bfloat16)",
            "served as float32: " + decode_note(),
            *notes,
        ],
        align="llrrrrc",
    )


def contiguous_files(pt_dir: Path, work: Path) -> dict[str, Path]:
    """Uncompressed (memory-mapped) conversions of ``pt_dir`` at each precision."""
    return {p: convert(pt_dir, work, p, None) for p in PRECISIONS}


def main() -> None:
    """The precision tables of bench_formats.py and bench_loader.py alone, on one dataset of ``--size``."""
    from _bench_common import section_alone

    args, n_pairs = section_alone(str(main.__doc__), batch=512)
    from jasper_ray.tools.synth import synth_dataset

    root = Path(args.out) / f"bench-precision-{n_pairs}"
    try:
        synth_dataset(root / "pt", n_pairs, 768, 12, seed=0)
        title = f"{n_pairs} pairs, D=768, n_neg=12 ({args.size} of PT files)"
        size_table("formats_precision_size", root / "pt", root, title)
        files = contiguous_files(root / "pt", root)
        rate_table(
            "formats_precision",
            f"Storage precision: batched samples/s memory-mapped, batches of {args.batch} assembled from the reader, "
            + title,
            rates(files, assembly_epoch, args.batch, args.rounds),
            [],
        )
        rate_table(
            "loader_precision",
            f"Storage precision through create_loader (batch 256, 0 workers), {title}",
            rates(files, loader_epoch, 256, args.rounds),
            [],
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
