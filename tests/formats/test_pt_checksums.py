"""The PT checksum sidecar (NOTE [PT checksum sidecar] in formats.pt_checksums): a changed byte in a PT tensor is
refused on first touch through every front-end; a sidecar that does not describe a file is ignored with a warning;
a malformed one is refused; without one, only float values are checked (a changed byte can be served)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _support import flip_byte

from jasper_ray import JASPERSteeringDataset, open_dataset
from jasper_ray.errors import ChecksumError, DatasetFormatError
from jasper_ray.formats.pt import write_pt_checksums, zip_records
from jasper_ray.schema import PT_CHECKSUMS, TENSOR


def _flip_row(directory: Path, name: str, row: int) -> np.ndarray:
    """Flip a byte of ``row`` of tensor ``name`` in its PT file (in place, as a disk or a stray write would);
    return the row as now stored."""
    path = directory / TENSOR[name].pt_file
    with open(path, "rb") as f:
        offset, _ = zip_records(f, str(path))["data/0"]
    with open_dataset(directory, "pt", verify="off") as reader:
        row_bytes = reader.array(name)[:1].nbytes
    flip_byte(path, offset + row * row_bytes + 1)  # a low mantissa byte: the value stays finite
    with open_dataset(directory, "pt", verify="off") as reader:
        return reader.take(name, [row])[0]


@pytest.fixture
def pt_copy(small_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(small_dir, tmp_path / "ds"))


@pytest.mark.parametrize("use_mmap", [True, False], ids=["mmap", "load"])
def test_a_changed_byte_in_a_pt_tensor_is_refused(pt_copy: Path, use_mmap: bool) -> None:
    assert (pt_copy / PT_CHECKSUMS).is_file()  # synth writes it
    changed = _flip_row(pt_copy, "steering_residual", 1500)
    reader = open_dataset(pt_copy, "pt", use_mmap=use_mmap)
    with pytest.raises(ChecksumError, match=r"steering_residual.pt: rows 0:2000 \(checksum block 0\) do not match"):
        reader.take("steering_residual", [1500])
    with pytest.raises(ChecksumError):
        ds = JASPERSteeringDataset(pt_copy, "train", storage_format="pt", use_mmap=use_mmap)
        ds.force_steering("residual")
        ds.get_batch(np.arange(len(ds)))
    with pytest.raises(ChecksumError, match=r"steering_residual.pt: rows 0:2000"):
        open_dataset(pt_copy, "pt", verify="open")
    served = open_dataset(pt_copy, "pt", verify="off").take("steering_residual", [1500])[0]
    assert served.tobytes() == changed.tobytes()


def test_read_jasper_refuses_a_changed_byte_in_a_pt_tensor(pt_copy: Path, ray_session) -> None:
    from jasper_ray import read_jasper

    _flip_row(pt_copy, "question_embs", 0)
    ds = read_jasper(
        pt_copy, "train", storage_format="pt", columns=["question_emb"], ray_remote_args={"max_retries": 0}
    )
    with pytest.raises(ChecksumError, match=r"question_embs.pt: rows \d+:\d+ \(checksum block 0\) do not match"):
        ds.take_all()


def test_without_a_sidecar_only_float_values_are_checked(pt_copy: Path) -> None:
    """The documented behaviour without a sidecar (upstream's builder writes none): a changed byte that leaves a
    finite value is served; one that makes NaN is refused."""
    from jasper_ray import ValidationError

    (pt_copy / PT_CHECKSUMS).unlink()
    changed = _flip_row(pt_copy, "steering_residual", 1500)
    assert open_dataset(pt_copy, "pt").take("steering_residual", [1500])[0].tobytes() == changed.tobytes()
    array = torch.load(pt_copy / TENSOR["steering_centroid"].pt_file, weights_only=True).numpy().copy()
    array[7, 2] = np.nan
    torch.save(torch.from_numpy(array), pt_copy / TENSOR["steering_centroid"].pt_file)
    with pytest.raises(ValidationError, match=r"steering_centroid.pt at position \(7, 2\): found value nan"):
        open_dataset(pt_copy, "pt").take("steering_centroid", [7])


def test_a_file_saved_again_is_not_described_by_the_sidecar(pt_copy: Path, caplog) -> None:
    """A tensor saved again (other values: a rebuilt dataset) has another identity: the sidecar is ignored for
    it, with a warning naming the fix, and its values are served (checked for NaN/inf only)."""
    path = pt_copy / TENSOR["steering_centroid"].pt_file
    array = torch.load(path, weights_only=True).numpy().copy()
    array[5] += 1.0
    torch.save(torch.from_numpy(array), path)
    with caplog.at_level(logging.WARNING, logger="jasper_ray"):
        got = open_dataset(pt_copy, "pt").take("steering_centroid", [5])[0]
    np.testing.assert_array_equal(got, array[5])
    assert f"{PT_CHECKSUMS} does not describe this file (saved again since it was recorded)" in caplog.text
    assert f"`jasper-ray checksum {pt_copy}`" in caplog.text
    write_pt_checksums(pt_copy)  # recorded again: covered again
    _flip_row(pt_copy, "steering_centroid", 5)
    with pytest.raises(ChecksumError):
        open_dataset(pt_copy, "pt").take("steering_centroid", [5])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: "not json", r"unreadable JSON"),
        (lambda d: {**d, "format": "other"}, r"'format' is not 'jasper_ray.pt_checksums'"),
        (lambda d: {**d, "version": 2}, r"'version' 2, this reader knows 1"),
        (lambda d: {**d, "tensors": {"nope": {}}}, r"unknown tensor 'nope'"),
        (lambda d: _tensor(d, xxh3_128=["00" * 16]), r"'xxh3_128' is not a list of 1 hex digests of 16 bytes"),
        (lambda d: _tensor(d, block_rows=0), r"'block_rows' 0 is not a positive integer"),
        (lambda d: _tensor(d, file="../../other.pt"), r"'file' is not 'steering_residual.pt'"),
        (lambda d: _tensor(d, all_finite="yes"), r"'all_finite' is not true or false"),
    ],
    ids=["json", "format", "version", "tensor", "digests", "block-rows", "file", "finite"],
)
def test_a_malformed_sidecar_is_refused(pt_copy: Path, edit, message: str) -> None:
    path = pt_copy / PT_CHECKSUMS
    doc = edit(json.loads(path.read_text()))
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(DatasetFormatError, match=message + r".*`jasper-ray checksum DIR`"):
        open_dataset(pt_copy, "pt").take("steering_residual", [0])


def _tensor(doc: dict, **changes: object) -> dict:
    entry = doc["tensors"]["steering_residual"]
    if "xxh3_128" in changes:
        changes["xxh3_128"] = changes["xxh3_128"] * 2  # two digests for one block
    entry.update(changes)
    return doc
