"""A dataset.h5 is never served silently once the PT files it came from change; HDF5-only directories load."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from _support import assert_bits_equal, save_pt

from jasper_ray import StaleDatasetError, convert_pt_to_hdf5, open_dataset
from jasper_ray.schema import KEYWORD_IDS, TENSOR


@pytest.fixture
def converted_copy(tmp_path: Path, converted) -> Path:
    return Path(shutil.copytree(converted("gzip"), tmp_path / "ds"))


def _rewrite_same_size(directory: Path, expected) -> str:
    """Different values, same shape and dtype: the file size does not change, only its bytes.

    torch.save names the zip records after the file it writes, as upstream's builder does.
    """
    name = "pair_relevance"
    file_name = TENSOR[name].pt_file
    torch.save(torch.from_numpy(expected.tensors[name][::-1].copy()), directory / file_name)
    return file_name


@pytest.mark.parametrize("change", ["same-size", "new-size", "keywords", "split"])
def test_changed_pt_files_make_hdf5_stale(converted_copy: Path, small_expected, caplog, change) -> None:
    size_before = None
    if change == "same-size":
        size_before = (converted_copy / "pair_relevance.pt").stat().st_size
        changed = _rewrite_same_size(converted_copy, small_expected)
        assert (converted_copy / changed).stat().st_size == size_before
    elif change == "new-size":
        changed = TENSOR["steering_residual"].pt_file
        save_pt(converted_copy, changed, small_expected.tensors["steering_residual"] * 2)
    elif change == "keywords":
        changed = KEYWORD_IDS.pt_file
        lists = [list(k) for k in small_expected.keyword_ids]
        lists[0] = [1, 2, 3]
        save_pt(converted_copy, changed, lists)
    else:
        changed = "val_idx.pt"
        save_pt(converted_copy, changed, small_expected.splits["val"][:-1].copy())

    with caplog.at_level(logging.WARNING, logger="jasper_ray"):
        reader = open_dataset(converted_copy)
    assert reader.storage_format == "pt", "auto serves the PT files, not the stale dataset.h5"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("stale" in w and changed in w for w in warnings), warnings

    with pytest.raises(StaleDatasetError, match=rf"dataset\.h5 is stale: .*{changed}.* changed since it was converted"):
        open_dataset(converted_copy, storage_format="hdf5")

    # Reconverting makes it fresh again, and it serves the new values.
    convert_pt_to_hdf5(converted_copy, "gzip", progress=False)
    reader = open_dataset(converted_copy)
    assert reader.storage_format == "hdf5"
    if change == "same-size":
        assert_bits_equal(reader.read("pair_relevance"), small_expected.tensors["pair_relevance"][::-1], "new values")


def test_touching_without_changing_is_not_stale(converted_copy: Path) -> None:
    """A new mtime alone (touch, checkout) is checked against the content and passes."""
    path = converted_copy / "hard_negatives.pt"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert open_dataset(converted_copy).storage_format == "hdf5"
    assert open_dataset(converted_copy, storage_format="hdf5").storage_format == "hdf5"


def test_a_plain_cp_copy_is_not_stale(tmp_path: Path, converted, small_expected) -> None:
    """``cp -r`` gives every file a new mtime but the same bytes: still fresh."""
    source = converted("lzf")
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(source), str(copy)], check=True)
    assert (copy / "pair_index.pt").stat().st_mtime_ns != (source / "pair_index.pt").stat().st_mtime_ns
    reader = open_dataset(copy)
    assert reader.storage_format == "hdf5"
    open_dataset(copy, storage_format="hdf5")  # no StaleDatasetError
    assert_bits_equal(reader.read("pair_index"), small_expected.tensors["pair_index"], "pair_index")


def test_new_pt_file_beside_hdf5_is_stale(converted_copy: Path, small_expected) -> None:
    """A split file that did not exist at conversion time is a change too."""
    save_pt(converted_copy, "holdout_idx.pt", np.array([1, 2, 3]))
    assert open_dataset(converted_copy).storage_format == "pt"
    with pytest.raises(StaleDatasetError, match="holdout_idx.pt"):
        open_dataset(converted_copy, storage_format="hdf5")


def _assert_full_dataset(reader, expected) -> None:
    assert reader.storage_format == "hdf5"
    assert set(reader.split_names()) == {"train", "val", "test"}
    for split, ids in expected.splits.items():
        assert_bits_equal(reader.split(split), ids, split)
    assert reader.config == expected.config
    idx = np.array([11, 0, 11, expected.n_pairs - 1])
    for name in ("steering_keyword_weighted", "hard_negatives", "pair_relevance"):
        assert_bits_equal(reader.take(name, idx), expected.tensors[name][idx], name)
    assert [k.tolist() for k in reader.keyword_ids(idx)] == [expected.keyword_ids[p] for p in idx]


@pytest.mark.parametrize("compression", ["gzip", None], ids=["gzip", "none"])
def test_hdf5_and_config_only(tmp_path: Path, converted, small_expected, compression) -> None:
    """The upload workflow: dataset.h5 + config.json, no PT files. Splits come from the file."""
    directory = tmp_path / "ds"
    directory.mkdir()
    for name in ("dataset.h5", "config.json"):
        shutil.copy(converted(compression) / name, directory / name)
    _assert_full_dataset(open_dataset(directory), small_expected)
    _assert_full_dataset(open_dataset(directory, storage_format="hdf5", use_mmap=False), small_expected)


def test_hdf5_alone_carries_its_config(tmp_path: Path, converted, small_expected) -> None:
    directory = tmp_path / "ds"
    directory.mkdir()
    shutil.copy(converted("gzip") / "dataset.h5", directory / "dataset.h5")
    _assert_full_dataset(open_dataset(directory, use_mmap=True), small_expected)
    _assert_full_dataset(open_dataset(directory / "dataset.h5"), small_expected)


def test_config_json_beside_wins_over_the_embedded_copy(tmp_path: Path, converted, small_expected) -> None:
    import json

    directory = tmp_path / "ds"
    directory.mkdir()
    shutil.copy(converted("gzip") / "dataset.h5", directory / "dataset.h5")
    edited = {**small_expected.config, "curriculum": {}}
    (directory / "config.json").write_text(json.dumps(edited))
    assert open_dataset(directory).config == edited
