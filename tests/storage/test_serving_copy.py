"""The serving copy: a compressed HDF5 file rewritten contiguous, in this process or by worker processes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from _support import FILL_AFTER_RESERVING, free_after_filling, mounted_tmpfs, subprocess_env

import jasper_ray.formats.serving as serving
from jasper_ray.errors import ChecksumError
from jasper_ray.formats.serving import check_file, serving_copy


def _datasets(path: Path) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    with h5py.File(path, "r", locking=False) as f:
        f.visititems(lambda name, obj: found.__setitem__(name, obj[()]) if hasattr(obj, "shape") else None)
    return found


@pytest.mark.parametrize("workers", [1, 2])
def test_the_copy_is_contiguous_checked_and_equal(
    workers: int, converted: Callable[[str | None], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(serving, "PARALLEL_MIN_BYTES", 0 if workers > 1 else 1 << 40)
    src = converted("gzip") / "dataset.h5"
    dest = tmp_path / "copy.h5"
    seen: list[int] = []
    assert serving_copy(src, dest, "src", on_bytes=seen.append, workers=workers)
    with h5py.File(dest, "r", locking=False) as f:
        assert all(d.chunks is None for d in (f[n] for n in ("steering/residual", "embeddings/sources")))
        assert f.attrs["compression"] == "none"
    want, got = _datasets(src), _datasets(dest)
    assert want.keys() == got.keys()
    for name in want:
        assert np.array_equal(want[name], got[name]), name
    check_file(dest, "copy")  # the recorded checksums (copied attributes) hold for the copy
    assert sum(seen) == sum(v.nbytes for v in want.values() if v.ndim)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_damaged_chunk_names_the_tensor(
    workers: int, converted: Callable[[str | None], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(serving, "PARALLEL_MIN_BYTES", 0 if workers > 1 else 1 << 40)
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes((converted("gzip") / "dataset.h5").read_bytes())
    with h5py.File(damaged, "r", locking=False) as f:
        dset = f["steering/residual"]
        offset, size = dset.id.get_chunk_info(1).byte_offset, dset.id.get_chunk_info(1).size
    data = bytearray(damaged.read_bytes())
    for i in range(offset + 8, offset + size - 8, 97):
        data[i] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"s3://b/ds/dataset.h5: tensor /steering/residual"):
        serving_copy(damaged, tmp_path / "copy.h5", "s3://b/ds/dataset.h5", workers=workers)


COPY_ON_A_FILLING_DISK = (
    FILL_AFTER_RESERVING
    + """
import sys
from pathlib import Path
import jasper_ray.formats.serving as serving
serving.PARALLEL_MIN_BYTES = 0 if sys.argv[3] == "2" else 1 << 40
assert serving.serving_copy(Path(sys.argv[1]), Path(sys.argv[2]), "src", workers=int(sys.argv[3]))
"""
)


@pytest.mark.parametrize("workers", [1, 2])
def test_the_copy_is_made_in_reserved_space(
    workers: int, converted: Callable[[str | None], Path], tmp_path: Path
) -> None:
    """The copy's space is reserved before HDF5 (or the workers) write to it: a cache disk that another process
    fills right after still gets the whole copy, and the unused rest of the reservation is given back."""
    src = converted("gzip") / "dataset.h5"
    with mounted_tmpfs(tmp_path / "cache", "size=64m") as cache:
        dest = cache / "copy.h5"
        child = subprocess.run(
            [sys.executable, "-c", COPY_ON_A_FILLING_DISK, str(src), str(dest), str(workers)],
            env=subprocess_env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert child.returncode == 0, child.stderr[-3000:]
        filled = free_after_filling(child.stdout)
        assert filled < (64 << 10), "the disk was full while the copy was written"
        assert shutil.disk_usage(cache).free > filled, "the reservation's unused rest was given back"
        with h5py.File(src, "r", locking=False) as f:
            assert dest.stat().st_size < serving.copy_size_bound(f)
        want, got = _datasets(src), _datasets(dest)
        assert want.keys() == got.keys() and all(np.array_equal(want[n], got[n]) for n in want)
        check_file(dest, "copy")
