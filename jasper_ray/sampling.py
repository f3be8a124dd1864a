"""Steering-variant sampling as pure functions of (seed, epoch, pair id).

NOTE [variants are a function, not a stream]
Upstream drew each variant from one stateful RNG per process, so a pair's
variant depended on access order, repeated across DataLoader workers and
ranks, and ignored ``set_epoch`` in persistent workers. Here a variant is
``searchsorted(cumprobs(epoch), u)`` with ``u`` a counter-based hash of
(seed, epoch, pair id): the same pair at the same epoch gets the same variant
on any machine, worker, rank, order or front-end (local, Ray Data, actors).

The schedule of probabilities over epochs follows config.json:
- no ``curriculum``: ``steering_probabilities`` at every epoch;
- upstream's keys ``zero_prob_start`` / ``zero_prob_end`` / ``epochs_total``
  without ``mode``: upstream's linear schedule (defaults 0.5 -> 0.1 over 100);
- the builder's ``mode`` (``fixed``, ``linear``, ``cosine``): ``fixed`` keeps
  ``steering_probabilities``; ``linear`` / ``cosine`` move P(zero) from
  ``zero_prob_start`` to ``zero_prob_end`` over ``epochs_total`` (alias
  ``warmup_epochs``), both defaulting to the configured P(zero), never to
  upstream's hidden 0.5 -> 0.1. The builder's distance thresholds are
  accepted and not applied to sampling (nothing upstream implements them).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .config import check_curriculum, check_probabilities
from .errors import ValidationError
from .schema import CONFIG_FILE, STEERING_VARIANTS

DEFAULT_SEED = 42
UPSTREAM_DEFAULTS = {"zero_prob_start": 0.5, "zero_prob_end": 0.1, "epochs_total": 100}
VARIANT_ID = {name: i for i, name in enumerate(STEERING_VARIANTS)}


class SteeringSchedule:
    """Probabilities of the four variants at each epoch, from config.json (checked at construction)."""

    def __init__(self, config: dict[str, Any]):
        if "steering_probabilities" not in config:
            raise ValidationError(
                f"{CONFIG_FILE} 'steering_probabilities'", "nothing", "a mapping of the four variants"
            )
        self.base = check_probabilities(config["steering_probabilities"])
        curriculum = check_curriculum(config.get("curriculum"))
        self.mode = "fixed"
        if curriculum:
            self.mode = curriculum.get("mode", "linear")
            defaults = (
                UPSTREAM_DEFAULTS
                if "mode" not in curriculum
                else {"zero_prob_start": self.base["zero"], "zero_prob_end": self.base["zero"], "epochs_total": 1}
            )
            self.zero_start = float(curriculum.get("zero_prob_start", defaults["zero_prob_start"]))
            self.zero_end = float(curriculum.get("zero_prob_end", defaults["zero_prob_end"]))
            self.epochs_total = curriculum.get(
                "epochs_total", curriculum.get("warmup_epochs", defaults["epochs_total"])
            )

    def probs(self, epoch: int) -> dict[str, float]:
        if self.mode == "fixed":
            return dict(self.base)
        progress = min(max(epoch, 0) / max(self.epochs_total, 1), 1.0)
        if self.mode == "cosine":
            progress = (1 - math.cos(math.pi * progress)) / 2
        p_zero = self.zero_start + (self.zero_end - self.zero_start) * progress
        rest = 1.0 - self.base["zero"]
        if rest <= 0:  # everything was zero: the rest goes to centroid, as upstream does
            return {"zero": p_zero, "centroid": 1.0 - p_zero, "keyword": 0.0, "residual": 0.0}
        scale = (1.0 - p_zero) / rest
        return {"zero": p_zero, **{v: self.base[v] * scale for v in STEERING_VARIANTS[1:]}}


_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def uniform_hash(seed: int, epoch: int, pair_ids: np.ndarray, stream: int = 0) -> np.ndarray:
    """A uniform [0, 1) float64 per pair id, a pure function of (seed, epoch, stream, pair id)."""
    key = np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64)
    for part in (epoch, stream):
        key = _splitmix64(key ^ np.uint64(part & 0xFFFFFFFFFFFFFFFF))
    z = _splitmix64(np.asarray(pair_ids, dtype=np.int64).astype(np.uint64) ^ _splitmix64(key))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def steering_variants(pair_ids: np.ndarray, epoch: int, seed: int, probs: dict[str, float]) -> np.ndarray:
    """Variant ids (0 zero, 1 centroid, 2 keyword, 3 residual) for ``pair_ids`` at ``epoch``."""
    cum = np.cumsum([probs[v] for v in STEERING_VARIANTS])
    cum[-1] = 1.0 + 1e-12  # guard float rounding so every u lands in a bucket
    variants = np.searchsorted(cum, uniform_hash(seed, epoch, pair_ids), side="right")
    return variants.astype(np.int64)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of ``range(n)``, a pure function of (seed, epoch)."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, 0x6A5]).permutation(n)
