"""Conversions whose source or output is a ``pyarrow.fs`` URI: staged through the node-local cache.

A remote PT source is fetched into the cache (parallel ranged GETs, one
download per node) and converted from there; a remote output is written to a
staging directory in the cache and uploaded when complete: ``dataset.h5`` as
one object (an S3 PUT replaces an object whole), the sharded layout's shard
files first and ``manifest.json`` last, so a reader sees the whole new dataset
or the old one. Staging is keyed by the output URI, so a re-run after a crash
finds the finished pieces of the last one beside it and reuses them.

The single-process writer converts so. Ray conversions stage only a remote
``dataset.h5`` output: their tasks read a remote source by byte ranges and
upload the shards of a remote sharded output (``conversion.ranged``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ..formats import open_dataset
from ..schema import HDF5_FILE, LAYOUT_SINGLE, MANIFEST, SHARDS_DIR
from ..storage import Location, NodeCache, locate
from ..storage.fetch import upload_file

if TYPE_CHECKING:
    import pyarrow.fs as pafs

log = logging.getLogger(__name__)


class _Report(Protocol):
    output: Path | str


Report = TypeVar("Report", bound=_Report)

STAGING_DIR = "outputs"


def local_source(
    dataset_dir: str | os.PathLike | Location, filesystem: pafs.FileSystem | None, cache_dir: str | os.PathLike | None
) -> tuple[Location, Path]:
    """The source's location, and a local directory holding its PT files (the cache's copy if remote)."""
    location = locate(dataset_dir, filesystem)
    if not location.is_remote:
        return location, Path(location.path)
    with open_dataset(location, "pt", True, cache_dir=cache_dir, progress=True) as reader:
        return location, reader.directory


def output_location(
    source: Location, output: str | os.PathLike | None, filesystem: pafs.FileSystem | None, layout: str
) -> Location | None:
    """Where the output goes when it is remote (None: a local path); beside a remote source by default."""
    name = HDF5_FILE if layout == LAYOUT_SINGLE else SHARDS_DIR
    if output is None:
        return source.child(name) if source.is_remote else None
    target = locate(output, filesystem if not isinstance(output, Path) else None)
    return target if target.is_remote else None


def staging_for(target: Location, cache_dir: str | os.PathLike | None) -> Path:
    """This node's staging directory for the output ``target`` (kept across runs: a re-run resumes there)."""
    staging = NodeCache.at(cache_dir).root / STAGING_DIR / hashlib.sha256(target.uri.encode()).hexdigest()[:16]
    staging.mkdir(parents=True, exist_ok=True)
    return staging


@contextlib.contextmanager
def staged_output(target: Location, cache_dir: str | os.PathLike | None, layout: str) -> Iterator[Path]:
    """A local path to convert into; on success its files are uploaded to ``target`` and the staging goes."""
    staging = staging_for(target, cache_dir)
    local = staging / (HDF5_FILE if layout == LAYOUT_SINGLE else SHARDS_DIR)
    yield local
    upload(local, target)
    shutil.rmtree(staging, ignore_errors=True)


def upload(local: Path, target: Location) -> None:
    """``local`` (a file, or a directory whose manifest goes last) to ``target``."""
    files = [local] if local.is_file() else sorted(local.iterdir(), key=lambda p: (p.name == MANIFEST, p.name))
    for path in files:
        where = target if local.is_file() else target.child(path.name)
        log.info("uploading %s to %s", path, where.uri)
        upload_file(path, where)


def is_remote_job(
    dataset_dir: str | os.PathLike | Location, output: str | os.PathLike | None, filesystem: pafs.FileSystem | None
) -> bool:
    """Whether the source or the output is not a local path."""
    if locate(dataset_dir, filesystem).is_remote:
        return True
    return output is not None and locate(output, filesystem if not isinstance(output, Path) else None).is_remote


def convert_staged(
    convert: Callable[..., Report],
    dataset_dir: str | os.PathLike | Location,
    *,
    output: str | os.PathLike | None,
    filesystem: pafs.FileSystem | None,
    cache_dir: str | os.PathLike | None,
    **options: Any,
) -> Report:
    """Run ``convert`` (a local conversion) on the staged source, into the staged output, then upload."""
    layout = str(options.get("layout", LAYOUT_SINGLE))
    source, local_dir = local_source(dataset_dir, filesystem, cache_dir)
    target = output_location(source, output, filesystem, layout)
    if target is None:
        return convert(local_dir, output=output, **options)
    with staged_output(target, cache_dir, layout) as staged:
        report = convert(local_dir, output=staged, **options)
    report.output = target.uri
    return report
