"""Fast block digests (NOTE [fast block digests] in formats.checksum): every writer records them beside the
sha256 block digests, first-touch reads check them, and what lacks them (earlier files) still works."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import xxhash
from _support import write_sharded

import jasper_ray.formats.checksum as checksum
from jasper_ray import convert_pt_to_hdf5, open_dataset
from jasper_ray.errors import ChecksumError, DatasetFormatError
from jasper_ray.formats import serving
from jasper_ray.formats.checksum import BlockDigests, BlockHasher
from jasper_ray.formats.serving import serving_copy
from jasper_ray.schema import (
    ATTR_BLOCK_DIGESTS,
    ATTR_CHECKSUM_BLOCK_ROWS,
    ATTR_FAST_DIGESTS,
    ATTR_FINITE,
    HDF5_FILE,
    MANIFEST,
    SHARDS_DIR,
    TENSORS,
)

SMALL_BLOCK = 64 << 10  # several checksum blocks per tensor of the small dataset (tests/conftest.py)


def blocks_of(rows: np.ndarray, block_rows: int) -> list[bytes]:
    return [np.ascontiguousarray(rows[a : a + block_rows]).tobytes() for a in range(0, len(rows), block_rows)]


def test_block_hasher_digests_blocks_fed_in_any_ranges() -> None:
    rows = np.random.default_rng(0).standard_normal((1000, 7)).astype(np.float32)
    blocks = blocks_of(rows, 64)
    for sha256 in (True, False):
        hasher = BlockHasher(64, 7 * 4, sha256=sha256)
        for a, b in [(0, 5), (5, 300), (300, 301), (301, 1000)]:
            hasher.update(rows[a:b])
        got = hasher.finish()
        assert got.fast == [xxhash.xxh3_128_digest(b) for b in blocks]
        assert got.sha256 == ([hashlib.sha256(b).digest() for b in blocks] if sha256 else [])
    half, rest = BlockHasher(64, 28), BlockHasher(64, 28)
    half.update(rows[:512])  # a block-aligned split, as conversion pieces are
    rest.update(rows[512:])
    joined = half.finish() + rest.finish()
    assert joined.sha256 == [hashlib.sha256(b).digest() for b in blocks]
    assert joined.fast == [xxhash.xxh3_128_digest(b) for b in blocks]
    assert (BlockDigests([b"s" * 32], []) + BlockDigests([b"t" * 32], [b"f" * 16])).fast == []  # one side lacks them


@pytest.fixture(scope="module")
def written(tmp_path_factory, small_dir: Path) -> dict[str, Path]:
    """The small dataset, written with 64 KiB checksum blocks by the single-process writer (none, lzf) and
    as the sharded layout (the Ray pieces' own code: tests/_support.write_sharded)."""
    out = {}
    for key, compression in [("single-none", None), ("single-lzf", "lzf"), ("sharded-lzf", "lzf")]:
        d = Path(shutil.copytree(small_dir, tmp_path_factory.mktemp(key) / "ds"))
        if key.startswith("sharded"):
            write_sharded(d, compression)
        else:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(checksum, "BLOCK_BYTES", SMALL_BLOCK)
                convert_pt_to_hdf5(d, compression=compression, progress=False)
        out[key] = d
    return out


@pytest.mark.parametrize("key", ["single-none", "single-lzf"])
def test_single_file_records_both_digests_of_every_block(written, small_dir: Path, key: str) -> None:
    source = open_dataset(small_dir, "pt", use_mmap=False)
    with h5py.File(written[key] / HDF5_FILE, "r") as f:
        for spec in TENSORS:
            dset = f[spec.h5_path]
            rows = np.asarray(source.array(spec.name))
            blocks = blocks_of(rows, int(dset.attrs[ATTR_CHECKSUM_BLOCK_ROWS]))
            assert dset.attrs[ATTR_FAST_DIGESTS].tobytes() == b"".join(xxhash.xxh3_128_digest(b) for b in blocks)
            assert dset.attrs[ATTR_BLOCK_DIGESTS].tobytes() == b"".join(hashlib.sha256(b).digest() for b in blocks)
            assert len(blocks) > 1 or rows.nbytes <= SMALL_BLOCK


def test_sharded_manifest_records_the_fast_digests_of_each_shard(written, small_dir: Path) -> None:
    source = open_dataset(small_dir, "pt", use_mmap=False)
    manifest = json.loads((written["sharded-lzf"] / SHARDS_DIR / MANIFEST).read_text())
    n_shards = 0
    for tensor in manifest["tensors"]:
        spec = next((s for s in TENSORS if s.h5_path == tensor["h5_path"]), None)
        if spec is None:
            continue
        rows = np.asarray(source.array(spec.name))
        for shard in tensor["shards"]:
            blocks = blocks_of(rows[shard["start"] : shard["stop"]], tensor["checksum_block_rows"])
            assert shard["block_xxh3_128"] == [xxhash.xxh3_128_digest(b).hex() for b in blocks]
            assert shard["all_finite"] is (True if spec.dtype.kind == "f" else None)
            with h5py.File(written["sharded-lzf"] / SHARDS_DIR / shard["file"], "r") as f:
                assert f[spec.h5_path].attrs[ATTR_FAST_DIGESTS].tobytes().hex() == "".join(shard["block_xxh3_128"])
            n_shards += 1
    assert n_shards > len(TENSORS)  # some tensors span shards


def test_first_touch_checks_the_fast_digest(written, tmp_path: Path) -> None:
    """A fast digest that does not match the bytes refuses its block (the bytes are fine: only the fast digest
    is wrong), so it is what reads check; `verify` (sha256) still passes."""
    d = Path(shutil.copytree(written["single-none"], tmp_path / "ds"))
    with h5py.File(d / HDF5_FILE, "r+") as f:
        attrs = f["steering/centroid"].attrs
        fast = attrs[ATTR_FAST_DIGESTS].copy()
        fast[16] ^= 1  # block 1's digest
        attrs[ATTR_FAST_DIGESTS] = fast
    reader = open_dataset(d)
    reader.take("steering_centroid", [0, 1999])  # blocks 0 and 3
    with pytest.raises(ChecksumError, match=r"steering/centroid: rows 512:1024 \(checksum block 1\) do not match"):
        reader.take("steering_centroid", [600])
    assert open_dataset(d, verify="off").verify_checksums() == []


def test_sharded_reads_check_the_manifests_fast_digests(written, tmp_path: Path) -> None:
    d = Path(shutil.copytree(written["sharded-lzf"], tmp_path / "ds"))
    path = d / SHARDS_DIR / MANIFEST
    manifest = json.loads(path.read_text())
    tensor = next(t for t in manifest["tensors"] if t["h5_path"] == "steering/residual")
    shard = tensor["shards"][1]
    digest = shard["block_xxh3_128"][0]
    shard["block_xxh3_128"][0] = ("0" if digest[0] != "0" else "1") + digest[1:]
    path.write_text(json.dumps(manifest))
    reader = open_dataset(d)
    with pytest.raises(ChecksumError, match=rf"rows {shard['start']}:\d+ \(checksum block \d+\) do not match"):
        reader.take("steering_residual", [shard["start"]])
    for bad in (shard["block_xxh3_128"][:-1] + ["zz" * 16], shard["block_xxh3_128"] + [digest], "abc"):
        shard["block_xxh3_128"] = bad
        path.write_text(json.dumps(manifest))
        with pytest.raises(DatasetFormatError, match=r"shard 1: block_xxh3_128 is not a list of \d+ hex digests"):
            open_dataset(d).take("steering_residual", [0])
    shard["block_xxh3_128"], shard["all_finite"] = [digest], "yes"
    path.write_text(json.dumps(manifest))
    with pytest.raises(DatasetFormatError, match=r"shard 1: all_finite 'yes', expected true, false or null"):
        open_dataset(d)
    del shard["block_xxh3_128"], shard["all_finite"]  # an earlier version's manifest: the shard's sha256 digests
    path.write_text(json.dumps(manifest))
    assert len(open_dataset(d).take("steering_residual", [shard["start"]])) == 1


@pytest.mark.parametrize("parallel", [False, True], ids=["in-process", "workers"])
def test_serving_copy_of_an_earlier_file_gains_fast_digests(written, tmp_path: Path, monkeypatch, parallel) -> None:
    """A compressed file without fast digests (an earlier version's) gets them on its serving copy, computed
    from the rows that matched its sha256; the copy's first touch then checks them."""
    src = Path(shutil.copytree(written["single-lzf"], tmp_path / "src")) / HDF5_FILE
    with h5py.File(src, "r+") as f:
        recorded = {s.h5_path: f[s.h5_path].attrs[ATTR_FAST_DIGESTS].tobytes() for s in TENSORS}
        for spec in TENSORS:
            del f[spec.h5_path].attrs[ATTR_FAST_DIGESTS]
    dest = tmp_path / "copy" / HDF5_FILE
    dest.parent.mkdir()
    shutil.copy(src.parent / "config.json", dest.parent / "config.json")
    if parallel:
        monkeypatch.setattr(serving, "PARALLEL_MIN_BYTES", 0)
    assert serving_copy(src, dest, "test", workers=2)
    with h5py.File(dest, "r") as f:
        for spec in TENSORS:
            assert f[spec.h5_path].chunks is None
            assert f[spec.h5_path].attrs[ATTR_FAST_DIGESTS].tobytes() == recorded[spec.h5_path]
    every = np.arange(2000)
    want = open_dataset(src.parent).take("steering_residual", every)
    np.testing.assert_array_equal(open_dataset(dest.parent).take("steering_residual", every), want)


def test_rows_a_writer_found_finite_are_not_scanned_again(written, tmp_path: Path, monkeypatch) -> None:
    """A float tensor whose writer found every value finite records it: first touch hashes its blocks and skips
    the NaN/inf scan (the bytes matching the digest are the values the writer saw). Without the record, it
    scans."""
    from jasper_ray.formats import verified

    scanned: list[str] = []
    real = verified.check_finite
    monkeypatch.setattr(verified, "check_finite", lambda where, *a, **k: (scanned.append(where), real(where, *a, **k)))
    d = Path(shutil.copytree(written["single-none"], tmp_path / "ds"))
    with h5py.File(d / HDF5_FILE, "r") as f:
        assert all(f[s.h5_path].attrs.get(ATTR_FINITE) == 1 for s in TENSORS if s.dtype.kind == "f")
        assert all(ATTR_FINITE not in f[s.h5_path].attrs for s in TENSORS if s.dtype.kind != "f")
    open_dataset(d).take("steering_residual", np.arange(2000))
    assert scanned == []
    with h5py.File(d / HDF5_FILE, "r+") as f:
        del f["steering/residual"].attrs[ATTR_FINITE]
    open_dataset(d).take("steering_residual", np.arange(2000))
    assert len(scanned) == 4  # its 4 blocks of 64 KiB, each one scan piece


def test_a_tensor_written_with_nan_is_scanned_when_nan_is_no_longer_allowed(small_dir: Path, tmp_path: Path) -> None:
    """Written while config.json allowed NaN, a tensor records no all_finite; when the config stops allowing
    NaN, first touch refuses the value (its digest matches: the scan is what finds it)."""
    from _support import edit_config, load_pt, save_pt

    from jasper_ray import ValidationError
    from jasper_ray.schema import TENSOR

    d = Path(shutil.copytree(small_dir, tmp_path / "ds"))
    spec = TENSOR["steering_keyword_weighted"]
    array = load_pt(d / spec.pt_file).numpy().copy()
    array[1234, 5] = np.nan
    save_pt(d, spec.pt_file, array)
    edit_config(d, allow_nonfinite=True)
    convert_pt_to_hdf5(d, compression=None, progress=False)
    with h5py.File(d / HDF5_FILE, "r") as f:
        assert ATTR_FINITE not in f[spec.h5_path].attrs and f["steering/centroid"].attrs[ATTR_FINITE] == 1
    for pt in d.glob("*.pt"):
        pt.unlink()
    assert np.isnan(open_dataset(d).take(spec.name, [1234])[0, 5])  # allowed
    edit_config(d, allow_nonfinite=False)
    with pytest.raises(ValidationError, match=r"steering/keyword_weighted.* at position \(1234, 5\): found value nan"):
        open_dataset(d).take(spec.name, [1234])
