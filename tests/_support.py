"""Helpers shared by the format-core tests (imported as ``_support``; tests/ is on sys.path).

Everything here reads the PT files with plain ``torch.load(weights_only=True)``
and h5py, independently of jasper_ray's readers, so tests compare the readers
against the raw source and not against themselves (``write_sharded`` writes
test data with jasper_ray's conversion; it reads nothing back).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

import jasper_ray.formats.checksum as checksum
from jasper_ray.conversion.pieces import WorkDir, write_piece
from jasper_ray.conversion.plan import default_output, plan_conversion, work_dir_for
from jasper_ray.conversion.publish import publish_sharded
from jasper_ray.formats import open_dataset
from jasper_ray.schema import ATTR_CHECKSUM, KEYWORD_IDS, LAYOUT_SHARDED, TENSORS, split_from_pt_file

REPO = Path(__file__).resolve().parents[1]

# Upstream's converter spells its HDF5 paths by string rewriting (UPSTREAM.md 1.3);
# spelled out here on purpose, independently of jasper_ray.schema.
UPSTREAM_H5_PATHS = {
    "question_embs": "embeddings/questions",
    "source_embs": "embeddings/sources",
    "keyword_embs": "embeddings/keywords",
    "centroid_embs": "embeddings/centroids",
    "pair_index": "pair_data/index",
    "pair_cluster_id": "pair_data/cluster_id",
    "pair_relevance": "pair_data/relevance",
    "hard_negatives": "negatives/hardnegatives",
    "negative_tiers": "negatives/tiers",
    "steering_centroid": "steering/centroid",
    "steering_keyword_weighted": "steering/keyword_weighted",
    "steering_residual": "steering/residual",
    "centroid_distances": "steering/distances",
}


@dataclass
class Expected:
    """The PT source of a dataset, loaded whole with torch.load(weights_only=True)."""

    tensors: dict[str, np.ndarray]
    keyword_ids: list[list[int]]
    splits: dict[str, np.ndarray]
    config: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_pairs(self) -> int:
        return len(self.tensors["pair_index"])


def load_pt(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_expected(directory: Path) -> Expected:
    directory = Path(directory)
    tensors = {spec.name: load_pt(directory / spec.pt_file).numpy() for spec in TENSORS}
    keyword_ids = load_pt(directory / KEYWORD_IDS.pt_file)
    splits = {}
    for path in sorted(directory.glob("*_idx.pt")):
        splits[split_from_pt_file(path.name)] = load_pt(path).numpy()
    config = json.loads((directory / "config.json").read_text())
    return Expected(tensors, keyword_ids, splits, config)


def assert_bits_equal(got: Any, want: np.ndarray, what: str = "") -> None:
    """Same dtype, same shape, same bytes (bit for bit, NaN-safe)."""
    got = np.asarray(got)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if np.ascontiguousarray(got).tobytes() != np.ascontiguousarray(want).tobytes():
        np.testing.assert_array_equal(got, want, err_msg=what)
        raise AssertionError(f"{what}: values equal but bytes differ (signed zeros or NaN payloads)")


def save_pt(directory: Path, file_name: str, value: Any) -> None:
    """Overwrite one PT file the way upstream's builder writes it."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    torch.save(value, Path(directory) / file_name)


def save_big_endian(path: Path) -> None:
    """Rewrite the torch file ``path`` as a big-endian machine writes it: its byte order record and its storage."""
    dtype = load_pt(path).numpy().dtype
    with zipfile.ZipFile(io.BytesIO(path.read_bytes())) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                data = np.frombuffer(data, dtype.newbyteorder("<")).astype(dtype.newbyteorder(">")).tobytes()
            out.writestr(info.filename, data)


def edit_config(directory: Path, **changes: Any) -> None:
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            config.pop(key)
        else:
            config[key] = value
    path.write_text(json.dumps(config, indent=2))


_DELETE = object()
DELETE = _DELETE


def write_upstream_hdf5(directory: Path, *, with_splits: bool = True, compression: str | None = "gzip") -> Path:
    """``dataset.h5`` exactly as upstream's ``convert_pt_to_hdf5`` writes it (UPSTREAM.md 1.3 and 4).

    One ``create_dataset(data=..., compression=...)`` per tensor, no chunks,
    no shuffle, no attributes; keyword ids as one int32 dataset per pair,
    uncompressed; splits compressed under ``splits/`` (absent if
    ``with_splits`` is false, as in files from before the group existed).
    """
    directory = Path(directory)
    path = directory / "dataset.h5"
    with h5py.File(path, "w") as f:
        for group in ("embeddings", "pair_data", "negatives", "steering") + (("splits",) if with_splits else ()):
            f.create_group(group)
        for name, h5_path in UPSTREAM_H5_PATHS.items():
            tensor = load_pt(directory / f"{name}.pt")
            f.create_dataset(h5_path, data=tensor.numpy(), compression=compression)
        kw_group = f["pair_data"].create_group("keyword_ids")
        for i, kw_list in enumerate(load_pt(directory / "pair_keyword_ids.pt")):
            kw_group.create_dataset(str(i), data=np.array(kw_list, dtype=np.int32))
        if with_splits:
            for split in ("train", "val", "test"):
                split_path = directory / f"{split}_idx.pt"
                if split_path.exists():
                    f["splits"].create_dataset(split, data=load_pt(split_path).numpy(), compression=compression)
    return path


def mapping_of(arr: Any) -> np.memmap | None:
    """The np.memmap an array is (or is a view of), or None if its bytes are not mapped that way."""
    while arr is not None:
        if isinstance(arr, np.memmap):
            return arr
        arr = getattr(arr, "base", None)
    return None


def block_checksum(array: np.ndarray, block_rows: int) -> str:
    """sha256 over the sha256 digests of consecutive ``block_rows``-row blocks (jasper_ray's tensor checksum)."""
    array = np.ascontiguousarray(array)
    outer = hashlib.sha256()
    for a in range(0, len(array), max(1, block_rows)):
        outer.update(hashlib.sha256(array[a : a + block_rows].tobytes()).digest())
    return outer.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())


# Child-process code (a prelude): another process fills the disk right after a file's space is reserved
# (``hdf5_files.reserve_space``), then prints how much it left free. Writes that reach HDF5 on a full disk may
# crash the process (h5py#914), so the children run what follows it.
FILL_AFTER_RESERVING = """
import shutil
from jasper_ray.formats import hdf5_files

_reserve = hdf5_files.reserve_space

def _reserve_then_fill(path, nbytes):
    reserved = _reserve(path, nbytes)
    try:
        with open(path.parent / "filler", "wb") as f:
            while True:
                f.write(bytes(1 << 16))
    except OSError:
        pass
    print("free after filling:", shutil.disk_usage(path.parent).free)
    return reserved

hdf5_files.reserve_space = _reserve_then_fill
"""


def free_after_filling(stdout: str) -> int:
    """What ``FILL_AFTER_RESERVING`` printed."""
    return int(stdout.split("free after filling:")[1].split()[0])


def subprocess_env() -> dict[str, str]:
    """Environment for child Pythons: the repository importable, no stray threads."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def ray_child_env(**extra: str) -> dict[str, str]:
    """Environment for a child Python that starts its own local Ray (no RAY_ADDRESS, auth off, repo importable)."""
    env = {k: v for k, v in subprocess_env().items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    env.update(extra)
    return env


# --- workers for fork / spawn tests (module level, so spawn children import them) ----------------


def take_in_worker(reader: Any, name: str, indices: np.ndarray) -> dict[str, Any]:
    """What a worker process reads through a reader it received (pickled or inherited)."""
    return {
        "pid": os.getpid(),
        "rows": reader.take(name, indices),
        "range": reader.read(name, 3, 11),
        "keywords": reader.keyword_ids(indices[:7]),
        "split": reader.split("val"),
    }


def take_into_queue(reader: Any, name: str, indices: np.ndarray, queue: Any) -> None:
    try:
        queue.put(take_in_worker(reader, name, indices))
    except BaseException as exc:  # noqa: BLE001 - report any failure to the parent
        queue.put(repr(exc))


class ReaderTorchDataset(Dataset):
    """A tiny torch Dataset over several readers: item i is row ``ids[i]`` of ``name`` from each."""

    def __init__(self, readers: dict[str, Any], name: str, ids: np.ndarray):
        self.readers, self.name, self.ids = readers, name, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        pair = int(self.ids[i])
        out = {key: torch.from_numpy(r.take(self.name, [pair])[0]) for key, r in self.readers.items()}
        out["pid"] = torch.tensor(os.getpid())
        out["kw_count"] = torch.tensor([len(r.keyword_ids([pair])[0]) for r in self.readers.values()])
        return out


def write_sharded(
    directory: Path, compression: str | None, piece_bytes: int = 64 << 10, precision: str = "float32"
) -> Path:
    """``directory``'s PT files converted to the sharded layout (``dataset.shards/`` beside them) in this
    process, without Ray: the conversion's own plan, pieces and publish, run one after another.

    The checksum block is cut to 64 KiB for the conversion (one chunk of a steering tensor), so that pieces of
    ``piece_bytes`` split the small dataset's tensors into several shards: readers then serve rows that span
    shard files. The manifest records the block rows it used; nothing else depends on them.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checksum, "BLOCK_BYTES", 64 << 10)
        source = open_dataset(directory, "pt", use_mmap=True)
        plan = plan_conversion(source, compression, piece_bytes=piece_bytes, precision=precision)
        output = default_output(Path(directory), LAYOUT_SHARDED)
        with WorkDir(work_dir_for(output), plan) as work:
            results = {task.piece.piece_id: write_piece(task) for task in plan.tasks(work.path)}
        publish_sharded(plan, work.path, output, results)
    return output


# --- a small filesystem of our own (disk-full cases) ----------------------------------------------


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc})")


@contextlib.contextmanager
def mounted_tmpfs(where: Path, options: str) -> Iterator[Path]:
    _mount_tmpfs(where, options)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


def raw_chunks(dset: Any) -> list[tuple[tuple[int, ...], int, bytes]]:
    """Every stored chunk as HDF5 keeps it (still compressed): (offset, filter mask, bytes)."""
    chunks = []
    for i in range(dset.id.get_num_chunks()):
        offset = dset.id.get_chunk_info(i).chunk_offset
        mask, data = dset.id.read_direct_chunk(offset)
        chunks.append((offset, mask, bytes(data)))
    return chunks


def assert_same_file(ours: Path, reference: Path) -> None:
    """Bit for bit: every dataset's values, dtype, shape, chunks, filters and attributes (sha256 included)."""
    a, b = h5_objects(ours), h5_objects(reference)
    assert sorted(a) == sorted(b)
    for name in b:
        kind, attrs, layout, values = b[name]
        assert a[name][0] == kind, name
        assert a[name][1] == attrs, f"{name}: attributes differ"
        assert a[name][2] == layout, f"{name}: layout differs: {a[name][2]} != {layout}"
        assert a[name][3] == values, f"{name}: values differ"
        if kind == "dataset":
            assert ATTR_CHECKSUM in attrs, name
    with h5py.File(ours, "r") as fa, h5py.File(reference, "r") as fb:
        for name, (kind, _, layout, _) in b.items():
            if kind == "dataset" and layout[2] is not None:
                ours_chunks, their_chunks = raw_chunks(fa[name]), raw_chunks(fb[name])
                if layout[3] == "lzf":
                    # liblzf leaves its hash table uninitialised (INIT_HTAB 0): the same chunk may compress
                    # to other (equally valid) bytes in another process. Same chunks, same values (above).
                    ours_chunks = [c[:2] for c in ours_chunks]
                    their_chunks = [c[:2] for c in their_chunks]
                # Chunk bytes equal: assembly copied the pieces' compressed chunks, it did not re-encode.
                assert ours_chunks == their_chunks, f"{name}: stored chunks differ"


def h5_objects(path: Path) -> dict[str, Any]:
    """Every group and dataset of a file: name -> (kind, attrs, layout, raw values)."""
    out: dict[str, Any] = {}
    with h5py.File(path, "r") as f:
        out["/"] = ("group", dict(f.attrs), None, None)

        def visit(name: str, obj: Any) -> None:
            attrs = {k: (v.tobytes() if isinstance(v, np.ndarray) else v) for k, v in obj.attrs.items()}
            if isinstance(obj, h5py.Dataset):
                layout = (obj.dtype.str, obj.shape, obj.chunks, obj.compression, obj.compression_opts, obj.shuffle)
                out[name] = ("dataset", attrs, layout, obj[...].tobytes())
            else:
                out[name] = ("group", attrs, None, None)

        f.visititems(visit)
    return out


# The start of a conversion driver script that a test kills mid-run: every piece task first sleeps (the function
# is pickled by value into the workers), so the driver is still running when the first pieces are done.
SLOW_PIECES = """
import sys, time
from jasper_ray import convert
from jasper_ray.conversion import tasks

real = tasks._piece_task
def slow(task):
    time.sleep(0.5)
    return real(task)
tasks._piece_task = slow
"""


def session_processes(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``: a child started with start_new_session and its descendants."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL a child and everything it started (its Ray: GCS, raylet, workers), and wait until all are gone."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while pids := session_processes(proc.pid):
        assert time.monotonic() < deadline, f"processes of the killed conversion survive: {pids}"
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def kill_driver_after(
    argv: list[str], finished: Callable[[], int], env: dict[str, str], deadline_s: float = 180
) -> None:
    """Run ``python -c argv...`` (a conversion driver) in a session of its own, and kill the session (its Ray
    included) once ``finished()`` counts 2 pieces done; fail when it ends first."""
    proc = subprocess.Popen(
        [sys.executable, "-c", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its Ray (GCS, raylet, workers) shares the session: killed with it
    )
    try:
        deadline = time.monotonic() + deadline_s
        while finished() < 2:
            if proc.poll() is not None:
                pytest.fail(f"the conversion ended (rc={proc.returncode}) before it was killed: {proc.stdout.read()}")
            assert time.monotonic() < deadline, "no piece finished"
            time.sleep(0.02)
    finally:
        kill_session(proc)
        proc.stdout.close()
