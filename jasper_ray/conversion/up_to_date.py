"""Whether a conversion's output already holds what converting again would write: then nothing is done.

Up to date means: the output is there in the asked layout; it records a fingerprint of exactly the PT
files now in the dataset directory, none changed since (``fingerprint.changed_files``: sizes, then
mtimes, then a whole-file crc32 only where an mtime moved); and its datasets carry the asked
compression, gzip level and shuffle (the sharded layout: and the asked piece size's row ranges).
Reads metadata, never the tensors, so it answers at once at any size. Imports no Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DatasetFormatError, DatasetNotFoundError
from ..fingerprint import changed_files
from ..formats.chunks import CompressionOpts
from ..formats.columns import Column
from ..formats.hdf5 import json_attr, require_h5py
from ..formats.manifest import read_manifest
from ..formats.precision import stored_dtype
from ..formats.pt import PTReader
from ..schema import ATTR_FINGERPRINT, COMPRESSION_NONE, LAYOUT_SINGLE, MANIFEST, PRECISION_FLOAT32, TENSORS
from .plan import piece_ranges

GZIP_DEFAULT_LEVEL = 4  # what h5py writes when no level is given


def _options_differ(
    dset: Any, compression: str | None, compression_opts: CompressionOpts, shuffle: bool, dtype: Any
) -> str | None:
    """How a written dataset's dtype (the precision) or filters differ from the asked options (None: they match)."""
    if dset.dtype != dtype:
        return f"{dset.name} stored as {dset.dtype}, not {dtype} (another precision)"
    if 0 in dset.shape:
        return None  # empty tensors are stored contiguous whatever the options
    if dset.compression != compression:
        return f"compression {dset.compression or COMPRESSION_NONE}, not {compression or COMPRESSION_NONE}"
    if compression is None:
        return None
    if compression == "gzip" and dset.compression_opts != (
        GZIP_DEFAULT_LEVEL if compression_opts is None else compression_opts
    ):
        return f"gzip level {dset.compression_opts}"
    if bool(dset.shuffle) != shuffle:
        return f"shuffle {'on' if dset.shuffle else 'off'}"
    return None


def why_convert(
    dataset_dir: Path,
    output: Path,
    layout: str,
    compression: str | None,
    compression_opts: CompressionOpts,
    shuffle: bool,
    piece_bytes: int,
    precision: str = PRECISION_FLOAT32,
) -> str | None:
    """None when ``output`` is up to date with ``dataset_dir`` and the options (the precision included); else why
    it is not."""
    h5py = require_h5py()
    differ: list[str | None] = []
    try:
        sources = PTReader(dataset_dir)
        tensors = [Column(s.h5_path, sources.shape(s.name), stored_dtype(s.name, precision), "") for s in TENSORS]
        if layout == LAYOUT_SINGLE:
            if not output.is_file():
                return f"{output} does not exist"
            with h5py.File(output, "r", locking=False) as f:
                recorded = json_attr(f, ATTR_FINGERPRINT, output)
                differ = [
                    _options_differ(f[c.h5_path], compression, compression_opts, shuffle, c.dtype) for c in tensors
                ]
        else:
            if not (output / MANIFEST).is_file():
                return f"{output / MANIFEST} does not exist"
            manifest = read_manifest(output)
            recorded = manifest["source_fingerprint"]
            if manifest["compression"] != (compression or COMPRESSION_NONE):
                return f"{output} has compression {manifest['compression']}"
            shards = {t["h5_path"]: t["shards"] for t in manifest["tensors"]}
            for c in tensors:
                ranges = [(s["start"], s["stop"]) for s in shards.get(c.h5_path, [])]
                if ranges != piece_ranges(c, piece_bytes):
                    return f"{output}: {c.h5_path} is cut into other shards than the asked piece size cuts"
                with h5py.File(output / shards[c.h5_path][0]["file"], "r", locking=False) as f:
                    differ.append(_options_differ(f[c.h5_path], compression, compression_opts, shuffle, c.dtype))
    except (OSError, KeyError, DatasetFormatError, DatasetNotFoundError) as exc:
        return f"{output} or its sources are unreadable or incomplete ({type(exc).__name__}: {exc})"
    if any(differ):
        return f"{output} has {next(d for d in differ if d)}"
    if not isinstance(recorded, dict):
        return f"{output} records no fingerprint of its sources"
    present = [p for p in sources.files() if p.is_file()]
    gone = sorted(set(recorded) - {p.name for p in present})
    changed = changed_files(dataset_dir, recorded, present) + gone
    return f"changed since {output} was written: {', '.join(changed)}" if changed else None
