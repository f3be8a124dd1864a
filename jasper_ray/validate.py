"""Validation of a whole dataset against the schema, through any reader.

Scans run in row blocks over mapped data, never whole-tensor loads. Each error
names the file or tensor, the position, the value found and what was expected.
Stops at the first error (a ``ValidationError``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .config import check_probabilities
from .errors import ValidationError
from .formats.base import Reader
from .schema import CONFIG_FILE, ENTITY_OF_SYMBOL, TENSORS, TIER_RANGE

SCAN_ELEMENTS = 4 << 20


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
        if dtype != spec.dtype:
            raise ValidationError(where, f"dtype {dtype}", f"dtype {spec.dtype}")
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
    n_kw = reader.n_keyword_pairs()
    if n_kw != sizes["P"]:
        raise ValidationError(reader.location_keywords(), f"{n_kw} entries", f"{sizes['P']} (one per pair)")


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


def validate_dataset(reader: Reader, progress: bool = False) -> None:
    """Raise ``ValidationError`` at the first place the dataset breaks the schema."""
    check_config(reader.config)
    sizes = symbol_sizes(reader)
    check_shapes(reader, sizes)
    total = sum(
        reader.dtype(n).itemsize * int(np.prod(reader.shape(n), dtype=np.int64))
        for n in ("pair_index", "pair_cluster_id", "hard_negatives", "negative_tiers")
    )
    with tqdm(total=total, unit="B", unit_scale=True, desc="validate", disable=not progress) as bar:
        check_ranges(reader, sizes, bar.update)


__all__ = ["validate_dataset", "check_config"]
