"""Opening a dataset: format detection, staleness and the mmap decision.

``open_dataset`` is the one way every front-end (local torch dataset, Ray
tasks, shard actors, CLI) gets at data. Detection is one mapping from format
name to reader class.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

from ..errors import DatasetNotFoundError, StaleDatasetError
from ..fingerprint import changed_files
from ..schema import HDF5_FILE, MANIFEST, PT_PROBE, SHARDS_DIR
from .base import Reader
from .hdf5 import HDF5Reader, require_h5py
from .pt import PTReader
from .sharded import ShardedHDF5Reader

log = logging.getLogger(__name__)

FORMATS = ("pt", "hdf5")
StorageFormat = Literal["auto", "pt", "hdf5"]

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


def _h5py_available() -> bool:
    try:
        require_h5py()
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


def hdf5_reader(directory: Path, **options) -> Reader:
    """``dataset.h5`` if present, else the sharded layout (``dataset.shards/manifest.json``)."""
    if (
        not (directory / options.get("file_name", HDF5_FILE)).is_file()
        and (directory / SHARDS_DIR / MANIFEST).is_file()
    ):
        options.pop("file_name", None)
        return ShardedHDF5Reader(directory, **options)
    return HDF5Reader(directory, **options)


def _has_hdf5(directory: Path) -> bool:
    return (directory / HDF5_FILE).is_file() or (directory / SHARDS_DIR / MANIFEST).is_file()


def detect_format(directory: Path) -> str:
    """HDF5 if ``dataset.h5`` or ``dataset.shards/`` is there (and h5py imports) and is not stale, else PT."""
    if _has_hdf5(directory) and _h5py_available():
        converted = hdf5_reader(directory)
        h5 = converted.path
        changed = stale_sources(directory, converted)
        converted.close()
        if not changed:
            return "hdf5"
        log.warning(
            "%s is stale: %s changed since it was converted; serving the PT files. "
            "Reconvert with `jasper-ray convert %s`.",
            h5,
            ", ".join(changed),
            directory,
        )
        return "pt"
    if (directory / PT_PROBE).is_file():
        return "pt"
    raise DatasetNotFoundError(
        f"No dataset files found in {directory}. Expected either {HDF5_FILE} or *.pt files (looked for {PT_PROBE})"
    )


def open_dataset(
    path: str | os.PathLike,
    storage_format: StorageFormat = "auto",
    use_mmap: bool | None = None,
    **options,
) -> Reader:
    """Open a JASPER dataset directory (or its ``dataset.h5``) for lazy reading.

    ``use_mmap=None`` maps when the files on disk (or the size config.json
    declares) exceed 10 GiB or half the RAM available now; an explicit bool wins.
    ``options`` tune the HDF5 reader (``chunk_cache_bytes``) and are ignored for PT. An explicit ``"hdf5"`` whose
    PT sources changed since conversion raises ``StaleDatasetError``.
    """
    path = Path(path)
    if path.is_file() and path.suffix in (".h5", ".hdf5"):
        options.setdefault("file_name", path.name)
        path, storage_format = path.parent, "hdf5"
    if not path.is_dir():
        raise DatasetNotFoundError(f"Dataset directory not found: {path}")
    if storage_format == "auto":
        storage_format = detect_format(path)
    elif storage_format not in FORMATS:
        raise ValueError(f"Invalid storage_format: {storage_format}. Must be 'auto', 'pt', or 'hdf5'")
    elif storage_format == "hdf5":
        require_h5py()
        h5 = hdf5_reader(path, **options)
        if not h5.path.exists():
            raise DatasetNotFoundError(f"HDF5 file not found: {h5.path}")
        changed = stale_sources(path, h5)
        h5.close()
        if changed:
            raise StaleDatasetError(
                f"{h5.path} is stale: {', '.join(changed)} changed since it was converted. "
                f"Reconvert with `jasper-ray convert {path}`, or open the PT files with storage_format='pt'."
            )
    elif not (path / PT_PROBE).is_file():
        raise DatasetNotFoundError(f"PT files not found in {path} (looked for {PT_PROBE})")
    reader = hdf5_reader(path, **options) if storage_format == "hdf5" else PTReader(path)
    if use_mmap is None:
        # A config that declares a larger dataset than the files hold is honoured too: mapping is never
        # the risky choice, loading is.
        try:
            declared = declared_bytes(reader.config)
        except (FileNotFoundError, ValueError):
            declared = 0
        use_mmap = decide_mmap(max(reader.nbytes_on_disk(), declared))
    reader.use_mmap = bool(use_mmap)
    return reader


__all__ = ["HDF5Reader", "PTReader", "Reader", "ShardedHDF5Reader", "open_dataset", "detect_format", "decide_mmap"]
