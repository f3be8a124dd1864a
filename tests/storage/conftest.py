"""A real S3 endpoint (moto's server on loopback, reached with pyarrow's S3 client) and datasets in it."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _s3 import S3Endpoint

from jasper_ray import convert_pt_to_hdf5, synth_dataset


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Endpoint]:
    endpoint = S3Endpoint()
    yield endpoint
    endpoint.stop()


@pytest.fixture(scope="session")
def remote(s3: S3Endpoint, converted: Callable[[str | None], Path], small_dir: Path) -> dict[str, str]:
    """The small dataset in one bucket, three ways: gzip dataset.h5 alone, contiguous dataset.h5 alone, PT files."""
    bucket = s3.bucket()
    out = {}
    for name, compression in (("gzip", "gzip"), ("none", None)):
        single = converted(compression) / "dataset.h5"
        out[name] = _upload_file(s3, single, bucket, name)
    out["pt"] = s3.upload(small_dir, bucket, "pt")
    return out


def _upload_file(s3: S3Endpoint, path: Path, bucket: str, prefix: str) -> str:
    with s3.admin.open_output_stream(f"{bucket}/{prefix}/{path.name}") as f:
        f.write(path.read_bytes())
    return f"s3://{bucket}/{prefix}"


@pytest.fixture(scope="session")
def several_shards(tmp_path_factory: pytest.TempPathFactory, ray_session: object) -> Path:
    """A dataset whose pair tensors span several shard files (each steering tensor > one 16 MiB piece)."""
    directory = synth_dataset(tmp_path_factory.mktemp("shards") / "ds", n_pairs=9000, dim=512, n_neg=4, seed=3)
    from jasper_ray import convert

    convert(directory, compression=None, layout="sharded", shard_bytes=1, progress=False)
    return directory


@pytest.fixture(scope="session")
def remote_shards(s3: S3Endpoint, several_shards: Path) -> str:
    return s3.upload(several_shards / "dataset.shards", s3.bucket(), "big/dataset.shards").rsplit("/", 1)[0]


@pytest.fixture
def fresh_h5(tmp_path: Path) -> Callable[[int], Path]:
    """``fresh_h5(seed)``: a small gzip dataset.h5 of its own values, alone in a directory."""

    def make(seed: int) -> Path:
        source = synth_dataset(tmp_path / f"pt{seed}", n_pairs=300, dim=16, n_neg=4, seed=seed)
        out = tmp_path / f"h5-{seed}" / "dataset.h5"
        out.parent.mkdir()
        convert_pt_to_hdf5(source, "gzip", output=out, progress=False)
        shutil.rmtree(source)
        return out

    return make
