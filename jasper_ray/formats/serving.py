"""The serving copy: an HDF5 file (or shard) with every dataset contiguous, so it memory-maps.

Compressed HDF5 is for storage: a gathered batch decodes whole chunks per row
(0.003x of a mapped file). The node-local cache turns a compressed file into
this copy once, on first use, checking every recorded checksum on the bytes it
decoded (checksums cover the logical rows, not the encoding, so the same
values hold for both). A file already contiguous is only checked.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ChecksumError
from ..schema import (
    ATTR_CHECKSUM,
    ATTR_CHECKSUM_BLOCK_ROWS,
    ATTR_COMPRESSION,
    ATTR_FAST_DIGESTS,
    ATTR_FINITE,
    COMPRESSION_NONE,
)
from .checksum import BlockDigests, BlockHasher, digests_attr, row_nbytes
from .hdf5 import open_h5, require_h5py
from .hdf5_files import file_size_bound, new_file
from .hdf5_writer import BLOCK_BYTES, MAX_BLOCK_DIGESTS


def _datasets(f: Any) -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    f.visititems(lambda name, obj: found.append((name, obj)) if hasattr(obj, "shape") else None)
    return found


def is_mappable(f: Any) -> bool:
    """Every dataset stored contiguous (no chunks, no filters): the file serves through ``np.memmap`` as it is."""
    return all(d.chunks is None for _, d in _datasets(f))


def _block_rows(dset: Any) -> int:
    return int(dset.attrs.get(ATTR_CHECKSUM_BLOCK_ROWS, max(1, dset.shape[0] if dset.shape else 1)))


def _stream(
    dset: Any, where: str, write: Callable[[int, np.ndarray], object] | None, on_bytes: Callable[[int], object] | None
) -> BlockDigests | None:
    """Read ``dset`` in whole checksum blocks, hand each to ``write``, and check the recorded checksum;
    return the block digests of the rows when there was one to check."""
    recorded = dset.attrs.get(ATTR_CHECKSUM)
    if not dset.shape:  # a scalar: nothing to check, copied whole
        if write is not None:
            write(0, dset[()])
        return None
    rows = _block_rows(dset)
    per_block = max(1, BLOCK_BYTES // max(1, rows * row_nbytes(dset.shape, dset.dtype))) * rows
    hasher = BlockHasher(rows, row_nbytes(dset.shape, dset.dtype))
    for start in range(0, dset.shape[0], per_block):
        try:
            block = dset[start : start + per_block]
        except OSError as exc:  # h5py cannot decode a damaged compressed chunk
            raise ChecksumError(f"{where}: tensor {dset.name} cannot be decoded near row {start} ({exc})") from exc
        if recorded is not None:
            hasher.update(block)
        if write is not None:
            write(start, block)
        if on_bytes is not None:
            on_bytes(block.nbytes)
    if recorded is None:
        return None
    digests = hasher.finish()
    _check_recorded(where, dset.name, digests.checksum(), recorded)
    return digests


def _add_fast_digests(copy: Any, digests: BlockDigests | None) -> None:
    """The fast block digests of rows just checked against their sha256 (NOTE [fast block digests]), on a
    serving copy of a file that records none (an earlier version's): its first touch is then as cheap."""
    if digests is not None and ATTR_FAST_DIGESTS not in copy.attrs and len(digests.fast) <= MAX_BLOCK_DIGESTS:
        copy.attrs[ATTR_FAST_DIGESTS] = digests_attr(digests.fast)
        if digests.finite:
            copy.attrs[ATTR_FINITE] = np.uint8(1)


def _check_recorded(where: str, name: str, got: str, recorded: object) -> None:
    """``ChecksumError`` naming ``where`` and the tensor when the decoded rows' checksum is not the recorded one."""
    if got != recorded:
        raise ChecksumError(
            f"{where}: tensor {name}: checksum {got[:16]}... does not match the recorded "
            f"{str(recorded)[:16]}... (the bytes fetched are corrupt; nothing was cached)"
        )


def check_file(path: Path, where: str, on_bytes: Callable[[int], object] | None = None) -> None:
    """Recompute every recorded checksum of the HDF5 file at ``path``; ``ChecksumError`` naming ``where``."""
    with open_h5(path) as f:
        for _, dset in _datasets(f):
            _stream(dset, where, None, on_bytes)


def serving_copy(
    src: Path, dest: Path, where: str, on_bytes: Callable[[int], object] | None = None, workers: int | None = None
) -> bool:
    """Make ``dest`` the contiguous, checked copy of ``src``; returns False (``dest`` untouched) when
    ``src`` is already contiguous (then ``check_file`` it and use it as it is).

    Large files are decoded by ``workers`` processes (default: the CPUs), each taking whole checksum
    blocks of a dataset and writing them in place into ``dest``, allocated first; small ones in this process.
    """
    with open_h5(src) as f:
        if is_mappable(f):
            return False
        total = sum(d.size * d.dtype.itemsize for _, d in _datasets(f))
        if total >= PARALLEL_MIN_BYTES and (workers or os.cpu_count() or 1) > 1:
            blocks = _allocate(f, dest)
            parallel = True
        else:
            parallel = False
    if parallel:
        _decode_in_place(src, dest, where, blocks, on_bytes, workers)
        return True
    with open_h5(src) as f:
        with new_file(dest, copy_size_bound(f)) as out:

            def visit(name: str, obj: Any) -> None:
                copy = out.create_dataset(name, shape=obj.shape, dtype=obj.dtype)
                for key, value in obj.attrs.items():
                    copy.attrs[key] = value

                def write(start: int, block: np.ndarray) -> None:
                    if obj.shape:
                        copy[start : start + len(block)] = block
                    else:
                        copy[()] = block

                _add_fast_digests(copy, _stream(obj, where, write, on_bytes))

            _copy_tree(f, out, visit)
    return True


def _copy_tree(f: Any, out: Any, dataset: Callable[[str, Any], None]) -> None:
    """``f``'s root attributes (compression now none) and groups into ``out``; each dataset to ``dataset``."""
    for key, value in f.attrs.items():
        out.attrs[key] = value
    if ATTR_COMPRESSION in f.attrs:
        out.attrs[ATTR_COMPRESSION] = COMPRESSION_NONE

    def visit(name: str, obj: Any) -> None:
        if hasattr(obj, "shape"):
            dataset(name, obj)
            return
        group = out.require_group(name)
        for key, value in obj.attrs.items():
            group.attrs[key] = value

    f.visititems(visit)


# Files smaller than this are decoded in this process: starting worker interpreters (which import torch
# with the package) costs more than they save.
PARALLEL_MIN_BYTES = 1 << 30


@dataclass(frozen=True)
class _Block:
    """Rows ``start:stop`` of one dataset (whole checksum blocks), and where the dataset lies in ``dest``."""

    name: str
    offset: int
    shape: tuple[int, ...]
    dtype: str
    start: int
    stop: int
    block_rows: int


def allocate_dataset(group: Any, name: str, shape: tuple[int, ...], dtype: Any) -> Any:
    """A contiguous dataset ``name`` under ``group``, its space allocated now: ``dset.id.get_offset()`` is
    where its bytes lie in the file before any is written, so other processes can write rows in place
    (``write_rows_at``). ``dtype``: a numpy dtype or an HDF5 type id (kept exactly). No fill is written."""
    h5py = require_h5py()
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return group.create_dataset(name, shape=shape, dtype=dtype, dcpl=dcpl)


def write_rows_at(path: Path, offset: int, start: int, rows: np.ndarray) -> None:
    """Write ``rows`` (C-contiguous, the dataset's dtype) as rows ``start:`` of the contiguous dataset whose
    bytes begin at ``offset`` in the file at ``path``. Plain ``pwrite``, not a mapping: a full disk is an
    ``OSError`` here, not a SIGBUS that kills the process."""
    data = np.ascontiguousarray(rows).data.cast("B")
    position = offset + start * (rows.nbytes // len(rows) if len(rows) else 0)
    fd = os.open(path, os.O_WRONLY)
    try:
        while data:
            written = os.pwrite(fd, data, position)
            data, position = data[written:], position + written
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Contiguous:
    """A contiguous dataset of an allocated file (``allocate_dataset``) by path and offset: rows written and
    read with plain file I/O from any process, sliced like an h5py dataset (``hdf5_writer.write_rows`` writes
    it, ``checksum.block_digests`` hashes it). Names and integers only: it travels to tasks."""

    path: str
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks = None  # what write_rows asks of a dataset: rows are not chunk-aligned

    def rows(self, start: int, stop: int) -> Contiguous:
        """Rows ``start:stop`` as a contiguous dataset of their own."""
        return Contiguous(
            self.path, self.offset + start * row_nbytes(self.shape, self.dtype), (stop - start, *self.shape[1:]),
            self.dtype,
        )  # fmt: skip

    def __setitem__(self, rows: slice, block: np.ndarray) -> None:
        write_rows_at(Path(self.path), self.offset, rows.start or 0, block)

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        count = max(0, stop - start) * int(np.prod(self.shape[1:], dtype=np.int64))
        offset = self.offset + start * row_nbytes(self.shape, self.dtype)
        data = np.fromfile(self.path, dtype=self.dtype, count=count, offset=offset)
        if data.size != count:
            raise OSError(f"{self.path}: ends before rows {start}:{stop} of the dataset at byte {self.offset}")
        return data.reshape((-1, *self.shape[1:]))

    def sync(self) -> None:
        """Make the rows written so far durable (``fdatasync``: the whole file's, from any process)."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)


def copy_size_bound(f: Any) -> int:
    """The most bytes a contiguous copy of the open file ``f`` can take (``file_size_bound``)."""
    return file_size_bound((d.shape, d.dtype, d.shape[0] if d.shape else 1) for _, d in _datasets(f))


def _allocate(f: Any, dest: Path) -> list[_Block]:
    """``dest`` with ``f``'s groups, attributes and datasets, each contiguous and allocated now (so its
    offset is known before any byte is written); the row ranges the workers fill."""
    blocks: list[_Block] = []
    with new_file(dest, copy_size_bound(f)) as out:

        def visit(name: str, obj: Any) -> None:
            copy = allocate_dataset(out, name, obj.shape, obj.id.get_type())
            for key, value in obj.attrs.items():
                copy.attrs[key] = value
            offset = copy.id.get_offset()
            if not obj.shape or offset is None or obj.dtype.kind not in "iuf":
                if obj.size:
                    copy[...] = obj[...]  # a scalar or an odd type: small, copied here
                return
            rows = _block_rows(obj)
            per_job = max(1, JOB_BYTES // max(1, rows * row_nbytes(obj.shape, obj.dtype))) * rows
            for start in range(0, obj.shape[0], per_job):
                stop = min(start + per_job, obj.shape[0])
                blocks.append(_Block(name, int(offset), tuple(obj.shape), obj.dtype.str, start, stop, rows))

        _copy_tree(f, out, visit)
    return blocks


JOB_BYTES = 64 << 20


def _decode_block(src: Path, dest: Path, block: _Block) -> BlockDigests:
    """Decode ``block``'s rows, write them in place in ``dest``, return their checksum block digests."""
    with open_h5(src) as f:
        rows = f[block.name][block.start : block.stop]
    hasher = BlockHasher(block.block_rows, row_nbytes(block.shape, np.dtype(block.dtype)))
    hasher.update(rows)
    write_rows_at(dest, block.offset, block.start, rows)
    return hasher.finish()


def worker_main() -> None:
    """A decoding worker (a fresh interpreter: no fork under the caller's threads, no re-run of its
    ``__main__``): reads ``{src, dest, blocks}`` as JSON on stdin, prints one JSON line per block done."""
    job = json.loads(sys.stdin.read())
    src, dest = Path(job["src"]), Path(job["dest"])
    for fields in job["blocks"]:
        block = _Block(**{**fields, "shape": tuple(fields["shape"])})
        try:
            digests = _decode_block(src, dest, block)
        except OSError as exc:
            print(json.dumps({"name": block.name, "start": block.start, "error": str(exc)}), flush=True)
            sys.exit(1)
        sha256, fast = digests.to_hex()
        line = {"name": block.name, "start": block.start, "digests": sha256, "fast": fast, "finite": digests.finite}
        print(json.dumps(line), flush=True)


WORKER = "from jasper_ray.formats.serving import worker_main; worker_main()"


def _decode_in_place(
    src: Path, dest: Path, where: str, blocks: list[_Block], on_bytes: Callable[[int], object] | None,
    workers: int | None,
) -> None:  # fmt: skip
    n = max(1, min(workers or os.cpu_count() or 1, len(blocks)))
    by_key = {(b.name, b.start): b for b in blocks}
    procs = []
    for k in range(n):
        job = {"src": str(src), "dest": str(dest), "blocks": [asdict(b) for b in blocks[k::n]]}
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(job))
        proc.stdin.close()
        procs.append(proc)
    done: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def pump(proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            done.put(json.loads(line))
        proc.wait()
        done.put(None)

    threads = [threading.Thread(target=pump, args=(p,), daemon=True) for p in procs]
    for t in threads:
        t.start()
    digests: dict[str, list[tuple[int, BlockDigests]]] = {}
    finished, failure = 0, None
    while finished < len(procs):
        item = done.get()
        if item is None:
            finished += 1
            continue
        block = by_key[(item["name"], item["start"])]
        if "error" in item:
            failure = failure or ChecksumError(
                f"{where}: tensor /{block.name} cannot be decoded in rows {block.start}:{block.stop} ({item['error']})"
            )
            continue
        digests.setdefault(block.name, []).append(
            (block.start, BlockDigests.from_hex(item["digests"], item["fast"], item["finite"]))
        )
        if on_bytes is not None:
            on_bytes((block.stop - block.start) * row_nbytes(block.shape, np.dtype(block.dtype)))
    if failure is not None:
        raise failure
    if any(p.returncode for p in procs) or sum(len(v) for v in digests.values()) != len(blocks):
        raise OSError(f"{where}: a decoding worker failed (exit codes {[p.returncode for p in procs]})")
    checked = {}
    with open_h5(src) as f:
        for name, parts in digests.items():
            recorded = f[name].attrs.get(ATTR_CHECKSUM)
            if recorded is None:
                continue
            whole = sum((part for _, part in sorted(parts, key=lambda p: p[0])), BlockDigests())
            _check_recorded(where, f"/{name}", whole.checksum(), recorded)
            checked[name] = whole
    with require_h5py().File(dest, "r+", locking=False) as out:
        for name, whole in checked.items():
            _add_fast_digests(out[name], whole)
