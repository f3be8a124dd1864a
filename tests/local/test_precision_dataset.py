"""``dtype=`` on the local front-end over 16-bit files: float32 by default (decoded inside the gather), the
stored dtype on request, the same values mapped, in RAM, and through the loader's fork and spawn workers.

Expected batches are the float32 dataset's batches cast by torch (a gather commutes with the rounding)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from jasper_ray import JASPERSteeringDataset, convert_pt_to_hdf5, create_loader
from jasper_ray.assembly import EMBEDDING_KEYS

TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory, small_dir: Path) -> dict[str, Path]:
    out = {}
    for precision in TORCH:
        directory = tmp_path_factory.mktemp(precision) / "ds"
        shutil.copytree(small_dir, directory)
        convert_pt_to_hdf5(directory, None, progress=False, precision=precision)
        out[precision] = directory
    return out


def expected(batch: dict[str, torch.Tensor], precision: str, native: bool) -> dict[str, torch.Tensor]:
    out = dict(batch)
    for key in EMBEDDING_KEYS:
        half = batch[key].to(TORCH[precision])
        out[key] = half if native else half.float()
    return out


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert set(got) == set(want), what
    for key in want:
        assert got[key].dtype == want[key].dtype, f"{what} {key}: {got[key].dtype} != {want[key].dtype}"
        assert torch.equal(got[key], want[key]), f"{what} {key}"


@pytest.mark.parametrize("precision", list(TORCH))
def test_dataset_serves_float32_by_default_and_the_stored_dtype_on_request(
    small_dir: Path, stored: dict[str, Path], precision: str
) -> None:
    positions = np.arange(0, 400, 3)[::-1].copy()
    reference = JASPERSteeringDataset(small_dir, "train", epoch=2).get_batch(positions)
    asked = ((None, False), ("float32", False), (precision, True), ("stored", True), (TORCH[precision], True))
    for dtype, native in asked:
        for use_mmap in (True, False):
            ds = JASPERSteeringDataset(stored[precision], "train", epoch=2, dtype=dtype, use_mmap=use_mmap)
            assert ds.dtype == (precision if native else "float32")
            assert_same(ds.get_batch(positions), expected(reference, precision, native), f"{dtype} mmap={use_mmap}")
            sample = ds[5]
            assert sample["question_emb"].dtype == (TORCH[precision] if native else torch.float32)


def test_a_16bit_dtype_the_file_does_not_store_is_refused(small_dir: Path, stored: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"stores its embeddings as float16; ask for 'float32'.*or 'float16'"):
        JASPERSteeringDataset(stored["float16"], "train", dtype="bfloat16")
    with pytest.raises(ValueError, match="stores its embeddings as float32"):
        JASPERSteeringDataset(small_dir, "train", dtype=torch.float16)
    with pytest.raises(ValueError, match="precision must be one of"):
        JASPERSteeringDataset(small_dir, "train", dtype="int8")


@pytest.mark.parametrize(("workers", "context"), [(0, None), (2, "fork"), (2, "spawn")])
def test_loader_batches_match_in_every_worker_mode(small_dir: Path, stored: dict[str, Path], workers, context) -> None:
    """bfloat16 batches through create_loader's slot workers (uint16 slots, bfloat16 tensors)."""
    options = dict(batch_size=64, shuffle=True, seed=5, epoch=1)
    reference = list(create_loader(small_dir, "train", **options))
    mode = dict(num_workers=workers, multiprocessing_context=context)
    got = list(create_loader(stored["bfloat16"], "train", dtype="bfloat16", **mode, **options))
    assert len(got) == len(reference)
    for i, (batch, want) in enumerate(zip(got, reference)):
        assert_same(batch, expected(want, "bfloat16", native=True), f"batch {i}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", list(TORCH))
def test_cuda_device_holds_16bit_tables_and_casts_there(
    small_dir: Path, stored: dict[str, Path], precision: str
) -> None:
    positions = np.arange(0, 300, 7)
    reference = JASPERSteeringDataset(small_dir, "train", epoch=1).get_batch(positions)
    for dtype, native in ((None, False), (precision, True)):
        ds = JASPERSteeringDataset(stored[precision], "train", epoch=1, device="cuda", dtype=dtype)
        assert ds.question_embs.dtype == TORCH[precision] and ds.question_embs.is_cuda  # placed as stored
        batch = ds.get_batch(positions)
        assert all(v.is_cuda for v in batch.values())
        assert_same({k: v.cpu() for k, v in batch.items()}, expected(reference, precision, native), f"cuda {dtype}")


def test_a_compressed_16bit_file_serves_through_the_cache(small_dir: Path, tmp_path: Path) -> None:
    """gzip bfloat16 decompressed once into the node-local cache's mappable copy: same stored values, same batches."""
    directory = Path(shutil.copytree(small_dir, tmp_path / "ds"))
    convert_pt_to_hdf5(directory, "gzip", progress=False, precision="bfloat16")
    positions = np.arange(0, 500, 4)
    reference = JASPERSteeringDataset(small_dir, "train", epoch=4).get_batch(positions)
    ds = JASPERSteeringDataset(directory, "train", epoch=4, cache_dir=tmp_path / "cache", dtype="stored")
    assert ds.reader.directory != directory and ds.reader.precision == "bfloat16"  # the cache's copy
    assert_same(ds.get_batch(positions), expected(reference, "bfloat16", native=True), "through the cache")
