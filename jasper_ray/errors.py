"""Error types. Each subclasses a built-in so callers that catch ValueError or
FileNotFoundError keep working (upstream raised those)."""

from __future__ import annotations


class DatasetNotFoundError(FileNotFoundError):
    """A directory, file or tensor the dataset needs is not there."""


class DatasetFormatError(ValueError):
    """A file exists but is not what the schema says (bad pickle, wrong layout)."""


class ValidationError(ValueError):
    """Content that breaks the schema: names where, what was found, what was expected."""

    def __init__(self, where: str, found: object, expected: str, position: object | None = None):
        self.where, self.found, self.expected, self.position = where, found, expected, position
        at = f" at position {position}" if position is not None else ""
        super().__init__(f"{where}{at}: found {found}, expected {expected}")


class StaleDatasetError(ValueError):
    """dataset.h5 was converted from PT files that have changed since."""


class ChecksumError(ValueError):
    """Stored bytes no longer match the checksum recorded when they were written."""
