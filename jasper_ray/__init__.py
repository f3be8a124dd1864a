"""jasper_ray: store, convert and serve JASPER steering datasets.

``import jasper_ray`` imports neither torch nor Ray: the torch and Ray front-ends
load on first use, so format work (and Ray workers serving HDF5) starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

# --- Public API ---
from .assembly import SAMPLE_KEYS, assemble_batch
from .conversion.writer import ConversionReport, convert_pt_to_hdf5
from .errors import (
    ChecksumError,
    ConversionError,
    DatasetFormatError,
    DatasetNotFoundError,
    LoaderWorkerError,
    ShardUnavailableError,
    StaleDatasetError,
    ValidationError,
)
from .formats import open_dataset
from .formats.base import Reader
from .formats.pt import write_pt_dataset
from .tools.synth import synth_dataset
from .validate import validate_dataset

# Front-ends that need torch or Ray: name -> module, imported on first access.
_LAZY = {
    "JASPERSteeringDataset": "local.dataset",
    "ResumableLoader": "local.loader",
    "create_loader": "local.loader",
    "set_epoch": "local.loader",
    "validate_first_batch": "local.loader",
    "ResumableSampler": "local.sampler",
    "collate": "local.batches",
    "convert": "conversion.parallel",
    "read_jasper": "ray_data",
    "ShardedJasper": "serve.client",
    "ServeSettings": "serve.settings",
}

__version__ = "0.1.0"

__all__ = [
    "SAMPLE_KEYS",
    "ChecksumError",
    "ConversionError",
    "ConversionReport",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "LoaderWorkerError",
    "Reader",
    "ShardUnavailableError",
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
