"""torchdata's ``StatefulDataLoader`` over ``JASPERSteeringDataset``: a state taken mid-epoch resumes with
exactly the remaining samples, bit for bit against an uninterrupted run, in one process and with
workers. With jasper_ray's sampler the state carries the epoch, and loading it moves the dataset there."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from jasper_ray import JASPERSteeringDataset, ResumableSampler, collate

stateful_dataloader = pytest.importorskip("torchdata.stateful_dataloader")
StatefulDataLoader = stateful_dataloader.StatefulDataLoader

pytest.register_assert_rewrite("_fixtures_dataset")
from _fixtures_dataset import assert_batches_equal  # noqa: E402

pytest_plugins = ["_fixtures_dataset"]
pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")  # torchdata 0.11 on torch 2.13

BATCH = 16
EPOCH = 3
WORKERS = [(0, None), (2, "fork"), (2, "spawn")]


def make_loader(directory: Path, num_workers: int, context: str | None) -> StatefulDataLoader:
    dataset = JASPERSteeringDataset(directory, "train")
    return StatefulDataLoader(
        dataset,
        batch_size=BATCH,
        sampler=ResumableSampler(dataset, shuffle=True),
        collate_fn=collate,
        num_workers=num_workers,
        multiprocessing_context=context,
    )


def assert_same(got: list, want: list) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_batches_equal(a, b, f"batch {i}")


@pytest.mark.parametrize(("num_workers", "context"), WORKERS, ids=["in-process", "fork", "spawn"])
def test_resume_mid_epoch_gives_exactly_the_rest(synth_dir: Path, num_workers: int, context: str | None) -> None:
    uninterrupted = make_loader(synth_dir, num_workers, context)
    uninterrupted.sampler.set_epoch(EPOCH)
    full = list(uninterrupted)
    reference = JASPERSteeringDataset(synth_dir, "train", epoch=EPOCH)
    order = uninterrupted.sampler.epoch_indices()
    assert_batches_equal(full[0], reference.get_batch(order[:BATCH]))  # the variants of that epoch

    k = 5
    loader = make_loader(synth_dir, num_workers, context)
    loader.sampler.set_epoch(EPOCH)
    first = list(itertools.islice(iter(loader), k))  # workers have prefetched more by now
    state = loader.state_dict()
    assert_same(first, full[:k])

    resumed = make_loader(synth_dir, num_workers, context)  # a new process would build it at epoch 0
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert resumed.dataset.current_epoch == EPOCH  # the sampler's state carried the epoch to the dataset
    assert_same(rest, full[k:])
    # The resumed epoch done, the next one is whole.
    resumed.sampler.set_epoch(EPOCH + 1)
    uninterrupted.sampler.set_epoch(EPOCH + 1)
    assert_same(list(resumed), list(uninterrupted))


def test_resume_with_torchdatas_own_shuffle(synth_dir: Path) -> None:
    """Without our sampler (``shuffle=True``: torchdata's RandomSampler, its generator in the state) the
    order resumes too; the epoch is then the loop's to restore, with ``dataset.set_epoch``."""

    def loader() -> StatefulDataLoader:
        dataset = JASPERSteeringDataset(synth_dir, "train", epoch=EPOCH)
        generator = torch.Generator().manual_seed(7)  # torchdata seeds each sampler at random otherwise
        return StatefulDataLoader(dataset, batch_size=BATCH, shuffle=True, collate_fn=collate, generator=generator)

    full = list(loader())
    interrupted = loader()
    first = list(itertools.islice(iter(interrupted), 4))
    state = interrupted.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    assert_same(first + list(resumed), full)
    assert not torch.equal(full[0]["question_emb"], full[1]["question_emb"])
