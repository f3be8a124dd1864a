"""A resumable, rank-aware sampler over one split.

The order of an epoch is a pure function of (seed, epoch) (see NOTE
[variants are a function, not a stream] in sampling.py), so the state needed
to resume mid-epoch is four numbers: seed, epoch, samples seen, world size.
Ranks get equal shards: ``drop_last=False`` pads by repeating the first
indices of the epoch, ``drop_last=True`` drops the tail; either way the count
is logged, never silent.

It subclasses torch's ``RandomSampler`` / ``SequentialSampler`` /
``DistributedSampler`` only so that code checking ``isinstance`` (upstream's
tests do) keeps working; the behaviour is this class's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
from torch.utils.data import DistributedSampler, RandomSampler, Sampler, SequentialSampler

from ..sampling import DEFAULT_SEED, epoch_permutation

log = logging.getLogger(__name__)


class ResumableSampler(Sampler[int]):
    """Indices of one rank's epoch: a seeded permutation (or split order), equal per-rank shards, and a
    resume point (``state_dict`` / ``load_state_dict``). See the module docstring."""

    def __init__(
        self,
        data_source: Sized | int,
        *,
        shuffle: bool = True,
        seed: int = DEFAULT_SEED,
        epoch: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ):
        n = data_source if isinstance(data_source, int) else len(data_source)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.data_source = data_source
        self.dataset = data_source
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, epoch
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, drop_last
        self.start = 0  # samples of this rank's epoch already seen (resume point)
        # Attributes torch's samplers carry, for code that reads them.
        self.replacement, self.generator = False, None
        self._num_samples: int | None = None
        self._per_rank = n // num_replicas if drop_last else math.ceil(n / num_replicas)
        self.total_size = self._per_rank * num_replicas
        if num_replicas > 1 and self.total_size != n and rank == 0:
            verb = "dropped" if drop_last else "repeated (padding)"
            log.warning(
                "%d of %d samples %s each epoch so that %d ranks get equal shards",
                abs(n - self.total_size),
                n,
                verb,
                num_replicas,
            )

    @property
    def num_samples(self) -> int:
        """Samples per rank per epoch (a property: torch's RandomSampler defines one)."""
        return self._per_rank

    def epoch_indices(self) -> np.ndarray:
        """This rank's whole epoch, in order."""
        order = epoch_permutation(self.n, self.seed, self.epoch) if self.shuffle else np.arange(self.n)
        if self.total_size > self.n:
            order = np.concatenate([order, np.resize(order, self.total_size - self.n)]) if self.n else order
        return order[: self.total_size][self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.start :].tolist())

    def __len__(self) -> int:
        return self.num_samples - self.start

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning; the epoch a loaded state resumes keeps its resume point
        (training loops call ``set_epoch`` at the top of every epoch, the resumed one included)."""
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

    def state_dict(self, samples_seen: int) -> dict[str, int]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "samples_seen": int(samples_seen),
            "num_replicas": self.num_replicas,
            "rank": self.rank,
            "dataset_len": self.n,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_replicas"] != self.num_replicas or state["dataset_len"] != self.n:
            raise ValueError(
                f"cannot resume: the state was saved with {state['num_replicas']} ranks over {state['dataset_len']} "
                f"samples, this sampler has {self.num_replicas} ranks over {self.n}; resume on the same world size"
            )
        if not 0 <= state["samples_seen"] <= self.num_samples:
            raise ValueError(f"samples_seen {state['samples_seen']} is not in [0, {self.num_samples}]")
        self.seed, self.epoch, self.start = state["seed"], state["epoch"], state["samples_seen"]


# These classes exist for isinstance checks only. torch types the attributes they share differently
# (data_source is a Sized there and may be a count here; num_samples is a property in RandomSampler and
# ours, an attribute in DistributedSampler): mypy's objections to the combinations are silenced per class.
class ShuffledSampler(ResumableSampler, RandomSampler):  # type: ignore[misc]
    """A ``ResumableSampler`` that shuffles; an instance of ``RandomSampler`` for callers that check."""


class OrderedSampler(ResumableSampler, SequentialSampler):  # type: ignore[misc]
    """A ``ResumableSampler`` in split order; an instance of ``SequentialSampler`` for callers that check."""


class DistributedResumableSampler(ResumableSampler, DistributedSampler):  # type: ignore[misc,override]
    """A ``ResumableSampler`` over ranks; an instance of ``DistributedSampler`` for callers that check."""


def make_sampler(data_source: Sized | int, *, shuffle: bool, num_replicas: int = 1, **kwargs: Any) -> ResumableSampler:
    """The sampler for a rank: an instance of the torch sampler class that code may check for."""
    cls: type[ResumableSampler]
    if num_replicas > 1:
        cls = DistributedResumableSampler
    else:
        cls = ShuffledSampler if shuffle else OrderedSampler
    return cls(data_source, shuffle=shuffle, num_replicas=num_replicas, **kwargs)
