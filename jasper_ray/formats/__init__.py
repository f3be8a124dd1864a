"""Opening a dataset: format detection, staleness and the mmap decision.

``open_dataset`` is the one way every front-end (local torch dataset, Ray
tasks, shard actors, CLI) gets at data. Detection is one mapping, ``FORMATS``:
format name -> its layouts in priority order, each a probe file and the reader
that opens it. The writers are ``pt.PTWriter`` and ``hdf5_writer.HDF5Writer``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import DatasetNotFoundError, StaleDatasetError
from ..fingerprint import changed_files
from ..schema import (
    ATTR_COMPRESSION,
    COMPRESSION_NONE,
    HDF5_FILE,
    HDF5_SUFFIXES,
    MANIFEST,
    PT_PROBE,
    PT_SUFFIX,
    SHARDS_DIR,
)
from ..storage import Location, NodeCache, locate
from .base import Reader, Writer
from .hdf5 import HDF5Reader, require_h5py
from .hdf5_writer import HDF5Writer
from .pt import PTReader, PTWriter
from .remote import localize
from .sharded import ShardedHDF5Reader
from .verified import VerifyMode, check_verify_mode

if TYPE_CHECKING:
    import pyarrow.fs as pafs

log = logging.getLogger(__name__)

StorageFormat = Literal["auto", "pt", "hdf5"]


@dataclass(frozen=True)
class Layout:
    """One way a format lies in a directory: the file whose presence shows it, and the reader that opens it."""

    probe: str  # relative to the dataset directory
    open: Callable[..., Reader]  # (directory, **options) -> Reader
    probe_option: str | None = None  # an open_dataset option that renames the probe file

    def probe_path(self, directory: Path, options: Mapping[str, Any]) -> Path:
        name = options.get(self.probe_option, self.probe) if self.probe_option else self.probe
        return directory / str(name)

    def present(self, directory: Path, options: Mapping[str, Any]) -> bool:
        return self.probe_path(directory, options).is_file()


@dataclass(frozen=True)
class Format:
    """A storage format: its layouts in priority order, and what opening it needs."""

    layouts: tuple[Layout, ...]
    missing: str  # the error when no layout is present; {directory} and {probe} (the first layout's file)
    require: Callable[[], object] | None = None  # raises ImportError when the format's library is missing
    converted: bool = True  # converted from PT files: stale when they changed since


def _sharded(directory: Path, file_name: str | None = None, **options: Any) -> Reader:
    """``file_name`` names a single HDF5 file: the sharded layout has none."""
    return ShardedHDF5Reader(directory, **options)


def _pt(directory: Path, **options: Any) -> Reader:
    """Options tune the HDF5 readers; PT takes none."""
    return PTReader(directory)


# Detection: format name -> layouts, in priority order. "auto" takes the first format with a layout
# present whose library imports (HDF5 before PT, unless its PT sources changed since conversion);
# a format opens its first layout present (dataset.h5 before dataset.shards/).
FORMATS: dict[str, Format] = {
    "hdf5": Format(
        (Layout(HDF5_FILE, HDF5Reader, probe_option="file_name"), Layout(f"{SHARDS_DIR}/{MANIFEST}", _sharded)),
        missing="HDF5 file not found: {probe}",
        require=require_h5py,
    ),
    "pt": Format(
        (Layout(PT_PROBE, _pt),), missing="PT files not found in {directory} (looked for {probe})", converted=False
    ),
}
# What conversions read, and what auto-detection serves instead of stale converted data.
SOURCE_FORMAT = "pt"


# Upstream's threshold: mmap above 10 GB.
MMAP_THRESHOLD_BYTES = 10 << 30
# ... or when the data would take more than this share of the RAM available now.
MMAP_RAM_SHARE = 0.5


def available_ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def decide_mmap(nbytes: int, available: int | None = None) -> bool:
    available = available_ram_bytes() if available is None else available
    return nbytes > MMAP_THRESHOLD_BYTES or nbytes > MMAP_RAM_SHARE * available


def declared_bytes(config: dict) -> int:
    """Upstream's size estimate from config.json (embedding_dim * n_pairs * 4 * 15); 0 if it says nothing."""
    try:
        return int(config["embedding_dim"]) * int(config.get("n_pairs", 0)) * 4 * 15
    except (KeyError, TypeError, ValueError):
        return 0


def _usable(fmt: Format) -> bool:
    """The format's library imports (h5py for HDF5)."""
    try:
        if fmt.require is not None:
            fmt.require()
    except ImportError:
        return False
    return True


def stale_sources(directory: Path, converted: Reader) -> list[str]:
    """PT files beside converted data that changed since it was converted from them."""
    pt_files = PTReader(directory).files()
    if not any(p.is_file() for p in pt_files):
        return []
    recorded = converted.source_fingerprint()
    if recorded is None:
        return []  # upstream's files record nothing; we cannot tell
    return changed_files(directory, recorded, pt_files)


def changed_since_conversion(name: str, directory: Path, options: Mapping[str, Any]) -> tuple[Path, list[str]]:
    """Where the format's converted data is, and the PT sources beside it that changed since conversion."""
    with open_layout(name, directory, **options) as converted:
        return converted.path, stale_sources(directory, converted)


def open_layout(storage_format: str, directory: Path, **options: Any) -> Reader:
    """The reader of the format's first layout present in ``directory`` (its first layout when none is)."""
    layouts = FORMATS[storage_format].layouts
    layout = next((lay for lay in layouts if lay.present(directory, options)), layouts[0])
    return layout.open(directory, **options)


def detect_format(directory: Path) -> str:
    """The first format of ``FORMATS`` with a layout present and its library importable; converted data
    whose PT sources changed since is passed over for the PT files, with a warning."""
    for name, fmt in FORMATS.items():
        if not any(lay.present(directory, {}) for lay in fmt.layouts) or not _usable(fmt):
            continue
        if not fmt.converted:
            return name
        where, changed = changed_since_conversion(name, directory, {})
        if not changed:
            return name
        log.warning(
            "%s is stale: %s changed since it was converted; serving the PT files. "
            "Reconvert with `jasper-ray convert %s`.",
            where,
            ", ".join(changed),
            directory,
        )
        return SOURCE_FORMAT
    raise DatasetNotFoundError(
        f"No dataset files found in {directory}. "
        f"Expected either {HDF5_FILE} or *{PT_SUFFIX} files (looked for {PT_PROBE})"
    )


def open_dataset(
    path: str | os.PathLike | Location,
    storage_format: StorageFormat = "auto",
    use_mmap: bool | None = None,
    *,
    filesystem: pafs.FileSystem | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache_limit: int | None = None,
    progress: bool = False,
    verify: VerifyMode = "first-touch",
    **options: Any,
) -> Reader:
    """Open a JASPER dataset directory (or its ``dataset.h5``), local or a ``pyarrow.fs`` URI, for lazy reading.

    A remote dataset (``s3://``, ``gs://``, ``hdfs://``, or a path inside ``filesystem=``) is served from
    the node-local cache (``cache_dir``, default ``$JASPER_RAY_CACHE`` or ``~/.cache/jasper_ray``;
    ``cache_limit`` bytes): files fetched in parallel ranges, checked against their recorded checksums,
    compressed HDF5 decompressed there once into a memory-mappable copy. A local compressed dataset
    takes the same route when ``cache_dir`` is given.

    ``use_mmap=None`` maps when the files on disk (or the size config.json
    declares) exceed 10 GiB or half the RAM available now; an explicit bool wins.
    ``options`` tune the HDF5 reader (``chunk_cache_bytes``) and are ignored for PT. An explicit ``"hdf5"`` whose
    PT sources changed since conversion raises ``StaleDatasetError``.

    ``verify``: ``"first-touch"`` checks each checksum block (and its float values) the first time a read
    touches it, ``"open"`` checks everything now, ``"off"`` nothing (NOTE [first-touch verification]).
    """
    check_verify_mode(verify)
    location = locate(path, filesystem)
    path = Path(location.path)
    if location.is_remote or cache_dir is not None or cache_limit is not None:
        cache = NodeCache.at(cache_dir, cache_limit)
        path, served = localize(location, cache, options, storage_format=storage_format, progress=progress)
        if served is not None:  # from the cache: checked copies, contiguous, made to be mapped
            storage_format, use_mmap = served, True if use_mmap is None else use_mmap
    if path.is_file() and path.suffix in HDF5_SUFFIXES:
        options.setdefault("file_name", path.name)
        path, storage_format = path.parent, "hdf5"
    if not path.is_dir():
        raise DatasetNotFoundError(f"Dataset directory not found: {path}")
    if storage_format == "auto":
        name = detect_format(path)
    elif storage_format not in FORMATS:
        raise ValueError(f"Invalid storage_format: {storage_format}. Must be 'auto', 'pt', or 'hdf5'")
    else:
        name = storage_format
        _check_present(name, path, options)
    reader = open_layout(name, path, **options)
    if use_mmap is None:
        # A config that declares a larger dataset than the files hold is honoured too: mapping is never
        # the risky choice, loading is.
        try:
            declared = declared_bytes(reader.config)
        except (FileNotFoundError, ValueError):
            declared = 0
        use_mmap = decide_mmap(max(reader.nbytes_on_disk(), declared))
    reader.use_mmap = bool(use_mmap)
    reader.verify = verify
    if verify == "open":
        reader.check_all()
    return reader


def chunk_gathers_warning(reader: Reader) -> str | None:
    """What to tell a user whose reads will decode compressed chunks (mapped reads of a compressed file)."""
    codec = _compression(reader)
    if not reader.use_mmap or codec in (None, COMPRESSION_NONE):
        return None
    return (
        f"{reader.path} is stored compressed ({codec}): every read decodes whole chunks, hundreds of times "
        "slower than a memory-mapped file. Give cache_dir= (CLI --cache-dir) to decompress it once into a "
        "mappable copy there, or convert with compression=None to serve."
    )


def _compression(reader: Reader) -> str | None:
    """The codec a converted dataset records (None: PT files, or a file that records none)."""
    if isinstance(reader, ShardedHDF5Reader):  # shards through a cache are served from contiguous copies
        return reader.layout.compression if reader.shard_files is None else None
    if isinstance(reader, HDF5Reader):
        value = reader.file.attrs.get(ATTR_COMPRESSION)
        return None if value is None else str(value)
    return None


def _check_present(name: str, directory: Path, options: Mapping[str, Any]) -> None:
    """An explicit format: its library imports, a layout is there, and (converted data) it is not stale."""
    fmt = FORMATS[name]
    if fmt.require is not None:
        fmt.require()
    if not any(lay.present(directory, options) for lay in fmt.layouts):
        probe = fmt.layouts[0].probe_path(directory, options)
        raise DatasetNotFoundError(fmt.missing.format(directory=directory, probe=probe))
    if fmt.converted:
        where, changed = changed_since_conversion(name, directory, options)
        if changed:
            raise StaleDatasetError(
                f"{where} is stale: {', '.join(changed)} changed since it was converted. "
                f"Reconvert with `jasper-ray convert {directory}`, or open the PT files with storage_format='pt'."
            )


__all__ = [
    "FORMATS",
    "HDF5Reader",
    "HDF5Writer",
    "PTReader",
    "PTWriter",
    "Reader",
    "ShardedHDF5Reader",
    "Writer",
    "chunk_gathers_warning",
    "decide_mmap",
    "detect_format",
    "open_dataset",
]
