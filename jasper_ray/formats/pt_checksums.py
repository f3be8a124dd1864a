"""The PT checksum sidecar: per-block digests of each PT tensor's rows, so first-touch reads cover PT files.

NOTE [PT checksum sidecar]
Upstream's layout records no checksums. ``pt_checksums.json`` beside the PT files
(written by ``synth``, or by ``jasper-ray checksum DIR`` for any PT dataset)
records, per tensor file: its identity (the file's size and a digest of its zip
directory, which lists every record with its CRC-32, so a file saved again with
other values has another identity), the tensor's shape and dtype, and the
xxh3-128 of each checksum block of its rows (``checksum.block_rows``: the same
blocks as an HDF5 file's, NOTE [fast block digests]), and whether every value
was finite. The PT reader checks a tensor's blocks on first touch when the
sidecar's identity matches the file; a file whose identity differs (saved again
since: a rebuilt dataset) is read with its float values checked only, with a
warning that says how to record it again. What is never covered: keyword ids
and splits (validated at open), legacy (non-zip) torch files, and a byte
changed inside the zip directory itself (the identity then differs: the warning
says so). The sidecar is input like any file: a malformed one is refused
(``DatasetFormatError`` naming the field), never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_output
from ..errors import DatasetFormatError
from ..schema import PT_CHECKSUMS, TENSOR
from .arrays import RowArray, will_need
from .checksum import FAST_DIGEST_SIZE, BlockHasher, block_rows, row_nbytes

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "jasper_ray.pt_checksums"
SIDECAR_VERSION = 1
HEX = frozenset("0123456789abcdef")


def file_identity(path: Path) -> str | None:
    """Size and zip directory (each record's name, CRC-32, size) of a torch file, hashed; None where it is
    not a zip (legacy torch files)."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = [(i.filename, i.CRC, i.file_size, i.header_offset) for i in archive.infolist()]
    except (OSError, zipfile.BadZipFile):
        return None
    body = json.dumps([path.stat().st_size, records]).encode()
    return hashlib.sha256(body).hexdigest()


@dataclass(frozen=True)
class TensorRecord:
    """One tensor file as the sidecar records it."""

    file: str
    identity: str
    shape: tuple[int, ...]
    dtype: str
    block_rows: int
    fast: list[bytes]
    all_finite: bool


def record_pt_checksums(directory: Path, arrays: Mapping[str, RowArray]) -> Path:
    """Record ``arrays`` (the PT tensors of ``directory`` by name, mapped: ``pt.write_pt_checksums``), hashed
    block by block, in the sidecar, published atomically; return its path."""
    tensors: dict[str, Any] = {}
    for name, rows in arrays.items():
        spec = TENSOR[name]
        path = directory / spec.pt_file
        identity = file_identity(path)
        if identity is None:
            log.warning("%s is not a zip torch file: the checksum sidecar cannot cover it", path)
            continue
        shape = tuple(int(x) for x in rows.shape)
        step = block_rows(shape, rows.dtype.itemsize)
        hasher = BlockHasher(step, row_nbytes(shape, rows.dtype), sha256=False)
        for a in range(0, shape[0], step):
            will_need(rows, a, a + step)
            hasher.update(np.asarray(rows[a : a + step]))
        digests = hasher.finish()
        tensors[spec.name] = {
            "file": spec.pt_file,
            "identity": identity,
            "shape": list(shape),
            "dtype": rows.dtype.str,
            "block_rows": step,
            "xxh3_128": [d.hex() for d in digests.fast],
            "all_finite": bool(digests.finite),
        }
        if file_identity(path) != identity:
            raise OSError(f"{path} changed while its checksums were recorded; run again")
    out = directory / PT_CHECKSUMS
    with atomic_output(out) as temp:
        temp.write_text(json.dumps({"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "tensors": tensors}))
    return out


def read_pt_checksums(directory: Path) -> dict[str, TensorRecord] | None:
    """The sidecar's records by tensor name (None: there is none); ``DatasetFormatError`` naming the field
    where it is malformed."""
    path = directory / PT_CHECKSUMS
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise _malformed(path, f"unreadable JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != SIDECAR_FORMAT:
        raise _malformed(path, f"'format' is not {SIDECAR_FORMAT!r}")
    if doc.get("version") != SIDECAR_VERSION:
        raise _malformed(path, f"'version' {doc.get('version')!r}, this reader knows {SIDECAR_VERSION}")
    tensors = doc.get("tensors")
    if not isinstance(tensors, dict):
        raise _malformed(path, "'tensors' is not an object")
    return {name: _record(path, name, entry) for name, entry in tensors.items()}


def _record(path: Path, name: object, entry: object) -> TensorRecord:
    if name not in TENSOR:
        raise _malformed(path, f"unknown tensor {name!r}")
    where = f"tensor {name!r}"
    if not isinstance(entry, dict):
        raise _malformed(path, f"{where} is not an object")
    shape, rows, digests = entry.get("shape"), entry.get("block_rows"), entry.get("xxh3_128")
    if not isinstance(shape, list) or not shape or not all(isinstance(x, int) and x >= 0 for x in shape):
        raise _malformed(path, f"{where}: 'shape' {shape!r} is not a list of sizes")
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
        raise _malformed(path, f"{where}: 'block_rows' {rows!r} is not a positive integer")
    blocks = -(-shape[0] // rows)
    if (
        not isinstance(digests, list)
        or len(digests) != blocks
        or not all(isinstance(d, str) and len(d) == 2 * FAST_DIGEST_SIZE and set(d) <= HEX for d in digests)
    ):
        raise _malformed(path, f"{where}: 'xxh3_128' is not a list of {blocks} hex digests of {FAST_DIGEST_SIZE} bytes")
    fields = {k: entry.get(k) for k in ("file", "identity", "dtype")}
    if not all(isinstance(v, str) for v in fields.values()) or fields["file"] != TENSOR[str(name)].pt_file:
        expected = TENSOR[str(name)].pt_file
        raise _malformed(path, f"{where}: 'file', 'identity' or 'dtype' missing, or 'file' is not {expected!r}")
    if not isinstance(entry.get("all_finite"), bool):
        raise _malformed(path, f"{where}: 'all_finite' is not true or false")
    return TensorRecord(
        str(fields["file"]),
        str(fields["identity"]),
        tuple(shape),
        str(fields["dtype"]),
        rows,
        [bytes.fromhex(d) for d in digests],
        entry["all_finite"],
    )


def _malformed(path: Path, what: str) -> DatasetFormatError:
    return DatasetFormatError(
        f"{path}: not a valid PT checksum sidecar: {what}. Delete it, or record the PT files as they are now "
        "with `jasper-ray checksum DIR`."
    )
