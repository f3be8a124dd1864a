"""Conversions and CLI commands on s3:// URIs.

The single-process writer reads a remote source by byte ranges as it writes and uploads its output
whole. Ray conversions read a remote source by byte ranges in the tasks and the tasks upload the shards
of a remote sharded output (NOTE [ranged sources], NOTE [pieces in the bucket] in conversion/ranged).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
from _s3 import S3Endpoint
from _support import SLOW_PIECES, h5_objects, kill_driver_after, save_big_endian, save_pt, subprocess_env

from jasper_ray import DatasetFormatError, ValidationError, convert, convert_pt_to_hdf5, open_dataset, synth_dataset
from jasper_ray.conversion.plan import plan_conversion
from jasper_ray.formats.checksum import row_nbytes
from jasper_ray.schema import ATTR_FINGERPRINT, MANIFEST, TENSOR, TENSORS
from jasper_ray.storage.fetch import fetched_bytes


def _assert_same_tensors(got_uri: str, small_dir: Path, cache: Path) -> None:
    with open_dataset(got_uri, cache_dir=cache) as got, open_dataset(small_dir, "pt") as want:
        assert got.storage_format == "hdf5"
        for spec in TENSORS:
            assert np.array_equal(got.read(spec.name), want.read(spec.name)), spec.name
        for split in want.split_names():
            assert np.array_equal(got.split(split), want.split(split))


def test_single_process_conversion_from_s3_to_s3(remote: dict[str, str], small_dir: Path, tmp_path: Path) -> None:
    out = remote["pt"].replace("/pt", "/converted-single")
    report = convert_pt_to_hdf5(remote["pt"], "gzip", output=f"{out}/dataset.h5", progress=False, cache_dir=tmp_path)
    assert report.output == f"{out}/dataset.h5"
    _assert_same_tensors(out, small_dir, tmp_path / "read")
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir()), "staging removed"


def test_single_process_ranged_source_equals_the_local_conversion(
    s3: S3Endpoint, ranged_src: Path, tmp_path: Path
) -> None:
    uri = s3.upload(ranged_src, s3.bucket(), "ds-single")
    want, got = tmp_path / "want.h5", tmp_path / "got.h5"
    convert_pt_to_hdf5(ranged_src, "gzip", output=want, progress=False)
    before = fetched_bytes()
    convert_pt_to_hdf5(uri, "gzip", output=got, progress=False, cache_dir=tmp_path / "c", block_bytes=1 << 20)
    # Read by byte ranges as written: the tensors' data are holes in the cache's skeleton, and about the
    # source's bytes were fetched (windows of each object, its rows once; validation reads ids and scores again).
    cached = list((tmp_path / "c").rglob("*.pt"))
    assert sum(p.stat().st_blocks * 512 for p in cached) < sum(p.stat().st_size for p in cached) // 2
    source_bytes = sum(p.stat().st_size for p in ranged_src.glob("*.pt"))
    assert fetched_bytes() - before < 1.3 * source_bytes, (fetched_bytes() - before, source_bytes)
    expected, objects = h5_objects(want), h5_objects(got)
    expected["/"][1].pop(ATTR_FINGERPRINT), objects["/"][1].pop(ATTR_FINGERPRINT)
    assert objects == expected, "bit for bit but for the sources' fingerprint (objects: ETags, not file bytes)"


def test_ray_conversion_of_an_s3_source_writes_the_sharded_layout_beside_it(
    s3: S3Endpoint, small_dir: Path, tmp_path: Path, ray_session: object
) -> None:
    uri = s3.upload(small_dir, s3.bucket(), "ds")
    report = convert(uri, layout="sharded", compression="lzf", progress=False, cache_dir=tmp_path)
    assert report.output == f"{uri}/dataset.shards"
    names = {
        i.base_name
        for i in s3.admin.get_file_info(__import__("pyarrow.fs").fs.FileSelector(f"{uri[5:]}/dataset.shards"))
    }
    assert "manifest.json" in names and len(names) > 10
    _assert_same_tensors(uri, small_dir, tmp_path / "read")


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jasper_ray", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_cli_inspect_and_verify_take_a_uri(remote: dict[str, str], s3: S3Endpoint, tmp_path: Path) -> None:
    env = {**subprocess_env(), **s3.env}
    inspected = _cli("inspect", remote["gzip"], "--cache-dir", str(tmp_path), "--json", env=env)
    assert inspected.returncode == 0, inspected.stderr[-3000:]
    fields = json.loads(inspected.stdout)
    assert fields["dataset"] == remote["gzip"] and fields["format"] == "hdf5"
    verified = _cli("verify", remote["gzip"], "--cache-dir", str(tmp_path), "-q", env=env)
    assert verified.returncode == 0, verified.stderr[-3000:]
    assert verified.stdout.startswith("ok: "), verified.stdout
    missing = _cli("verify", remote["gzip"] + "-missing", "--cache-dir", str(tmp_path), "-q", env=env)
    assert missing.returncode == 1 and remote["gzip"] + "-missing" in missing.stderr


def test_verify_of_an_s3_sharded_dataset_fetches_and_checks_every_shard(
    remote_shards: str, s3: S3Endpoint, tmp_path: Path
) -> None:
    env = {**subprocess_env(), **s3.env}
    verified = _cli("verify", remote_shards, "--cache-dir", str(tmp_path), "-q", "--json", env=env)
    assert verified.returncode == 0, verified.stderr[-3000:]
    doc = json.loads(verified.stdout)
    assert doc["ok"] and doc["checksums"]["mismatched"] == 0 and doc["checksums"]["recorded"] > 10
    assert doc["layout"] == "sharded"


# --- Ray: tasks read byte ranges, upload their shards --------------------------------------------------------

RANGED = {"n_pairs": 9000, "dim": 512, "n_neg": 4, "seed": 5}  # steering tensors 18 MB: two 16 MiB blocks each
ONE_BLOCK = 1  # shard_bytes: every piece is one checksum block, so large tensors span several pieces


@pytest.fixture(scope="module")
def ranged_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_dataset(tmp_path_factory.mktemp("ranged") / "ds", **RANGED)


@pytest.fixture(scope="module")
def ranged_local(tmp_path_factory: pytest.TempPathFactory, ranged_src: Path, ray_session: object) -> Path:
    """The local Ray conversion of ``ranged_src`` (gzip, sharded): what the bucket must hold, bit for bit."""
    out = tmp_path_factory.mktemp("ranged-local") / "dataset.shards"
    convert(ranged_src, layout="sharded", compression="gzip", shard_bytes=ONE_BLOCK, output=out, progress=False)
    return out


def _download(s3: S3Endpoint, uri: str, dest: Path) -> Path:
    """The object or prefix ``uri`` as the local file or directory ``dest``."""
    path = uri[len("s3://") :]
    is_dir = s3.admin.get_file_info(path).type == pafs.FileType.Directory
    (dest if is_dir else dest.parent).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(dest), source_filesystem=s3.admin)
    return dest


def assert_same_shards(got: Path, want: Path) -> None:
    """Every shard's datasets and attributes bit for bit; the manifests equal but for the sources' fingerprint
    (a bucket's objects are fingerprinted by ETag and modification time, local files by their bytes)."""
    names = sorted(p.name for p in want.iterdir())
    assert sorted(p.name for p in got.iterdir()) == names
    for name in names:
        if name == MANIFEST:
            a, b = json.loads((got / name).read_text()), json.loads((want / name).read_text())
            a.pop("source_fingerprint"), b.pop("source_fingerprint")
            assert a == b
        else:
            assert h5_objects(got / name) == h5_objects(want / name), name


def test_ray_s3_to_s3_sharded_equals_local_and_tasks_fetch_only_their_rows(
    s3: S3Endpoint, ranged_src: Path, ranged_local: Path, tmp_path: Path
) -> None:
    uri = s3.upload(ranged_src, s3.bucket(), "ds")
    report = convert(
        uri, layout="sharded", compression="gzip", shard_bytes=ONE_BLOCK, progress=False, cache_dir=tmp_path
    )
    assert report.output == f"{uri}/dataset.shards" and report.shards_reused == 0
    assert_same_shards(_download(s3, report.output, tmp_path / "got"), ranged_local)
    assert [i.base_name for i in s3.admin.get_file_info(pafs.FileSelector(uri[5:]))].count(".dataset.shards.work") == 0

    plan = plan_conversion(open_dataset(ranged_src, "pt"), "gzip", piece_bytes=ONE_BLOCK)
    column_of = {c.h5_path: c for c in plan.columns}
    split = 0
    for piece in plan.pieces:
        column = column_of[piece.h5_path]
        if not column.source.startswith("tensor:"):
            continue  # keyword ids and splits are fetched whole (a pickle, small arrays)
        split += piece.start > 0
        rows_bytes = (piece.stop - piece.start) * row_nbytes(column.shape, column.dtype)
        assert report.results[piece.piece_id].fetched_bytes == rows_bytes, f"{piece.piece_id}: only its rows"
    assert split >= 3, "the steering tensors span several pieces, each fetching its own rows"


def test_ray_local_source_into_an_s3_sharded_layout(
    s3: S3Endpoint, ranged_src: Path, ranged_local: Path, tmp_path: Path
) -> None:
    """The README's `convert data/demo --layout sharded --output s3://...`: the tasks upload the shards."""
    target = f"s3://{s3.bucket()}/demo/dataset.shards"
    options = dict(layout="sharded", compression="gzip", shard_bytes=ONE_BLOCK, progress=False)
    report = convert(ranged_src, output=target, cache_dir=tmp_path / "c", **options)
    assert report.output == target and report.output_bytes == sum(r.file_bytes for r in report.results.values())
    got = _download(s3, target, tmp_path / "got")
    assert_same_shards(got, ranged_local)
    assert json.loads((got / MANIFEST).read_text()) == json.loads((ranged_local / MANIFEST).read_text())


def test_ray_s3_source_into_a_local_and_an_s3_dataset_h5(s3: S3Endpoint, ranged_src: Path, tmp_path: Path) -> None:
    """A single dataset.h5: written here (in place, uncompressed) from ranged reads, or assembled here and uploaded."""
    uri = s3.upload(ranged_src, s3.bucket(), "ds")
    want = tmp_path / "want" / "dataset.h5"
    want.parent.mkdir()
    convert_pt_to_hdf5(ranged_src, None, output=want, progress=False)
    local = tmp_path / "here" / "dataset.h5"
    local.parent.mkdir()
    convert(uri, compression=None, shard_bytes=ONE_BLOCK, output=local, progress=False, cache_dir=tmp_path / "c")
    remote = convert(uri, compression=None, shard_bytes=ONE_BLOCK, progress=False, cache_dir=tmp_path / "c")
    assert remote.output == f"{uri}/dataset.h5"
    got = _download(s3, remote.output, tmp_path / "got.h5")
    expected = h5_objects(want)
    expected["/"][1].pop(ATTR_FINGERPRINT)
    for path in (local, got):
        objects = h5_objects(path)
        objects["/"][1].pop(ATTR_FINGERPRINT)
        assert objects == expected, path


KILLED_DRIVER = (
    SLOW_PIECES
    + """
convert(sys.argv[1], layout="sharded", compression="gzip", shard_bytes=1, progress=False, cache_dir=sys.argv[2])
print("finished", flush=True)
"""
)


def test_ray_s3_output_killed_driver_then_rerun_reuses_the_shards_in_the_bucket(
    s3: S3Endpoint, ranged_src: Path, ranged_local: Path, tmp_path: Path, ray_subprocess_env: Callable[..., dict]
) -> None:
    uri = s3.upload(ranged_src, s3.bucket(), "ds")
    records = f"{uri[5:]}/.dataset.shards.work"

    def recorded() -> int:
        return len(s3.admin.get_file_info(pafs.FileSelector(records, allow_not_found=True)))

    kill_driver_after([KILLED_DRIVER, uri, str(tmp_path / "cache")], recorded, ray_subprocess_env(**s3.env))
    time.sleep(1)  # a task that was uploading when its worker died has stopped
    done = recorded()
    assert not s3.admin.get_file_info(f"{uri[5:]}/dataset.shards/{MANIFEST}").is_file, "no manifest: no dataset"

    report = convert(
        uri, layout="sharded", compression="gzip", shard_bytes=ONE_BLOCK, progress=False, cache_dir=tmp_path / "cache"
    )
    assert report.shards_reused == done, "every shard recorded in the bucket verifies and is reused"
    assert sum(not r.reused for r in report.results.values()) == report.shards - done
    assert_same_shards(_download(s3, report.output, tmp_path / "got"), ranged_local)
    with open_dataset(uri, cache_dir=tmp_path / "read") as reader:
        assert reader.verify_checksums() == []


def test_ray_s3_source_values_are_validated_by_the_driver_and_the_tasks(
    s3: S3Endpoint, dataset_copy: Path, tmp_path: Path
) -> None:
    """Ids and pair scores: the driver, through ranged reads, before any task; float tables: each task, on the
    rows it reads. Either error names the object and the position."""
    negatives = torch.load(dataset_copy / "hard_negatives.pt", weights_only=True)
    bad = negatives.clone()
    bad[5, 2] = 10**6
    save_pt(dataset_copy, "hard_negatives.pt", bad)
    uri = s3.upload(dataset_copy, s3.bucket(), "bad-ids")
    out = tmp_path / "out" / "dataset.h5"
    with pytest.raises(ValidationError, match=r"hard_negatives\.pt.*\(5, 2\)"):
        convert(uri, compression="gzip", output=out, progress=False, cache_dir=tmp_path / "c")

    save_pt(dataset_copy, "hard_negatives.pt", negatives)
    residual = torch.load(dataset_copy / "steering_residual.pt", weights_only=True)
    residual[123, 4] = float("nan")
    save_pt(dataset_copy, "steering_residual.pt", residual)
    uri = s3.upload(dataset_copy, s3.bucket(), "bad-floats")
    with pytest.raises(ValidationError, match=r"steering_residual\.pt.*\(123, 4\)"):
        convert(uri, compression="gzip", output=out, progress=False, cache_dir=tmp_path / "c", max_retries=0)
    assert not out.exists()


def test_an_s3_tensor_stored_big_endian_is_refused_by_name(s3: S3Endpoint, dataset_copy: Path, tmp_path: Path) -> None:
    """Ranged reads take a tensor's bytes as they lie in the object: one written big-endian is refused before any
    task, naming it, never read as little-endian values (NOTE [mapped sources] in conversion/ranged)."""
    save_big_endian(dataset_copy / TENSOR["source_embs"].pt_file)
    uri = s3.upload(dataset_copy, s3.bucket(), "big-endian")
    out = tmp_path / "out" / "dataset.h5"
    where = re.escape(f"{uri}/{TENSOR['source_embs'].pt_file}: stored big-endian")
    with pytest.raises(DatasetFormatError, match=where):
        convert(uri, compression="gzip", output=out, progress=False, cache_dir=tmp_path / "c")
    assert not out.exists()
