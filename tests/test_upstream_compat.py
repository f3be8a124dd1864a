"""Upstream's own dataset and loader tests (UPSTREAM.md section 7), rewritten against jasper_ray.

Same fixture shape as upstream's ``mock_dataset_dir`` (D=64, n_neg=4, 100 pairs, splits
0-69 / 70-84 / 85-99, curriculum 0.5 -> 0.1 over 100 epochs); where upstream only checked a
shape or a flag, these also check values.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler, RandomSampler, SequentialSampler

from jasper_ray import JASPERSteeringDataset, convert_pt_to_hdf5, create_loader, set_epoch, validate_first_batch

pytest.register_assert_rewrite("_fixtures_dataset")
from _fixtures_dataset import (  # noqa: E402
    SAMPLE_SHAPES,
    assert_batches_equal,
    expected_batch,
    raw,
    stack_samples,
    write_mock_dataset,
)

pytest_plugins = ["_fixtures_dataset"]
pytestmark = pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true:UserWarning")

D, NEG = 64, 4


def variants_of(ds: JASPERSteeringDataset, n: int | None = None) -> list[int]:
    return [int(ds[i]["steering_variant"]) for i in range(len(ds) if n is None else n)]


# --- construction and the sample ------------------------------------------------------------------


def test_dataset_init(mock_dataset_dir: Path) -> None:
    ds = JASPERSteeringDataset(mock_dataset_dir, "train")
    assert len(ds) == 70
    assert ds.embedding_dim == D
    assert ds.n_neg == NEG
    assert ds.current_epoch == 0
    assert ds.split_indices.tolist() == list(range(70))


def test_dataset_splits(mock_dataset_dir: Path) -> None:
    sizes = {split: len(JASPERSteeringDataset(mock_dataset_dir, split)) for split in ("train", "val", "test")}
    assert sizes == {"train": 70, "val": 15, "test": 15}
    assert JASPERSteeringDataset(mock_dataset_dir, "val").split_indices.tolist() == list(range(70, 85))
    assert JASPERSteeringDataset(mock_dataset_dir, "test").split_indices.tolist() == list(range(85, 100))


def test_getitem_schema_shapes_dtypes_and_values(mock_dataset_dir: Path) -> None:
    ds = JASPERSteeringDataset(mock_dataset_dir, "val")
    sizes = {"D": D, "NEG": NEG}
    for i in (0, 7, 14):
        sample = ds[i]
        assert set(sample) == set(SAMPLE_SHAPES)
        for key, (shape, dtype) in SAMPLE_SHAPES.items():
            assert tuple(sample[key].shape) == tuple(sizes[s] for s in shape), key
            assert sample[key].dtype == dtype, key
        pair = 70 + i
        want = expected_batch(mock_dataset_dir, [pair], [int(sample["steering_variant"])])
        assert_batches_equal(stack_samples([sample]), want, f"sample {i}")


def test_value_ranges(mock_dataset_dir: Path) -> None:
    ds = JASPERSteeringDataset(mock_dataset_dir, "train")
    batch = ds.get_batch(range(len(ds)))
    for key in ("question_emb", "target_source_emb", "steering", "negative_embs"):
        assert torch.isfinite(batch[key]).all(), key
    assert ((batch["relevance"] >= 0) & (batch["relevance"] <= 1)).all()
    assert ((batch["centroid_distance"] >= 0) & (batch["centroid_distance"] <= 2)).all()
    assert ((batch["cluster_id"] >= 0) & (batch["cluster_id"] < len(ds.centroid_embs))).all()
    assert set(batch["steering_variant"].tolist()) == {0, 1, 2, 3}
    assert ((batch["negative_tiers"] >= 1) & (batch["negative_tiers"] <= 4)).all()


# --- steering and epochs --------------------------------------------------------------------------


def test_steering_variant_distribution_at_epoch_0(tmp_path: Path) -> None:
    # Variants are a function of the pair, so the 70 train pairs give only 70 draws; the same
    # fixture with more pairs gives enough for upstream's +-0.05 (here +-0.03).
    directory = write_mock_dataset(tmp_path / "big", n_pairs=6000)
    ds = JASPERSteeringDataset(directory, "train")
    assert ds.steering_probs == pytest.approx({"zero": 0.5, "centroid": 1 / 6, "keyword": 1 / 6, "residual": 1 / 6})
    counts = np.bincount(ds.get_batch(range(len(ds)))["steering_variant"].numpy(), minlength=4) / len(ds)
    assert counts == pytest.approx([0.5, 1 / 6, 1 / 6, 1 / 6], abs=0.03)


def test_set_epoch_changes_probs(mock_dataset_dir: Path) -> None:
    ds = JASPERSteeringDataset(mock_dataset_dir, "train")
    p0 = ds.steering_probs
    ds.set_epoch(50)
    p50 = ds.steering_probs
    ds.set_epoch(100)
    p100 = ds.steering_probs
    assert ds.current_epoch == 100
    assert p0["zero"] > p50["zero"] > p100["zero"]
    assert p0["centroid"] < p50["centroid"] < p100["centroid"]
    assert p0 == pytest.approx({"zero": 0.5, "centroid": 1 / 6, "keyword": 1 / 6, "residual": 1 / 6})
    assert p50 == pytest.approx({"zero": 0.3, "centroid": 0.7 / 3, "keyword": 0.7 / 3, "residual": 0.7 / 3})
    assert p100 == pytest.approx({"zero": 0.1, "centroid": 0.3, "keyword": 0.3, "residual": 0.3})
    ds.set_epoch(500)  # past epochs_total: stays at the end value
    assert ds.steering_probs == pytest.approx(p100)


def test_force_steering_zero(mock_dataset_dir: Path) -> None:
    ds = JASPERSteeringDataset(mock_dataset_dir, "train")
    ds.force_steering("zero")
    for i in range(len(ds)):
        sample = ds[i]
        assert int(sample["steering_variant"]) == 0
        assert torch.equal(sample["steering"], torch.zeros(D))


@pytest.mark.parametrize(
    "variant,vid,name", [("centroid", 1, "steering_centroid"), ("residual", 3, "steering_residual")]
)
def test_force_steering_nonzero(mock_dataset_dir: Path, variant: str, vid: int, name: str) -> None:
    ds = JASPERSteeringDataset(mock_dataset_dir, "train")
    ds.force_steering(variant)
    batch = ds.get_batch(range(len(ds)))
    assert batch["steering_variant"].tolist() == [vid] * 70
    assert torch.equal(batch["steering"], raw(mock_dataset_dir, name)[:70])


def test_force_steering_restore(mock_dataset_dir: Path) -> None:
    ds = JASPERSteeringDataset(mock_dataset_dir, "train")
    sampled = variants_of(ds)
    ds.force_steering("centroid")
    assert set(variants_of(ds)) == {1}
    ds.force_steering(None)
    restored = variants_of(ds)
    assert len(set(restored)) > 1
    assert restored == sampled  # back to exactly the sampled variants, not a continued stream


def test_force_steering_invalid_names(mock_dataset_dir: Path) -> None:
    ds = JASPERSteeringDataset(mock_dataset_dir, "train")
    for bad in ("none", "keyword_weighted", "ZERO"):
        with pytest.raises(ValueError, match="Unknown steering variant"):
            ds.force_steering(bad)


def test_determinism_with_same_epoch(mock_dataset_dir: Path) -> None:
    a = JASPERSteeringDataset(mock_dataset_dir, "train", epoch=3)
    b = JASPERSteeringDataset(mock_dataset_dir, "train", epoch=3)
    assert variants_of(a) == variants_of(b)
    assert_batches_equal(a.get_batch(range(70)), b.get_batch(range(70)))


def test_different_epochs_different_samples(mock_dataset_dir: Path) -> None:
    ds = JASPERSteeringDataset(mock_dataset_dir, "train", epoch=0)
    v0 = variants_of(ds)
    ds.set_epoch(1)
    v1 = variants_of(ds)
    assert v0 != v1
    assert (
        JASPERSteeringDataset(mock_dataset_dir, "train", epoch=1).get_batch(range(70))["steering_variant"].tolist()
        == v1
    )


# --- negatives ------------------------------------------------------------------------------------


def test_reload_negatives(mock_dataset_dir: Path) -> None:
    ds = JASPERSteeringDataset(mock_dataset_dir, "train")
    before = ds[0]["negative_embs"]
    sources = raw(mock_dataset_dir, "source_embs")
    assert torch.equal(before, sources[raw(mock_dataset_dir, "hard_negatives")[0]])
    new = (raw(mock_dataset_dir, "hard_negatives") + 1) % 80
    torch.save(new, mock_dataset_dir / "hard_negatives.pt")
    assert torch.equal(ds[0]["negative_embs"], before)  # nothing changes until asked
    ds.reload_negatives()
    after = ds[0]["negative_embs"]
    assert not torch.equal(after, before)
    assert torch.equal(after, sources[new[0]])
    assert torch.equal(ds.hard_negatives, new)


def test_reload_negatives_validates(mock_dataset_dir: Path) -> None:
    ds = JASPERSteeringDataset(mock_dataset_dir, "train")
    bad = raw(mock_dataset_dir, "hard_negatives").clone()
    bad[5, 2] = 80
    torch.save(bad, mock_dataset_dir / "hard_negatives.pt")
    with pytest.raises(ValueError, match="hard_negatives references source 80"):
        ds.reload_negatives()


# --- errors ---------------------------------------------------------------------------------------


def test_invalid_split_raises(mock_dataset_dir: Path) -> None:
    with pytest.raises(ValueError, match="Split file not found"):
        JASPERSteeringDataset(mock_dataset_dir, "invalid")


def test_missing_config_raises(mock_dataset_dir: Path) -> None:
    (mock_dataset_dir / "config.json").unlink()
    with pytest.raises(ValueError, match="Config file not found"):
        JASPERSteeringDataset(mock_dataset_dir, "train")


def test_missing_dataset_dir_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Dataset directory not found"):
        JASPERSteeringDataset(tmp_path / "nowhere", "train")


def test_index_out_of_bounds_raises(mock_dataset_dir: Path) -> None:
    ds = JASPERSteeringDataset(mock_dataset_dir, "train")
    with pytest.raises(IndexError, match=r"Index .* out of range"):
        ds[len(ds)]
    with pytest.raises(IndexError, match=r"Index .* out of range"):
        ds[-1]  # upstream rejects negative indices rather than wrapping
    with pytest.raises(IndexError, match=r"Index .* out of range"):
        ds.__getitems__([0, 1, 70])


@pytest.mark.parametrize(
    "name,row,col,value,message",
    [
        ("pair_index", 3, 0, 50, "pair_index references question 50, but only 50 questions exist"),
        ("pair_index", 4, 1, 999, "pair_index references source 999, but only 80 sources exist"),
        ("hard_negatives", 9, 3, 80, "hard_negatives references source 80, but only 80 sources exist"),
    ],
)
def test_referential_integrity(mock_dataset_dir: Path, name: str, row: int, col: int, value: int, message: str) -> None:
    tensor = raw(mock_dataset_dir, name).clone()
    tensor[row, col] = value
    torch.save(tensor, mock_dataset_dir / f"{name}.pt")
    with pytest.raises(ValueError, match=message):
        JASPERSteeringDataset(mock_dataset_dir, "train")


def test_referential_integrity_split_indices(mock_dataset_dir: Path) -> None:
    torch.save(torch.tensor([0, 1, 100]), mock_dataset_dir / "val_idx.pt")
    with pytest.raises(ValueError, match="Split indices reference pair 100, but only 100 pairs exist"):
        JASPERSteeringDataset(mock_dataset_dir, "val")


def test_invalid_storage_format(mock_dataset_dir: Path) -> None:
    with pytest.raises(ValueError, match="Invalid storage_format: parquet"):
        JASPERSteeringDataset(mock_dataset_dir, "train", storage_format="parquet")


def test_storage_format_auto_no_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"embedding_dim": 64, "n_neg": 4}')
    with pytest.raises(ValueError, match="No dataset files found"):
        JASPERSteeringDataset(tmp_path, "train")


# --- lifecycle and device -------------------------------------------------------------------------


def test_context_manager_support(mock_dataset_dir: Path) -> None:
    with JASPERSteeringDataset(mock_dataset_dir, "train") as ds:
        assert torch.equal(ds.question_embs, raw(mock_dataset_dir, "question_embs"))
        assert int(ds[0]["cluster_id"]) == int(raw(mock_dataset_dir, "pair_cluster_id")[0])
    with pytest.raises(AttributeError):
        ds.question_embs  # noqa: B018
    with pytest.raises(AttributeError):
        ds[0]


def test_close_method(mock_dataset_dir: Path) -> None:
    ds = JASPERSteeringDataset(mock_dataset_dir, "train")
    ds.close()
    with pytest.raises(AttributeError):
        ds.question_embs  # noqa: B018
    with pytest.raises(AttributeError):
        ds.centroid_embs  # noqa: B018
    ds.close()  # idempotent


def test_memory_usage_logging(mock_dataset_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="jasper_ray"):
        JASPERSteeringDataset(mock_dataset_dir, "train", use_mmap=False)
    lines = [r.getMessage() for r in caplog.records if "Dataset initialized" in r.getMessage()]
    assert len(lines) == 1
    assert "memory=" in lines[0] and "70 samples" in lines[0]


def test_device_placement_cpu(mock_dataset_dir: Path) -> None:
    ds = JASPERSteeringDataset(mock_dataset_dir, "train", device="cpu")
    assert ds.device == torch.device("cpu")
    sample = ds[0]
    assert all(v.device.type == "cpu" for v in sample.values())
    assert ds.centroid_embs.device.type == "cpu"
    assert torch.equal(ds.centroid_embs, raw(mock_dataset_dir, "centroid_embs"))


@pytest.mark.parametrize("use_mmap", [False, True])
def test_create_combined_splits_share_one_copy(mock_dataset_dir: Path, use_mmap: bool) -> None:
    splits = JASPERSteeringDataset.create_combined_splits(mock_dataset_dir, epoch=2, use_mmap=use_mmap)
    assert {k: len(v) for k, v in splits.items()} == {"train": 70, "val": 15, "test": 15}
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert train.reader is val.reader is test.reader
    for name in ("source_embs", "question_embs", "steering_residual", "hard_negatives"):
        ptr = getattr(train, name).data_ptr()
        assert getattr(val, name).data_ptr() == ptr == getattr(test, name).data_ptr(), name
    assert all(ds.current_epoch == 2 for ds in splits.values())
    val.set_epoch(7)  # each split keeps its own epoch
    assert (train.current_epoch, val.current_epoch) == (2, 7)
    # Each split serves its own pairs, with the same samples a standalone instance gives.
    alone = JASPERSteeringDataset(mock_dataset_dir, "test", epoch=2)
    assert_batches_equal(test.get_batch(range(15)), alone.get_batch(range(15)))


def test_create_combined_splits_with_storage_format(mock_dataset_dir: Path) -> None:
    splits = JASPERSteeringDataset.create_combined_splits(mock_dataset_dir, storage_format="pt")
    assert all(ds.storage_format == "pt" for ds in splits.values())


# --- storage format and mmap ----------------------------------------------------------------------


def test_storage_format_detection_pt(mock_dataset_dir: Path) -> None:
    assert JASPERSteeringDataset(mock_dataset_dir, "train").storage_format == "pt"
    assert JASPERSteeringDataset(mock_dataset_dir, "train", storage_format="pt").storage_format == "pt"


def test_convert_pt_to_hdf5_then_load(mock_dataset_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pt = JASPERSteeringDataset(mock_dataset_dir, "train", storage_format="pt")
    want = pt.get_batch(range(70))
    # The static method converts on Ray when Ray imports; these tests start no Ray: take the
    # in-process path a user without Ray gets.
    monkeypatch.setitem(sys.modules, "ray", None)
    report = JASPERSteeringDataset.convert_pt_to_hdf5(mock_dataset_dir, progress=False)
    assert report.output == mock_dataset_dir / "dataset.h5"
    assert (mock_dataset_dir / "dataset.h5").is_file()
    assert (mock_dataset_dir / "question_embs.pt").is_file()  # PT files are kept
    h5 = JASPERSteeringDataset(mock_dataset_dir, "train")
    assert h5.storage_format == "hdf5"
    assert len(h5) == 70
    assert_batches_equal(h5.get_batch(range(70)), want, "hdf5 vs pt")
    assert torch.equal(h5.centroid_embs, raw(mock_dataset_dir, "centroid_embs"))
    assert JASPERSteeringDataset(mock_dataset_dir, "train", storage_format="pt").storage_format == "pt"


def test_memory_mapping_disabled_by_default_for_small_data(mock_dataset_dir: Path) -> None:
    assert JASPERSteeringDataset(mock_dataset_dir, "train").use_mmap is False


@pytest.mark.parametrize("use_mmap", [True, False])
def test_memory_mapping_explicit(mock_dataset_dir: Path, use_mmap: bool) -> None:
    ds = JASPERSteeringDataset(mock_dataset_dir, "train", use_mmap=use_mmap)
    assert ds.use_mmap is use_mmap
    assert len(ds) == 70
    ds.force_steering("keyword")
    want = expected_batch(mock_dataset_dir, range(70), [2] * 70)
    assert_batches_equal(ds.get_batch(range(70)), want)


def test_memory_mapping_auto_enable_large_dataset(tmp_path: Path) -> None:
    # The config declares D=768 and a million pairs (~46 GB by upstream's estimate): map, do not load.
    directory = write_mock_dataset(tmp_path / "big", dim=768, config_extra={"n_pairs": 1_000_000})
    ds = JASPERSteeringDataset(directory, "train")
    assert ds.use_mmap is True
    assert torch.equal(ds[3]["question_emb"], raw(directory, "question_embs")[raw(directory, "pair_index")[3, 0]])


# --- loader (upstream's tests/test_loader.py) -----------------------------------------------------


def test_create_loader_basic(mock_loader_dir: Path) -> None:
    loader = create_loader(mock_loader_dir, "train", batch_size=8)
    assert loader.batch_size == 8
    assert isinstance(loader.dataset_obj, JASPERSteeringDataset)
    assert loader.dataset is loader.dataset_obj
    assert loader.sampler is loader.sampler_obj


def test_create_loader_all_splits(mock_loader_dir: Path) -> None:
    for split, n in (("train", 70), ("val", 15), ("test", 15)):
        loader = create_loader(mock_loader_dir, split, batch_size=4)
        assert len(loader.dataset_obj) == n
        seen = torch.cat([b["cluster_id"] for b in loader])
        expected_n = n // 4 * 4 if split == "train" else n
        assert len(seen) == expected_n


def test_loader_iteration_count(mock_loader_dir: Path) -> None:
    loader = create_loader(mock_loader_dir, "train", batch_size=8)
    batches = list(loader)
    assert len(batches) == len(loader) == 70 // 8
    assert all(len(b["steering_variant"]) == 8 for b in batches)


def test_loader_batch_shapes_and_values(mock_loader_dir: Path) -> None:
    loader = create_loader(mock_loader_dir, "val", batch_size=16)
    batch = next(iter(loader))
    assert batch["question_emb"].shape == (15, D)  # val keeps its last, short batch
    loader = create_loader(mock_loader_dir, "train", batch_size=16, shuffle=False)
    batch = next(iter(loader))
    for key, (shape, dtype) in SAMPLE_SHAPES.items():
        assert tuple(batch[key].shape) == (16, *({"D": D, "NEG": NEG}[s] for s in shape)), key
        assert batch[key].dtype == dtype, key
    assert_batches_equal(batch, expected_batch(mock_loader_dir, range(16), batch["steering_variant"]))


def test_drop_last_defaults_and_override(mock_loader_dir: Path) -> None:
    assert create_loader(mock_loader_dir, "train", batch_size=8).drop_last is True
    assert create_loader(mock_loader_dir, "val", batch_size=8).drop_last is False
    assert len(list(create_loader(mock_loader_dir, "val", batch_size=8))) == 2
    train_keep = create_loader(mock_loader_dir, "train", batch_size=8, drop_last=False)
    assert train_keep.drop_last is False and len(list(train_keep)) == 9
    val_drop = create_loader(mock_loader_dir, "val", batch_size=8, drop_last=True)
    assert val_drop.drop_last is True and len(list(val_drop)) == 1


def test_pin_memory_flag(mock_loader_dir: Path) -> None:
    assert create_loader(mock_loader_dir, "train", batch_size=8).pin_memory is True
    assert create_loader(mock_loader_dir, "train", batch_size=8, pin_memory=False).pin_memory is False


def test_num_workers_configurable(mock_loader_dir: Path) -> None:
    assert create_loader(mock_loader_dir, "train", batch_size=8).num_workers == 0
    assert create_loader(mock_loader_dir, "train", batch_size=8, num_workers=2).num_workers == 2


def test_samplers(mock_loader_dir: Path) -> None:
    val = create_loader(mock_loader_dir, "val", batch_size=4)
    assert isinstance(val.sampler, SequentialSampler)
    assert list(val.sampler) == list(range(15))
    train = create_loader(mock_loader_dir, "train", batch_size=4)
    assert isinstance(train.sampler, RandomSampler)
    assert not isinstance(train.sampler, DistributedSampler)
    order = list(train.sampler)
    assert sorted(order) == list(range(70)) and order != list(range(70))


def test_set_epoch_on_loader(mock_loader_dir: Path) -> None:
    loader = create_loader(mock_loader_dir, "train", batch_size=8)
    first_order = list(loader.sampler)
    set_epoch(loader, 5)
    assert loader.dataset_obj.current_epoch == 5
    assert loader.sampler_obj.epoch == 5
    assert list(loader.sampler) != first_order  # a new shuffle per epoch


def test_loader_with_epoch_curriculum(mock_dataset_dir: Path) -> None:
    loader = create_loader(mock_dataset_dir, "train", batch_size=8, epoch=50)
    assert loader.dataset_obj.current_epoch == 50
    assert loader.dataset_obj.steering_probs["zero"] == pytest.approx(0.3)


def test_validate_first_batch_does_not_advance_anything(mock_loader_dir: Path) -> None:
    reference = list(create_loader(mock_loader_dir, "train", batch_size=8))
    loader = create_loader(mock_loader_dir, "train", batch_size=8)
    assert validate_first_batch(loader) is True
    after = list(loader)
    assert len(after) == len(reference)
    for got, want in zip(after, reference):
        assert_batches_equal(got, want)


def test_validate_first_batch_rejects_bad_values(mock_loader_dir: Path) -> None:
    relevance = raw(mock_loader_dir, "pair_relevance")
    relevance[0] = 1.5
    torch.save(relevance, mock_loader_dir / "pair_relevance.pt")
    loader = create_loader(mock_loader_dir, "train", batch_size=8, shuffle=False)
    with pytest.raises(AssertionError, match="relevance"):
        validate_first_batch(loader)


def test_loader_force_steering_in_validation(mock_loader_dir: Path) -> None:
    loader = create_loader(mock_loader_dir, "val", batch_size=8)
    loader.dataset_obj.force_steering("zero")
    batches = list(loader)
    assert sum(len(b["steering"]) for b in batches) == 15
    for batch in batches:
        assert torch.equal(batch["steering"], torch.zeros_like(batch["steering"]))
        assert batch["steering_variant"].eq(0).all()


def test_create_loader_passes_dataset_kwargs(mock_loader_dir: Path) -> None:
    loader = create_loader(mock_loader_dir, "train", batch_size=8, storage_format="pt", use_mmap=True, device="cpu")
    ds = loader.dataset_obj
    assert (ds.storage_format, ds.use_mmap, ds.device.type) == ("pt", True, "cpu")


def test_hdf5_only_directory_loads(tmp_path: Path, mock_loader_dir: Path) -> None:
    """Upstream needed the PT split files beside dataset.h5; dataset.h5 alone must do."""
    convert_pt_to_hdf5(mock_loader_dir, compression="gzip", progress=False)
    alone = tmp_path / "only_h5"
    alone.mkdir()
    shutil.copy(mock_loader_dir / "dataset.h5", alone / "dataset.h5")
    assert sorted(os.listdir(alone)) == ["dataset.h5"]
    ds = JASPERSteeringDataset(alone, "val")
    assert ds.storage_format == "hdf5" and len(ds) == 15
    want = JASPERSteeringDataset(mock_loader_dir, "val", storage_format="pt").get_batch(range(15))
    assert_batches_equal(ds.get_batch(range(15)), want)
