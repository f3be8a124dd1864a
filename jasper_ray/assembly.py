"""Sample assembly: pair ids + steering variants -> the batch dict, vectorised.

The one place that knows what a sample is. The local torch dataset, the Ray
Data read tasks and the shard actors all call ``assemble_batch``, so the same
pair at the same epoch gives the same sample on a laptop and on a cluster.
A source gives rows of named tensors (``take``); ``ReaderSource`` reads them
through the format reader (memory-mapped), ``TensorSource`` indexes tensors
already placed on a device (no ``.item()`` syncs: positions are computed on
the host). Imports no Ray.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from .formats.base import Reader
from .schema import STEERING_TENSOR, TENSORS

# Upstream's sample dict: key -> (per-sample shape in symbols, dtype).
SAMPLE_KEYS: dict[str, tuple[tuple[str, ...], torch.dtype]] = {
    "question_emb": (("D",), torch.float32),
    "target_source_emb": (("D",), torch.float32),
    "steering": (("D",), torch.float32),
    "negative_embs": (("NEG", "D"), torch.float32),
    "cluster_id": ((), torch.int64),
    "relevance": ((), torch.float32),
    "centroid_distance": ((), torch.float32),
    "steering_variant": ((), torch.int64),
    "negative_tiers": (("NEG",), torch.int64),
}


class Source(Protocol):
    device: torch.device

    def take(self, name: str, indices: np.ndarray | torch.Tensor) -> torch.Tensor: ...

    def row_shape(self, name: str) -> tuple[int, ...]: ...


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` without the read-only warning (mapped arrays are read-only; we never write them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


class ReaderSource:
    """Rows straight from a format reader: picklable, opens lazily per process."""

    device = torch.device("cpu")

    def __init__(self, reader: Reader):
        self.reader = reader

    def take(self, name: str, indices: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(indices, torch.Tensor):
            indices = indices.numpy()
        return torch.from_numpy(self.reader.take(name, indices))

    def tensor(self, name: str) -> torch.Tensor:
        return as_tensor(np.asarray(self.reader.read(name)))

    def row_shape(self, name: str) -> tuple[int, ...]:
        return self.reader.shape(name)[1:]

    @property
    def resident_bytes(self) -> int:
        return 0


class TensorSource:
    """Every tensor placed once on ``device`` (RAM or GPU); batches are index_select on it."""

    def __init__(self, reader: Reader, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.tensors = {spec.name: as_tensor(np.asarray(reader.read(spec.name))).to(self.device) for spec in TENSORS}

    def take(self, name: str, indices: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(indices, np.ndarray):
            indices = torch.from_numpy(indices)
        return self.tensors[name].index_select(0, indices.to(self.device, non_blocking=True))

    def tensor(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def row_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape[1:])

    @property
    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def assemble_batch(
    source: Source, pair_ids: np.ndarray, variants: np.ndarray, keys: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """The collated batch for ``pair_ids`` with the given steering ``variants`` (0..3), shapes ``[B, ...]``.

    ``keys`` (default: all of ``SAMPLE_KEYS``) selects what to build; nothing else is read.
    """
    keys = list(SAMPLE_KEYS) if keys is None else list(keys)
    unknown = [k for k in keys if k not in SAMPLE_KEYS]
    if unknown:
        raise KeyError(f"unknown sample key(s) {unknown}; known: {list(SAMPLE_KEYS)}")
    pair_ids = np.asarray(pair_ids, dtype=np.int64)
    variants = np.asarray(variants, dtype=np.int64)
    n = len(pair_ids)
    index = source.take("pair_index", pair_ids) if {"question_emb", "target_source_emb"} & set(keys) else None
    per_pair = {
        "cluster_id": "pair_cluster_id",
        "relevance": "pair_relevance",
        "centroid_distance": "centroid_distances",
        "negative_tiers": "negative_tiers",
    }
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        if key == "question_emb":
            out[key] = source.take("question_embs", index[:, 0])
        elif key == "target_source_emb":
            out[key] = source.take("source_embs", index[:, 1])
        elif key == "negative_embs":
            negatives = source.take("hard_negatives", pair_ids)
            rows = source.take("source_embs", negatives.reshape(-1))
            out[key] = rows.reshape(n, negatives.shape[1], rows.shape[-1])  # not -1: n may be 0
        elif key == "steering":
            # Made on the source's device: batches mixing variants collate.
            steering = torch.zeros((n, *source.row_shape("steering_centroid")), device=source.device)
            for variant, name in STEERING_TENSOR.items():
                positions = np.flatnonzero(variants == variant)
                if len(positions):
                    rows = source.take(name, pair_ids[positions])
                    steering.index_copy_(0, torch.from_numpy(positions).to(steering.device, non_blocking=True), rows)
            out[key] = steering
        elif key == "steering_variant":
            out[key] = torch.from_numpy(variants).to(source.device, non_blocking=True)
        else:
            out[key] = source.take(per_pair[key], pair_ids)
    return out


class SampleBatch(Sequence):
    """A collated batch that also reads as a list of per-sample dicts.

    ``JASPERSteeringDataset.__getitems__`` returns it: ``jasper_ray.collate``
    hands back ``.batch`` as is (no copy); torch's ``default_collate`` still
    works on it, sample by sample, for users who keep their own DataLoader.
    """

    def __init__(self, batch: dict[str, torch.Tensor]):
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch["steering_variant"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return {key: value[i] for key, value in self.batch.items()}


def collate(batch: Any) -> Any:
    """``collate_fn`` for DataLoaders over JASPER datasets: batched results pass through untouched."""
    if isinstance(batch, SampleBatch):
        return batch.batch
    from torch.utils.data import default_collate

    return default_collate(batch)
