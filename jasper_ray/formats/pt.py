"""Upstream's per-tensor ``.pt`` layout: reader and writer.

Every load is ``torch.load(weights_only=True)``: dataset files are untrusted,
and upstream's pickled ``pair_keyword_ids.pt`` (a list of lists of ints) loads
under it too. With ``use_mmap`` the tensors are mapped, not read. The writer
writes upstream's exact bytes (what its builder writes and its loader reads).
torch is imported on first use: HDF5 readers (and the Ray workers serving them)
start without it.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import pickle
import shutil
import struct
import types
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

from ..atomic import atomic_output, publish, remove_orphan_temps, temp_path_for
from ..errors import ChecksumError, DatasetFormatError, DatasetNotFoundError
from ..schema import (
    CONFIG_FILE,
    KEYWORD_IDS,
    PT_CHECKSUMS,
    PT_FILES,
    SPLIT_DTYPE,
    SPLIT_PT_GLOB,
    TENSOR,
    TENSORS,
    split_from_pt_file,
    split_pt_file,
)
from .arrays import RowArray, advise_huge_pages
from .base import Reader, Writer
from .pt_checksums import TensorRecord, file_identity, read_pt_checksums, record_pt_checksums
from .verified import TouchGuard, Unit, block_units

log = logging.getLogger(__name__)

REBUILD = "Restore the file, or write the dataset again (a file rewritten while it was read is cut short)."


def load_pt(path: Path, *, mmap: bool) -> Any:
    """``torch.load`` with weights_only, and errors that name the file."""
    import torch  # lazy: only PT data needs torch; HDF5 readers (and the Ray workers serving them) start without it

    if not path.is_file():
        raise DatasetNotFoundError(f"Required tensor file not found: {path}")
    if path.stat().st_size == 0:
        raise DatasetFormatError(f"{path}: empty file (0 bytes): the write that made it never finished. {REBUILD}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (EOFError, OSError) as exc:
        raise DatasetFormatError(
            f"{path}: truncated or damaged torch file ({type(exc).__name__}: {exc}). {REBUILD}"
        ) from exc
    except pickle.UnpicklingError as exc:
        raise DatasetFormatError(
            f"{path}: refused to load: it holds objects other than tensors and plain containers "
            f"(loaded with weights_only=True; jasper_ray never unpickles arbitrary objects). {exc}"
        ) from exc
    except RuntimeError as exc:
        if "central directory" in str(exc) or "zip archive" in str(exc):
            raise DatasetFormatError(f"{path}: truncated or damaged torch file ({str(exc)[:120]}). {REBUILD}") from exc
        if mmap and "mmap" in str(exc).lower():
            # Pre-1.6 (non-zip) torch.save files cannot be mapped.
            log.warning("%s cannot be memory-mapped (legacy format); loading it whole", path)
            return load_pt(path, mmap=False)
        raise DatasetFormatError(f"{path}: not a readable torch file ({exc})") from exc


def zip_records(f: IO[bytes], where: str) -> dict[str, tuple[int, int]]:
    """Where each record of a torch file (a zip archive, ``f`` seekable) lies: its name inside the archive's folder
    (``data.pkl``, ``data/0``, ...) -> (byte offset of its data, bytes). torch stores records uncompressed, so a
    saved tensor's rows are one byte range of the file: what a reader of object storage fetches."""
    records = {}
    try:
        with zipfile.ZipFile(f) as archive:
            for info in archive.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    raise DatasetFormatError(f"{where}: record {info.filename} is compressed; torch stores them as is")
                f.seek(info.header_offset)
                header = f.read(30)
                if header[:4] != b"PK\x03\x04":
                    raise DatasetFormatError(f"{where}: no zip header at byte {info.header_offset} ({info.filename})")
                name_len, extra_len = struct.unpack("<HH", header[26:30])
                data_at = info.header_offset + 30 + name_len + extra_len
                records[info.filename.split("/", 1)[-1]] = (data_at, info.file_size)
    except zipfile.BadZipFile as exc:
        raise DatasetFormatError(f"{where}: not a torch zip file ({exc}). {REBUILD}") from exc
    return records


def load_pt_tensor(path: Path, *, mmap: bool) -> np.ndarray:
    import torch  # lazy: only PT data needs torch

    obj = load_pt(path, mmap=mmap)
    if not isinstance(obj, torch.Tensor):
        raise DatasetFormatError(f"{path}: expected a tensor, found {type(obj).__name__}")
    if obj.layout != torch.strided:
        raise DatasetFormatError(
            f"{path}: a {obj.layout} tensor; expected a dense tensor. Save it with torch.save(t.to_dense(), path)."
        )
    try:
        array = obj.detach().cpu().numpy()
    except TypeError as exc:  # bfloat16 and other dtypes numpy lacks
        raise DatasetFormatError(
            f"{path}: dtype {obj.dtype} has no numpy equivalent; the schema stores float32 (embeddings, steering, "
            "relevance, distances) and int64 (ids, tiers). Save it with torch.save(t.float(), path) (or .long())."
        ) from exc
    if mmap:  # the dataset: the PT files beside this one
        advise_huge_pages(array, sum(p.stat().st_size for p in path.parent.glob("*.pt")))
    return array


def keyword_lists_to_csr(obj: object, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Upstream's ``List[List[int]]`` as CSR, checking each entry is a list of ints."""
    import torch  # lazy: only PT data needs torch

    if isinstance(obj, torch.Tensor) and obj.ndim == 2:  # a dense [P, k] tensor is a valid ragged list too
        obj = obj.tolist()
    if not isinstance(obj, (list, tuple)):
        raise DatasetFormatError(f"{where}: expected a list of lists of keyword ids, found {type(obj).__name__}")
    lengths = np.empty(len(obj) + 1, dtype=np.int64)
    lengths[0] = 0
    for p, ids in enumerate(obj):
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if not isinstance(ids, (list, tuple)):
            raise DatasetFormatError(
                f"{where} at position {p}: expected a list of keyword ids, found {type(ids).__name__}"
            )
        lengths[p + 1] = len(ids)
    offsets = np.cumsum(lengths)
    values = np.empty(int(offsets[-1]), dtype=KEYWORD_IDS.dtype)
    for p, ids in enumerate(obj):
        if len(ids):
            try:
                values[offsets[p] : offsets[p + 1]] = ids
            except (TypeError, ValueError, OverflowError) as exc:
                raise DatasetFormatError(
                    f"{where} at position {p}: expected integer keyword ids, found {ids!r:.80}"
                ) from exc
    return values, offsets


class PTReader(Reader):
    storage_format = "pt"

    def __init__(self, directory: str | os.PathLike, *, use_mmap: bool = True):
        super().__init__(directory, use_mmap=use_mmap)
        self._keywords: tuple[np.ndarray, np.ndarray] | None = None
        self._sidecar: tuple[dict[str, TensorRecord] | None] | None = None

    _process_local = ("_keywords", "_sidecar")

    def location(self, name: str) -> str:
        return str(self.directory / TENSOR[name].pt_file)

    def location_keywords(self) -> str:
        return str(self.directory / KEYWORD_IDS.pt_file)

    def location_split(self, split: str) -> str:
        return str(self.directory / split_pt_file(split))

    def has_tensor(self, name: str) -> bool:
        return (self.directory / TENSOR[name].pt_file).is_file()

    def _load_array(self, name: str) -> np.ndarray:
        return load_pt_tensor(self.directory / TENSOR[name].pt_file, mmap=self.use_mmap)

    def split_names(self) -> tuple[str, ...]:
        names = (split_from_pt_file(p.name) for p in self.directory.glob(SPLIT_PT_GLOB))
        return tuple(sorted(n for n in names if n))

    def _load_split(self, split: str) -> np.ndarray:
        return load_pt_tensor(self.directory / split_pt_file(split), mmap=False)

    def keyword_csr(self) -> tuple[np.ndarray, np.ndarray]:
        self._ensure_open()
        if self._keywords is None:
            path = self.directory / KEYWORD_IDS.pt_file
            # Unpickling one list per pair runs the cyclic collector over all of them again and again; lists of
            # ints hold no cycles. 148,570 pairs: 1.10 s with it, 0.75 s with it paused.
            collecting = gc.isenabled()
            gc.disable()
            try:
                self._keywords = keyword_lists_to_csr(load_pt(path, mmap=False), str(path))
            finally:
                if collecting:
                    gc.enable()
        return self._keywords

    def files(self) -> list[Path]:
        return [self.directory / f for f in PT_FILES] + [self.directory / split_pt_file(s) for s in self.split_names()]

    def _units(self, name: str) -> list[Unit] | None:
        """The sidecar's blocks of tensor ``name`` where it describes the file as it is now (NOTE [PT checksum
        sidecar] in pt_checksums), else none (float values are checked only)."""
        self._ensure_open()
        if self._sidecar is None:
            self._sidecar = (read_pt_checksums(self.directory),)
        record = (self._sidecar[0] or {}).get(name)
        if record is None:
            return None
        arr, path = self.array(name), self.directory / record.file
        if file_identity(path) != record.identity or (tuple(arr.shape), arr.dtype.str) != (record.shape, record.dtype):
            log.warning(
                "%s: %s does not describe this file (saved again since it was recorded): only its float values are "
                "checked. Record it as it is now with `jasper-ray checksum %s`.",
                path, PT_CHECKSUMS, self.directory,
            )  # fmt: skip
            return None
        return block_units(arr.shape[0], record.block_rows, None, fast=record.fast, finite=record.all_finite)

    def verify_checksums(self, on_block: Callable[[int], object] | None = None) -> list[str]:
        """Every block the sidecar records for the files as they are now (``verify="open"``, ``jasper-ray
        verify``); one message per tensor whose rows do not match."""
        problems = []
        for spec in TENSORS:
            units = self._units(spec.name) if self.has_tensor(spec.name) else None
            if units:
                arr = self.array(spec.name)
                try:
                    TouchGuard(self.location(spec.name), units, False, arr[:1].nbytes).touch_range(arr, 0, arr.shape[0])
                except ChecksumError as exc:
                    problems.append(str(exc))
                if on_block is not None:
                    on_block(arr.shape[0] * arr[:1].nbytes)
        return problems

    def sidecar_tensors(self) -> int:
        """How many tensors the checksum sidecar covers as the files are now (0: none, or no sidecar)."""
        return sum(1 for s in TENSORS if self.has_tensor(s.name) and self._units(s.name))


def _save_atomic(obj: Any, path: Path, pickle_module: types.ModuleType = pickle) -> None:
    """``torch.save`` published atomically. The temp file keeps the final name inside a private
    directory: torch names the records of its zip after the file, so the bytes equal upstream's."""
    import torch  # lazy: only PT data needs torch

    remove_orphan_temps(path)
    private = temp_path_for(path)
    private.mkdir()
    try:
        torch.save(obj, private / path.name, pickle_module=pickle_module)
        publish(private / path.name, path)
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _int_op(value: int) -> bytes:
    """pickle's opcode for an int of 32 bits (what its C Pickler writes, protocol 2)."""
    if 0 <= value < 1 << 8:
        return b"K" + value.to_bytes(1, "little")
    if 0 <= value < 1 << 16:
        return b"M" + value.to_bytes(2, "little")
    return b"J" + value.to_bytes(4, "little", signed=True)


def _batched(write: Callable[[bytes], object], items: Iterator[bytes], n: int) -> None:
    """A list's items as pickle's C Pickler appends them: one APPEND, or batches of 1000 in MARK ... APPENDS."""
    if n == 1:
        write(next(items) + b"a")
        return
    for start in range(0, n, 1000):
        write(b"(")
        for _ in range(min(1000, n - start)):
            write(next(items))
        write(b"e")


class _IntListsPickler:
    """The bytes pickle writes for a ``List[List[int]]`` (protocol 2: every list memoised in order, ints
    not), made from CSR one pair at a time: ``torch.save`` of upstream's keyword ids without the lists."""

    def __init__(self, file: Any, protocol: int = 2):
        self.file = file

    def dump(self, csr: tuple[np.ndarray, np.ndarray]) -> None:
        values, offsets = csr
        write = self.file.write
        write(b"\x80\x02]q\x00")
        n = len(offsets) - 1

        def lists() -> Iterator[bytes]:
            for i in range(n):
                memo = i + 1
                head = b"]" + (b"q" + memo.to_bytes(1, "little") if memo < 256 else b"r" + memo.to_bytes(4, "little"))
                row = values[offsets[i] : offsets[i + 1]].tolist()
                if not row:
                    yield head
                    continue
                body: list[bytes] = []
                _batched(body.append, map(_int_op, row), len(row))
                yield head + b"".join(body)

        if n:
            _batched(write, lists(), n)
        write(b".")


_INT_LISTS = types.ModuleType("jasper_ray_int_lists")  # a pickle_module for torch.save
_INT_LISTS.Pickler = _IntListsPickler  # type: ignore[attr-defined]


class PTWriter(Writer):
    """Upstream's layout in ``directory``: one ``torch.save`` file per tensor, keyword ids as a pickled
    ``List[List[int]]``, ``{split}_idx.pt``, ``config.json``.

    Each file is published atomically as it is written (the layout has no single file to publish): an
    error leaves the files written before it, each whole, and never half a file.
    """

    storage_format = "pt"

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def __enter__(self) -> PTWriter:
        self.directory.mkdir(parents=True, exist_ok=True)
        return self

    def write_config(self, config: Mapping[str, Any], source_fingerprint: Mapping[str, Any] | None = None) -> None:
        """``config.json`` (PT files are sources: no fingerprint is recorded)."""
        with atomic_output(self.directory / CONFIG_FILE) as temp:
            temp.write_text(json.dumps(dict(config), indent=2))

    def write_tensor(self, name: str, rows: RowArray | torch.Tensor) -> None:
        """A tensor file, saved whole (torch.save cannot stream): the rows are read into memory."""
        import torch  # lazy: only PT data needs torch

        tensor = rows if isinstance(rows, torch.Tensor) else torch.as_tensor(np.ascontiguousarray(rows[:]))
        _save_atomic(tensor.contiguous(), self.directory / TENSOR[name].pt_file)

    def write_keyword_ids(self, values: RowArray, offsets: np.ndarray) -> None:
        """Upstream's ``List[List[int]]`` bytes, pickled straight from CSR: ~10 bytes a pair in memory,
        not the ~300 of the lists (ids beyond 32 bits go through the lists)."""
        values, offsets = np.asarray(values[:]), np.asarray(offsets)
        if values.size and (values.min() < -(1 << 31) or values.max() >= 1 << 31):
            self.write_keyword_lists([values[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])])
            return
        _save_atomic((values, offsets), self.directory / KEYWORD_IDS.pt_file, _INT_LISTS)

    def write_keyword_lists(self, keyword_ids: Sequence[Sequence[int]]) -> None:
        """Upstream's form: a plain ``List[List[int]]``."""
        _save_atomic([[int(k) for k in ids] for ids in keyword_ids], self.directory / KEYWORD_IDS.pt_file)

    def write_split(self, split: str, ids: RowArray | torch.Tensor) -> None:
        import torch  # lazy: only PT data needs torch

        _save_atomic(torch.as_tensor(np.asarray(ids[:], dtype=SPLIT_DTYPE)), self.directory / split_pt_file(split))


def write_pt_checksums(directory: str | os.PathLike) -> Path:
    """The checksum sidecar of the PT files in ``directory`` (NOTE [PT checksum sidecar] in pt_checksums)."""
    with PTReader(directory, use_mmap=True) as reader:
        arrays = {s.name: reader.array(s.name) for s in TENSORS if reader.has_tensor(s.name)}
        try:
            return record_pt_checksums(Path(directory), arrays)
        finally:
            arrays.clear()  # the mappings go with the reader


def write_pt_dataset(
    directory: str | os.PathLike,
    tensors: Mapping[str, np.ndarray | torch.Tensor],
    keyword_ids: Sequence[Sequence[int]],
    splits: Mapping[str, np.ndarray | torch.Tensor],
    config: Mapping[str, Any],
) -> Path:
    """Write a dataset in upstream's exact layout (what its builder writes and its loader reads).

    ``keyword_ids`` is saved as a plain ``List[List[int]]``, as upstream does.
    Each file is published atomically.
    """
    with PTWriter(directory) as writer:
        for name, value in tensors.items():
            writer.write_tensor(name, value)
        writer.write_keyword_lists(keyword_ids)
        for split, ids in splits.items():
            writer.write_split(split, ids)
        writer.write_config(config)
    return writer.directory
