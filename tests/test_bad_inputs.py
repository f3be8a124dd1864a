"""Bad inputs and faults (issue 17): one test per case, each asserting the refusal names the place and the fix.

Cases of the issue's list "served wrong or crashed" and "vague errors"; validation of
tensor contents has its own table in test_validation.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from _support import FILL_AFTER_RESERVING, free_after_filling, mounted_tmpfs, subprocess_env, write_sharded

from jasper_ray import open_dataset
from jasper_ray.atomic import remove_orphan_temps, temp_path_for, writer_tag
from jasper_ray.errors import DatasetFormatError, StaleDatasetError
from jasper_ray.fingerprint import changed_files
from jasper_ray.schema import HDF5_FILE, MANIFEST, TENSOR, TENSORS

# --- shared-filesystem safety: temp names carry host, pid and start time ---------------------------


def test_temp_names_carry_host_pid_and_start_time(tmp_path: Path) -> None:
    host, pid, start = writer_tag().split(".")
    assert pid == str(os.getpid()) and int(start) > 0 and host
    assert temp_path_for(tmp_path / "x.h5").name == f".x.h5.tmp-{host}.{pid}.{start}"


def test_orphan_cleanup_judges_only_this_hosts_dead_writers(tmp_path: Path) -> None:
    final = tmp_path / "dataset.h5"
    host, _, _ = writer_tag().split(".")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        keep = {
            "live writer": temp_path_for(final, live.pid),
            "this process": temp_path_for(final),
            "same pid on another host": final.with_name(f".dataset.h5.tmp-otherhost.{live.pid}.1"),
            "dead pid on another host": final.with_name(f".dataset.h5.tmp-otherhost.{dead.pid}.1"),
            "an earlier version's pid-only tag": final.with_name(f".dataset.h5.tmp-{dead.pid}"),
        }
        gone = {
            "dead writer": final.with_name(f".dataset.h5.tmp-{host}.{dead.pid}.1"),
            "reused pid (live, other start time)": final.with_name(f".dataset.h5.tmp-{host}.{live.pid}.1"),
        }
        for path in [*keep.values(), *gone.values()]:
            path.write_bytes(b"half a file")
        removed = remove_orphan_temps(final)
        assert sorted(removed) == sorted(gone.values())
        for what, path in keep.items():
            assert path.exists(), what
    finally:
        live.kill()
        live.wait()


# --- manifest paths must stay inside the dataset ----------------------------------------------------


@pytest.fixture
def sharded_copy(dataset_copy: Path) -> Path:
    write_sharded(dataset_copy, None)
    return dataset_copy


def _edit_manifest(directory: Path, fn) -> Path:
    path = directory / "dataset.shards" / MANIFEST
    manifest = json.loads(path.read_text())
    fn(manifest)
    path.write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_manifest_paths_outside_the_dataset_are_refused(sharded_copy: Path, tmp_path: Path, kind: str) -> None:
    other = tmp_path / "other"
    shutil.copytree(sharded_copy / "dataset.shards", other)  # another dataset's shard of the same size
    shard = json.loads((sharded_copy / "dataset.shards" / MANIFEST).read_text())["tensors"][0]["shards"][0]
    if kind == "symlink":
        target = sharded_copy / "dataset.shards" / shard["file"]
        target.unlink()
        target.symlink_to(other / shard["file"])
        match = "outside .*symlink"
    else:
        name = str(other / shard["file"]) if kind == "absolute" else f"../../other/{shard['file']}"

        def point_out(m: dict) -> None:
            m["tensors"][0]["shards"][0]["file"] = name

        _edit_manifest(sharded_copy, point_out)
        match = "is not a plain name inside"
    with pytest.raises(DatasetFormatError, match=match):
        open_dataset(sharded_copy, "hdf5").read("question_embs", 0, 1)


@pytest.mark.parametrize(
    "breakage,match",
    [
        (lambda m: m.pop("tensors"), "the field 'tensors' is missing"),
        (lambda m: m["tensors"][0]["shards"].pop(0), "shard 0: rows .*expected integer rows from 0"),
        (lambda m: m["tensors"][0].update(shape=[5]), "shards cover .* rows, shape is \\[5\\]"),
        (lambda m: m.update(format_version=99), "format version 99, this jasper_ray reads versions 1 to 1"),
    ],
    ids=["missing-field", "gap", "wrong-rows", "newer-version"],
)
def test_manifest_of_the_wrong_shape(sharded_copy: Path, breakage, match: str) -> None:
    path = _edit_manifest(sharded_copy, breakage)
    with pytest.raises(DatasetFormatError, match=match) as info:
        open_dataset(sharded_copy, "hdf5").read("question_embs", 0, 1)
    assert str(path) in str(info.value)


# --- HDF5 root attributes, foreign files, versions --------------------------------------------------


@pytest.fixture
def h5_copy(converted, tmp_path: Path) -> Path:
    return Path(shutil.copytree(converted(None), tmp_path / "h5"))


def test_newer_format_version_is_refused(h5_copy: Path) -> None:
    with h5py.File(h5_copy / HDF5_FILE, "r+") as f:
        f.attrs["jasper_format_version"] = 7
    with pytest.raises(DatasetFormatError, match="format version 7, this jasper_ray reads versions 1 to 1. Upgrade"):
        open_dataset(h5_copy, "hdf5").read("question_embs", 0, 1)


def test_foreign_hdf5_file_is_named(tmp_path: Path) -> None:
    with h5py.File(tmp_path / HDF5_FILE, "w") as f:
        f["images"] = np.zeros(3)
    with pytest.raises(DatasetFormatError, match=r"not a JASPER dataset: none of the groups .* \(found \['images'\]\)"):
        open_dataset(tmp_path / HDF5_FILE).read("question_embs", 0, 1)


@pytest.mark.parametrize("attr", ["config_json", "source_fingerprint"])
def test_corrupt_root_attributes_are_named(h5_copy: Path, attr: str) -> None:
    for pt in h5_copy.glob("*.pt"):
        pt.unlink()
    (h5_copy / "config.json").unlink()
    with h5py.File(h5_copy / HDF5_FILE, "r+") as f:
        f.attrs[attr] = "{not json"
    with pytest.raises(DatasetFormatError, match=f"root attribute '{attr}' is not valid JSON"):
        reader = open_dataset(h5_copy, "hdf5")
        reader.config, reader.source_fingerprint()


# --- stale detection: an edit in place between the sampled blocks -----------------------------------


def test_in_place_edit_between_samples_is_stale(tmp_path: Path) -> None:
    from jasper_ray.fingerprint import SAMPLE_BLOCKS, SAMPLE_BYTES, fingerprint

    path = tmp_path / "steering_residual.pt"
    path.write_bytes(np.random.default_rng(0).bytes(SAMPLE_BLOCKS * SAMPLE_BYTES * 4))
    recorded = fingerprint([path])
    with open(path, "r+b") as f:  # a byte between the 1st and 2nd sampled 64 KiB blocks, size unchanged
        f.seek(SAMPLE_BYTES + 10)
        byte = f.read(1)
        f.seek(SAMPLE_BYTES + 10)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(path, ns=(time.time_ns(), recorded[path.name]["mtime_ns"] + 10**9))
    assert changed_files(tmp_path, recorded, [path]) == ["steering_residual.pt"]
    # A touch (same bytes, new mtime) is not a change: the whole-file crc32 decides.
    recorded = fingerprint([path])
    os.utime(path, ns=(time.time_ns(), recorded[path.name]["mtime_ns"] + 10**9))
    assert changed_files(tmp_path, recorded, [path]) == []


def test_in_place_edit_is_never_served(h5_copy: Path) -> None:
    path = h5_copy / TENSOR["steering_residual"].pt_file
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2 + 12345)
        byte = f.read(1)
        f.seek(st.st_size // 2 + 12345)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(StaleDatasetError, match="steering_residual.pt changed since it was converted"):
        open_dataset(h5_copy, "hdf5")
    assert open_dataset(h5_copy).storage_format == "pt"


# --- non-finite values: refused, naming tensor and position; a documented opt-out -------------------

NONFINITE = [
    ("question_embs", (3, 5), np.nan, "a finite value"),
    ("steering_residual", (17, 2), np.inf, "a finite value"),
    ("pair_relevance", 11, np.nan, "a finite value"),
    ("centroid_distances", 9, -0.5, "a finite value >= 0.0"),
]


@pytest.mark.parametrize("name,position,value,expected", NONFINITE, ids=[c[0] for c in NONFINITE])
def test_nonfinite_values_are_refused(dataset_copy: Path, name, position, value, expected) -> None:
    from _support import load_pt, save_pt

    from jasper_ray import ValidationError, convert_pt_to_hdf5, validate_dataset
    from jasper_ray.local.dataset import JASPERSteeringDataset

    array = load_pt(dataset_copy / TENSOR[name].pt_file).numpy().copy()
    array[position] = value
    save_pt(dataset_copy, TENSOR[name].pt_file, array)
    want = f"{TENSOR[name].pt_file} at position {position}: found value {value}, expected {expected}"
    with pytest.raises(ValidationError, match=re_escape(want)):
        validate_dataset(open_dataset(dataset_copy, "pt"), scan_floats=True)  # what verify and convert run
    verify_cli = subprocess.run(
        [sys.executable, "-m", "jasper_ray", "verify", str(dataset_copy)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert verify_cli.returncode == 1 and want in verify_cli.stderr + verify_cli.stdout, verify_cli.stderr
    out = dataset_copy.parent / "converted.h5"  # the float tables: refused as written (NOTE [floats checked ...])
    with pytest.raises(ValidationError, match=re_escape(want)):
        convert_pt_to_hdf5(dataset_copy, "gzip", output=out, progress=False)
    assert not out.exists()
    with pytest.raises(ValidationError, match=re_escape(want)):
        ds = JASPERSteeringDataset(dataset_copy, "train")  # serving: at open, or the first read of the block
        ds.get_batch(np.arange(len(ds)))
        ds.reader.take(name, np.arange(ds.reader.shape(name)[0]))
    # The opt-out: "allow_nonfinite": true in config.json (a negative distance stays refused).
    from _support import edit_config

    edit_config(dataset_copy, allow_nonfinite=True)
    if value < 0:
        with pytest.raises(ValidationError, match=re_escape(want)):
            validate_dataset(open_dataset(dataset_copy, "pt"), scan_floats=True)
    else:
        validate_dataset(open_dataset(dataset_copy, "pt"), scan_floats=True)
        convert_pt_to_hdf5(dataset_copy, "gzip", output=out, progress=False)
        got = JASPERSteeringDataset(dataset_copy, "train").reader.take(
            name, [position if np.ndim(position) == 0 else position[0]]
        )
        assert not np.isfinite(got).all()


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_invalid_curriculum_is_refused_by_validation(dataset_copy: Path) -> None:
    """One check for verify, convert and load (verify and convert accepted it, load refused it)."""
    from _support import edit_config

    from jasper_ray import ValidationError, convert_pt_to_hdf5, validate_dataset

    edit_config(dataset_copy, curriculum={"mode": "exponential"})
    match = re_escape(
        "config.json curriculum['mode']: found 'exponential', expected one of ['fixed', 'linear', 'cosine']"
    )
    with pytest.raises(ValidationError, match=match):
        validate_dataset(open_dataset(dataset_copy, "pt"))
    with pytest.raises(ValidationError, match=match):
        convert_pt_to_hdf5(dataset_copy, progress=False)
    assert not (dataset_copy / HDF5_FILE).exists()


def test_duplicate_and_overlapping_split_ids_warn(dataset_copy: Path, caplog) -> None:
    from _support import load_pt, save_pt

    from jasper_ray import validate_dataset

    train = load_pt(dataset_copy / "train_idx.pt").numpy()
    val = load_pt(dataset_copy / "val_idx.pt").numpy()
    save_pt(dataset_copy, "train_idx.pt", np.concatenate([train, train[:3], val[:2]]))
    with caplog.at_level("WARNING", logger="jasper_ray.validate"):
        validate_dataset(open_dataset(dataset_copy, "pt"))
    text = caplog.text
    assert "train_idx.pt: 3 pair id(s) appear more than once" in text
    assert "splits 'train' and 'val' share 2 pair id(s)" in text or "splits 'test' and 'train'" in text


def test_epoch_and_positions_must_be_integers(small_dir: Path) -> None:
    from jasper_ray.local.dataset import JASPERSteeringDataset
    from jasper_ray.validate import check_batch_size

    ds = JASPERSteeringDataset(small_dir, "train")
    with pytest.raises(ValueError, match=r"epoch must be an integer >= 0, got 1.7"):
        ds.set_epoch(1.7)
    with pytest.raises(ValueError, match=r"epoch must be an integer >= 0, got -1"):
        JASPERSteeringDataset(small_dir, "train", epoch=-1)
    with pytest.raises(TypeError, match=r"positions in split 'train' must be integers, got float64 values such as 0.5"):
        ds.get_batch([0.5])
    with pytest.raises(IndexError, match=r"Index 5000 out of range \[0, \d+\)"):
        ds.get_batch([1, 5000])
    for bad in (-1, 0, 2.5, True):
        with pytest.raises(ValueError, match=f"batch_size must be an integer >= 1, got {bad!r}"):
            check_batch_size(bad)
    assert check_batch_size(np.int64(4)) == 4


# --- read verification: a changed byte never reaches a model ----------------------------------------

SMALL_BLOCK = 64 << 10  # checksum blocks of 64 KiB: the small dataset's tensors span several


@pytest.fixture(scope="module")
def small_block_layouts(tmp_path_factory, small_dir: Path) -> dict[str, Path]:
    """The small dataset converted with 64 KiB checksum blocks: single none / lzf, sharded none / lzf."""
    import jasper_ray.formats.checksum as checksum
    from jasper_ray import convert_pt_to_hdf5

    out = {}
    for layout in ("single", "sharded"):
        for compression in (None, "lzf"):
            key = f"{layout}-{compression or 'none'}"
            d = Path(shutil.copytree(small_dir, tmp_path_factory.mktemp(key) / "ds"))
            if layout == "sharded":
                write_sharded(d, compression)
            else:
                with pytest.MonkeyPatch.context() as patch:
                    patch.setattr(checksum, "BLOCK_BYTES", SMALL_BLOCK)
                    convert_pt_to_hdf5(d, compression=compression, progress=False)
            for pt in d.glob("*.pt"):  # serve the converted files only
                pt.unlink()
            out[key] = d
    return out


def _stored_file(directory: Path, h5_path: str, row: int) -> tuple[Path, int]:
    """The file holding ``row`` of ``h5_path`` and the byte offset of one of its stored bytes."""
    files = (
        [directory / HDF5_FILE]
        if (directory / HDF5_FILE).exists()
        else sorted((directory / "dataset.shards").glob("*.h5"))
    )
    for path in files:
        with h5py.File(path, "r") as f:
            if h5_path not in f:
                continue
            dset = f[h5_path]
            start = int(dset.attrs.get("start", 0))
            if not start <= row < start + dset.shape[0]:
                continue
            local = row - start
            if dset.chunks is None:
                return path, dset.id.get_offset() + local * dset.dtype.itemsize * int(np.prod(dset.shape[1:]))
            info = dset.id.get_chunk_info_by_coord((local // dset.chunks[0] * dset.chunks[0],) + (0,) * (dset.ndim - 1))
            return path, info.byte_offset + info.size // 2
    raise AssertionError(f"row {row} of {h5_path} not found")


LAYOUT_KEYS = ["single-none", "single-lzf", "sharded-none", "sharded-lzf"]


@pytest.mark.parametrize("key", LAYOUT_KEYS)
def test_a_changed_byte_is_never_served(small_block_layouts, tmp_path: Path, key: str) -> None:
    from _support import flip_byte

    from jasper_ray.errors import ChecksumError
    from jasper_ray.local.dataset import JASPERSteeringDataset

    d = Path(shutil.copytree(small_block_layouts[key], tmp_path / "ds"))
    h5_path, row = TENSOR["steering_residual"].h5_path, 1500
    good = open_dataset(d).take("steering_residual", [row, 3])
    path, offset = _stored_file(d, h5_path, row)
    flip_byte(path, offset)
    reader = open_dataset(d)
    block_rows = SMALL_BLOCK // (4 * 32)
    far = (row // block_rows + 2) * block_rows % 2000
    assert np.array_equal(reader.take("steering_residual", [3]), good[1:]) or far  # other blocks are served
    with pytest.raises(
        ChecksumError, match=r"steering/residual: rows \d+:\d+ .*(do not match the checksum|cannot be decoded)"
    ):
        reader.take("steering_residual", [row])
    with pytest.raises(ChecksumError):
        reader.read("steering_residual", row, row + 1)
    for use_mmap in (True, False):  # mapped: the batch's read refuses; in RAM: placing the tensors refuses
        with pytest.raises(ChecksumError):
            ds = JASPERSteeringDataset(d, "train", use_mmap=use_mmap)
            ds.force_steering("residual")
            ds.get_batch(np.arange(len(ds)))
    with pytest.raises(ChecksumError):  # verify="open": refused when opened
        open_dataset(d, verify="open")
    served = open_dataset(d, verify="off")  # off: the documented way to serve without checks
    if "none" in key:
        assert not np.array_equal(served.take("steering_residual", [row]), good[:1])


@pytest.mark.parametrize(
    "removed, refused",
    [
        (["block_xxh3_128"], r"rows 1536:2000 \(checksum block 3\)"),  # sha256 block digests only
        (["block_xxh3_128", "block_digests"], r"rows 0:2000 \(these rows\)"),  # the tensor's checksum only
    ],
    ids=["sha256-blocks", "checksum-only"],
)
def test_files_of_earlier_versions_are_checked(
    small_block_layouts, tmp_path: Path, removed: list[str], refused: str
) -> None:
    """Files of earlier versions record no fast digests (checked per block with sha256), or only the tensor's
    checksum (the first touch checks the whole tensor)."""
    from _support import flip_byte

    from jasper_ray.errors import ChecksumError

    d = Path(shutil.copytree(small_block_layouts["single-none"], tmp_path / "ds"))
    with h5py.File(d / HDF5_FILE, "r+") as f:
        for attr in removed:
            del f["steering/residual"].attrs[attr]
    path, offset = _stored_file(d, "steering/residual", 1999)
    flip_byte(path, offset)
    reader = open_dataset(d)
    if len(removed) == 1:
        reader.take("steering_residual", [0])  # another block: served
    with pytest.raises(ChecksumError, match=r"steering/residual: " + refused):
        reader.take("steering_residual", [1999])


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_refuse_a_changed_byte(small_block_layouts, tmp_path: Path, context: str) -> None:
    from _support import flip_byte

    from jasper_ray.local.loader import create_loader

    d = Path(shutil.copytree(small_block_layouts["single-none"], tmp_path / "ds"))
    flip_byte(*_stored_file(d, "steering/centroid", 700))
    loader = create_loader(d, "train", batch_size=256, num_workers=1, multiprocessing_context=context, use_mmap=True)
    loader.dataset.force_steering("centroid")
    with pytest.raises(Exception, match=r"steering/centroid: rows \d+:\d+ \(checksum block \d+\) do not match"):
        for _ in loader:
            pass


def _changed_question(directory: Path) -> tuple[int, np.ndarray]:
    """Flip a byte of the question of a train pair; return the pair and the question's stored (changed) row."""
    from _support import flip_byte

    with open_dataset(directory, verify="off") as reader:
        pair = int(reader.split("train")[0])
        question = int(reader.take("pair_index", [pair])[0, 0])
    flip_byte(*_stored_file(directory, "embeddings/questions", question))
    with open_dataset(directory, verify="off") as reader:
        return pair, reader.take("question_embs", [question])[0]


@pytest.mark.parametrize("verify", ["first-touch", "open", "off"])
def test_read_jasper_verify(small_block_layouts, tmp_path: Path, ray_session, verify: str) -> None:
    """A changed byte through read_jasper: ChecksumError (from a read task with first-touch, from read_jasper
    itself with open), or served with off."""
    from jasper_ray import read_jasper
    from jasper_ray.errors import ChecksumError

    d = Path(shutil.copytree(small_block_layouts["single-none"], tmp_path / "ds"))
    pair, changed = _changed_question(d)
    question_rows = r"embeddings/questions: rows \d+:\d+ \(checksum block \d+\) do not match"
    args = {"columns": ["pair_id", "question_emb"], "verify": verify, "ray_remote_args": {"max_retries": 0}}
    if verify == "open":
        with pytest.raises(ChecksumError, match=r"embeddings/questions: checksum .* does not match"):
            read_jasper(d, "train", **args)
        return
    ds = read_jasper(d, "train", **args)
    if verify == "first-touch":
        with pytest.raises(ChecksumError, match=question_rows):
            ds.take_all()
        return
    rows = ds.take_all()
    served = next(r["question_emb"] for r in rows if r["pair_id"] == pair)
    assert served.tobytes() == changed.tobytes()
    with pytest.raises(ValueError, match=r"verify must be one of \['first-touch', 'open', 'off'\], got 'no'"):
        read_jasper(d, "train", verify="no")


@pytest.mark.parametrize("verify", ["first-touch", "open", "off"])
def test_sharded_jasper_verify(small_block_layouts, tmp_path: Path, ray_session, verify: str) -> None:
    """The same through ShardedJasper: an actor's ChecksumError with first-touch, the client's with open."""
    from jasper_ray.errors import ChecksumError
    from jasper_ray.serve.client import ShardedJasper

    d = Path(shutil.copytree(small_block_layouts["single-none"], tmp_path / "ds"))
    pair, changed = _changed_question(d)
    args = {"batch_size": 256, "num_shards": 2, "num_cpus": 0.25, "verify": verify, "shuffle": False}
    if verify == "open":
        with pytest.raises(ChecksumError, match=r"embeddings/questions: checksum .* does not match"):
            ShardedJasper(d, "train", **args)
        return
    with ShardedJasper(d, "train", **args) as service:
        if verify == "first-touch":
            with pytest.raises(ChecksumError, match=r"embeddings/questions: rows \d+:\d+ \(checksum block"):
                list(service.iter_numpy())
            return
        served = [b["question_emb"][b["pair_id"] == pair].copy() for b in service.iter_numpy()]
    assert np.concatenate(served)[0].tobytes() == changed.tobytes()
    with pytest.raises(ValueError, match=r"verify must be one of"):
        ShardedJasper(d, "train", verify="no")


# --- PT files: truncated, empty, bfloat16, sparse -----------------------------------------------------


@pytest.mark.parametrize("kind", ["truncated", "empty", "bfloat16", "sparse"])
@pytest.mark.parametrize("use_mmap", [True, False], ids=["mmap", "load"])
def test_unreadable_pt_tensors_are_named(dataset_copy: Path, kind: str, use_mmap: bool) -> None:
    import torch

    from jasper_ray.local.dataset import JASPERSteeringDataset

    path = dataset_copy / TENSOR["steering_centroid"].pt_file
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        match = "truncated or damaged torch file"
    elif kind == "empty":
        path.write_bytes(b"")
        match = r"empty file \(0 bytes\)"
    elif kind == "bfloat16":
        torch.save(torch.load(path, weights_only=True).to(torch.bfloat16), path)
        match = r"dtype torch.bfloat16 has no numpy equivalent; the schema stores float32"
    else:
        torch.save(torch.load(path, weights_only=True).to_sparse(), path)
        match = r"a torch.sparse_coo tensor; expected a dense tensor"
    with pytest.raises(DatasetFormatError, match=f"steering_centroid.pt: {match}"):
        JASPERSteeringDataset(dataset_copy, "train", storage_format="pt", use_mmap=use_mmap)


# --- a full disk during a single-process conversion ---------------------------------------------------

FULL_DISK_CHILD = """
import sys
from jasper_ray.conversion.writer import convert_pt_to_hdf5
try:
    convert_pt_to_hdf5(sys.argv[1], compression="gzip", output=sys.argv[2], progress=False)
except OSError as exc:
    print(exc)
    sys.exit(1)
"""


def _converting_child(code: str, source: Path, output: Path) -> subprocess.CompletedProcess:
    """``code`` run in a child process with the source directory and the output as its arguments: HDF5 may crash
    a process whose disk filled (h5py#914)."""
    args = [sys.executable, "-c", code, str(source), str(output)]
    return subprocess.run(args, env=subprocess_env(), capture_output=True, text=True, timeout=120)


def test_a_full_disk_fails_cleanly_in_one_process(dataset_copy: Path, tmp_path: Path) -> None:
    """A 1 MiB tmpfs (the small dataset is ~2.4 MB of PT files): refused before writing, no crash, no temp."""
    target = tmp_path / "full"
    target.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)], capture_output=True)
    assert mounted.returncode == 0, f"cannot mount a tmpfs (the tests run as root): {mounted.stderr!r}"
    try:
        for _ in range(3):  # the crash it replaces happened on every run
            child = _converting_child(FULL_DISK_CHILD, dataset_copy, target / HDF5_FILE)
            assert child.returncode == 1, (child.returncode, child.stderr[-2000:])
            assert f"No space left on device to write {target / HDF5_FILE}: it needs up to" in child.stdout
            assert list(target.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


FILLED_AFTER_RESERVING_CHILD = (
    FILL_AFTER_RESERVING
    + """
import sys
from jasper_ray.conversion.writer import convert_pt_to_hdf5
convert_pt_to_hdf5(sys.argv[1], compression="gzip", output=sys.argv[2], progress=False)
"""
)


def test_a_disk_filled_by_another_process_mid_conversion_does_not_reach_hdf5(
    dataset_copy: Path, tmp_path: Path
) -> None:
    """The single-process writer reserves its file's largest size before HDF5 writes: a disk filled right after
    (before any dataset is written) leaves the conversion whole; without the reservation HDF5 failed inside."""
    target = tmp_path / "filling"
    with mounted_tmpfs(target, "size=64m"):
        child = _converting_child(FILLED_AFTER_RESERVING_CHILD, dataset_copy, target / HDF5_FILE)
        assert child.returncode == 0, child.stderr[-2000:]
        filled = free_after_filling(child.stdout)
        assert filled < (64 << 10), "the disk was full while the file was written"
        assert shutil.disk_usage(target).free > filled, "the reservation's unused rest was given back"
        reader = open_dataset(target, storage_format="hdf5")
        assert reader.verify_checksums() == []
        source = open_dataset(dataset_copy, storage_format="pt")
        for spec in TENSORS:
            assert np.array_equal(reader.read(spec.name), source.read(spec.name)), spec.name
        reader.close()


# --- a file truncated under (or before) a memory-mapped reader ----------------------------------------


def test_a_truncated_mapped_file_is_refused_at_open(h5_copy: Path) -> None:
    """Mapping past the end would kill the process with SIGBUS at the first read: refused when opened."""
    path = h5_copy / HDF5_FILE
    with h5py.File(path, "r") as f:
        end = f["steering/residual"].id.get_offset() + f["steering/residual"].id.get_storage_size()
    with open(path, "r+b") as f:
        f.truncate(end - 100)
    for pt in h5_copy.glob("*.pt"):
        pt.unlink()
    with pytest.raises(DatasetFormatError, match=r"dataset.h5: the file is truncated \(.*truncated file: eof = "):
        open_dataset(h5_copy, use_mmap=True).take("steering_residual", [0])


def test_sigbus_under_a_mapped_reader_is_what_the_docs_say(dataset_copy: Path) -> None:
    """torch.save over a PT file while it is mapped: the reader's process dies of SIGBUS (a documented limit,
    docs/troubleshooting.md); the same rewrite published by rename (jasper_ray's writers) leaves it serving."""
    child = f"""
import numpy as np, torch, os, sys
from jasper_ray import open_dataset
from jasper_ray.formats.pt import PTWriter
r = open_dataset({str(dataset_copy)!r}, "pt", use_mmap=True, verify="off")
before = r.take("steering_residual", [1999]).copy()
path = {str(dataset_copy / TENSOR["steering_residual"].pt_file)!r}
if sys.argv[1] == "rename":
    PTWriter({str(dataset_copy)!r}).write_tensor("steering_residual", torch.zeros(2000, 32))
    assert np.array_equal(r.take("steering_residual", [1999]), before)  # the old mapping still serves
    print("served")
else:
    with open(path, "r+b") as f:
        f.truncate(100)
    r.take("steering_residual", [1999])
"""
    for mode, expected in (("rename", 0), ("in-place", -7)):  # -7: killed by SIGBUS
        run = subprocess.run([sys.executable, "-c", child, mode], env=subprocess_env(), capture_output=True, text=True)
        assert run.returncode == expected, (mode, run.returncode, run.stderr[-1500:])


# --- the Ray front-ends read through the same checks --------------------------------------------------


def test_ray_front_ends_never_serve_a_changed_byte(small_block_layouts, tmp_path: Path, ray_session) -> None:
    """read_jasper's tasks and ShardedJasper's actors open readers with verify="first-touch" (the default)."""
    from _support import flip_byte

    from jasper_ray import ShardedJasper, read_jasper

    d = Path(shutil.copytree(small_block_layouts["single-none"], tmp_path / "ds"))
    flip_byte(*_stored_file(d, "embeddings/sources", 5))  # every batch's negatives reach into the sources
    with pytest.raises(Exception, match=r"embeddings/sources: rows 0:\d+ \(checksum block 0\) do not match"):
        read_jasper(d, "train").take_all()
    with pytest.raises(Exception, match=r"embeddings/sources: rows 0:\d+ \(checksum block 0\) do not match"):
        client = ShardedJasper(d, "train", batch_size=64, num_shards=1, num_cpus=0.25)
        try:
            for _ in client:
                pass
        finally:
            client.close()
