"""``ServeSettings``: how a ``ShardedJasper`` serves, as one frozen value that every rank view shares.

Floor: serve (a Ray front-end), but this module imports no Ray and no torch: it is plain data.
A view's own position (epoch, rank, world size) is not here: those are arguments of the client.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TypedDict

from ..formats import StorageFormat, VerifyMode
from ..sampling import DEFAULT_SEED


@dataclass(frozen=True)
class ServeSettings:
    """What the client and its actors do; ``ShardedJasper(path, split, **overrides)`` takes any field."""

    batch_size: int = 256  # samples per batch
    num_shards: int | None = None  # actors (one pair-row range each); None: the sharded layout's files, or one per CPU
    seed: int = DEFAULT_SEED  # seeds the epoch's permutation and the steering variants
    shuffle: bool = True  # a seeded permutation of the split per epoch; False: split order
    storage_format: StorageFormat = "auto"  # which files the actors map: "auto", "pt" or "hdf5"
    drop_last: bool = False  # rank views: drop the epoch's tail instead of padding to equal shares
    max_in_flight: int = 8  # batches requested ahead of the one being yielded (a paced epoch: at most PACED_AHEAD)
    batches_per_call: int = 4  # per-call transport: batches one ``fill_many`` call covers
    max_restarts: int = 3  # restarts of a dead actor before its shard is unavailable
    max_retries: int = 5  # per-call transport: resubmits of a request whose actor failed (not restarting)
    restart_timeout_s: float = 60.0  # without serve_while_restarting: how long a part waits for its actor's restart
    serve_while_restarting: bool = True  # build a restarting actor's rows in the client instead of waiting
    pace_in_shared_memory: bool = True  # all actors on this node: one paced call per actor per epoch
    num_cpus: float = 1.0  # CPUs each actor reserves in Ray
    cache_dir: str | None = None  # node-local cache of a remote (or compressed) dataset; None: $JASPER_RAY_CACHE
    cache_limit: int | None = None  # bytes the cache may hold (pair-row shards evicted least recently used)
    dtype: str | None = None  # embedding keys: float32 (None, decoded in the actors), or a 16-bit file's "stored" dtype
    # "first-touch": each actor checks the checksum blocks its reads touch; "open": the client checks everything
    # once, before the actors start; "off" (NOTE [first-touch verification])
    verify: VerifyMode = "first-touch"

    def with_overrides(
        self, overrides: ServeOverrides, *, caller: str = "with_overrides()", also: tuple[str, ...] = ()
    ) -> ServeSettings:
        """These settings with some fields replaced. An unknown name raises ``TypeError`` naming
        ``caller`` and the valid keywords (``also``: the caller's own, listed first)."""
        names = [field.name for field in dataclasses.fields(self)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise TypeError(
                f"{caller} got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                f"valid: {', '.join((*also, *names))}"
            )
        return dataclasses.replace(self, **overrides) if overrides else self


class ServeOverrides(TypedDict, total=False):
    """``ServeSettings`` fields as keywords (``ShardedJasper(path, split, **overrides)``), so a type checker
    and an editor know them; tests keep it equal to the dataclass's fields."""

    batch_size: int
    num_shards: int | None
    seed: int
    shuffle: bool
    storage_format: StorageFormat
    drop_last: bool
    max_in_flight: int
    batches_per_call: int
    max_restarts: int
    max_retries: int
    restart_timeout_s: float
    serve_while_restarting: bool
    pace_in_shared_memory: bool
    num_cpus: float
    cache_dir: str | None
    cache_limit: int | None
    dtype: str | None
    verify: VerifyMode
