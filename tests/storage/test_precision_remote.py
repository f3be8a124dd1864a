"""16-bit storage through an object-storage conversion: the single-process writer staging a PT source from a
bucket and uploading its dataset.h5. Stored values equal a local single-process conversion's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from _s3 import S3Endpoint
from _support import assert_bits_equal

from jasper_ray import convert_pt_to_hdf5, open_dataset
from jasper_ray.schema import TENSORS


def _assert_stored_like(uri: str, local: Path, cache: Path, precision: str) -> None:
    with open_dataset(uri, cache_dir=cache) as got, open_dataset(local) as want:
        assert got.precision == want.precision == precision
        for spec in TENSORS:
            assert_bits_equal(got.read(spec.name), np.asarray(want.read(spec.name)), spec.name)


def test_single_process_s3_to_s3_at_float16(s3: S3Endpoint, small_dir: Path, tmp_path: Path) -> None:
    uri = s3.upload(small_dir, s3.bucket(), "ds")
    local = tmp_path / "local.h5"
    convert_pt_to_hdf5(small_dir, "gzip", output=local, progress=False, precision="float16")
    out = f"{uri}/converted"
    convert_pt_to_hdf5(uri, "gzip", output=f"{out}/dataset.h5", progress=False, cache_dir=tmp_path, precision="float16")
    _assert_stored_like(out, local, tmp_path / "read", "float16")
