"""The torch side of samples: tensors placed on a device, numpy batches as tensors, DataLoader collate.

``TensorSource`` is the assembly source for ``device=cuda`` (or tensors held
in RAM): everything is placed once, and batches are ``index_select`` on the
device with host-computed positions, so no per-sample ``.item()`` syncs.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import default_collate

from ..formats.base import Reader
from ..formats.precision import BFLOAT16_BITS
from ..schema import PRECISION_FLOAT32, TENSORS


@contextlib.contextmanager
def _read_only_ok() -> Iterator[None]:
    """Silence torch's warning about tensors over read-only arrays: mapped arrays are read-only, and
    we never write them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    """uint16 arrays are bfloat16 bits (NOTE [16-bit storage] in ``formats.precision``): a bfloat16 view."""
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if array.dtype == BFLOAT16_BITS else tensor


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` without the read-only warning."""
    with _read_only_ok():
        return _from_numpy(array)


def to_torch(batch: Mapping[str, np.ndarray | torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch of numpy arrays as tensors sharing their memory (tensors pass through)."""
    with _read_only_ok():  # once per batch: a third of the cost of once per key
        return {k: v if isinstance(v, torch.Tensor) else _from_numpy(v) for k, v in batch.items()}


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    return _from_numpy(np.empty(0, dtype=dtype)).dtype


class TensorSource:
    """Every tensor placed once on ``device`` (RAM or GPU) as stored (16-bit tables take half the device
    memory); batches are index_select on it, embeddings cast to float32 there unless served at the stored
    ``precision`` (a bf16 model on a GPU gets bf16 rows with no conversion on the CPU)."""

    def __init__(self, reader: Reader, device: torch.device | str = "cpu", precision: str = PRECISION_FLOAT32):
        self.device = torch.device(device)
        self.precision = precision
        self.tensors = {spec.name: as_tensor(np.asarray(reader.read(spec.name))).to(self.device) for spec in TENSORS}
        self.cast = {
            spec.name: torch.float32
            for spec in TENSORS
            if spec.reducible and precision == PRECISION_FLOAT32 and self.tensors[spec.name].dtype != torch.float32
        }

    def _index(self, indices: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(indices, np.ndarray):
            indices = torch.from_numpy(np.ascontiguousarray(indices))
        return indices.to(self.device, non_blocking=True)

    def take(self, name: str, indices: np.ndarray | torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        cast = self.cast.get(name)
        if cast is None:
            return torch.index_select(self.tensors[name], 0, self._index(indices), out=out)
        rows = torch.index_select(self.tensors[name], 0, self._index(indices))
        return rows.to(cast) if out is None else out.copy_(rows)

    def tensor(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def row_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape[1:])

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch_dtype(dtype), device=self.device)

    def put_rows(self, out: torch.Tensor, positions: np.ndarray, rows: torch.Tensor) -> None:
        out.index_copy_(0, self._index(positions), rows)

    def from_host(self, array: np.ndarray) -> torch.Tensor:
        return self._index(array)

    @property
    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


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


def collate(batch: SampleBatch | list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``collate_fn`` for DataLoaders over JASPER datasets: batched results pass through untouched."""
    if isinstance(batch, SampleBatch):
        return batch.batch
    return default_collate(batch)
