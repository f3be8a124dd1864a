"""Steering variants: a pure function of (seed, epoch, pair id), distributed as the schedule says.

And the schedule itself: upstream's curriculum keys, the builder's ``mode`` honoured as named,
and bad configs rejected when the dataset is built, not at the first sample.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from jasper_ray import JASPERSteeringDataset, ValidationError
from jasper_ray.sampling import SteeringSchedule, steering_variants, uniform_hash

pytest.register_assert_rewrite("_fixtures_dataset")
from _fixtures_dataset import (  # noqa: E402
    BUILDER_CURRICULUM,
    UNIFORM_PROBS,
    UPSTREAM_CURRICULUM,
    edit_config,
    write_mock_dataset,
)

pytest_plugins = ["_fixtures_dataset"]

VARIANTS = ("zero", "centroid", "keyword", "residual")
CHI2_999_3DOF = 16.266  # chi-square critical value, 3 degrees of freedom, p = 0.001


def chi2_critical() -> float:
    try:
        from scipy.stats import chi2
    except ImportError:
        return CHI2_999_3DOF
    return float(chi2.ppf(0.999, 3))


def chi2_statistic(variants: np.ndarray, probs: dict[str, float]) -> float:
    observed = np.bincount(variants, minlength=4).astype(float)
    expected = len(variants) * np.array([probs[v] for v in VARIANTS])
    return float(((observed - expected) ** 2 / expected).sum())


def schedule(curriculum: dict | None, probs: dict | None = None) -> SteeringSchedule:
    config = {"steering_probabilities": probs or UNIFORM_PROBS}
    if curriculum is not None:
        config["curriculum"] = curriculum
    return SteeringSchedule(config)


# --- a pure function of (seed, epoch, pair id) ----------------------------------------------------


def test_same_variant_whatever_the_access_order(synth_dir: Path) -> None:
    ds = JASPERSteeringDataset(synth_dir, "train", epoch=4)
    n = len(ds)
    forward = [int(ds[i]["steering_variant"]) for i in range(n)]
    backward = [int(ds[i]["steering_variant"]) for i in reversed(range(n))][::-1]
    order = list(range(n))
    random.Random(0).shuffle(order)
    shuffled = dict(zip(order, ds.__getitems__(order).batch["steering_variant"].tolist()))
    batched = ds.__getitems__(list(range(n))).batch["steering_variant"].tolist()
    assert forward == backward == batched == [shuffled[i] for i in range(n)]
    # Reading other samples in between changes nothing either.
    ds[0], ds[n - 1], ds.get_batch([3, 3, 3])
    assert [int(ds[i]["steering_variant"]) for i in range(n)] == forward
    assert len(set(forward)) == 4  # and the split really mixes all four variants


def test_variant_depends_on_the_pair_not_the_split_position(tmp_path: Path) -> None:
    directory = write_mock_dataset(tmp_path / "m", curriculum=None)
    torch.save(torch.arange(99, 49, -1), directory / "rev_idx.pt")  # pairs 99..50 under another split name
    test_split = JASPERSteeringDataset(directory, "test", epoch=2)  # pairs 85..99
    rev = JASPERSteeringDataset(directory, "rev", epoch=2)
    by_pair_test = dict(
        zip(test_split.split_indices.tolist(), test_split.get_batch(range(15))["steering_variant"].tolist())
    )
    by_pair_rev = dict(zip(rev.split_indices.tolist(), rev.get_batch(range(50))["steering_variant"].tolist()))
    assert all(by_pair_rev[p] == v for p, v in by_pair_test.items())


def test_variants_are_a_function_of_seed_epoch_and_pair() -> None:
    pairs = np.arange(5000)
    probs = UNIFORM_PROBS
    a = steering_variants(pairs, 3, 42, probs)
    assert np.array_equal(a, steering_variants(pairs, 3, 42, probs))
    assert np.array_equal(a[::-1], steering_variants(pairs[::-1], 3, 42, probs))
    perm = np.random.default_rng(1).permutation(len(pairs))
    assert np.array_equal(a[perm], steering_variants(pairs[perm], 3, 42, probs))
    assert np.array_equal(a[17:18], steering_variants(pairs[17:18], 3, 42, probs))
    other_epoch = steering_variants(pairs, 4, 42, probs)
    other_seed = steering_variants(pairs, 3, 43, probs)
    # Independent draws: two epochs (or seeds) agree on ~ sum(p^2) = 1/4 of the pairs, not all, not none.
    assert abs(np.mean(a == other_epoch) - 0.25) < 0.03
    assert abs(np.mean(a == other_seed) - 0.25) < 0.03
    u = uniform_hash(42, 3, pairs)
    assert u.min() >= 0 and u.max() < 1


def test_epochs_differ_in_the_dataset(synth_dir: Path) -> None:
    ds = JASPERSteeringDataset(synth_dir, "train")
    per_epoch = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        per_epoch.append(ds.get_batch(range(len(ds)))["steering_variant"])
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.equal(per_epoch[a], per_epoch[b]), (a, b)
    ds.set_epoch(1)
    assert torch.equal(ds.get_batch(range(len(ds)))["steering_variant"], per_epoch[1])


def test_seed_changes_variants(synth_dir: Path) -> None:
    a = JASPERSteeringDataset(synth_dir, "train", seed=1).get_batch(range(100))["steering_variant"]
    b = JASPERSteeringDataset(synth_dir, "train", seed=2).get_batch(range(100))["steering_variant"]
    c = JASPERSteeringDataset(synth_dir, "train", seed=1).get_batch(range(100))["steering_variant"]
    assert torch.equal(a, c) and not torch.equal(a, b)


# --- distribution ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "curriculum,epoch",
    [(None, 0), (None, 7), (UPSTREAM_CURRICULUM, 0), (UPSTREAM_CURRICULUM, 50), (UPSTREAM_CURRICULUM, 100)],
)
def test_chi_square_over_20k_pairs(curriculum: dict | None, epoch: int) -> None:
    probs = schedule(curriculum).probs(epoch)
    variants = steering_variants(np.arange(20_000), epoch, 42, probs)
    stat = chi2_statistic(variants, probs)
    assert stat < chi2_critical(), f"chi2 {stat:.2f} for {probs}"


def test_chi_square_skewed_probabilities() -> None:
    probs = {"zero": 0.05, "centroid": 0.6, "keyword": 0.1, "residual": 0.25}
    variants = steering_variants(np.arange(20_000) * 7 + 1_000_000, 9, 42, probs)
    assert chi2_statistic(variants, probs) < chi2_critical()
    never = steering_variants(np.arange(20_000), 0, 42, {"zero": 0.0, "centroid": 0.5, "keyword": 0.0, "residual": 0.5})
    assert set(np.unique(never).tolist()) == {1, 3}


def test_chi_square_through_the_dataset(tmp_path: Path) -> None:
    directory = write_mock_dataset(
        tmp_path / "m", n_pairs=20_000, n_questions=50, dim=8, curriculum=UPSTREAM_CURRICULUM
    )
    torch.save(torch.arange(20_000), directory / "all_idx.pt")
    ds = JASPERSteeringDataset(directory, "all", epoch=50)
    variants = ds.get_batch(range(len(ds)))["steering_variant"].numpy()
    assert chi2_statistic(variants, ds.steering_probs) < chi2_critical()


# --- the schedule ---------------------------------------------------------------------------------


def test_no_curriculum_is_fixed() -> None:
    s = schedule(None, {"zero": 0.1, "centroid": 0.2, "keyword": 0.3, "residual": 0.4})
    for epoch in (0, 1, 50, 1000):
        assert s.probs(epoch) == pytest.approx({"zero": 0.1, "centroid": 0.2, "keyword": 0.3, "residual": 0.4})


def test_builder_curriculum_keeps_configured_probabilities() -> None:
    # What upstream's builder writes; upstream's dataset silently turned it into 0.5 -> 0.1 over 100 epochs.
    s = schedule(BUILDER_CURRICULUM)
    for epoch in (0, 5, 10, 100):
        assert s.probs(epoch) == pytest.approx(UNIFORM_PROBS), epoch


def test_builder_dataset_probabilities_at_epoch_0(synth_dir: Path) -> None:
    config = json.loads((synth_dir / "config.json").read_text())
    assert config["curriculum"]["mode"] == "linear" and "zero_prob_start" not in config["curriculum"]
    ds = JASPERSteeringDataset(synth_dir, "train")
    assert ds.steering_probs == pytest.approx(UNIFORM_PROBS)  # upstream: zero 0.5


def test_fixed_mode_is_constant() -> None:
    s = schedule(
        {"mode": "fixed", "warmup_epochs": 10}, {"zero": 0.4, "centroid": 0.2, "keyword": 0.2, "residual": 0.2}
    )
    for epoch in (0, 3, 10, 99):
        assert s.probs(epoch) == pytest.approx({"zero": 0.4, "centroid": 0.2, "keyword": 0.2, "residual": 0.2})


def test_upstream_keys_without_mode_follow_upstream() -> None:
    s = schedule(UPSTREAM_CURRICULUM)
    assert s.probs(0)["zero"] == pytest.approx(0.5)
    assert s.probs(25)["zero"] == pytest.approx(0.4)
    assert s.probs(100)["zero"] == pytest.approx(0.1)
    # Missing keys take upstream's defaults (0.5 -> 0.1 over 100).
    assert schedule({"epochs_total": 10}).probs(5)["zero"] == pytest.approx(0.3)


@pytest.mark.parametrize("mode", ["linear", "cosine"])
def test_linear_and_cosine_move_as_named(mode: str) -> None:
    s = schedule({"mode": mode, "zero_prob_start": 0.5, "zero_prob_end": 0.1, "epochs_total": 100})
    assert s.probs(0)["zero"] == pytest.approx(0.5)
    assert s.probs(50)["zero"] == pytest.approx(0.3)  # cosine and linear meet at the midpoint
    assert s.probs(100)["zero"] == pytest.approx(0.1)
    assert s.probs(400)["zero"] == pytest.approx(0.1)
    for epoch in (0, 13, 25, 50, 75, 100):
        p = s.probs(epoch)
        assert sum(p.values()) == pytest.approx(1.0)
        assert p["centroid"] == pytest.approx(p["keyword"]) == pytest.approx(p["residual"])
    zeros = [s.probs(e)["zero"] for e in range(0, 101, 5)]
    assert all(a >= b for a, b in zip(zeros, zeros[1:]))  # monotone
    linear_q1 = 0.5 - 0.4 * 0.25
    cosine_q1 = 0.5 - 0.4 * (1 - math.cos(math.pi / 4)) / 2
    expected_q1 = linear_q1 if mode == "linear" else cosine_q1
    assert s.probs(25)["zero"] == pytest.approx(expected_q1)
    expected_q3 = 0.5 - 0.4 * (0.75 if mode == "linear" else (1 - math.cos(3 * math.pi / 4)) / 2)
    assert s.probs(75)["zero"] == pytest.approx(expected_q3)


def test_cosine_quarter_points_differ_from_linear() -> None:
    lin = schedule({"mode": "linear", "zero_prob_start": 0.5, "zero_prob_end": 0.1, "epochs_total": 100})
    cos = schedule({"mode": "cosine", "zero_prob_start": 0.5, "zero_prob_end": 0.1, "epochs_total": 100})
    assert cos.probs(50) == pytest.approx(lin.probs(50))
    assert cos.probs(25)["zero"] > lin.probs(25)["zero"] + 0.03  # cosine starts slower
    assert cos.probs(75)["zero"] < lin.probs(75)["zero"] - 0.03  # and ends faster


def test_warmup_epochs_is_the_length_under_a_mode() -> None:
    s = schedule({"mode": "linear", "zero_prob_start": 0.5, "zero_prob_end": 0.1, "warmup_epochs": 10})
    assert s.probs(5)["zero"] == pytest.approx(0.3)
    assert s.probs(10)["zero"] == pytest.approx(0.1)


def test_a_mode_defaults_to_the_configured_zero_probability() -> None:
    s = schedule({"mode": "linear", "zero_prob_end": 0.05, "epochs_total": 10})
    assert s.probs(0)["zero"] == pytest.approx(0.25)
    assert s.probs(10)["zero"] == pytest.approx(0.05)


def test_dataset_follows_a_linear_curriculum(tmp_path: Path) -> None:
    curriculum = {"mode": "linear", "zero_prob_start": 0.6, "zero_prob_end": 0.2, "epochs_total": 4}
    directory = write_mock_dataset(tmp_path / "m", curriculum=curriculum)
    ds = JASPERSteeringDataset(directory, "train")
    got = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        got.append(ds.steering_probs["zero"])
    assert got == pytest.approx([0.6, 0.5, 0.4, 0.3, 0.2, 0.2])


# --- errors at construction -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"curriculum": {"mode": "linear", "zero_prob_begin": 0.5}}, "unknown key"),
        ({"curriculum": {"mode": "exponential"}}, "mode"),
        ({"curriculum": {"zero_prob_start": 1.5}}, "zero_prob_start"),
        ({"steering_probabilities": {"zero": 0.3, "centroid": 0.3, "keyword": 0.3, "residual": 0.3}}, "sum"),
        (
            {"steering_probabilities": {"zero": 0.25, "centroid": 0.25, "keyword_weighted": 0.25, "residual": 0.25}},
            "unknown variant",
        ),
        (
            {"steering_probabilities": {"none": 0.25, "centroid": 0.25, "keyword": 0.25, "residual": 0.25}},
            "unknown variant",
        ),
        ({"steering_probabilities": {"zero": 0.5, "centroid": 0.5}}, "missing variant"),
    ],
)
@pytest.mark.parametrize("validate", [True, False])
def test_bad_sampling_config_fails_at_construction(tmp_path: Path, changes: dict, match: str, validate: bool) -> None:
    directory = write_mock_dataset(tmp_path / "m", n_pairs=20, n_questions=10, n_sources=10, dim=8)
    edit_config(directory, **changes)
    with pytest.raises(ValidationError, match=match):
        JASPERSteeringDataset(directory, "train", validate=validate)


def test_missing_probabilities_fail_at_construction(tmp_path: Path) -> None:
    directory = write_mock_dataset(tmp_path / "m", n_pairs=20, n_questions=10, n_sources=10, dim=8)
    config = json.loads((directory / "config.json").read_text())
    del config["steering_probabilities"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValidationError, match="steering_probabilities"):
        JASPERSteeringDataset(directory, "train")
