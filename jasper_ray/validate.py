"""Validation of a whole dataset against the schema, through any reader, and of the arguments that pick
rows from it: the one validation every front-end calls (local dataset, ``read_jasper``, ``ShardedJasper``,
``verify``, ``convert``).

Scans run in row blocks over mapped data, never whole-tensor loads. Each error
names the file or tensor, the position, the value found and what was expected.
Stops at the first error (a ``ValidationError``).

NOTE [when values are checked]
Ids, tiers, offsets, relevance and distances (a few bytes per pair) are scanned
whole whenever a dataset is validated. The float tables (embeddings, steering:
nearly all of a 50 GB dataset) are scanned whole by ``verify`` (``scan_floats=True``);
``convert`` checks each block as it writes it (NOTE [floats checked as written] at
``refused_nonfinite``); a reader opened for serving instead checks each checksum
block of them the first time a read touches it (``formats.verified``), so
opening stays cheap and nothing non-finite is served. ``"allow_nonfinite": true``
in config.json is the opt-out for data that really stores NaN or inf.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .config import allows_nonfinite, check_curriculum, check_probabilities
from .errors import ValidationError
from .formats.base import Reader
from .formats.columns import TENSOR_SOURCE, Column
from .formats.verified import check_finite
from .schema import CONFIG_FILE, ENTITY_OF_SYMBOL, PRECISION_DTYPES, TENSORS, TIER_RANGE

log = logging.getLogger(__name__)

SCAN_ELEMENTS = 4 << 20
# Per-pair floats: scanned whole at every validation (NOTE [when values are checked]); (name, lowest value).
PAIR_FLOATS = {"pair_relevance": None, "centroid_distances": 0.0}
# The float tables: scanned whole by verify, as written by convert, per block on first touch when serving.
FLOAT_TABLES = tuple(s.name for s in TENSORS if s.dtype.kind == "f" and s.name not in PAIR_FLOATS)


def _positive_int(config: dict[str, Any], key: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValidationError(f"{CONFIG_FILE} {key!r}", repr(value), "a positive integer")
    return value


def check_config(config: dict[str, Any]) -> None:
    _positive_int(config, "embedding_dim")
    _positive_int(config, "n_neg")
    if "steering_probabilities" not in config:
        raise ValidationError(f"{CONFIG_FILE} 'steering_probabilities'", "nothing", "a mapping of the four variants")
    check_probabilities(config["steering_probabilities"])
    check_curriculum(config.get("curriculum"))
    allows_nonfinite(config)


def symbol_sizes(reader: Reader) -> dict[str, int]:
    """What each shape symbol must equal: entity-table rows, pairs, and D / NEG from the config."""
    sizes = {sym: reader.shape(name)[0] for sym, name in ENTITY_OF_SYMBOL.items()}
    sizes.update(
        P=reader.shape("pair_index")[0], D=reader.config["embedding_dim"], NEG=reader.config["n_neg"], **{"2": 2}
    )
    return sizes


def check_shapes(reader: Reader, sizes: dict[str, int]) -> None:
    for spec in TENSORS:
        where = reader.location(spec.name)
        shape, dtype = reader.shape(spec.name), reader.dtype(spec.name)
        if dtype != spec.dtype and not (spec.reducible and dtype in PRECISION_DTYPES.values()):
            expected = f"dtype {spec.dtype}" + (" (or float16, or uint16 holding bfloat16)" if spec.reducible else "")
            raise ValidationError(where, f"dtype {dtype}", expected)
        if len(shape) != len(spec.shape):
            raise ValidationError(
                where, f"{len(shape)} dimensions {shape}", f"{len(spec.shape)} dimensions {list(spec.shape)}"
            )
        for axis, (got, sym) in enumerate(zip(shape, spec.shape)):
            if got != sizes[sym]:
                what = {
                    "P": "the number of pairs (rows of pair_index)",
                    "D": f"embedding_dim from {CONFIG_FILE}",
                    "NEG": f"n_neg from {CONFIG_FILE}",
                    "2": "2",
                }.get(sym, f"rows of {ENTITY_OF_SYMBOL.get(sym)}")
                raise ValidationError(where, f"size {got} on axis {axis}", f"{sizes[sym]} ({what})")


def _blocks(n: int, row_elems: int) -> Iterable[tuple[int, int]]:
    step = max(1, SCAN_ELEMENTS // max(row_elems, 1))
    for a in range(0, n, step):
        yield a, min(n, a + step)


def check_range(
    where: str,
    block: np.ndarray,
    lo: int,
    hi: int,
    expected: str,
    first_row: int = 0,
    column: int | None = None,
    summary: str | None = None,
) -> None:
    """Every value in [lo, hi); the error names the first bad position."""
    if block.size == 0:
        return
    bad = (block < lo) | (block >= hi)
    if bad.any():
        pos = np.argwhere(bad)[0]
        value = block[tuple(pos)]
        pos[0] += first_row
        position = int(pos[0]) if block.ndim == 1 else tuple(int(x) for x in pos)
        if column is not None:
            position = (int(pos[0]), column)
        raise ValidationError(
            where, f"value {value}", expected, position, summary.format(value=value) if summary else None
        )


def check_floats(reader: Reader, names: Iterable[str], on_bytes: Callable[[int], object] | None = None) -> None:
    """Scan float tensors whole for NaN and inf (and negative distances), in row blocks."""
    allow = allows_nonfinite(reader.config)
    for name in names:
        lowest = PAIR_FLOATS.get(name)
        if allow and lowest is None:
            continue
        shape = reader.shape(name)
        for a, b in _blocks(shape[0], int(np.prod(shape[1:], dtype=np.int64))):
            block = reader.read(name, a, b)
            check_finite(reader.location(name), block, a, lowest, allow)
            if on_bytes is not None:
                on_bytes(block.nbytes)


def check_splits(reader: Reader) -> None:
    """Warn (never refuse: upstream's files may have them) about pair ids repeated in a split or shared by two."""
    seen: dict[str, np.ndarray] = {}
    for split in reader.split_names():
        ids = np.asarray(reader.split(split))
        unique = np.unique(ids)
        if len(unique) != len(ids):
            values, counts = np.unique(ids, return_counts=True)
            log.warning(
                "%s: %d pair id(s) appear more than once (first: pair %d, %d times); they are served as often",
                reader.location_split(split),
                int((counts > 1).sum()),
                int(values[counts > 1][0]),
                int(counts[counts > 1][0]),
            )
        for other, other_ids in seen.items():
            shared = np.intersect1d(unique, other_ids, assume_unique=True)
            if len(shared):
                log.warning(
                    "splits %r and %r share %d pair id(s) (first: pair %d): evaluation sees training pairs",
                    other,
                    split,
                    len(shared),
                    int(shared[0]),
                )
        seen[split] = unique


def check_ranges(reader: Reader, sizes: dict[str, int], on_bytes: Callable[[int], object] | None = None) -> None:
    q, s, c, k, p = sizes["Q"], sizes["S"], sizes["C"], sizes["K"], sizes["P"]
    lo_tier, hi_tier = TIER_RANGE
    # tensor -> (column or None, lo, hi, what a value refers to, how many exist)
    rules: dict[str, list[tuple[int | None, int, int, str | None, int | None]]] = {
        "pair_index": [(0, 0, q, "question", q), (1, 0, s, "source", s)],
        "pair_cluster_id": [(None, 0, c, "cluster", c)],
        "hard_negatives": [(None, 0, s, "source", s)],
        "negative_tiers": [(None, lo_tier, hi_tier + 1, None, None)],
    }
    for name, checks in rules.items():
        where = reader.location(name)
        shape = reader.shape(name)
        for a, b in _blocks(shape[0], int(np.prod(shape[1:], dtype=np.int64))):
            block = reader.read(name, a, b)
            for column, lo, hi, entity, count in checks:
                part = block if column is None else block[:, column]
                if entity is None:
                    check_range(where, part, lo, hi, f"a tier in [{lo}, {hi - 1}]", a, column)
                else:
                    check_range(
                        where,
                        part,
                        lo,
                        hi,
                        f"a {entity} id in [0, {count})",
                        a,
                        column,
                        summary=f"{name} references {entity} {{value}}, but only {count} {entity}s exist",
                    )
            if on_bytes is not None:
                on_bytes(block.nbytes)
    values, offsets = reader.keyword_csr()
    where = reader.location_keywords()
    if offsets[0] != 0 or (np.diff(offsets) < 0).any() or offsets[-1] != values.shape[0]:
        raise ValidationError(where, "inconsistent offsets", "non-decreasing offsets from 0 to len(values)")
    for a, b in _blocks(values.shape[0], 1):
        block = np.asarray(values[a:b])
        bad = (block < 0) | (block >= k)
        if bad.any():
            i = a + int(np.argmax(bad))
            pair = int(np.searchsorted(offsets, i, side="right") - 1)
            raise ValidationError(
                where,
                f"keyword id {values[i]}",
                f"a keyword id in [0, {k}) (rows of keyword_embs)",
                f"pair {pair}, entry {i - offsets[pair]}",
            )
    for split in reader.split_names():
        ids = reader.split(split)
        where = reader.location_split(split)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValidationError(where, f"shape {ids.shape} dtype {ids.dtype}", "a 1-D integer array of pair ids")
        check_range(
            where,
            ids,
            0,
            p,
            f"a pair id in [0, {p})",
            summary=f"Split indices reference pair {{value}}, but only {p} pairs exist",
        )


def refused_nonfinite(reader: Reader, column: Column) -> str:
    """Where a converter names a value of ``column`` that is not finite, refusing it
    as it writes the block; "" where nothing is refused (not a float table, or ``allow_nonfinite``).

    NOTE [floats checked as written]: ``scan_floats`` reads every float table whole before a conversion
    writes a row, a serial pass over nearly all the bytes (at 28 GB, larger than the RAM, a read of the
    disk before any task starts). The converters validate without it and check each block they write instead:
    its hasher already learns whether every value is finite (``BlockDigests.finite``), so only a block that
    is not gets scanned again, for the position (``hdf5_writer.write_rows``). The same error, one pass."""
    name = column.source_name
    if column.source_kind != TENSOR_SOURCE or name not in FLOAT_TABLES or allows_nonfinite(reader.config):
        return ""
    return reader.location(name)


def validate_dataset(reader: Reader, progress: bool = False, *, scan_floats: bool = False) -> None:
    """Raise ``ValidationError`` at the first place the dataset breaks the schema.

    Ids, tiers, relevance and distances are always scanned whole; the float tables only with
    ``scan_floats=True`` (``verify``): converters check them as they write them (NOTE [floats checked as
    written]), serving readers on first touch (NOTE [when values are checked])."""
    check_structure(reader)
    check_values(reader, progress, scan_floats=scan_floats)


def check_structure(reader: Reader) -> None:
    """The config, and every tensor's dtype and shape: what the files' headers tell, before any value is read
    (``validate_dataset``'s first half; NOTE [keyword lists beside the pieces] in conversion.parallel)."""
    check_config(reader.config)
    check_shapes(reader, symbol_sizes(reader))


def check_values(reader: Reader, progress: bool = False, *, scan_floats: bool = False) -> None:
    """The keyword lists (one per pair), ids in range, pair floats finite, splits: ``validate_dataset``'s
    second half, after ``check_structure``."""
    sizes = symbol_sizes(reader)
    n_kw = reader.n_keyword_pairs()
    if n_kw != sizes["P"]:
        raise ValidationError(reader.location_keywords(), f"{n_kw} entries", f"{sizes['P']} (one per pair)")
    floats = list(PAIR_FLOATS) + (list(FLOAT_TABLES) if scan_floats else [])
    names = ["pair_index", "pair_cluster_id", "hard_negatives", "negative_tiers", *floats]
    total = sum(reader.dtype(n).itemsize * int(np.prod(reader.shape(n), dtype=np.int64)) for n in names)
    with tqdm(total=total, unit="B", unit_scale=True, desc="validate", disable=not progress) as bar:
        check_ranges(reader, sizes, bar.update)
        check_floats(reader, floats, bar.update)
    check_splits(reader)


# --- arguments that pick rows: what every front-end checks before serving -----------------------------


def check_epoch(epoch: object, where: str = "epoch") -> int:
    """An epoch: an integer >= 0 (``1.7`` was silently floored; ``True`` is not an epoch)."""
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or int(epoch) < 0:
        raise ValueError(f"{where} must be an integer >= 0, got {epoch!r}")
    return int(epoch)


def check_batch_size(batch_size: object, where: str = "batch_size") -> int:
    """A batch size: an integer >= 1 (``-1`` iterated nothing without a word)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or int(batch_size) < 1:
        raise ValueError(f"{where} must be an integer >= 1, got {batch_size!r}")
    return int(batch_size)


def check_positions(positions: object, n: int, where: str = "indices") -> np.ndarray:
    """Positions into something of ``n`` rows as int64: integers only (``[0.5]`` served row 0), in [0, n)."""
    idx = np.asarray(positions)
    if idx.size and idx.dtype.kind not in "iu":
        raise TypeError(f"{where} must be integers, got {idx.dtype} values such as {idx.reshape(-1)[0].item()!r}")
    idx = idx.astype(np.int64, copy=False).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        bad = int(idx[(idx < 0) | (idx >= n)][0])
        raise IndexError(f"{where}: Index {bad} out of range [0, {n})")
    return idx


__all__ = [
    "FLOAT_TABLES",
    "check_batch_size",
    "check_config",
    "check_epoch",
    "check_finite",
    "check_positions",
    "check_structure",
    "check_values",
    "validate_dataset",
]
