"""The serving copy: a compressed HDF5 file rewritten contiguous, in this process or by worker processes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

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
