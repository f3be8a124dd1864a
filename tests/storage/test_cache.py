"""The node-local cache under load and faults: one download per node, resume, eviction, a lost endpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _s3 import S3Endpoint, keys
from _support import subprocess_env

from jasper_ray import JASPERSteeringDataset, ShardedJasper, open_dataset
from jasper_ray.errors import RemoteAccessError
from jasper_ray.storage import NodeCache, download, locate, remote_identity

OPEN_AND_REPORT = """
import logging, os, sys
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
from jasper_ray import open_dataset
with open_dataset(sys.argv[1], cache_dir=sys.argv[2]) as reader:
    print("INODE", os.stat(reader.path).st_ino, float(reader.read("steering_residual").sum()))
"""


def test_eight_processes_asking_at_once_make_one_download(
    remote: dict[str, str], s3: S3Endpoint, tmp_path: Path
) -> None:
    env = {**subprocess_env(), **s3.env}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_AND_REPORT, remote["gzip"], str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    made = sum(err.count("cache: made") for _, err in outs)
    assert made == 1, f"one download for eight processes, got {made}"
    reports = {line for out, _ in outs for line in out.splitlines() if line.startswith("INODE")}
    assert len(reports) == 1, f"every process served the same copy: {reports}"


def test_an_interrupted_download_resumes_where_it_stopped(remote: dict[str, str], tmp_path: Path) -> None:
    location = locate(f"{remote['gzip']}/dataset.h5")
    identity = remote_identity(location).as_dict()
    part, size, ranges = tmp_path / "dataset.h5.part", int(identity["size"]), 64 << 10
    seen: list[int] = []

    def stop_after_three(n: int) -> None:
        seen.append(n)
        if len(seen) == 3:
            raise KeyboardInterrupt  # stands for a killed process: what was written stays

    with pytest.raises(KeyboardInterrupt):
        download(location, part, size, identity, range_bytes=ranges, parallel=1, on_bytes=stop_after_three)
    resumed: list[int] = []
    download(location, part, size, identity, range_bytes=ranges, parallel=1, on_bytes=resumed.append)
    assert resumed[0] >= 2 * ranges, "the first report is what an earlier call already fetched"
    assert sum(resumed[1:]) <= size - 2 * ranges, "only the missing ranges are fetched again"
    assert part.read_bytes() == location_bytes(location)


def location_bytes(location) -> bytes:  # type: ignore[no-untyped-def]
    with location.filesystem.open_input_file(location.path) as f:
        return f.read()


def test_an_endpoint_that_goes_away_is_retried_then_named(converted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    endpoint = S3Endpoint()
    try:
        bucket = endpoint.bucket()
        with endpoint.admin.open_output_stream(f"{bucket}/ds/dataset.h5") as f:
            f.write((converted("gzip") / "dataset.h5").read_bytes())
        import pyarrow.fs as pafs

        impatient = pafs.S3FileSystem(
            endpoint_override=endpoint.url, scheme="http", connect_timeout=0.5, request_timeout=1,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1), **keys(),
        )  # fmt: skip
        location = locate(f"{bucket}/ds/dataset.h5", filesystem=impatient)
        identity = remote_identity(location).as_dict()
    finally:
        endpoint.stop()
    part = tmp_path / "x.part"
    with pytest.raises(RemoteAccessError, match=rf"s3://{bucket}/ds/dataset.h5 bytes 0-\d+ after \d attempts"):
        download(location, part, int(identity["size"]), identity, range_bytes=1 << 20)


def test_eviction_under_a_cache_limit_still_serves_every_sample_once(
    remote_shards: str, several_shards: Path, tmp_path: Path
) -> None:
    with open_dataset(several_shards) as local:
        manifest = local.layout
    pair_paths = {"steering/centroid", "steering/keyword_weighted", "steering/residual"}
    biggest = max(s.bytes for t in manifest.tensors for s in t.shards)
    pinned = sum(s.bytes for t in manifest.tensors if t.h5_path not in pair_paths for s in t.shards)
    limit = pinned + 3 * biggest  # the tables and about three pair-row shards: fewer than the six there are
    mine = tmp_path / "my-notes.txt"  # the cache deletes only its own copies (mosaicml/streaming#988)
    mine.write_text("not the cache's")
    ds = JASPERSteeringDataset(remote_shards, "train", epoch=1, cache_dir=tmp_path, cache_limit=limit)
    stray = NodeCache(tmp_path).dataset_dir(remote_shards) / "dataset.shards" / "unlisted.h5"
    stray.write_bytes(b"x" * 1000)
    want = JASPERSteeringDataset(several_shards, "train", epoch=1)
    order = np.arange(len(ds))
    for start in range(0, len(ds), 500):
        batch = order[start : start + 500].tolist()
        got, expected = ds.get_batch(batch), want.get_batch(batch)
        for key in expected:
            assert torch.equal(got[key], expected[key]), (key, start)
        used = sum(e.nbytes for e in NodeCache(tmp_path).entries())
        assert used <= limit, f"the cache holds {used} bytes, over its limit {limit}"
    entries = NodeCache(tmp_path).entries()
    kept = {e.rel for e in entries}
    assert mine.read_text() == "not the cache's" and stray.stat().st_size == 1000
    assert any(
        f"dataset.shards/{s.file}" not in kept for t in manifest.tensors for s in t.shards if t.h5_path in pair_paths
    )


def test_sharded_jasper_actors_serve_an_s3_dataset(
    remote_shards: str, several_shards: Path, tmp_path: Path, ray_session: object
) -> None:
    want = JASPERSteeringDataset(several_shards, "train", epoch=0)
    with ShardedJasper(
        remote_shards, "train", batch_size=512, num_shards=2, shuffle=False, cache_dir=str(tmp_path), num_cpus=0.5
    ) as served:
        batches = list(served.iter_numpy())
    got = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    expected = want.get_batch(list(range(len(want))))
    assert len(got["question_emb"]) == len(want)
    for key, value in expected.items():
        assert np.array_equal(got[key], value.numpy()), key


def test_refused_credentials_name_the_variables(tmp_path: Path) -> None:
    """A server that checks keys (moto with auth on) refuses ours: the error says where credentials come from."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(
            endpoint_override=f"http://127.0.0.1:{port}",
            scheme="http",
            access_key="nobody",
            secret_key="nothing",
            connect_timeout=1,
            request_timeout=5,
        )
        _wait_for(port)
        with pytest.raises(RemoteAccessError, match=r"s3://bkt/ds: access denied .*AWS_ACCESS_KEY_ID"):
            open_dataset("bkt/ds", filesystem=fs, cache_dir=tmp_path)
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_for(port: int) -> None:
    import socket
    import time

    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"moto server on {port} did not start")


def test_a_full_cache_disk_is_a_clear_error_and_publishes_nothing(remote: dict[str, str], tmp_path: Path) -> None:
    from _support import mounted_tmpfs

    from jasper_ray.errors import CacheError

    with mounted_tmpfs(tmp_path / "small", "size=256k") as cache:
        with pytest.raises(CacheError, match=r"not enough space in .*: needs \d+ bytes, \d+ free"):
            open_dataset(remote["none"], cache_dir=cache)
        assert not [p for p in cache.rglob("*") if p.is_file() and p.suffix != ".lock"]


DECOMPRESS_INTO_FULL_DISK = """
import sys
from jasper_ray import open_dataset
from jasper_ray.errors import CacheError
try:
    open_dataset(sys.argv[1], cache_dir=sys.argv[2])
except CacheError as exc:
    print("CacheError:", exc)
"""


def test_a_disk_that_fills_while_decompressing_is_a_clear_error(
    remote: dict[str, str], s3: S3Endpoint, tmp_path: Path
) -> None:
    """Room for the download and most of the copy, not all of it: the write fails mid-way (in a child, so a
    crash would show as one), the error says so, and neither half a copy nor the download stays."""
    from _support import mounted_tmpfs

    with open_dataset(remote["gzip"], cache_dir=tmp_path / "probe") as probe:
        copy_bytes = probe.path.stat().st_size
    compressed = remote_identity(locate(f"{remote['gzip']}/dataset.h5")).size
    room = compressed + copy_bytes - 64 * 1024  # passes the up-front check (twice the object), not the write
    assert 2 * compressed <= room, "the check must pass for the write to fail"
    with mounted_tmpfs(tmp_path / "full", f"size={room}") as cache:
        run = subprocess.run(
            [sys.executable, "-c", DECOMPRESS_INTO_FULL_DISK, remote["gzip"], str(cache)],
            env={**subprocess_env(), **s3.env}, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        assert "disk full in" in run.stdout and "nothing was kept" in run.stdout, run.stdout + run.stderr[-2000:]
        assert not [p for p in cache.rglob("*") if p.is_file() and p.suffix != ".lock"]


def test_the_range_size_follows_the_environment(
    remote: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    location = locate(f"{remote['gzip']}/dataset.h5")
    identity = remote_identity(location).as_dict()
    size = int(identity["size"])
    counts = []
    for range_bytes in (64 << 10, size):
        monkeypatch.setenv("JASPER_RAY_RANGE_BYTES", str(range_bytes))
        calls: list[int] = []
        download(location, tmp_path / f"{range_bytes}.part", size, identity, on_bytes=calls.append)
        counts.append(len(calls))
        assert (tmp_path / f"{range_bytes}.part").read_bytes() == location_bytes(location)
    assert counts == [-(-size // (64 << 10)), 1]


class _FramingEndpoint:
    """A filesystem whose objects keep a transfer frame around the bytes written, as moto once stored them."""

    def __init__(self) -> None:
        import pyarrow.fs as pafs  # lazy: only this test wraps a filesystem

        self.inner = pafs.LocalFileSystem()

    def open_output_stream(self, path: str):  # type: ignore[no-untyped-def]
        stream = self.inner.open_output_stream(path)
        stream.write(b"A2D8\r\n")
        return stream

    def get_file_info(self, path: str):  # type: ignore[no-untyped-def]
        return self.inner.get_file_info(path)


def test_an_upload_the_endpoint_stored_framed_is_refused(tmp_path: Path) -> None:
    from jasper_ray.storage.fetch import upload_file, write_object
    from jasper_ray.storage.location import Location

    local = tmp_path / "shard.h5"
    local.write_bytes(b"\x89HDF" + bytes(100))
    endpoint = _FramingEndpoint()
    target = Location("s3://bucket/ds/shard.h5", str(tmp_path / "object"), endpoint)  # type: ignore[arg-type]
    with pytest.raises(RemoteAccessError, match=r"s3://bucket/ds/shard.h5: the endpoint stored 110 bytes for the 104"):
        upload_file(local, target)
    with pytest.raises(RemoteAccessError, match="stored 9 bytes for the 3 bytes"):
        write_object(target, b"{}\n")
