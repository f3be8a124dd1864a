"""Where a dataset lives: a local path, or anything ``pyarrow.fs`` reaches (s3://, gs://, hdfs://, file://).

Resolution is pyarrow's, as in Ray Data's readers: a URI picks its filesystem
and reads credentials and endpoint from the standard environment
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...); ``filesystem=`` (a
``pyarrow.fs.FileSystem``) takes paths inside it. A ``Location`` is picklable
(pyarrow filesystems pickle with their options), so it travels to Ray tasks and
actors, which resolve files on their own node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DatasetNotFoundError, RemoteAccessError

if TYPE_CHECKING:
    import pyarrow.fs as pafs

# What pyarrow's S3 client reads from the environment; named in credential errors.
S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
_DENIED = (
    "ACCESS_DENIED",
    "AccessDenied",
    "INVALID_ACCESS_KEY_ID",
    "InvalidAccessKeyId",
    "SIGNATURE_DOES_NOT_MATCH",
    "SignatureDoesNotMatch",
    "credentials",
    "403",
)
_MISSING = ("NO_SUCH_BUCKET", "NoSuchBucket", "NoSuchKey", "does not exist", "Path does not exist")


@dataclass(frozen=True)
class Location:
    """A dataset directory or file: ``path`` inside ``filesystem``, or a local path when ``filesystem`` is None."""

    uri: str  # as the user gave it: messages and the cache key
    path: str
    filesystem: pafs.FileSystem | None = None

    @property
    def is_remote(self) -> bool:
        return self.filesystem is not None

    @property
    def local_path(self) -> Path:
        if self.filesystem is not None:
            raise ValueError(f"{self.uri} is not a local path")
        return Path(self.path)

    def child(self, name: str) -> Location:
        """The file ``name`` inside this directory."""
        sep = "" if self.uri.endswith("/") else "/"
        if self.filesystem is None:
            return Location(str(Path(self.path) / name), str(Path(self.path) / name))
        return Location(f"{self.uri}{sep}{name}", f"{self.path.rstrip('/')}/{name}", self.filesystem)

    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def parent(self) -> Location:
        if self.filesystem is None:
            parent = Path(self.path).parent
            return Location(str(parent), str(parent))
        return Location(
            self.uri.rstrip("/").rsplit("/", 1)[0], self.path.rstrip("/").rsplit("/", 1)[0], self.filesystem
        )


def is_uri(path: object) -> bool:
    return isinstance(path, str) and "://" in path


def locate(path: str | os.PathLike | Location, filesystem: pafs.FileSystem | None = None) -> Location:
    """Resolve ``path`` (a local path, a URI, or a path inside ``filesystem``) the way Ray Data's readers do."""
    if isinstance(path, Location):
        return path
    if filesystem is not None:
        import pyarrow.fs as pafs  # lazy: pyarrow's filesystems load only for remote datasets

        text = str(path)
        inner = text.split("://", 1)[1] if is_uri(text) else text
        if isinstance(filesystem, pafs.LocalFileSystem):
            return Location(inner, inner)
        return Location(text if is_uri(text) else f"{filesystem.type_name}://{inner}", inner, filesystem)
    if not is_uri(path):
        text = os.fspath(path)
        return Location(text, text)
    import pyarrow.fs as pafs  # lazy: pyarrow's filesystems load only for remote datasets

    text = str(path)
    try:
        fs, inner = pafs.FileSystem.from_uri(text)
    except (ValueError, OSError) as exc:
        raise ValueError(f"Cannot resolve {text}: {exc} (pyarrow.fs knows s3://, gs://, hdfs://, file://)") from exc
    if isinstance(fs, pafs.LocalFileSystem):
        return Location(inner, inner)
    return Location(text, inner, fs)


def remote_error(exc: BaseException, uri: str) -> Exception:
    """A jasper_ray error for a failed remote call: not found, or credentials, naming the URI."""
    text = str(exc)
    if any(m in text for m in _DENIED):
        return RemoteAccessError(
            f"{uri}: access denied ({text}). Credentials come from the environment as pyarrow reads them: "
            f"{', '.join(S3_ENV)} (set: {', '.join(v for v in S3_ENV if v in os.environ) or 'none'}), "
            "or pass filesystem=pyarrow.fs.S3FileSystem(...)."
        )
    if isinstance(exc, FileNotFoundError) or any(m in text for m in _MISSING):
        return DatasetNotFoundError(f"{uri} not found: {text}")
    return RemoteAccessError(f"{uri}: {text}")


def file_info(location: Location) -> Any:
    """pyarrow's FileInfo of ``location`` (remote); jasper_ray errors for what cannot be reached."""
    assert location.filesystem is not None
    try:
        return location.filesystem.get_file_info(location.path)
    except OSError as exc:
        raise remote_error(exc, location.uri) from exc
