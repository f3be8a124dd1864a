"""PT sources in object storage read by the tasks themselves, and sharded outputs written there by them.

Sources (NOTE [ranged sources]): a torch file is a zip archive whose records
are stored uncompressed, so a tensor's rows are one byte range of its object
(``formats.pt.zip_records``). The driver fetches each tensor object's head and
tail (its small records and the zip directory) into a sparse local *skeleton*
of the same size, which opens as a PT dataset for the plan (shapes, dtypes,
config; keyword ids and splits are fetched whole); the tensors' data stay holes
there, never read. Each task reads the rows of its piece with ranged GETs
(``RangedRows``); keyword ids and splits are fetched whole by the tasks that
convert them. The sources' fingerprint is the objects' identities (size, ETag,
modification time): an object replaced since gives another plan.

NOTE [mapped sources]: local PT files are read the same way, without torch in
the tasks. The driver, which opened every file with torch's safe loader for
the plan, records where each tensor's and split's data record lies
(``local_ranges``) and the file's size and modification time; a task maps that
byte range (``ranged_rows``: ``np.memmap``) after checking the file is still
the one planned. Importing torch cost each Ray worker ~0.8 s of CPU on its
first piece and ~130 MB of owned memory for as long as it lived; the pieces
need none of it. A tensor that is not its whole storage (a view saved as
such), or a file with several storages or another byte order, keeps the old
way: the task opens the file with torch.

Outputs (NOTE [pieces in the bucket]): for the sharded layout each task uploads
the shard it made, then a record of it (plan key, block digests) under a hidden
prefix beside the output; the driver deletes the old manifest before the first
shard and uploads the new one last, so a reader sees the whole dataset or none.
A re-run reuses a shard whose record is of this plan and whose rows, fetched
back, hash to the recorded digests. A single ``dataset.h5`` is assembled by the
driver in its cache and uploaded whole (``remote.staged_output``): an object
cannot be written at offsets by several writers, and a multipart upload whose
parts are the pieces would need each piece's final bytes and offset before
assembly (pyarrow exposes no part uploads either); for a cluster whose nodes
share no filesystem, the sharded layout is the one the tasks write.

Validation is split as the serving readers split it: the driver validates the
dataset through ranged reads of the ids and pair scores (``RangedPTReader``:
``validate_dataset`` without the float tables, ~2% of the bytes), and each
task checks the float-table rows it writes, as for local files (NOTE [floats
checked as written] in ``validate``); errors name the objects. No Ray here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..atomic import atomic_output
from ..errors import DatasetFormatError, DatasetNotFoundError
from ..formats.arrays import RowArray
from ..formats.base import Reader
from ..formats.checksum import row_nbytes
from ..formats.columns import KEYWORD_SOURCE, SPLIT_SOURCE, TENSOR_SOURCE, Column
from ..formats.pt import PTReader, load_pt_tensor, zip_records
from ..schema import CONFIG_FILE, KEYWORD_IDS, PT_SUFFIX, TENSORS, split_pt_file, work_dir_name
from ..storage import Location, NodeCache, download, remote_identity
from ..storage.fetch import RemoteFile, listing, read_object, read_range, upload_file, write_object

log = logging.getLogger(__name__)

SKELETON_DIR = "sources"  # in the node cache: one skeleton per source URI
WINDOW_BYTES = 1 << 20  # of each tensor object, fetched from its start and its end
RECORD_SUFFIX = ".done"


# --- sources -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RangedTensor:
    """A tensor's rows in a remote PT object: its data record starts at byte ``offset``, C-ordered."""

    location: Location
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype
    identity: tuple[int, int] | None = None  # a local file's (size, mtime_ns) when planned (NOTE [mapped sources])


class RangedRows:
    """A ``RowArray`` over a ``RangedTensor``: ``rows[a:b]`` is one ranged GET of exactly those rows."""

    def __init__(self, tensor: RangedTensor):
        self.tensor = tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return self.tensor.shape

    @property
    def dtype(self) -> np.dtype:
        return self.tensor.dtype

    def __len__(self) -> int:
        return self.tensor.shape[0]

    def __getitem__(self, rows: Any) -> np.ndarray:
        if not isinstance(rows, slice):
            raise TypeError(f"{self.tensor.location.uri}: ranged rows are read by slices, got {type(rows).__name__}")
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError(f"{self.tensor.location.uri}: ranged rows are read by contiguous slices")
        row_bytes = row_nbytes(self.shape, self.dtype)
        first = self.tensor.offset + start * row_bytes
        data = read_range(self.tensor.location, first, max(0, stop - start) * row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape((-1, *self.shape[1:]))


class RangedPTReader(PTReader):
    """A remote PT directory's skeleton whose tensors read by byte ranges from the objects: what the driver
    plans and validates from (the ids and pair scores, ~2% of the bytes; the float tables are the tasks')."""

    def __init__(self, directory: Path, ranged: dict[str, RangedTensor]):
        super().__init__(directory, use_mmap=True)
        self.ranged = ranged

    def _load_array(self, name: str) -> RowArray:  # type: ignore[override]  # any RowArray (base.Reader)
        found = self.ranged.get(f"{TENSOR_SOURCE}:{name}")
        return RangedRows(found) if found is not None else super()._load_array(name)

    def location(self, name: str) -> str:
        found = self.ranged.get(f"{TENSOR_SOURCE}:{name}")
        return found.location.uri if found is not None else super().location(name)


@dataclass
class RemoteSource:
    """A remote PT directory, prepared for a conversion: a local skeleton to plan from, the tensors' ranges."""

    location: Location
    local_dir: Path
    ranged: dict[str, RangedTensor]  # by column source ("tensor:<name>")
    fingerprint: dict[str, Any]

    def reader(self) -> RangedPTReader:
        return RangedPTReader(self.local_dir, self.ranged)


def source_file(column: Column) -> str:
    """The PT file a column's rows come from."""
    if column.source_kind == TENSOR_SOURCE:
        return next(s.pt_file for s in TENSORS if s.name == column.source_name)
    if column.source_kind == SPLIT_SOURCE:
        return split_pt_file(column.source_name)
    assert column.source_kind == KEYWORD_SOURCE
    return KEYWORD_IDS.pt_file


def _fetch_whole(location: Location, path: Path) -> None:
    identity = remote_identity(location)
    part = download(location, path.with_name(path.name + ".part"), identity.size, identity.as_dict())
    os.replace(part, path)


def _skeleton_file(location: Location, size: int, path: Path) -> tuple[int, int]:
    """``path``: a sparse copy of the torch object at ``location`` holding every record but its tensor data;
    returns where that data lies in the object (offset, bytes)."""
    head = read_range(location, 0, min(WINDOW_BYTES, size))
    tail_at = max(len(head), size - WINDOW_BYTES)
    windows = {0: head, tail_at: read_range(location, tail_at, size - tail_at)}
    remote = RemoteFile(location, size, windows)
    records = zip_records(remote, location.uri)  # type: ignore[arg-type]
    found, why = storage_extent(remote, records)  # type: ignore[arg-type]
    if found is None:
        raise DatasetFormatError(f"{location.uri}: {why}; expected one storage, little-endian, read by byte ranges")
    offset, nbytes = found
    with atomic_output(path) as temp:
        with open(temp, "wb") as f:
            f.truncate(size)
            for at, chunk in windows.items():
                f.seek(at)
                f.write(chunk)
            for name, (at, n) in records.items():  # small records outside both windows (not torch's layout)
                fetched = any(w <= at and at + n <= w + len(c) for w, c in windows.items())
                if not name.startswith("data/") and not fetched:
                    f.seek(at)
                    f.write(read_range(location, at, n))
    return offset, nbytes


def prepare_source(location: Location, cache_dir: str | os.PathLike | None) -> RemoteSource:
    """The skeleton of the remote PT directory ``location`` in this node's cache, and its tensors' ranges."""
    local = NodeCache.at(cache_dir).root / SKELETON_DIR / hashlib.sha256(location.uri.encode()).hexdigest()[:16]
    local.mkdir(parents=True, exist_ok=True)
    names = sorted(n for n in listing(location) if n == CONFIG_FILE or n.endswith(PT_SUFFIX))
    if CONFIG_FILE not in names:
        raise DatasetNotFoundError(f"{location.uri}: no {CONFIG_FILE} there (found {names or 'nothing'})")
    tensor_of = {s.pt_file: s.name for s in TENSORS}
    _fetch_whole(location.child(CONFIG_FILE), local / CONFIG_FILE)
    fingerprint: dict[str, Any] = {}
    ranged: dict[str, RangedTensor] = {}
    for name in names:
        where = location.child(name)
        identity = remote_identity(where)
        fingerprint[name] = identity.as_dict()
        if name == CONFIG_FILE:
            continue
        if name not in tensor_of:
            _fetch_whole(where, local / name)
            continue
        offset, nbytes = _skeleton_file(where, identity.size, local / name)
        array = load_pt_tensor(local / name, mmap=True)  # the holes are mapped, never read
        if not whole_storage(array, nbytes):
            raise DatasetFormatError(
                f"{where.uri}: the tensor is a view ({array.nbytes} of its storage's {nbytes} bytes, or strided); "
                "save it with torch.save(t.contiguous().clone(), path)"
            )
        tensor = tensor_of[name]
        ranged[f"{TENSOR_SOURCE}:{tensor}"] = RangedTensor(where, offset, tuple(array.shape), array.dtype)
    return RemoteSource(location, local, ranged, fingerprint)


def storage_extent(f: IO[bytes], records: dict[str, tuple[int, int]]) -> tuple[tuple[int, int] | None, str]:
    """(offset, bytes) of the one tensor storage of torch file ``f`` (its ``zip_records``) when its bytes are
    the values as this machine reads them (little-endian), else None and why."""
    data = [extent for name, extent in records.items() if name.startswith("data/")]
    order = b"little"  # files written before torch recorded the byte order are little-endian
    if "byteorder" in records:
        at, n = records["byteorder"]
        f.seek(at)
        order = f.read(n)
    if len(data) != 1:
        return None, f"{len(data)} tensor storages"
    if order != b"little" or sys.byteorder != "little":
        return None, f"stored {order.decode(errors='replace')}-endian, read on a {sys.byteorder}-endian machine"
    return data[0], ""


def whole_storage(array: RowArray, nbytes: int) -> bool:
    """The array is all ``nbytes`` of its storage, in C order: its rows are one byte range of the file."""
    return isinstance(array, np.ndarray) and array.flags.c_contiguous and array.nbytes == nbytes


def local_ranges(directory: Path, reader: Reader, columns: list[Column]) -> dict[str, RangedTensor]:
    """Where the tensors' and splits' rows lie in the PT files of ``directory`` (``reader``'s), by column source
    (NOTE [mapped sources]); those the tasks cannot map are left out."""
    found: dict[str, RangedTensor] = {}
    for column in columns:
        if column.source_kind == KEYWORD_SOURCE or column.source in found:
            continue
        path = directory / source_file(column)
        array = column.rows(reader)
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            extent, _ = storage_extent(f, zip_records(f, str(path)))
        if extent is not None and whole_storage(array, extent[1]):
            where = Location(str(path), str(path))
            identity = (stat.st_size, stat.st_mtime_ns)
            found[column.source] = RangedTensor(where, extent[0], tuple(array.shape), array.dtype, identity)
    return found


def ranged_rows(tensor: RangedTensor) -> RowArray:
    """A tensor's rows by their byte range: a local file mapped (after checking it is the file planned), or
    ranged GETs of an object."""
    if tensor.location.is_remote:
        return RangedRows(tensor)
    path = tensor.location.local_path
    stat = path.stat()
    if (stat.st_size, stat.st_mtime_ns) != tensor.identity:
        raise DatasetFormatError(
            f"{path}: changed since this conversion was planned (size {stat.st_size} bytes, modified "
            f"{stat.st_mtime_ns} ns; planned: {tensor.identity}). Convert again once the files stay as they are."
        )
    if 0 in tensor.shape:
        return np.empty(tensor.shape, tensor.dtype)
    return np.memmap(path, dtype=tensor.dtype, mode="r", offset=tensor.offset, shape=tensor.shape)


@contextlib.contextmanager
def remote_rows(source: Location, column: Column) -> Iterator[RowArray]:
    """The rows of ``column`` from the remote PT directory ``source``, its file fetched whole here."""
    with tempfile.TemporaryDirectory(prefix="jasper-source-") as tmp:
        for name in (CONFIG_FILE, source_file(column)):
            _fetch_whole(source.child(name), Path(tmp) / name)
        with PTReader(tmp, use_mmap=True) as reader:  # only these files: no detection
            yield column.rows(reader)


# --- outputs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteOutput:
    """Where a task uploads its shard (``target``: the sharded layout's directory) and its record."""

    target: Location
    records: Location
    plan_key: str

    @classmethod
    def beside(cls, target: Location, plan_key: str) -> RemoteOutput:
        """Records under a hidden prefix beside ``target`` (``.dataset.shards.work/``): never a reader's."""
        return cls(target, target.parent().child(work_dir_name(target.name())), plan_key)

    def record(self, piece_id: str) -> Location:
        return self.records.child(f"{piece_id}{RECORD_SUFFIX}")


def recorded_piece(out: RemoteOutput, piece_id: str, file_name: str, path: Path) -> list[str] | None:
    """The digests recorded for a shard of this plan already in the bucket, its bytes fetched to ``path``;
    None when there is none (or its record is of another plan). The caller checks the rows against them."""
    raw = read_object(out.record(piece_id))
    if raw is None:
        return None
    record = json.loads(raw)
    if record.get("plan") != out.plan_key:
        return None
    where = out.target.child(file_name)
    try:
        identity = remote_identity(where)
    except DatasetNotFoundError:
        return None
    download(where, path, identity.size, identity.as_dict())
    return list(record["digests"])


def upload_piece(out: RemoteOutput, piece_id: str, path: Path, digests: list[str]) -> None:
    """The shard, then its record: a record names only a shard that is whole in the bucket."""
    upload_file(path, out.target.child(path.name))
    write_object(out.record(piece_id), json.dumps({"plan": out.plan_key, "digests": digests}).encode())
