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
from collections.abc import Sequence
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

    @property
    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def assemble_batch(source: Source, pair_ids: np.ndarray, variants: np.ndarray) -> dict[str, torch.Tensor]:
    """The collated batch for ``pair_ids`` with the given steering ``variants`` (0..3), shapes ``[B, ...]``."""
    pair_ids = np.asarray(pair_ids, dtype=np.int64)
    variants = np.asarray(variants, dtype=np.int64)
    index = source.take("pair_index", pair_ids)
    question = source.take("question_embs", index[:, 0])
    negatives = source.take("hard_negatives", pair_ids)
    n, n_neg = negatives.shape
    negative_embs = source.take("source_embs", negatives.reshape(-1))
    steering = torch.zeros_like(question)  # on the source's device: batches mixing variants collate
    for variant, name in STEERING_TENSOR.items():
        positions = np.flatnonzero(variants == variant)
        if len(positions):
            rows = source.take(name, pair_ids[positions])
            steering.index_copy_(0, torch.from_numpy(positions).to(steering.device, non_blocking=True), rows)
    return {
        "question_emb": question,
        "target_source_emb": source.take("source_embs", index[:, 1]),
        "steering": steering,
        "negative_embs": negative_embs.reshape(n, n_neg, -1),
        "cluster_id": source.take("pair_cluster_id", pair_ids),
        "relevance": source.take("pair_relevance", pair_ids),
        "centroid_distance": source.take("centroid_distances", pair_ids),
        "steering_variant": torch.from_numpy(variants).to(steering.device, non_blocking=True),
        "negative_tiers": source.take("negative_tiers", pair_ids),
    }


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
