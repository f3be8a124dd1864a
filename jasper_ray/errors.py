"""Error types. Each subclasses a built-in so callers that catch ValueError or
FileNotFoundError keep working (upstream raised those)."""

from __future__ import annotations


class DatasetNotFoundError(FileNotFoundError, ValueError):
    """A directory, file or tensor the dataset needs is not there (upstream raised ValueError for these)."""


class DatasetFormatError(ValueError):
    """A file exists but is not what the schema says (bad pickle, wrong layout)."""


class ValidationError(ValueError):
    """Content that breaks the schema: names where, what was found, what was expected."""

    def __init__(
        self, where: str, found: object, expected: str, position: object | None = None, summary: str | None = None
    ):
        self.where, self.found, self.expected, self.position = where, found, expected, position
        at = f" at position {position}" if position is not None else ""
        detail = f"{where}{at}: found {found}, expected {expected}"
        # ``summary`` keeps upstream's wording ("pair_index references question 999, ...") in front.
        super().__init__(f"{summary} ({detail})" if summary else detail)
        self.summary = summary

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        """Pickled with its own arguments: raised in a Ray task (a conversion piece), it reaches the driver."""
        return type(self), (self.where, self.found, self.expected, self.position, self.summary)


class FirstBatchError(ValidationError, AssertionError):
    """A first batch that fails upstream's checks: a ValidationError, and an AssertionError as upstream raised."""


class StaleDatasetError(ValueError):
    """dataset.h5 was converted from PT files that have changed since."""


class ChecksumError(ValueError):
    """Stored bytes no longer match the checksum recorded when they were written."""


class ConversionError(RuntimeError):
    """Conversion pieces failed after their retries; names them."""


class ShardUnavailableError(RuntimeError):
    """A shard's actor could not serve a request after all retries."""


class RayUnreachableError(ConnectionError):
    """No Ray cluster answers at the address given."""


class RemoteAccessError(OSError):
    """Object storage refused or could not be reached: names the URI and where credentials come from."""


class CacheError(OSError):
    """The node-local cache cannot hold what it must (a limit too small, a full disk): names sizes and paths."""


class LoaderWorkerError(RuntimeError):
    """A worker of the local loader died or stalled; names it, its pid and how it ended."""
