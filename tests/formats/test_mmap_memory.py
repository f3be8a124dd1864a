"""Memory-mapping does not load tensors: RSS of a fresh process stays flat when it opens a 1 GB tensor.

One module-scoped fixture writes ``question_embs`` as a [1_000_000, 256] float32
tensor (1.02 GB) twice, in a child process (this one never holds it): as a
contiguous, uncompressed ``dataset.h5`` (written with h5py in 64 MB blocks) and
as ``question_embs.pt`` (torch.save of a copy-on-write mapping of those bytes).
A child process per format measures VmRSS around ``open_dataset(...,
use_mmap=True)`` + ``take`` of a few rows, then around the same with
``use_mmap=False``, which must load it: the test can fail both ways.
The files are deleted afterwards.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _support import assert_bits_equal, subprocess_env

ROWS, DIM = 1_000_000, 256
NBYTES = ROWS * DIM * 4
BLOCK_ROWS = 65_536
TAKE = [0, ROWS - 1, 123_456, 5, 123_456, 777_777]


def rows_values(a: int, b: int) -> np.ndarray:
    """Row i holds (i % 65536) * 256 + j: cheap, exact in float32 (< 2**24), distinct for the rows taken."""
    rows = (np.arange(a, b) % 65536).astype(np.float32)[:, None] * np.float32(DIM)
    return rows + np.arange(DIM, dtype=np.float32)[None, :]


assert len({r % 65536 for r in TAKE}) == len(set(TAKE))


def expected_rows(rows: list[int]) -> np.ndarray:
    return np.concatenate([rows_values(r, r + 1) for r in rows])


CHILD = r"""
import json, sys
import h5py, numpy, torch  # imported before the first measurement
from jasper_ray import open_dataset

def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

path, fmt, rows = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
out = {}
for label, use_mmap in (("mmap", True), ("load", False)):
    before = rss()
    reader = open_dataset(path, storage_format=fmt, use_mmap=use_mmap)
    got = reader.take("question_embs", rows)
    arr = reader.array("question_embs")
    while arr is not None and not isinstance(arr, numpy.memmap):
        arr = getattr(arr, "base", None)
    out[label] = {"growth": rss() - before, "rows": got.tolist(), "np_memmap": arr is not None}
print(json.dumps(out))
"""


BUILD = r"""
import sys
import h5py, numpy as np, torch
ROWS, DIM, BLOCK_ROWS = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])

def rows_values(a, b):
    rows = (np.arange(a, b) % 65536).astype(np.float32)[:, None] * np.float32(DIM)
    return rows + np.arange(DIM, dtype=np.float32)[None, :]

with h5py.File(sys.argv[1], "w") as f:
    dset = f.create_dataset("embeddings/questions", shape=(ROWS, DIM), dtype="float32")  # contiguous
    for a in range(0, ROWS, BLOCK_ROWS):
        b = min(ROWS, a + BLOCK_ROWS)
        dset[a:b] = rows_values(a, b)
    offset = dset.id.get_offset()
mapped = np.memmap(sys.argv[1], dtype=np.float32, mode="c", offset=offset, shape=(ROWS, DIM))
torch.save(torch.from_numpy(mapped), sys.argv[2])
"""


@pytest.fixture(scope="module")
def big_dataset(tmp_path_factory) -> dict[str, Path]:
    """Both files, written by a child process (this one never holds the tensor); deleted afterwards."""
    base = tmp_path_factory.mktemp("big")
    config = {
        "embedding_dim": DIM,
        "n_neg": 1,
        "steering_probabilities": {"zero": 0.25, "centroid": 0.25, "keyword": 0.25, "residual": 0.25},
    }
    h5_dir, pt_dir = base / "h5", base / "pt"
    for d in (h5_dir, pt_dir):
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
    args = [h5_dir / "dataset.h5", pt_dir / "question_embs.pt", ROWS, DIM, BLOCK_ROWS]
    subprocess.run([sys.executable, "-c", BUILD, *map(str, args)], env=subprocess_env(), check=True, timeout=300)
    yield {"pt": pt_dir, "hdf5": h5_dir}
    shutil.rmtree(base)


def test_files_hold_a_1gb_tensor(big_dataset) -> None:
    assert (big_dataset["pt"] / "question_embs.pt").stat().st_size >= NBYTES
    assert (big_dataset["hdf5"] / "dataset.h5").stat().st_size >= NBYTES


def test_mmap_does_not_load_the_tensor(big_dataset) -> None:
    procs = {
        fmt: subprocess.Popen(
            [sys.executable, "-c", CHILD, str(directory), fmt, json.dumps(TAKE)],
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for fmt, directory in big_dataset.items()
    }
    want = expected_rows(TAKE)
    for fmt, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{fmt}: {stderr}"
        result = json.loads(stdout.strip().splitlines()[-1])
        for label in ("mmap", "load"):
            got = np.array(result[label]["rows"], dtype=np.float32)
            assert_bits_equal(got, want, f"{fmt} {label} rows")
        mmap_growth, load_growth = result["mmap"]["growth"], result["load"]["growth"]
        assert mmap_growth < 0.10 * NBYTES, (
            f"{fmt}: opening with use_mmap=True and taking {len(TAKE)} rows grew RSS by {mmap_growth / 1e6:.0f} MB "
            f"for a {NBYTES / 1e6:.0f} MB tensor"
        )
        assert load_growth > 0.8 * NBYTES, (
            f"{fmt}: use_mmap=False grew RSS by only {load_growth / 1e6:.0f} MB: the tensor was not loaded, "
            "so this test could not tell mapping from loading"
        )
        if fmt == "hdf5":
            assert result["mmap"]["np_memmap"] and not result["load"]["np_memmap"]


def _vm_flags(arr: np.ndarray) -> set[str]:
    """The kernel's advice flags of the mapping that holds ``arr`` (``hg``: huge pages, ``rr``: random reads)."""
    at = arr.__array_interface__["data"][0]
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            if lo <= at < hi:
                flags = next(ln for ln in lines[i + 1 :] if ln.startswith("VmFlags:"))
                return set(flags.split()[1:])
    raise AssertionError("no mapping holds the array")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/smaps are Linux's")
def test_huge_pages_only_for_a_dataset_the_page_cache_can_hold(tmp_path: Path) -> None:
    """2 MB readahead pays while the file stays cached; over a dataset larger than RAM it reads 2 MB per row."""
    from jasper_ray.formats.arrays import advise_huge_pages

    path = tmp_path / "table.bin"
    np.arange(1 << 20, dtype=np.float32).tofile(path)
    small = np.memmap(path, dtype=np.float32, mode="r").view(np.ndarray)
    advise_huge_pages(small, path.stat().st_size)
    assert "hg" in _vm_flags(small) and "rr" not in _vm_flags(small)
    large = np.memmap(path, dtype=np.float32, mode="r").view(np.ndarray)
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    advise_huge_pages(large, ram)  # a dataset as large as RAM
    assert "rr" in _vm_flags(large) and "hg" not in _vm_flags(large)


def _resident(arr: np.ndarray) -> float:
    """The share of ``arr``'s pages in the page cache and mapped (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    start = arr.__array_interface__["data"][0]
    first = start - start % page
    length = start + arr.nbytes - first
    vec = (ctypes.c_ubyte * ((length + page - 1) // page))()
    assert libc.mincore(ctypes.c_void_p(first), ctypes.c_size_t(length), vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec) / len(vec)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise, mincore and smaps are Linux's")
def test_scans_read_ahead_the_blocks_of_a_mapping_advised_random(tmp_path: Path) -> None:
    """A dataset larger than half the RAM is mapped MADV_RANDOM (4 KB a fault from disk); a scan in order reads
    each block ahead whole (``will_need``) and leaves the mapping random for the gathers that follow."""
    from jasper_ray.formats.arrays import advise_huge_pages, will_need

    path = tmp_path / "table.bin"
    np.arange(4 << 20, dtype=np.float32).reshape(-1, 256).tofile(path)  # 16 MiB, 16384 rows
    table = np.memmap(path, dtype=np.float32, mode="r").reshape(-1, 256).view(np.ndarray)
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    advise_huge_pages(table, ram)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # written back, so that it can leave the page cache: not yet read
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert _resident(table) < 0.1
    will_need(table, 1024, 9216)  # 8 MiB of rows
    assert _resident(table[1024:9216]) > 0.99, "the block is read and mapped"
    assert _resident(table[12288:]) < 0.1, "nothing beyond it"
    assert "rr" in _vm_flags(table[1024:9216]) and "sr" not in _vm_flags(table[1024:9216]), "random again"
    assert np.array_equal(table[1024:9216].reshape(-1), np.arange(1024 * 256, 9216 * 256, dtype=np.float32))
