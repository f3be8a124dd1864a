"""Every front-end serves the same values for the same 16-bit file (NOTE [16-bit storage] in formats.precision):
the local dataset, ``read_jasper`` (its Arrow schema too) and ``ShardedJasper`` (paced through shared memory
and through Ray calls), as float32 by default and as the stored dtype on request.

The expected batches are the float32 PT dataset's, cast by torch: a gather commutes with the rounding."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from jasper_ray import JASPERSteeringDataset, ShardedJasper, convert_pt_to_hdf5, read_jasper
from jasper_ray.assembly import EMBEDDING_KEYS, PAIR_ID, SAMPLE_KEYS
from jasper_ray.local.batches import as_tensor

pytestmark = pytest.mark.usefixtures("ray_session")
TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16}
EPOCH, SEED = 3, 11


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory, small_dir: Path) -> dict[str, Path]:
    """The small dataset converted at each 16-bit precision (bfloat16 contiguous, float16 gzip)."""
    out = {}
    for precision, compression in (("bfloat16", None), ("float16", "gzip")):
        directory = tmp_path_factory.mktemp(precision) / "ds"
        shutil.copytree(small_dir, directory)
        convert_pt_to_hdf5(directory, compression, progress=False, precision=precision)
        out[precision] = directory
    return out


@pytest.fixture(scope="module")
def reference(small_dir: Path) -> dict[str, Any]:
    """The float32 dataset's whole train split at EPOCH, by pair id (torch tensors)."""
    with JASPERSteeringDataset(small_dir, "train", epoch=EPOCH, seed=SEED) as ds:
        ids = ds.split_indices.numpy().copy()
        order = np.argsort(ids)
        batch = ds.get_batch(order)
        return {"pair_id": ids[order], "batch": {k: v.clone() for k, v in batch.items()}}


def expected(reference: dict[str, Any], precision: str, native: bool, ids: np.ndarray) -> dict[str, torch.Tensor]:
    rows = torch.from_numpy(np.searchsorted(reference["pair_id"], ids))
    out = {}
    for key, value in reference["batch"].items():
        value = value[rows]
        if key in EMBEDDING_KEYS:
            value = value.to(TORCH[precision]) if native else value.to(TORCH[precision]).float()
        out[key] = value
    return out


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert set(got) == set(want) == set(SAMPLE_KEYS), what
    for key in want:
        assert got[key].dtype == want[key].dtype, f"{what} {key}: {got[key].dtype} != {want[key].dtype}"
        assert torch.equal(got[key], want[key]), f"{what} {key}"


@pytest.mark.parametrize("native", [False, True], ids=["float32", "stored"])
@pytest.mark.parametrize("precision", list(TORCH))
def test_read_jasper_serves_the_local_values(stored, reference, precision: str, native: bool) -> None:
    dtype = precision if native else None
    ds = read_jasper(stored[precision], "train", epoch=EPOCH, seed=SEED, shuffle=True, rows_per_block=97, dtype=dtype)
    column = np.dtype("uint16" if native and precision == "bfloat16" else (precision if native else "float32"))
    schema = dict(zip(ds.schema().names, ds.schema().types))
    assert schema["negative_embs"].value_type == pa.from_numpy_dtype(column), schema  # no pass is run for it
    assert schema["relevance"] == pa.float32()
    parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    cols = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    ids = cols.pop(PAIR_ID)
    got = {key: as_tensor(np.ascontiguousarray(value)) for key, value in cols.items()}  # uint16: bfloat16 bits
    assert_same(got, expected(reference, precision, native, ids), f"read_jasper {precision} dtype={dtype}")
    torch_batch = next(iter(ds.iter_torch_batches(batch_size=8)))  # Ray's torch face: uint16 for bfloat16
    if native and precision == "bfloat16":
        assert torch_batch["steering"].dtype == torch.uint16
        assert torch_batch["steering"].view(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("paced", [True, False], ids=["shared-memory", "ray-calls"])
@pytest.mark.parametrize("native", [False, True], ids=["float32", "stored"])
def test_sharded_jasper_serves_the_local_values(stored, reference, native: bool, paced: bool) -> None:
    dtype = "bfloat16" if native else None
    options = dict(batch_size=64, num_shards=2, seed=SEED, epoch=EPOCH, num_cpus=0.25, pace_in_shared_memory=paced)
    with ShardedJasper(stored["bfloat16"], "train", dtype=dtype, **options) as client:
        batches = [{k: v.clone() for k, v in b.items()} for b in client]
    assert len(batches) > 1
    for i, batch in enumerate(batches):
        ids = batch.pop(PAIR_ID).numpy()
        assert_same(batch, expected(reference, "bfloat16", native, ids), f"ShardedJasper batch {i}")


def test_a_16bit_dtype_the_file_does_not_store_is_refused(stored) -> None:
    with pytest.raises(ValueError, match="stores its embeddings as float16"):
        read_jasper(stored["float16"], "train", dtype="bfloat16")
    with pytest.raises(ValueError, match="stores its embeddings as bfloat16"):
        ShardedJasper(stored["bfloat16"], "train", dtype="float16", num_shards=1, num_cpus=0.25)
