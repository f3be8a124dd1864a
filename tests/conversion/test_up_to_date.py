"""A conversion whose output already holds its PT files converted with the same options does nothing.

Up to date: same sources (a touch that keeps the bytes counts as the same), same compression, level,
shuffle and layout (and piece size for the sharded layout). Anything else converts again; so does force.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import pytest
import torch

from jasper_ray import convert, convert_pt_to_hdf5
from jasper_ray.cli import main
from jasper_ray.schema import HDF5_FILE, MANIFEST, SHARDS_DIR


def _identity(path: Path) -> tuple[int, int]:
    """Which file is there: inode and mtime (a rewrite, atomic by rename, changes both)."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_single_process_rerun_is_a_no_op_until_something_changes(dataset_copy: Path) -> None:
    out = dataset_copy / HDF5_FILE
    first = convert_pt_to_hdf5(dataset_copy, "gzip", progress=False)
    assert not first.up_to_date
    written = _identity(out)

    again = convert_pt_to_hdf5(dataset_copy, "gzip", progress=False)
    assert again.up_to_date and again.shards == 0
    assert again.output_bytes == out.stat().st_size and again.source_bytes == first.source_bytes
    assert again.lines()[0].startswith(f"Up to date: {out}")
    assert _identity(out) == written

    pt = dataset_copy / "pair_relevance.pt"
    os.utime(pt, ns=(pt.stat().st_atime_ns, pt.stat().st_mtime_ns + 10**9))  # touched, the same bytes
    assert convert_pt_to_hdf5(dataset_copy, "gzip", progress=False).up_to_date
    assert _identity(out) == written

    for options in ({"compression": None}, {"compression": "gzip", "compression_opts": 6}, {"shuffle": False}):
        options = {"compression": "gzip", **options}
        report = convert_pt_to_hdf5(dataset_copy, progress=False, **options)
        assert not report.up_to_date, options
        assert convert_pt_to_hdf5(dataset_copy, progress=False, **options).up_to_date, options
    written = _identity(out)

    assert not convert_pt_to_hdf5(dataset_copy, "gzip", shuffle=False, progress=False, force=True).up_to_date
    assert _identity(out) != written

    relevance = torch.load(pt, weights_only=True)
    relevance[0] = 0.5 if relevance[0] != 0.5 else 0.75
    torch.save(relevance, pt)  # a changed source: converted again, the new value in the output
    assert not convert_pt_to_hdf5(dataset_copy, "gzip", shuffle=False, progress=False).up_to_date
    with h5py.File(out) as f:
        assert f["pair_data/relevance"][0] == relevance[0].item()


@pytest.mark.usefixtures("ray_session")
def test_ray_rerun_is_a_no_op_for_both_layouts(dataset_copy: Path) -> None:
    """The Ray converter checks the same way (the single-process output counts), per layout and piece size."""
    out = dataset_copy / HDF5_FILE
    convert_pt_to_hdf5(dataset_copy, None, progress=False)
    written = _identity(out)
    assert convert(dataset_copy, compression=None, progress=False).up_to_date
    assert _identity(out) == written
    assert not convert(dataset_copy, compression="lzf", progress=False).up_to_date

    shards = dataset_copy / SHARDS_DIR
    first = convert(dataset_copy, compression="lzf", layout="sharded", shard_bytes=64 << 10, progress=False)
    assert not first.up_to_date and first.shards > 1
    manifest = _identity(shards / MANIFEST)
    again = convert(dataset_copy, compression="lzf", layout="sharded", shard_bytes=64 << 10, progress=False)
    assert again.up_to_date and _identity(shards / MANIFEST) == manifest
    # Every tensor here is one 16 MiB checksum block: a larger piece size cuts the same shards.
    assert convert(dataset_copy, compression="lzf", layout="sharded", shard_bytes=1 << 30, progress=False).up_to_date
    gzip = convert(dataset_copy, compression="gzip", layout="sharded", shard_bytes=64 << 10, progress=False)
    assert not gzip.up_to_date and _identity(shards / MANIFEST) != manifest
    forced = convert(dataset_copy, compression="gzip", layout="sharded", progress=False, force=True)
    assert not forced.up_to_date and forced.shards == first.shards


def test_cli_reports_up_to_date_and_force_converts(dataset_copy: Path, capsys) -> None:
    args = ["convert", str(dataset_copy), "--single-process", "--compression", "lzf", "-q"]
    assert main(args) == 0
    assert "Conversion complete" in capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out.startswith(f"Up to date: {dataset_copy / HDF5_FILE}")
    assert main([*args, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["up_to_date"] is True and doc["pieces"] == 0 and doc["ok"] is True
    assert main([*args, "--json", "--force"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["up_to_date"] is False and doc["pieces"] == 1
