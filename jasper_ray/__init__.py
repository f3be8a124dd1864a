"""jasper_ray: store, convert and serve JASPER steering datasets.

``import jasper_ray`` imports neither torch nor Ray: the torch and Ray front-ends
load on first use, so format work (and Ray workers serving HDF5) starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

# --- Public API ---
from .assembly import SAMPLE_KEYS, assemble_batch
from .errors import ChecksumError, DatasetFormatError, DatasetNotFoundError, StaleDatasetError, ValidationError
from .formats import open_dataset
from .formats.base import Reader
from .formats.pt import write_pt_dataset
from .synth import synth_dataset
from .validate import validate_dataset
from .writer import ConversionReport, convert_pt_to_hdf5

# Front-ends that need torch or Ray: name -> module, imported on first access.
_LAZY = {
    "JASPERSteeringDataset": "dataset",
    "ResumableLoader": "loader",
    "create_loader": "loader",
    "set_epoch": "loader",
    "validate_first_batch": "loader",
    "ResumableSampler": "sampler",
    "collate": "torch_batches",
    "ConversionError": "ray_convert",
    "convert": "ray_convert",
    "read_jasper": "ray_data",
    "ShardedJasper": "shard_service",
    "ShardUnavailableError": "shard_service",
}

__version__ = "0.1.0"

__all__ = [
    "SAMPLE_KEYS",
    "ChecksumError",
    "ConversionReport",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "Reader",
    "StaleDatasetError",
    "ValidationError",
    "assemble_batch",
    "convert_pt_to_hdf5",
    "open_dataset",
    "synth_dataset",
    "validate_dataset",
    "write_pt_dataset",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'jasper_ray' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
