"""The sharded layout's ``manifest.json``: its fields, spelled once, and the checks that it is whole.

The manifest's fields are the fields of ``Manifest``, ``ManifestTensor`` and
``ManifestShard``: the conversion that publishes the layout builds these, the
reader parses them. Every shard file it names must lie inside the shards
directory; its shards must cover each tensor's rows in order.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..atomic import atomic_output
from ..errors import DatasetFormatError
from ..schema import FORMAT_VERSION, LAYOUT_SHARDED, MANIFEST, PRECISION_FLOAT32
from .checksum import FAST_DIGEST_SIZE
from .hdf5 import check_format_version


@dataclass(frozen=True)
class ManifestShard:
    """Rows ``start:stop`` of a tensor, in ``file`` (``bytes`` long, ``checksum`` over those rows), the
    xxh3-128 of each of its checksum blocks, hex, and whether all its values are finite (NOTE [fast block
    digests]; both absent from earlier versions)."""

    file: str
    start: int
    stop: int
    bytes: int
    checksum: str
    block_xxh3_128: list[str] | None = None
    all_finite: bool | None = None


@dataclass(frozen=True)
class ManifestTensor:
    """One tensor (an HDF5 path) and its shards, in row order."""

    h5_path: str
    shape: list[int]
    dtype: str
    checksum: str
    checksum_block_rows: int
    shards: list[ManifestShard]


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """manifest.json: the layout's truth. Fields in the order of the file."""

    format_version: int = FORMAT_VERSION
    layout: str = LAYOUT_SHARDED
    compression: str
    config: dict[str, Any]
    source_fingerprint: dict[str, Any] | None
    tensors: list[ManifestTensor]
    # The reducible tensors' storage precision (NOTE [16-bit storage] in ``precision``); absent before it.
    precision: str = PRECISION_FLOAT32

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Manifest:
        """Raises KeyError or TypeError where a field is missing or malformed."""
        tensors = []
        for t in obj["tensors"]:
            shards = [ManifestShard(**_fields_of(ManifestShard, s)) for s in t["shards"]]
            tensors.append(ManifestTensor(**{**_fields_of(ManifestTensor, t), "shards": shards}))
        return cls(**{**_fields_of(cls, obj), "tensors": tensors})


def _fields_of(cls: type, obj: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``obj`` that are fields of ``cls`` (a missing one fails the construction)."""
    return {f.name: obj[f.name] for f in fields(cls) if f.name in obj}


def read_manifest(shards_dir: Path) -> dict[str, Any]:
    """The manifest as JSON (what ``ShardedHDF5Reader.manifest`` returns), checked to parse."""
    path = shards_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetFormatError(f"{path}: unreadable shard manifest ({exc})") from exc
    try:
        if manifest.get("layout") != LAYOUT_SHARDED:
            raise ValueError(f"layout is not {LAYOUT_SHARDED!r}")
        layout = Manifest.from_json(manifest)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        missing = f"the field {exc} is missing" if isinstance(exc, KeyError) else str(exc)
        raise DatasetFormatError(
            f"{path}: not a jasper_ray shard manifest ({missing}). "
            "Reconvert with `jasper-ray convert --layout sharded`."
        ) from exc
    check_format_version(path, layout.format_version)
    for tensor in layout.tensors:
        _check_rows(path, tensor)
    return manifest


def _check_rows(path: Path, tensor: ManifestTensor) -> None:
    """A tensor's shards cover rows 0..shape[0] in order, each file named inside the shards directory."""
    at = 0
    for i, shard in enumerate(tensor.shards):
        where = f"{path}: tensor {tensor.h5_path!r} shard {i}"
        if not isinstance(shard.file, str) or Path(shard.file).is_absolute() or ".." in Path(shard.file).parts:
            raise DatasetFormatError(
                f"{where}: file {shard.file!r} is not a plain name inside {path.parent}; every shard file must "
                "lie in the shards directory (absolute paths and '..' are refused)"
            )
        if not all(isinstance(x, int) for x in (shard.start, shard.stop, shard.bytes)) or shard.start != at:
            raise DatasetFormatError(f"{where}: rows {shard.start!r}:{shard.stop!r}, expected integer rows from {at}")
        at = shard.stop
        _check_fast_digests(where, shard, tensor.checksum_block_rows)
    if not isinstance(tensor.shape, list) or not tensor.shape or at != tensor.shape[0]:
        raise DatasetFormatError(f"{path}: tensor {tensor.h5_path!r}: shards cover {at} rows, shape is {tensor.shape}")


def _check_fast_digests(where: str, shard: ManifestShard, block_rows: object) -> None:
    """A shard's fast digests, where recorded: one hex xxh3-128 per checksum block of its rows."""
    if shard.all_finite not in (None, True, False):
        raise DatasetFormatError(f"{where}: all_finite {shard.all_finite!r}, expected true, false or null")
    found = shard.block_xxh3_128
    if found is None:
        return
    if not isinstance(block_rows, int) or block_rows < 1:
        raise DatasetFormatError(f"{where}: checksum_block_rows {block_rows!r}, expected a positive integer")
    blocks = -(-(shard.stop - shard.start) // block_rows)
    hex_digits = set("0123456789abcdef")
    if (
        not isinstance(found, list)
        or len(found) != blocks
        or not all(isinstance(d, str) and len(d) == 2 * FAST_DIGEST_SIZE and set(d) <= hex_digits for d in found)
    ):
        raise DatasetFormatError(
            f"{where}: block_xxh3_128 is not a list of {blocks} hex digests of {FAST_DIGEST_SIZE} bytes "
            f"(one per {block_rows} rows); reconvert with `jasper-ray convert --layout sharded --force`"
        )


def write_manifest(shards_dir: Path, manifest: Manifest) -> None:
    """Publish ``manifest.json`` in ``shards_dir`` atomically."""
    with atomic_output(shards_dir / MANIFEST) as temp:
        temp.write_text(manifest.to_json())
