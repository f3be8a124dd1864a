"""The resumable sampler and loader: mid-epoch resume, per-rank shards, world-size checks, torch's
DataLoader defaults, and the sampler moving its dataset's epoch."""

from __future__ import annotations

import itertools
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from _support import subprocess_env
from torch.utils.data import DataLoader, Subset

from jasper_ray import (
    JASPERSteeringDataset,
    ResumableSampler,
    ValidationError,
    collate,
    create_loader,
    set_epoch,
    validate_first_batch,
)
from jasper_ray.local.loader import accelerator_available
from jasper_ray.local.sampler import make_sampler

pytest.register_assert_rewrite("_fixtures_dataset")
from _fixtures_dataset import assert_batches_equal  # noqa: E402

pytest_plugins = ["_fixtures_dataset"]

BATCH = 16


def take(loader, k: int) -> list[dict[str, torch.Tensor]]:
    return list(itertools.islice(iter(loader), k))


def assert_same_batches(got: list, want: list) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_batches_equal(a, b, f"batch {i}")


# --- mid-epoch resume -----------------------------------------------------------------------------


@pytest.mark.parametrize("drop_last", [True, False])
def test_resume_mid_epoch_yields_exactly_the_rest(synth_dir: Path, drop_last: bool) -> None:
    full = list(create_loader(synth_dir, "train", BATCH, shuffle=True, drop_last=drop_last, epoch=3))
    k = 5
    loader = create_loader(synth_dir, "train", BATCH, shuffle=True, drop_last=drop_last, epoch=3)
    first = take(loader, k)
    assert_same_batches(first, full[:k])
    state = loader.state_dict()
    assert state == {
        "seed": 42,
        "epoch": 3,
        "samples_seen": k * BATCH,
        "num_replicas": 1,
        "rank": 0,
        "dataset_len": len(loader.dataset_obj),
    }
    resumed = create_loader(synth_dir, "train", BATCH, shuffle=True, drop_last=drop_last)  # built at epoch 0
    resumed.load_state_dict(state)
    assert resumed.dataset_obj.current_epoch == 3
    assert len(resumed) == len(full) - k
    rest = list(resumed)
    assert_same_batches(rest, full[k:])
    # Resume twice in a row: the second save continues counting from the first.
    again = create_loader(synth_dir, "train", BATCH, shuffle=True, drop_last=drop_last)
    again.load_state_dict(state)
    take(again, 2)
    state2 = again.state_dict()
    assert state2["samples_seen"] == (k + 2) * BATCH
    third = create_loader(synth_dir, "train", BATCH, shuffle=True, drop_last=drop_last)
    third.load_state_dict(state2)
    assert_same_batches(list(third), full[k + 2 :])


def test_resume_in_a_later_epoch(synth_dir: Path) -> None:
    loader = create_loader(synth_dir, "train", BATCH, shuffle=True)
    epoch0 = list(loader)
    set_epoch(loader, 1)
    epoch1 = list(loader)
    assert not torch.equal(epoch0[0]["question_emb"], epoch1[0]["question_emb"])  # a new shuffle
    set_epoch(loader, 1)
    take(loader, 3)
    state = loader.state_dict()
    assert (state["epoch"], state["samples_seen"]) == (1, 3 * BATCH)
    resumed = create_loader(synth_dir, "train", BATCH, shuffle=True)
    resumed.load_state_dict(state)
    assert_same_batches(list(resumed), epoch1[3:])
    # The next epoch starts from its beginning again.
    set_epoch(resumed, 2)
    fresh = create_loader(synth_dir, "train", BATCH, shuffle=True, epoch=2)
    assert_same_batches(list(resumed), list(fresh))


def test_trainer_style_loop_resumes_then_moves_on(synth_dir: Path) -> None:
    """Training loops call set_epoch at the top of every epoch, the resumed one included."""
    epoch2 = list(create_loader(synth_dir, "train", BATCH, shuffle=True, epoch=2))
    epoch3 = list(create_loader(synth_dir, "train", BATCH, shuffle=True, epoch=3))
    loader = create_loader(synth_dir, "train", BATCH, shuffle=True, epoch=2)
    take(loader, 4)
    state = loader.state_dict()
    resumed = create_loader(synth_dir, "train", BATCH, shuffle=True)
    resumed.load_state_dict(state)
    seen = []
    for epoch in (2, 3):
        set_epoch(resumed, epoch)
        seen.append(list(resumed))
    assert_same_batches(seen[0], epoch2[4:])
    assert_same_batches(seen[1], epoch3)


def test_next_pass_after_a_resumed_epoch_is_whole(synth_dir: Path) -> None:
    full = list(create_loader(synth_dir, "train", BATCH, shuffle=True))
    loader = create_loader(synth_dir, "train", BATCH, shuffle=True)
    take(loader, 3)
    resumed = create_loader(synth_dir, "train", BATCH, shuffle=True)
    resumed.load_state_dict(loader.state_dict())
    assert_same_batches(list(resumed), full[3:])
    assert len(resumed) == len(full)
    assert_same_batches(list(resumed), full)  # same epoch again (no set_epoch): all of it


def test_state_saved_between_epochs_resumes_the_new_epoch_whole(synth_dir: Path) -> None:
    loader = create_loader(synth_dir, "train", BATCH, shuffle=True)
    list(loader)
    set_epoch(loader, 1)
    state = loader.state_dict()  # a checkpoint at the top of epoch 1, before its first batch
    assert (state["epoch"], state["samples_seen"]) == (1, 0)
    resumed = create_loader(synth_dir, "train", BATCH, shuffle=True)
    resumed.load_state_dict(state)
    assert_same_batches(list(resumed), list(create_loader(synth_dir, "train", BATCH, shuffle=True, epoch=1)))


def test_state_after_a_full_epoch_and_at_start(synth_dir: Path) -> None:
    loader = create_loader(synth_dir, "val", BATCH)
    assert loader.state_dict()["samples_seen"] == 0
    list(loader)
    assert loader.state_dict()["samples_seen"] == len(loader.dataset_obj)  # val keeps its last short batch
    resumed = create_loader(synth_dir, "val", BATCH)
    resumed.load_state_dict(loader.state_dict())
    assert list(resumed) == []


def test_resume_with_a_different_dataset_size_or_world_size_raises(synth_dir: Path) -> None:
    state = create_loader(synth_dir, "train", BATCH).state_dict()
    val = create_loader(synth_dir, "val", BATCH)
    with pytest.raises(ValueError, match="same world size"):
        val.load_state_dict(state)
    two = make_sampler(100, shuffle=True, num_replicas=2, rank=0)
    three = make_sampler(100, shuffle=True, num_replicas=3, rank=0)
    with pytest.raises(ValueError, match="same world size"):
        three.load_state_dict(two.state_dict(10))
    with pytest.raises(ValueError, match="samples_seen"):
        two.load_state_dict({**two.state_dict(0), "samples_seen": 51})


def test_sampler_state_roundtrip_per_rank() -> None:
    for rank in range(3):
        s = make_sampler(101, shuffle=True, num_replicas=3, rank=rank, epoch=4)
        whole = list(s)
        t = make_sampler(101, shuffle=True, num_replicas=3, rank=rank)
        t.load_state_dict(s.state_dict(13))
        assert list(t) == whole[13:]
        assert len(t) == len(whole) - 13


# --- shards ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [False, True])
def test_shards_padded_cover_everything(shuffle: bool) -> None:
    shards = [list(make_sampler(10, shuffle=shuffle, num_replicas=3, rank=r, epoch=1)) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    flat = list(itertools.chain(*shards))
    assert sorted(set(flat)) == list(range(10))
    counts = np.bincount(flat, minlength=10)
    assert counts.sum() == 12 and counts.max() == 2 and (counts == 2).sum() == 2
    # Padding repeats the first indices of the epoch's order.
    order = list(make_sampler(10, shuffle=shuffle, epoch=1))
    assert sorted(np.flatnonzero(counts == 2).tolist()) == sorted(order[:2])
    # Apart from the padding, ranks are disjoint.
    for a, b in itertools.combinations(range(3), 2):
        assert set(shards[a]) & set(shards[b]) <= set(order[:2])


@pytest.mark.parametrize("shuffle", [False, True])
def test_shards_drop_last_drops_exactly_the_remainder(shuffle: bool) -> None:
    shards = [list(make_sampler(10, shuffle=shuffle, num_replicas=3, rank=r, drop_last=True)) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]
    flat = list(itertools.chain(*shards))
    assert len(set(flat)) == 9 == len(flat)  # disjoint
    assert len(set(range(10)) - set(flat)) == 10 % 3


def test_shards_even_split_needs_no_padding() -> None:
    shards = [list(make_sampler(12, shuffle=True, num_replicas=4, rank=r)) for r in range(4)]
    assert sorted(itertools.chain(*shards)) == list(range(12))


def test_shard_order_is_a_function_of_seed_and_epoch() -> None:
    a = list(make_sampler(50, shuffle=True, epoch=2, seed=7))
    assert a == list(make_sampler(50, shuffle=True, epoch=2, seed=7))
    assert a != list(make_sampler(50, shuffle=True, epoch=3, seed=7))
    assert a != list(make_sampler(50, shuffle=True, epoch=2, seed=8))
    s = make_sampler(50, shuffle=True, seed=7)
    s.set_epoch(2)
    assert list(s) == a


def test_padding_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="jasper_ray"):
        make_sampler(10, shuffle=True, num_replicas=3, rank=0)
    assert any("2 of 10 samples repeated" in r.getMessage() for r in caplog.records)


def test_sampler_rejects_a_bad_rank() -> None:
    with pytest.raises(ValueError, match="rank 3"):
        ResumableSampler(10, num_replicas=3, rank=3)


# --- torch's habits: DataLoader defaults, the sampler's set_epoch, torchdata's resume protocol -------


def test_workers_are_persistent_only_when_asked(synth_dir: Path) -> None:
    assert create_loader(synth_dir, "train", BATCH, num_workers=2).persistent_workers is False  # torch's default
    assert create_loader(synth_dir, "train", BATCH, num_workers=2, persistent_workers=True).persistent_workers


@pytest.mark.skipif(accelerator_available(), reason="pinning is for machines with an accelerator")
@pytest.mark.parametrize("num_workers", [0, 2])
def test_default_pin_memory_neither_pins_nor_warns_without_an_accelerator(synth_dir: Path, num_workers: int) -> None:
    loader = create_loader(synth_dir, "val", BATCH, num_workers=num_workers, multiprocessing_context="fork")
    assert loader.pin_memory is True  # upstream's default, as code reading the attribute expects
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(loader)
        list(loader)  # every epoch builds an iterator: none of them warns
    assert not [w for w in caught if "pin_memory" in str(w.message) or "accelerator" in str(w.message)]
    assert not any(batch["question_emb"].is_pinned() for batch in batches)
    assert loader.pin_memory is True


def test_sampler_set_epoch_alone_moves_the_dataset(synth_dir: Path) -> None:
    """What Lightning and DistributedSampler loops call: the sampler's set_epoch, never the dataset's."""
    ds = JASPERSteeringDataset(synth_dir, "train", epoch=0)
    reference = JASPERSteeringDataset(synth_dir, "train", epoch=5)
    sampler = make_sampler(ds, shuffle=True)
    loader = DataLoader(ds, batch_size=BATCH, sampler=sampler, collate_fn=collate)
    sampler.set_epoch(5)
    assert ds.current_epoch == 5
    got = list(loader)
    order = sampler.epoch_indices()
    assert_batches_equal(got[0], reference.get_batch(order[:BATCH]))
    variants = torch.cat([b["steering_variant"] for b in got])
    assert torch.equal(variants, reference.get_batch(order)["steering_variant"])
    # Through a Subset, and on loading a state (the dataset resumes the saved epoch).
    sub = make_sampler(Subset(ds, range(10)), shuffle=False)
    sub.set_epoch(7)
    assert ds.current_epoch == 7
    sampler.load_state_dict(sampler.state_dict(BATCH) | {"epoch": 2})
    assert ds.current_epoch == 2
    make_sampler(100, shuffle=True).set_epoch(3)  # a sampler over a count has no dataset to move


def test_a_pass_resumes_with_torchdatas_protocol() -> None:
    """``state_dict()`` without an argument (the sampler: where the pass started; the pass: how far it got),
    loaded back sampler first, then pass, as torchdata's StatefulDataLoader does."""
    sampler = make_sampler(50, shuffle=True, epoch=4)
    whole = list(sampler)
    epoch_pass = iter(sampler)
    drawn = list(itertools.islice(epoch_pass, 17))
    assert drawn == whole[:17]
    saved_sampler, saved_pass = sampler.state_dict(), epoch_pass.state_dict()
    assert (saved_sampler["epoch"], saved_sampler["samples_seen"], saved_pass) == (4, 0, {"samples_seen": 17})

    resumed = make_sampler(50, shuffle=True)
    resumed.load_state_dict(saved_sampler)
    again = iter(resumed)
    again.load_state_dict(saved_pass)
    assert list(again) == whole[17:]
    assert list(resumed) == whole[17:]  # the sampler resumes there too, should the pass be remade
    resumed.set_epoch(5)
    assert list(resumed) == list(make_sampler(50, shuffle=True, epoch=5))  # the next epoch is whole
    # Resumed twice: the second pass's state counts from the epoch's start too.
    resumed.load_state_dict({**saved_sampler, "samples_seen": 17})
    third = iter(resumed)
    list(itertools.islice(third, 3))
    assert third.state_dict() == {"samples_seen": 20}
    with pytest.raises(ValueError, match="cannot resume this pass at sample 10"):
        third.load_state_dict({"samples_seen": 10})


# --- validate_first_batch ---------------------------------------------------------------------------

Batch = dict[str, torch.Tensor]


def _set(key: str, position: int, value: float) -> Callable[[Batch], None]:
    def edit(batch: Batch) -> None:
        batch[key][position] = value

    return edit


def _replace(key: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Batch], None]:
    def edit(batch: Batch) -> None:
        batch[key] = make(batch[key])

    return edit


BAD_FIRST_BATCHES = {
    "missing key": (lambda b: b.pop("relevance"), r"keys differ from the expected ones: \['relevance'\]"),
    "shape": (
        _replace("negative_embs", lambda t: t[..., :-1]),
        r"negative_embs of the first batch: found shape \(8, 4, 31\), expected shape \(8, 4, 32\)",
    ),
    "dtype": (
        _replace("cluster_id", lambda t: t.to(torch.int32)),
        r"cluster_id of the first batch: found dtype torch.int32, expected dtype int64",
    ),
    "NaN": (
        _set("steering", 3, float("nan")),
        r"steering of the first batch at position 3: found NaN or Inf, expected finite values",
    ),
    "relevance": (
        _set("relevance", 2, 1.5),
        r"relevance of the first batch at position 2: found 1.5, expected a value in \[0, 1\]",
    ),
    "distance": (
        _set("centroid_distance", 0, -0.5),
        r"centroid_distance of the first batch at position 0: found -0.5, expected a value in \[0, 2\]",
    ),
    "variant": (
        _set("steering_variant", 5, 4),
        r"steering_variant of the first batch at position 5: found 4, expected a value in \[0, 3\]",
    ),
    "cluster": (
        _set("cluster_id", 1, 10_000),
        r"cluster_id of the first batch at position 1: found 10000, expected a row of centroid_embs, in \[0, \d+\)",
    ),
}


@pytest.mark.parametrize("case", BAD_FIRST_BATCHES)
def test_validate_first_batch_names_key_found_and_expected(
    synth_dir: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """Each failed check raises ValidationError (an AssertionError too, as upstream) naming key, sample, values."""
    loader = create_loader(synth_dir, "train", 8, shuffle=False)
    good = loader.dataset_obj.get_batch(range(8))
    edit, message = BAD_FIRST_BATCHES[case]
    bad = {key: value.clone() for key, value in good.items()}
    edit(bad)
    monkeypatch.setattr(loader.dataset_obj, "get_batch", lambda indices: bad)
    with pytest.raises(ValidationError, match=message) as caught:
        validate_first_batch(loader)
    assert isinstance(caught.value, AssertionError)
    assert validate_first_batch(DataLoader([good], batch_size=None)) is True  # not a JASPER dataset: no cluster check
    if case != "cluster":
        with pytest.raises(ValidationError, match=message):
            validate_first_batch(DataLoader([bad], batch_size=None))


def test_validate_first_batch_checks_under_python_O() -> None:
    """Explicit checks, not asserts: ``python -O`` still rejects a bad batch."""
    code = """if True:
        import torch
        from torch.utils.data import DataLoader
        from jasper_ray import ValidationError, validate_first_batch
        b, d, n = 2, 3, 2
        batch = {
            "question_emb": torch.zeros(b, d), "target_source_emb": torch.zeros(b, d),
            "steering": torch.full((b, d), float("inf")), "negative_embs": torch.zeros(b, n, d),
            "cluster_id": torch.zeros(b, dtype=torch.int64), "relevance": torch.zeros(b),
            "centroid_distance": torch.zeros(b), "steering_variant": torch.zeros(b, dtype=torch.int64),
            "negative_tiers": torch.ones(b, n, dtype=torch.int64),
        }
        try:
            validate_first_batch(DataLoader([batch], batch_size=None))
        except ValidationError as exc:
            print(exc)
        """
    run = subprocess.run(
        [sys.executable, "-O", "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "steering of the first batch at position 0: found NaN or Inf, expected finite values" in run.stdout
