"""jasper_ray: store, convert and serve JASPER steering datasets."""

from __future__ import annotations

# --- Public API ---
from .assembly import SAMPLE_KEYS, assemble_batch, collate
from .dataset import JASPERSteeringDataset
from .errors import ChecksumError, DatasetFormatError, DatasetNotFoundError, StaleDatasetError, ValidationError
from .formats import open_dataset
from .formats.base import Reader
from .formats.pt import write_pt_dataset
from .loader import ResumableLoader, create_loader, set_epoch, validate_first_batch
from .ray_convert import ConversionError, convert
from .sampler import ResumableSampler
from .synth import synth_dataset
from .validate import validate_dataset
from .writer import ConversionReport, convert_pt_to_hdf5

__version__ = "0.1.0"

__all__ = [
    "JASPERSteeringDataset",
    "ResumableLoader",
    "ResumableSampler",
    "SAMPLE_KEYS",
    "assemble_batch",
    "collate",
    "create_loader",
    "set_epoch",
    "validate_first_batch",
    "ChecksumError",
    "ConversionError",
    "convert",
    "ConversionReport",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "Reader",
    "StaleDatasetError",
    "ValidationError",
    "convert_pt_to_hdf5",
    "open_dataset",
    "synth_dataset",
    "validate_dataset",
    "write_pt_dataset",
]
