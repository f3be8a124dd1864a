"""Conversions and CLI commands on s3:// URIs: sources fetched into the cache, outputs uploaded whole."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from _s3 import S3Endpoint
from _support import subprocess_env

from jasper_ray import convert, convert_pt_to_hdf5, open_dataset
from jasper_ray.schema import TENSORS


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
