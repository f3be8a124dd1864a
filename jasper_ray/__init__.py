"""jasper_ray: store, convert and serve JASPER steering datasets."""

from __future__ import annotations

# --- Public API ---
from .errors import ChecksumError, DatasetFormatError, DatasetNotFoundError, StaleDatasetError, ValidationError
from .formats import open_dataset
from .formats.base import Reader
from .formats.pt import write_pt_dataset
from .synth import synth_dataset
from .validate import validate_dataset
from .writer import ConversionReport, convert_pt_to_hdf5

__version__ = "0.1.0"

__all__ = [
    "ChecksumError",
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
