"""HDF5 files written by upstream's converter read correctly (UPSTREAM.md 1.3 and 4).

The file is built here exactly as upstream's ``convert_pt_to_hdf5`` builds it
(``_support.write_upstream_hdf5``): ``create_dataset(data=..., compression=...)``
per tensor, ``negatives/hardnegatives``, one int32 dataset per pair under
``pair_data/keyword_ids/``, splits compressed under ``splits/`` (or absent),
no attributes and no config inside the file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from _reader_contract import Case, ReaderContract
from _support import assert_bits_equal, mapping_of, write_upstream_hdf5

from jasper_ray import DatasetFormatError, DatasetNotFoundError, open_dataset, validate_dataset
from jasper_ray.cli import main
from jasper_ray.formats.hdf5 import HDF5Reader

VARIANTS = {
    # Upstream's real output: dataset.h5 beside the PT files it came from, splits in both places.
    "beside_pt": {"with_splits": True, "compression": "gzip", "drop": ()},
    # Splits only in the file: the PT split files are gone, so the reader must use splits/*.
    "splits_in_file_only": {"with_splits": True, "compression": "gzip", "drop": ("*_idx.pt",)},
    # No splits group: splits come only from {split}_idx.pt beside the file.
    "splits_from_pt_only": {"with_splits": False, "compression": "gzip", "drop": ()},
    # Upstream passes compression straight to h5py: None gives contiguous datasets (mapped by our reader).
    "uncompressed": {"with_splits": True, "compression": None, "drop": ()},
    "lzf": {"with_splits": False, "compression": "lzf", "drop": ()},
}


@pytest.fixture(scope="module")
def upstream_dirs(tmp_path_factory, small_dir) -> dict[str, Path]:
    dirs = {}
    for name, variant in VARIANTS.items():
        out = tmp_path_factory.mktemp(f"upstream-{name}") / "ds"
        shutil.copytree(small_dir, out)
        write_upstream_hdf5(out, with_splits=variant["with_splits"], compression=variant["compression"])
        for pattern in variant["drop"]:
            for path in out.glob(pattern):
                path.unlink()
        dirs[name] = out
    return dirs


class TestUpstreamHDF5Reader(ReaderContract):
    @pytest.fixture(
        params=[(v, m) for v in VARIANTS for m in (True, False)],
        ids=lambda p: f"{p[0]}-{'mmap' if p[1] else 'load'}",
    )
    def case(self, request, upstream_dirs, small_expected) -> Case:
        variant, use_mmap = request.param
        reader = open_dataset(upstream_dirs[variant], storage_format="hdf5", use_mmap=use_mmap)
        assert isinstance(reader, HDF5Reader)
        return Case(reader, small_expected)


def test_the_file_is_upstreams_layout(upstream_dirs, small_expected) -> None:
    """Guard the fixture itself: what upstream writes, and nothing of ours."""
    with h5py.File(upstream_dirs["beside_pt"] / "dataset.h5", "r") as f:
        assert dict(f.attrs) == {}
        assert "negatives/hardnegatives" in f and "negatives/hard" not in f
        group = f["pair_data/keyword_ids"]
        assert len(group) == small_expected.n_pairs and "offsets" not in group and dict(group.attrs) == {}
        assert group["0"].dtype == np.int32 and group["0"].compression is None
        assert f["steering/centroid"].compression == "gzip" and not f["steering/centroid"].shuffle
        assert f["splits/train"].compression == "gzip"
    with h5py.File(upstream_dirs["splits_from_pt_only"] / "dataset.h5", "r") as f:
        assert "splits" not in f
    assert not list(upstream_dirs["splits_in_file_only"].glob("*_idx.pt"))


def test_auto_detection_serves_upstreams_file(upstream_dirs) -> None:
    """Upstream's file records no fingerprint: nothing says it is stale, so auto serves it."""
    reader = open_dataset(upstream_dirs["beside_pt"])
    assert reader.storage_format == "hdf5"
    assert reader.location("hard_negatives").endswith("dataset.h5:negatives/hardnegatives")


def test_split_locations(upstream_dirs) -> None:
    in_file = open_dataset(upstream_dirs["splits_in_file_only"], "hdf5")
    assert in_file.location_split("val").endswith("dataset.h5:splits/val")
    from_pt = open_dataset(upstream_dirs["splits_from_pt_only"], "hdf5")
    assert from_pt.location_split("val") == str(upstream_dirs["splits_from_pt_only"] / "val_idx.pt")


def test_uncompressed_upstream_file_is_mapped(upstream_dirs) -> None:
    reader = open_dataset(upstream_dirs["uncompressed"], "hdf5", use_mmap=True)
    assert mapping_of(reader.array("steering_residual")) is not None
    assert mapping_of(reader.array("hard_negatives")) is not None


def test_keyword_ids_per_pair_read_only_the_pairs_asked_for(upstream_dirs, small_expected) -> None:
    reader = open_dataset(upstream_dirs["beside_pt"], "hdf5")
    got = reader.keyword_ids([17, 3, 17])
    assert [k.tolist() for k in got] == [small_expected.keyword_ids[p] for p in (17, 3, 17)]
    assert reader._keywords is None, "a few pairs must not read all N_p per-pair datasets"


def test_missing_per_pair_dataset_is_named(tmp_path, small_dir) -> None:
    out = Path(shutil.copytree(small_dir, tmp_path / "ds"))
    write_upstream_hdf5(out)
    with h5py.File(out / "dataset.h5", "a") as f:
        del f["pair_data/keyword_ids/5"]
        f["pair_data/keyword_ids"].create_dataset("zzz", data=np.array([1], dtype=np.int32))
    expected = r"pair_data/keyword_ids: pair 5 has no keyword dataset \(expected '5'\)"
    with pytest.raises(DatasetFormatError, match=expected):
        open_dataset(out, "hdf5").keyword_csr()


@pytest.mark.parametrize("variant", ["beside_pt", "splits_from_pt_only", "uncompressed"])
def test_upstream_file_validates_and_verifies(upstream_dirs, variant, capsys) -> None:
    validate_dataset(open_dataset(upstream_dirs[variant], "hdf5", use_mmap=True))
    assert main(["-q", "verify", str(upstream_dirs[variant]), "--format", "hdf5"]) == 0
    assert "ok:" in capsys.readouterr().out


def test_upstream_file_alone_without_config(tmp_path, upstream_dirs, small_expected) -> None:
    """Upstream puts no config in the file: without config.json beside it the config is missing, named."""
    (tmp_path / "only").mkdir()
    shutil.copy(upstream_dirs["splits_in_file_only"] / "dataset.h5", tmp_path / "only" / "dataset.h5")
    reader = open_dataset(tmp_path / "only")
    assert reader.storage_format == "hdf5"
    idx = np.array([4, 0, 4])
    assert_bits_equal(reader.take("steering_centroid", idx), small_expected.tensors["steering_centroid"][idx], "sc")
    assert_bits_equal(reader.split("test"), small_expected.splits["test"], "test split")
    with pytest.raises(DatasetNotFoundError, match=r"Config file not found: .*config\.json"):
        _ = reader.config
