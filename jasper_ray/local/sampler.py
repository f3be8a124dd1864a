"""A resumable, rank-aware sampler over one split.

The order of an epoch is a pure function of (seed, epoch) (see NOTE
[variants are a function, not a stream] in sampling.py), so the state needed
to resume mid-epoch is four numbers: seed, epoch, samples seen, world size.
Ranks get equal shards: ``drop_last=False`` pads by repeating the first
indices of the epoch, ``drop_last=True`` drops the tail; either way the count
is logged, never silent.

The sampler moves its dataset's epoch: ``set_epoch`` (what training loops and
Lightning call on a ``DistributedSampler``) and ``load_state_dict`` also call
``set_epoch`` on the dataset it samples (through ``Subset`` wrappers), so the
steering variants follow the sampler's epoch without a second call. A sampler
over a count (``ShardedJasper``'s) has no dataset to move.

It speaks two resume protocols: ``ResumableLoader`` and ``ShardedJasper`` pass
the samples they delivered (``state_dict(samples_seen)``); torchdata's
``StatefulDataLoader`` asks the sampler (``state_dict()``: where this pass
started, with the epoch) and the pass (``iter(sampler).state_dict()``: how far
it got), and loads them back in that order.

It subclasses torch's ``RandomSampler`` / ``SequentialSampler`` /
``DistributedSampler`` only so that code checking ``isinstance`` (upstream's
tests do) keeps working; the behaviour is this class's.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import operator
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
from torch.utils.data import DistributedSampler, RandomSampler, Sampler, SequentialSampler, Subset

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
        """The rest of this rank's epoch from the resume point, as a resumable ``EpochPass``."""
        return EpochPass(self)

    def __len__(self) -> int:
        return self.num_samples - self.start

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning and move the sampled dataset, if any, to it.

        The epoch a loaded state resumes keeps its resume point (training loops call ``set_epoch`` at the
        top of every epoch, the resumed one included)."""
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch
        self._move_dataset()

    def _move_dataset(self) -> None:
        """``set_epoch`` on the dataset sampled, so its variants are the sampler's epoch's."""
        dataset: object = self.data_source
        while isinstance(dataset, Subset):
            dataset = dataset.dataset
        set_epoch = getattr(dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(self.epoch)

    def state_dict(self, samples_seen: int | None = None) -> dict[str, int]:
        """The resume point: seed, epoch, samples of this rank's epoch seen, world size.

        ``samples_seen`` defaults to where a pass starts now (a pass's own ``state_dict`` says how far it got)."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "samples_seen": self.start if samples_seen is None else int(samples_seen),
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
        self._move_dataset()


class EpochPass(itertools.chain[int]):
    """One pass over a sampler's epoch (what ``iter(sampler)`` returns), resumable with torchdata's
    protocol: ``state_dict()`` says how many samples of the epoch were drawn, ``load_state_dict`` skips
    to there. A subclass of ``itertools.chain`` (over the positions) so that drawing an index stays in
    C: the DataLoader draws every sample's index one by one. A state taken after the epoch's last batch
    resumes that epoch with nothing left (as torchdata's own samplers do): resume the loop at the saved
    epoch, and the next ``set_epoch`` starts a whole one."""

    sampler: ResumableSampler
    first: int  # the position in the epoch this pass started at
    total: int
    rest: Iterator[int]

    def __new__(cls, sampler: ResumableSampler) -> EpochPass:
        positions = sampler.epoch_indices()[sampler.start :].tolist()
        rest = iter(positions)
        self = super().__new__(cls, rest)
        self.sampler, self.first, self.total, self.rest = sampler, sampler.start, len(positions), rest
        return self

    @property
    def position(self) -> int:
        """Samples of this rank's epoch drawn so far (the pass's start included)."""
        return self.first + self.total - operator.length_hint(self.rest)

    def state_dict(self) -> dict[str, int]:
        return {"samples_seen": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Skip to ``state["samples_seen"]``; the sampler resumes there too, should the pass be remade."""
        skip = state["samples_seen"] - self.position
        if not 0 <= skip <= operator.length_hint(self.rest):
            raise ValueError(
                f"cannot resume this pass at sample {state['samples_seen']}: it holds samples "
                f"[{self.position}, {self.first + self.total}] of the epoch; load the sampler's state first"
            )
        collections.deque(itertools.islice(self.rest, skip), maxlen=0)  # consume without keeping
        self.sampler.start = state["samples_seen"]


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
