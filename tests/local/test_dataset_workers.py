"""DataLoader workers (fork and spawn): same samples as one process; the epoch reaches workers started
anew each pass (torch's default, and create_loader's) whether it was set on the loader or only on the
sampler; set_epoch / force_steering / reload reach persistent workers; resume counts only delivered
batches. Each test starts worker processes (spawn re-imports torch: a few seconds each), so the data is
small."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from jasper_ray import JASPERSteeringDataset, collate, create_loader, set_epoch
from jasper_ray.local.sampler import make_sampler

pytest.register_assert_rewrite("_fixtures_dataset")
from _fixtures_dataset import assert_batches_equal, concat_batches  # noqa: E402

pytest_plugins = ["_fixtures_dataset"]

BATCH = 16
CONTEXTS = ["fork", "spawn"]


def epoch_batches(loader) -> list[dict[str, torch.Tensor]]:
    return [dict(b) for b in loader]


def expected(ds: JASPERSteeringDataset, order: list[int]) -> dict[str, torch.Tensor]:
    """The epoch as one process builds it, at the dataset's current epoch."""
    return ds.get_batch(order)


def sample_keys(batch: dict[str, torch.Tensor]) -> list[tuple[bytes, int]]:
    """(question, negatives, variant) per sample: identifies the pair and its variant."""
    return sorted(
        (q.numpy().tobytes() + n.numpy().tobytes(), int(v))
        for q, n, v in zip(batch["question_emb"], batch["negative_embs"], batch["steering_variant"])
    )


@pytest.mark.parametrize("context", CONTEXTS)
def test_workers_give_the_single_process_samples(synth_dir: Path, context: str) -> None:
    ds = JASPERSteeringDataset(synth_dir, "train", storage_format="pt", use_mmap=True, epoch=1)
    loader = DataLoader(
        ds, batch_size=BATCH, shuffle=False, num_workers=2, collate_fn=collate, multiprocessing_context=context
    )
    single = DataLoader(ds, batch_size=BATCH, shuffle=False, num_workers=0, collate_fn=collate)
    got, want = concat_batches(epoch_batches(loader)), concat_batches(epoch_batches(single))
    assert sample_keys(got) == sample_keys(want)  # the same multiset of (pair, variant)
    assert_batches_equal(got, want)  # and in fact the same batches in the same order
    assert_batches_equal(got, expected(ds, list(range(len(ds)))))
    if context == "spawn":
        return  # the rest needs a second start of the workers: fork shows it at a fraction of the cost
    # Non-persistent workers pick up the epoch at the next iteration.
    ds.set_epoch(2)
    again = concat_batches(epoch_batches(loader))
    assert_batches_equal(again, expected(ds, list(range(len(ds)))))
    assert not torch.equal(again["steering_variant"], got["steering_variant"])


@pytest.mark.parametrize("context", CONTEXTS)
def test_the_samplers_set_epoch_alone_reaches_the_workers(synth_dir: Path, context: str) -> None:
    """A plain DataLoader with our sampler; the loop calls only ``sampler.set_epoch`` (as Lightning does)."""
    ds = JASPERSteeringDataset(synth_dir, "train", storage_format="pt", use_mmap=True)
    reference = JASPERSteeringDataset(synth_dir, "train", storage_format="pt", use_mmap=True)
    sampler = make_sampler(ds, shuffle=True)
    loader = DataLoader(
        ds, batch_size=BATCH, sampler=sampler, num_workers=2, collate_fn=collate, multiprocessing_context=context
    )
    for epoch in (0, 3):
        sampler.set_epoch(epoch)
        got = concat_batches(epoch_batches(loader))
        reference.set_epoch(epoch)
        want = reference.get_batch(sampler.epoch_indices())
        assert torch.equal(got["steering_variant"], want["steering_variant"]), f"epoch {epoch}"
        assert_batches_equal(got, want, f"epoch {epoch}")


@pytest.mark.parametrize("context", CONTEXTS)
def test_set_epoch_reaches_workers_started_anew_each_pass(synth_dir: Path, context: str) -> None:
    """create_loader's workers are not persistent (torch's default): each pass pickles (spawn) or forks the
    dataset again, and the epoch set before it travels with it."""
    loader = create_loader(synth_dir, "train", BATCH, num_workers=2, multiprocessing_context=context)
    assert not loader.persistent_workers
    reference = JASPERSteeringDataset(synth_dir, "train")
    n = len(loader) * BATCH
    for epoch in (0, 4):
        set_epoch(loader, epoch)
        got = concat_batches(epoch_batches(loader))
        reference.set_epoch(epoch)
        assert_batches_equal(got, reference.get_batch(list(loader.sampler)[:n]), f"epoch {epoch}")


@pytest.mark.parametrize("context", CONTEXTS)
def test_persistent_workers_see_set_epoch_force_steering_and_reload(synth_copy: Path, context: str) -> None:
    synth_dir = synth_copy
    loader = create_loader(
        synth_dir,
        "train",
        BATCH,
        num_workers=2,
        shuffle=True,
        multiprocessing_context=context,
        persistent_workers=True,
        storage_format="pt",
        use_mmap=False,
    )
    ds = loader.dataset_obj
    reference = JASPERSteeringDataset(synth_dir, "train", storage_format="pt", use_mmap=True)
    n = len(loader) * BATCH

    epoch0 = concat_batches(epoch_batches(loader))
    assert_batches_equal(epoch0, reference.get_batch(list(loader.sampler)[:n]), "epoch 0")
    workers = loader.worker_pids  # create_loader's slot workers (local.workers)
    assert len(workers) == 2

    set_epoch(loader, 2)
    epoch2 = concat_batches(epoch_batches(loader))
    assert loader.worker_pids == workers  # the same persistent processes
    reference.set_epoch(2)
    assert_batches_equal(epoch2, reference.get_batch(list(loader.sampler)[:n]), "epoch 2")
    # Epoch 2's variants are not epoch 0's, pair for pair (compare in a common, unshuffled order).
    reference.set_epoch(0)
    v0 = reference.get_batch(range(len(reference)))["steering_variant"]
    reference.set_epoch(2)
    v2 = reference.get_batch(range(len(reference)))["steering_variant"]
    assert not torch.equal(v0, v2)

    ds.force_steering("zero")
    forced = concat_batches(epoch_batches(loader))
    assert forced["steering_variant"].eq(0).all()
    assert torch.equal(forced["steering"], torch.zeros_like(forced["steering"]))
    ds.force_steering(None)
    restored = concat_batches(epoch_batches(loader))
    assert_batches_equal(restored, epoch2, "restored")

    # reload_negatives in the main process reaches the persistent workers too.
    sources = torch.load(synth_dir / "source_embs.pt", weights_only=True)
    new = (torch.load(synth_dir / "hard_negatives.pt", weights_only=True) + 1) % len(sources)
    torch.save(new, synth_dir / "hard_negatives.pt")
    ds.reload_negatives()
    reloaded = concat_batches(epoch_batches(loader))
    pairs = ds.split_indices[list(loader.sampler)[:n]]
    assert torch.equal(reloaded["negative_embs"], sources[new[pairs]])
    assert_batches_equal(reloaded, ds.get_batch(list(loader.sampler)[:n]), "after reload")
    assert loader.worker_pids == workers


@pytest.mark.parametrize("storage", ["h5_gzip", "h5_contiguous"])
def test_hdf5_with_spawn_workers(storage_variants: dict, storage: str) -> None:
    """Upstream's HDF5 dataset held an open h5py handle and could not be pickled for spawn."""
    directory, options = storage_variants[storage]
    ds = JASPERSteeringDataset(directory, "val", epoch=3, **options)
    ds.get_batch([0])  # the file is open in the parent before the workers start
    loader = DataLoader(ds, batch_size=BATCH, num_workers=2, collate_fn=collate, multiprocessing_context="spawn")
    assert_batches_equal(concat_batches(epoch_batches(loader)), ds.get_batch(range(len(ds))))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_with_workers_counts_delivered_batches(synth_dir: Path, num_workers: int) -> None:
    kwargs = {"shuffle": True, "num_workers": num_workers, "epoch": 1, "multiprocessing_context": "fork"}
    full = epoch_batches(create_loader(synth_dir, "train", BATCH, **kwargs))
    loader = create_loader(synth_dir, "train", BATCH, **kwargs)
    k = 4
    first = list(itertools.islice(iter(loader), k))  # workers have prefetched more than k by now
    for a, b in zip(first, full):
        assert_batches_equal(a, b)
    state = loader.state_dict()
    assert state["samples_seen"] == k * BATCH and state["epoch"] == 1
    resumed = create_loader(synth_dir, "train", BATCH, **{**kwargs, "epoch": 0})
    resumed.load_state_dict(state)
    rest = epoch_batches(resumed)
    assert len(rest) == len(full) - k
    for i, (a, b) in enumerate(zip(rest, full[k:])):
        assert_batches_equal(a, b, f"batch {k + i}")
