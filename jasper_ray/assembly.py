"""Sample assembly: pair ids + steering variants -> the batch dict, vectorised.

The one place that knows what a sample is. The local torch dataset, the Ray
Data read tasks and the shard actors all call ``assemble_batch``, so the same
pair at the same epoch gives the same sample on a laptop and on a cluster.
A source gives rows of named tensors (``take``) and the few array operations
assembly needs: ``ReaderSource`` reads numpy rows through the format reader
(memory-mapped), ``local.batches.TensorSource`` indexes torch tensors placed
on a device (no ``.item()`` syncs: positions are computed on the host).
Imports neither torch nor Ray, so Ray workers that serve HDF5 start fast.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np

from .formats.base import Reader
from .schema import STEERING_TENSOR

# Upstream's sample dict: key -> (per-sample shape in symbols, dtype).
SAMPLE_KEYS: dict[str, tuple[tuple[str, ...], np.dtype]] = {
    "question_emb": (("D",), np.dtype("float32")),
    "target_source_emb": (("D",), np.dtype("float32")),
    "steering": (("D",), np.dtype("float32")),
    "negative_embs": (("NEG", "D"), np.dtype("float32")),
    "cluster_id": ((), np.dtype("int64")),
    "relevance": ((), np.dtype("float32")),
    "centroid_distance": ((), np.dtype("float32")),
    "steering_variant": ((), np.dtype("int64")),
    "negative_tiers": (("NEG",), np.dtype("int64")),
}


def sample_fields(dim: int, n_neg: int) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """Each sample key with its per-sample shape in numbers and its dtype (how a batch slot is laid out)."""
    sizes = {"D": dim, "NEG": n_neg}
    return [(key, tuple(sizes[s] for s in shape), dtype) for key, (shape, dtype) in SAMPLE_KEYS.items()]


# The column that names each sample's pair where batches leave the local dataset (Ray Data, shard actors).
PAIR_ID = "pair_id"


class Source(Protocol):
    """Rows of named tensors, and the array operations assembly needs, on one device."""

    def take(self, name: str, indices: Any, out: Any = None) -> Any: ...

    def row_shape(self, name: str) -> tuple[int, ...]: ...

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> Any: ...

    def put_rows(self, out: Any, positions: np.ndarray, rows: Any) -> None: ...

    def from_host(self, array: np.ndarray) -> Any: ...


class ReaderSource:
    """numpy rows straight from a format reader: picklable, opens lazily per process."""

    def __init__(self, reader: Reader):
        self.reader = reader

    def take(self, name: str, indices: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return self.reader.take(name, np.asarray(indices), out)

    def row_shape(self, name: str) -> tuple[int, ...]:
        return self.reader.shape(name)[1:]

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return np.zeros(shape, dtype=dtype)

    def put_rows(self, out: np.ndarray, positions: np.ndarray, rows: np.ndarray) -> None:
        out[positions] = rows

    def from_host(self, array: np.ndarray) -> np.ndarray:
        return array

    @property
    def resident_bytes(self) -> int:
        return 0


def assemble_batch(
    source: Source,
    pair_ids: np.ndarray,
    variants: np.ndarray,
    keys: Iterable[str] | None = None,
    out: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The collated batch for ``pair_ids`` with the given steering ``variants`` (0..3), shapes ``[B, ...]``.

    ``keys`` (default: all of ``SAMPLE_KEYS``) selects what to build; nothing else is read.
    ``out`` (key -> C-contiguous array of the batch's shape) receives the batch in place of new
    arrays: a shard actor gathers straight into shared memory, with no second copy.
    """
    keys = list(SAMPLE_KEYS) if keys is None else list(keys)
    unknown = [k for k in keys if k not in SAMPLE_KEYS]
    if unknown:
        raise KeyError(f"unknown sample key(s) {unknown}; known: {list(SAMPLE_KEYS)}")
    pair_ids = np.asarray(pair_ids, dtype=np.int64)
    variants = np.asarray(variants, dtype=np.int64)
    n = len(pair_ids)
    into = out or {}
    for key, dest in into.items():
        contiguous = dest.is_contiguous() if hasattr(dest, "is_contiguous") else dest.flags.c_contiguous
        if not contiguous or len(dest) != n:
            raise ValueError(f"out[{key!r}] must be C-contiguous with {n} rows (got shape {tuple(dest.shape)})")
    needs_index = bool({"question_emb", "target_source_emb"} & set(keys))
    index = source.take("pair_index", pair_ids) if needs_index else source.zeros((0, 2), np.dtype("int64"))
    per_pair = {
        "cluster_id": "pair_cluster_id",
        "relevance": "pair_relevance",
        "centroid_distance": "centroid_distances",
        "negative_tiers": "negative_tiers",
    }
    batch: dict[str, Any] = {}
    for key in keys:
        dest = into.get(key)
        if key == "question_emb":
            batch[key] = source.take("question_embs", index[:, 0], dest)
        elif key == "target_source_emb":
            batch[key] = source.take("source_embs", index[:, 1], dest)
        elif key == "negative_embs":
            negatives = source.take("hard_negatives", pair_ids)
            dim = source.row_shape("source_embs")[-1]
            flat = None if dest is None else dest.reshape(-1, dim)  # a view: dest is C-contiguous
            rows = source.take("source_embs", negatives.reshape(-1), flat)
            batch[key] = rows.reshape(n, negatives.shape[1], dim) if dest is None else dest  # not -1: n may be 0
        elif key == "steering":
            # Made by the source, on its device: batches mixing variants collate.
            if dest is None:
                steering = source.zeros((n, *source.row_shape("steering_centroid")), SAMPLE_KEYS[key][1])
            else:
                steering = dest
                steering[...] = 0
            for variant, name in STEERING_TENSOR.items():
                positions = np.flatnonzero(variants == variant)
                if len(positions):
                    source.put_rows(steering, positions, source.take(name, pair_ids[positions]))
            batch[key] = steering
        elif key == "steering_variant":
            batch[key] = source.from_host(variants)
            if dest is not None:
                dest[...] = batch[key]
                batch[key] = dest
        else:
            batch[key] = source.take(per_pair[key], pair_ids, dest)
    return batch
