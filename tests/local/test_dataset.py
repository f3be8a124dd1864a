"""The batched path, storage equivalence, values, empty splits and the GPU path of JASPERSteeringDataset."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from jasper_ray import JASPERSteeringDataset, collate, convert_pt_to_hdf5, create_loader, validate_first_batch
from jasper_ray.local.batches import SampleBatch
from jasper_ray.schema import TENSORS

pytest.register_assert_rewrite("_fixtures_dataset")
from _fixtures_dataset import (  # noqa: E402
    SAMPLE_SHAPES,
    assert_batches_equal,
    concat_batches,
    expected_batch,
    open_variant,
    raw,
    stack_samples,
)

pytest_plugins = ["_fixtures_dataset"]
pytestmark = pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true:UserWarning")

STORAGES = ["pt_mmap", "pt_ram", "h5_gzip", "h5_contiguous", "h5_gzip_ram"]


def some_indices(n: int, seed: int = 0) -> list[int]:
    """Out of order, with repeats, first and last included."""
    rng = random.Random(seed)
    return [n - 1, 0, *rng.sample(range(n), min(40, n)), 5, 5, n - 1]


# --- __getitems__ == stacked __getitem__, in every storage ----------------------------------------


@pytest.mark.parametrize("storage", STORAGES)
def test_getitems_equals_stacked_getitem(storage_variants: dict, storage: str) -> None:
    ds = open_variant(storage_variants, storage, epoch=3)
    assert ds.storage_format == ("pt" if storage.startswith("pt") else "hdf5")
    assert ds.use_mmap is not storage.endswith("_ram")
    indices = some_indices(len(ds))
    got = ds.__getitems__(indices)
    assert isinstance(got, SampleBatch) and len(got) == len(indices)
    assert_batches_equal(got.batch, stack_samples([ds[i] for i in indices]), storage)
    assert set(got.batch["steering_variant"].tolist()) == {0, 1, 2, 3}  # a batch mixing all variants
    # The Sequence view of the batch yields the same samples.
    assert_batches_equal(stack_samples(list(got)), got.batch, f"{storage} as a sequence")


@pytest.mark.parametrize("storage", STORAGES[1:])
def test_every_storage_gives_the_pt_batches(storage_variants: dict, storage: str, synth_dir: Path) -> None:
    reference = open_variant(storage_variants, "pt_mmap", "val", epoch=5)
    ds = open_variant(storage_variants, storage, "val", epoch=5)
    assert torch.equal(ds.split_indices, reference.split_indices)
    indices = some_indices(len(ds), seed=1)
    assert_batches_equal(ds.get_batch(indices), reference.get_batch(indices), storage)
    for name in ("centroid_embs", "hard_negatives", "steering_keyword_weighted"):
        assert torch.equal(getattr(ds, name), raw(synth_dir, name)), name
    ds.force_steering("residual")
    reference.force_steering("residual")
    assert_batches_equal(ds.get_batch(indices), reference.get_batch(indices), f"{storage} forced")


@pytest.mark.parametrize("storage", ["pt_mmap", "h5_gzip"])
def test_batch_values_from_the_raw_files(storage_variants: dict, storage: str, synth_dir: Path) -> None:
    ds = open_variant(storage_variants, storage, epoch=1)
    indices = some_indices(len(ds), seed=2)
    batch = ds.get_batch(indices)
    pairs = ds.split_indices[indices]
    index = raw(synth_dir, "pair_index")
    assert torch.equal(batch["question_emb"], raw(synth_dir, "question_embs")[index[pairs, 0]])
    assert torch.equal(batch["target_source_emb"], raw(synth_dir, "source_embs")[index[pairs, 1]])
    assert torch.equal(batch["negative_embs"], raw(synth_dir, "source_embs")[raw(synth_dir, "hard_negatives")[pairs]])
    steering_file = {1: "steering_centroid", 2: "steering_keyword_weighted", 3: "steering_residual"}
    for row, (pair, variant) in enumerate(zip(pairs.tolist(), batch["steering_variant"].tolist())):
        want = torch.zeros(ds.embedding_dim) if variant == 0 else raw(synth_dir, steering_file[variant])[pair]
        assert torch.equal(batch["steering"][row], want), (row, pair, variant)
    assert_batches_equal(batch, expected_batch(synth_dir, pairs, batch["steering_variant"]))


# --- DataLoaders ----------------------------------------------------------------------------------


def test_default_collate_dataloader_matches_create_loader(synth_dir: Path) -> None:
    """A plain DataLoader (torch's default_collate, no jasper collate) works on the batched path too."""
    loader = create_loader(synth_dir, "val", batch_size=16, epoch=2)
    plain = DataLoader(JASPERSteeringDataset(synth_dir, "val", epoch=2), batch_size=16)
    ours, theirs = list(loader), list(plain)
    assert len(ours) == len(theirs) == -(-len(loader.dataset_obj) // 16)
    for a, b in zip(ours, theirs):
        assert_batches_equal(b, a)
    # And the per-sample path (no __getitems__ used): a DataLoader over a Subset-free wrapper.
    per_sample = [
        stack_samples([plain.dataset[i] for i in range(k, min(k + 16, len(plain.dataset)))])
        for k in range(0, len(plain.dataset), 16)
    ]
    for a, b in zip(ours, per_sample):
        assert_batches_equal(b, a)


def test_collate_passes_batches_through_and_collates_lists(synth_dir: Path) -> None:
    ds = JASPERSteeringDataset(synth_dir, "train")
    batch = ds.__getitems__([1, 2, 3])
    assert collate(batch) is batch.batch
    assert_batches_equal(collate([ds[1], ds[2], ds[3]]), batch.batch)


def test_create_loader_unshuffled_epoch_covers_the_split_in_order(synth_dir: Path) -> None:
    loader = create_loader(synth_dir, "test", batch_size=10, epoch=4)
    batches = list(loader)
    ds = loader.dataset_obj
    assert_batches_equal(concat_batches(batches), ds.get_batch(range(len(ds))))
    want = expected_batch(synth_dir, ds.split_indices, concat_batches(batches)["steering_variant"])
    assert_batches_equal(concat_batches(batches), want)


def test_shuffled_epoch_is_a_permutation_of_the_split(synth_dir: Path) -> None:
    loader = create_loader(synth_dir, "train", batch_size=32, drop_last=False, epoch=1)
    ds = loader.dataset_obj
    order = list(loader.sampler)
    assert sorted(order) == list(range(len(ds))) and order != sorted(order)
    got = concat_batches(list(loader))
    assert_batches_equal(got, ds.get_batch(order))


# --- pickling, reload, splits ---------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["pt_mmap", "pt_ram", "h5_gzip"])
def test_dataset_pickles(storage_variants: dict, storage: str) -> None:
    ds = open_variant(storage_variants, storage, epoch=6)
    ds.get_batch([0, 1])  # files opened before pickling
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.current_epoch == 6 and len(clone) == len(ds)
    indices = some_indices(len(ds), seed=3)
    assert_batches_equal(clone.get_batch(indices), ds.get_batch(indices))
    if storage != "pt_ram":  # mapped data pickles as paths, not as payload
        assert len(pickle.dumps(ds)) < 100_000


def test_reload_negatives_in_hdf5_mode_reads_the_new_pt_files(synth_copy: Path) -> None:
    """Upstream's reload re-read the open dataset.h5, so rewriting the PT negatives did nothing."""
    convert_pt_to_hdf5(synth_copy, compression="gzip", progress=False)
    ds = JASPERSteeringDataset(synth_copy, "train")
    assert ds.storage_format == "hdf5"
    n_sources = raw(synth_copy, "source_embs").shape[0]
    new = (raw(synth_copy, "hard_negatives") * 7 + 3) % n_sources
    torch.save(new, synth_copy / "hard_negatives.pt")
    ds.reload_negatives()
    pairs = ds.split_indices[:20]
    assert torch.equal(ds.get_batch(range(20))["negative_embs"], raw(synth_copy, "source_embs")[new[pairs]])


def test_reload_negatives_with_mmap(synth_copy: Path) -> None:
    ds = JASPERSteeringDataset(synth_copy, "train", use_mmap=True)
    n_sources = raw(synth_copy, "source_embs").shape[0]
    new = (raw(synth_copy, "hard_negatives") + 1) % n_sources
    tmp = synth_copy / "hard_negatives.pt.tmp"
    torch.save(new, tmp)
    tmp.replace(synth_copy / "hard_negatives.pt")
    ds.reload_negatives()
    assert ds.use_mmap is True
    assert torch.equal(
        ds.get_batch([0, 1, 2])["negative_embs"], raw(synth_copy, "source_embs")[new[ds.split_indices[:3]]]
    )


def test_combined_splits_reload_once_for_all(synth_copy: Path) -> None:
    splits = JASPERSteeringDataset.create_combined_splits(synth_copy, use_mmap=False)
    n_sources = raw(synth_copy, "source_embs").shape[0]
    new = (raw(synth_copy, "hard_negatives") + 2) % n_sources
    torch.save(new, synth_copy / "hard_negatives.pt")
    splits["train"].reload_negatives()
    for name, ds in splits.items():
        assert torch.equal(ds.hard_negatives, new), name
    assert splits["val"].source_embs.data_ptr() == splits["test"].source_embs.data_ptr()


def test_pair_keyword_ids_is_upstreams_list_of_lists(synth_dir: Path) -> None:
    ds = JASPERSteeringDataset(synth_dir, "train")
    assert ds.pair_keyword_ids == raw(synth_dir, "pair_keyword_ids")


def test_tensor_attributes_are_the_schemas_tensors(synth_dir: Path) -> None:
    """One declared property per schema tensor (go to definition works), each the reader's whole tensor."""
    properties = {name for name, value in vars(JASPERSteeringDataset).items() if isinstance(value, property)}
    assert {spec.name for spec in TENSORS} <= properties
    ds = JASPERSteeringDataset(synth_dir, "train", validate=False)
    for spec in TENSORS:
        assert torch.equal(getattr(ds, spec.name), torch.as_tensor(np.asarray(ds.reader.read(spec.name)))), spec.name


# --- empty split ----------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["pt", "hdf5"])
def test_empty_split(synth_copy: Path, storage: str) -> None:
    torch.save(torch.empty(0, dtype=torch.int64), synth_copy / "test_idx.pt")
    if storage == "hdf5":
        convert_pt_to_hdf5(synth_copy, compression="gzip", progress=False)
    ds = JASPERSteeringDataset(synth_copy, "test", storage_format=storage)
    assert len(ds) == 0
    assert ds.split_indices.tolist() == []
    with pytest.raises(IndexError, match=r"Index 0 out of range \[0, 0\)"):
        ds[0]
    empty = ds.get_batch([])
    for key, (shape, dtype) in SAMPLE_SHAPES.items():
        assert tuple(empty[key].shape) == (0, *({"D": 32, "NEG": 4}[s] for s in shape)), key
        assert empty[key].dtype == dtype, key
    assert list(DataLoader(ds, batch_size=4)) == []
    for shuffle in (False, True):
        loader = create_loader(synth_copy, "test", batch_size=4, shuffle=shuffle, storage_format=storage)
        assert len(loader) == 0
        assert list(loader) == []
        assert loader.state_dict()["samples_seen"] == 0
    # The other splits are unaffected.
    assert len(JASPERSteeringDataset(synth_copy, "train", storage_format=storage)) > 0


def test_empty_float_split_is_a_clear_error(synth_copy: Path) -> None:
    torch.save(torch.tensor([]), synth_copy / "test_idx.pt")  # torch.tensor([]) is float32
    with pytest.raises(ValueError, match="test_idx.pt.*integer array of pair ids"):
        JASPERSteeringDataset(synth_copy, "test")


# --- device ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_full_epoch_through_create_loader(synth_dir: Path) -> None:
    loader = create_loader(
        synth_dir, "train", batch_size=64, device="cuda", num_workers=0, pin_memory=False, shuffle=True, epoch=2
    )
    ds = loader.dataset_obj
    assert ds.device.type == "cuda" and ds.use_mmap is False
    assert ds.source_embs.is_cuda and ds.centroid_embs.is_cuda
    cpu = JASPERSteeringDataset(synth_dir, "train", epoch=2, device="cpu")
    order = list(loader.sampler)
    batches = list(loader)
    assert len(batches) == len(ds) // 64
    mixed = 0
    for k, batch in enumerate(batches):
        assert set(batch) == set(SAMPLE_SHAPES)
        assert all(v.is_cuda for v in batch.values()), k
        mixed += len(batch["steering_variant"].unique()) == 4
        assert_batches_equal(batch, cpu.get_batch(order[k * 64 : (k + 1) * 64]), f"batch {k}")
    assert mixed == len(batches)  # every batch mixes all four variants and still collates
    zero_rows = batches[0]["steering_variant"] == 0
    assert torch.equal(batches[0]["steering"][zero_rows], torch.zeros_like(batches[0]["steering"][zero_rows]))
    assert validate_first_batch(loader) is True
    # Per-sample access and torch's default_collate on the device too.
    plain = DataLoader(ds, batch_size=32, collate_fn=None)
    first = next(iter(plain))
    assert first["steering"].is_cuda
    samples = [ds[i] for i in range(32)]
    assert all(s["steering"].is_cuda for s in samples)
    assert_batches_equal(stack_samples(samples), cpu.get_batch(range(32)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_loader_with_default_pin_memory(synth_dir: Path) -> None:
    loader = create_loader(synth_dir, "val", batch_size=16, device="cuda")
    batches = list(loader)
    assert batches and all(b["question_emb"].is_cuda for b in batches)
    cpu = JASPERSteeringDataset(synth_dir, "val")
    assert_batches_equal(concat_batches(batches), cpu.get_batch(range(len(cpu))))
