"""Datasets at s3:// URIs, served through the node-local cache: the same samples as the local PT files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from _s3 import S3Endpoint

from jasper_ray import JASPERSteeringDataset, open_dataset
from jasper_ray.errors import CacheError, ChecksumError, DatasetNotFoundError
from jasper_ray.formats.arrays import is_mapped
from jasper_ray.schema import TENSORS
from jasper_ray.storage import NodeCache


def _all(ds: JASPERSteeringDataset) -> dict[str, torch.Tensor]:
    return ds.get_batch(list(range(len(ds))))


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("variant", ["gzip", "none", "pt"])
def test_an_s3_dataset_serves_the_local_pt_samples_bit_for_bit(
    variant: str, remote: dict[str, str], small_dir: Path, tmp_path: Path
) -> None:
    want = _all(JASPERSteeringDataset(small_dir, "train", epoch=2, storage_format="pt"))
    ds = JASPERSteeringDataset(remote[variant], "train", epoch=2, cache_dir=tmp_path)
    assert ds.dataset_dir == remote[variant]
    _assert_same(_all(ds), want)
    reader = ds._live_core().reader
    assert reader.use_mmap and reader.storage_format == ("pt" if variant == "pt" else "hdf5")
    if variant != "pt":  # torch maps PT files itself (is_mapped sees numpy's and Python's maps only)
        assert all(is_mapped(reader.array(s.name)) for s in TENSORS if reader.shape(s.name)[0]), "served mapped"


def test_every_tensor_from_s3_equals_the_pt_tensor(remote: dict[str, str], small_dir: Path, tmp_path: Path) -> None:
    local = open_dataset(small_dir, "pt")
    with open_dataset(remote["gzip"], cache_dir=tmp_path) as reader:
        for spec in TENSORS:
            assert np.array_equal(
                np.asarray(reader.array(spec.name)[0:None]), np.asarray(local.array(spec.name)[0:None])
            )
        assert reader.split_names() == local.split_names()


def test_a_gzip_dataset_becomes_a_mapped_copy_in_the_cache_and_opens_from_it_again(
    remote: dict[str, str], tmp_path: Path
) -> None:
    with open_dataset(remote["gzip"], cache_dir=tmp_path) as reader:
        assert reader.path.is_relative_to(tmp_path)
        import h5py

        with h5py.File(reader.path, "r", locking=False) as f:
            assert f["steering/residual"].chunks is None and f["steering/residual"].compression is None
    (entry,) = NodeCache(tmp_path).entries()
    made = json.loads(entry.meta.read_text())["made"]
    with open_dataset(remote["gzip"], cache_dir=tmp_path):
        pass
    assert json.loads(entry.meta.read_text())["made"] == made, "a valid copy is served, not made again"


def test_a_local_gzip_dataset_given_a_cache_dir_serves_mapped(
    converted: Callable[[str | None], Path], tmp_path: Path
) -> None:
    source = converted("gzip")
    with open_dataset(source, "hdf5", cache_dir=tmp_path) as cached, open_dataset(source, "hdf5") as direct:
        assert is_mapped(cached.array("steering_residual")) and not is_mapped(direct.array("steering_residual"))
        for spec in TENSORS:
            assert np.array_equal(cached.read(spec.name), direct.read(spec.name)), spec.name
    assert (source / "dataset.h5").is_file(), "the source is untouched"


def test_a_changed_remote_object_is_fetched_again(
    s3: S3Endpoint, fresh_h5: Callable[[int], Path], tmp_path: Path
) -> None:
    bucket = s3.bucket()
    first, second = fresh_h5(1), fresh_h5(2)
    key = f"{bucket}/changing/dataset.h5"
    with s3.admin.open_output_stream(key) as f:
        f.write(first.read_bytes())
    with open_dataset(f"s3://{key}", cache_dir=tmp_path) as reader:
        old = reader.read("steering_residual").copy()
    with s3.admin.open_output_stream(key) as f:
        f.write(second.read_bytes())
    with open_dataset(f"s3://{key}", cache_dir=tmp_path) as reader, open_dataset(second) as want:
        new = reader.read("steering_residual")
        assert np.array_equal(new, want.read("steering_residual"))
        assert not np.array_equal(new, old)


def test_a_corrupt_object_is_refused_naming_uri_and_tensor_and_nothing_stays(
    s3: S3Endpoint, converted: Callable[[str | None], Path], tmp_path: Path
) -> None:
    import h5py

    path = converted(None) / "dataset.h5"
    with h5py.File(path) as f:
        offset = f["steering/residual"].id.get_offset() + 1000
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    uri = f"s3://{s3.bucket()}/corrupt"
    with s3.admin.open_output_stream(f"{uri[5:]}/dataset.h5") as f:
        f.write(bytes(data))
    with pytest.raises(ChecksumError, match=rf"{uri}/dataset.h5: tensor /steering/residual"):
        open_dataset(uri, cache_dir=tmp_path)
    left = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".lock"]
    assert left == [], f"nothing corrupt (or half made) stays in the cache: {left}"


def test_missing_bucket_or_key_names_the_uri(s3: S3Endpoint, tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="s3://no-such-bucket-xyz/ds"):
        open_dataset("s3://no-such-bucket-xyz/ds", cache_dir=tmp_path)
    uri = f"s3://{s3.bucket()}/nothing-here"
    with pytest.raises(DatasetNotFoundError, match=uri):
        open_dataset(uri, cache_dir=tmp_path)
    with pytest.raises(DatasetNotFoundError, match=f"{uri}/dataset.h5"):
        open_dataset(f"{uri}/dataset.h5", cache_dir=tmp_path)


def test_a_cache_limit_below_the_tables_names_the_minimum(remote: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(CacheError, match=r"cache_limit=1000 bytes is too small .* at least \d+ bytes"):
        open_dataset(remote["none"], cache_dir=tmp_path, cache_limit=1000)
    assert not [p for p in tmp_path.rglob("dataset.h5") if p.is_file()]


def test_filesystem_takes_paths_inside_it(
    s3: S3Endpoint, remote: dict[str, str], small_dir: Path, tmp_path: Path
) -> None:
    inside = remote["none"].removeprefix("s3://")
    with (
        open_dataset(inside, filesystem=s3.filesystem(), cache_dir=tmp_path) as reader,
        open_dataset(small_dir, "pt") as want,
    ):
        assert np.array_equal(reader.read("source_embs"), want.read("source_embs"))


def test_read_jasper_streams_an_s3_dataset_bit_for_bit(
    remote: dict[str, str], small_dir: Path, tmp_path: Path, ray_session: object
) -> None:
    from jasper_ray import read_jasper

    rows = read_jasper(remote["gzip"], "train", epoch=3, cache_dir=tmp_path).take_all()
    got = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    want_ds = JASPERSteeringDataset(small_dir, "train", epoch=3, storage_format="pt")
    position = {int(p): i for i, p in enumerate(want_ds.split_indices.numpy())}
    want = want_ds.get_batch([position[int(p)] for p in got["pair_id"]])
    assert sorted(got["pair_id"].tolist()) == sorted(position), "every pair of the split once"
    for key, value in want.items():
        assert np.array_equal(got[key], value.numpy()), key
