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
from .formats.precision import check_precision
from .schema import PRECISION_DTYPES, PRECISION_FLOAT32, STEERING_TENSOR, TENSOR

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


# The keys that carry embeddings (rows of the reducible tensors): what a front-end's ``dtype=`` applies to.
EMBEDDING_KEYS = ("question_emb", "target_source_emb", "steering", "negative_embs")


def sample_dtype(key: str, precision: str = PRECISION_FLOAT32) -> np.dtype:
    """The dtype of ``key`` in a batch served at ``precision`` (bfloat16: uint16 bits, NOTE [16-bit storage])."""
    return PRECISION_DTYPES[precision] if key in EMBEDDING_KEYS else SAMPLE_KEYS[key][1]


def sample_fields(
    dim: int, n_neg: int, precision: str = PRECISION_FLOAT32
) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """Each sample key with its per-sample shape in numbers and its dtype (how a batch slot is laid out)."""
    sizes = {"D": dim, "NEG": n_neg}
    return [
        (key, tuple(sizes[s] for s in shape), sample_dtype(key, precision)) for key, (shape, _) in SAMPLE_KEYS.items()
    ]


def output_precision(dtype: object, stored: str) -> str:
    """The precision a front-end's ``dtype=`` asks for, given what the dataset ``stored``: "float32" (the
    default, decoded inside the gather), the stored precision by name (or "stored"), never a conversion
    between 16-bit kinds. Accepts names, numpy dtypes and torch dtypes."""
    name = PRECISION_FLOAT32 if dtype is None else str(dtype).removeprefix("torch.")
    name = stored if name == "stored" else name
    check_precision(name)
    if name not in (PRECISION_FLOAT32, stored):
        raise ValueError(
            f"dtype={name!r}: the dataset stores its embeddings as {stored}; ask for 'float32' (decoded as it is "
            f"read) or {stored!r} (as stored), or reconvert with --precision {name}"
        )
    return name


# The column that names each sample's pair where batches leave the local dataset (Ray Data, shard actors).
PAIR_ID = "pair_id"


class Source(Protocol):
    """Rows of named tensors, and the array operations assembly needs, on one device."""

    # What the embedding keys are served at (``output_precision``).
    precision: str

    def take(self, name: str, indices: Any, out: Any = None) -> Any: ...

    def row_shape(self, name: str) -> tuple[int, ...]: ...

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> Any: ...

    def put_rows(self, out: Any, positions: np.ndarray, rows: Any) -> None: ...

    def from_host(self, array: np.ndarray) -> Any: ...


class ReaderSource:
    """numpy rows straight from a format reader: picklable, opens lazily per process. Embedding rows come
    at ``precision``: float32 decoded inside the gather, or as stored (bfloat16: uint16 bits)."""

    def __init__(self, reader: Reader, precision: str = PRECISION_FLOAT32):
        self.reader, self.precision = reader, precision

    def take(self, name: str, indices: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        indices = np.asarray(indices)
        if out is None and TENSOR[name].reducible:
            out = np.empty((len(indices), *self.row_shape(name)), dtype=PRECISION_DTYPES[self.precision])
        return self.reader.take(name, indices, out)

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
                steering = source.zeros(
                    (n, *source.row_shape("steering_centroid")), sample_dtype(key, source.precision)
                )
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
