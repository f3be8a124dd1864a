"""A sample service on Ray actors: each ``ShardServer`` owns a pair-row shard, memory-mapped.

``ShardedJasper`` is the client. It starts one actor per shard, spread over
the cluster's nodes (on the node that holds the shard's file, for the sharded
layout, when one does: ``serve.placement``), plans each epoch as the seeded
permutation of the split that ``ResumableSampler`` gives (so a rank's batches
are the local loader's), routes each batch's pair ids to the actors that own
them, keeps several batches in flight and yields them in the plan's order.
Inside a batch the samples come grouped by shard, so each actor builds its
rows as one block, in place.

How batches travel (``serve.transport``): when every actor runs on the
client's node (and ``pace_in_shared_memory``, the default), one ``serve`` call
per actor per epoch, paced through shared memory; otherwise one ``fill_many``
call per actor per ``batches_per_call`` batches.

Faults (``serve.failover``): actors restart (``max_restarts``) and reopen
their files in ``__init__``; the client resubmits what a dead actor lost, so a
killed actor costs latency, never a sample. While an actor is restarting the
client builds that actor's rows itself, with the same reader and assembly
(``serve_while_restarting``, default on): a restart takes seconds (a new
worker process, imports, a lost node's detection); once it is back it gets a
new call from the current batch on. With it off, the client waits up to
``restart_timeout_s`` instead. Other actor errors count against
``max_retries`` (with backoff) on the call path, and end a paced epoch at
once. A shard that cannot be served raises ``ShardUnavailableError`` naming
it. Actors are owned by the process that made them: ``close()`` (or leaving
``with``) kills them, and Ray kills them if that process exits. Actors run
calls in threads (up to ``MAX_CLIENTS``), so the rank views of one service
never wait on each other.

Floor: serve (a Ray front-end, loaded lazily by ``jasper_ray``). Format logic
stays in the reader and ``assemble_batch``; this module plans epochs and ranks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import ray
import torch
from ray.actor import ActorHandle
from torch.utils.data import IterableDataset, get_worker_info

from ..formats import open_dataset
from ..local.batches import to_torch
from ..local.sampler import ResumableSampler, make_sampler
from ..ray_session import connect
from ..shm import SlotPool
from ..storage import locate
from ..validate import check_batch_size, check_epoch, validate_dataset
from .failover import Failover
from .placement import Fleet, start_fleet, stop_fleet
from .server import ShardServer
from .settings import ServeOverrides, ServeSettings
from .transport import transport_for

if TYPE_CHECKING:  # typing.Unpack is 3.11+; the package supports 3.10
    import pyarrow.fs as pafs
    from typing_extensions import Unpack

# The constructor's keywords besides the ServeSettings fields (named when an unknown keyword is refused).
OWN_KEYWORDS = ("settings", "epoch", "rank", "world_size", "address", "filesystem", "validate")


class ShardedJasper(IterableDataset):
    """Client of the shard actors: epochs of batches, per-rank views, resumable. See the module docstring.

    ``ShardedJasper(path, split, batch_size=256, num_shards=2, ...)``: every ``ServeSettings`` field is
    a keyword (applied over ``settings``, the defaults when None); ``epoch``, ``rank`` and
    ``world_size`` place this view; ``address`` names a Ray cluster (else ``RAY_ADDRESS``, else a local Ray).
    The dataset is validated once, here (``validate_dataset``, as the local dataset does), unless ``validate=False``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        split: str = "train",
        *,
        settings: ServeSettings | None = None,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        address: str | None = None,
        filesystem: pafs.FileSystem | None = None,
        validate: bool = True,
        **overrides: Unpack[ServeOverrides],
    ) -> None:
        settings = (settings or ServeSettings()).with_overrides(overrides, caller="ShardedJasper()", also=OWN_KEYWORDS)
        check_batch_size(settings.batch_size, "ShardedJasper batch_size")
        epoch = check_epoch(epoch, "ShardedJasper epoch")
        connect(address)  # a local Ray unless an address (or RAY_ADDRESS) names a cluster
        location = locate(path, filesystem)
        cache_dir, cache_limit = settings.cache_dir, settings.cache_limit
        reader = open_dataset(
            location,
            settings.storage_format,
            True,
            cache_dir=cache_dir,
            cache_limit=cache_limit,
            verify=settings.verify,
        )
        try:
            if validate:
                validate_dataset(reader)  # once, in the client: the actors then map known-good files
            split_ids = np.asarray(reader.split(split), dtype=np.int64)
            fleet = start_fleet(location if location.is_remote else location.path, reader, settings)
        finally:
            reader.close()
        self._attach(fleet, settings, split, split_ids, epoch, rank, world_size, owns_actors=True)

    @classmethod
    def _sharing(cls, owner: ShardedJasper, rank: int, world_size: int) -> ShardedJasper:
        """A view of ``owner``'s actors for one rank (it does not own them)."""
        view = cls.__new__(cls)
        fleet, settings, epoch = owner.fleet, owner.settings, owner.epoch
        view._attach(fleet, settings, owner.split, owner.split_ids, epoch, rank, world_size, owns_actors=False)
        return view

    def _attach(
        self, fleet: Fleet, settings: ServeSettings, split: str, split_ids: np.ndarray,
        epoch: int, rank: int, world_size: int, owns_actors: bool,
    ) -> None:  # fmt: skip
        self.fleet, self.settings, self.split, self.split_ids = fleet, settings, split, split_ids
        self.path, self.storage_format = fleet.path, fleet.storage_format
        self.seed, self.batch_size = int(settings.seed), int(settings.batch_size)
        self.sampler: ResumableSampler = make_sampler(
            len(split_ids),
            shuffle=settings.shuffle,
            seed=self.seed,
            epoch=epoch,
            num_replicas=world_size,
            rank=rank,
            drop_last=settings.drop_last,
        )
        self.samples_delivered = 0
        self._owns_actors, self._closed = owns_actors, False
        self._failover = Failover(fleet, settings)  # per view: what it has seen of the actors' health
        self._pool = SlotPool(fleet.layout)  # per view and per process: the batches it hands out

    @property
    def actors(self) -> list[ActorHandle[ShardServer]]:
        """One ``ShardServer`` per shard (none once closed)."""
        return [] if self._closed else self.fleet.actors

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """Per shard: its pair rows [start, stop)."""
        return self.fleet.ranges

    @property
    def names(self) -> list[str]:
        """Per shard: how errors and logs name it."""
        return self.fleet.names

    # --- epochs and ranks -------------------------------------------------------------
    def __len__(self) -> int:
        """Batches in this rank's epoch (what is left of it, after a resume)."""
        return -(-len(self.sampler) // self.batch_size)

    @property
    def epoch(self) -> int:
        """The epoch being planned and served."""
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(check_epoch(epoch, "ShardedJasper.set_epoch epoch"))

    def for_rank(self, rank: int, world_size: int) -> ShardedJasper:
        """A view for one rank of ``world_size``: equal shards of the epoch (padding or ``drop_last``,
        logged), the same actors (the view does not own them; it pickles into Ray Train workers)."""
        return ShardedJasper._sharing(self, rank, world_size)

    def state_dict(self) -> dict[str, int]:
        return {**self.sampler.state_dict(self.samples_delivered), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue a saved epoch: the next iteration yields exactly the samples not yet delivered."""
        self.sampler.load_state_dict(state)
        self.samples_delivered = state["samples_seen"]

    # --- batches ------------------------------------------------------------------------------
    def iter_numpy(self) -> Iterator[dict[str, np.ndarray]]:
        """The rest of this rank's epoch as batches of numpy arrays (plus ``pair_id``), in plan order.

        Each batch holds the plan's samples, grouped by the shard that owns them (plan order within
        a shard). The arrays live in shared memory owned by this client; a batch's memory is reused
        only after the caller has dropped every reference to it."""
        positions = self.sampler.epoch_indices()[self.sampler.start :]
        self.samples_delivered = self.sampler.start
        batches = [
            self.fleet.route(self.split_ids[positions[i : i + self.batch_size]])
            for i in range(0, len(positions), self.batch_size)
        ]
        transport = transport_for(self.fleet, self._pool, self._failover, self.settings, self.epoch)
        with contextlib.closing(transport.deliver(batches)) as source:
            for ids, batch in source:
                self.samples_delivered += len(ids)
                yield batch
        self.sampler.start = 0  # the epoch is done: the next pass is a whole epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches as torch tensors: iterate directly, or ``DataLoader(client, batch_size=None)`` with
        ``num_workers=0`` (the actors already work in parallel; loader workers would each replay the epoch)."""
        if get_worker_info() is not None:
            raise RuntimeError(
                "ShardedJasper cannot run inside DataLoader workers: every worker would replay the whole "
                "epoch. Use DataLoader(service, batch_size=None, num_workers=0), or iterate it directly."
            )
        for batch in self.iter_numpy():
            yield to_torch(batch)

    def stats(self) -> list[dict[str, int | str]]:
        """Per actor: its shard, rows, bytes mapped, batches served, pid, node and memory."""
        return ray.get([actor.stats.remote() for actor in self.actors])

    # --- lifetime ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Kill the actors this client started (views leave them to their owner) and free its memory."""
        self._pool.close()
        if self._owns_actors and not self._closed:
            stop_fleet(self.fleet)
        self._closed = True

    def __enter__(self) -> ShardedJasper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_owns_actors"] = False  # a copy in another process never kills the owner's actors
        state["_pool"] = SlotPool(self.fleet.layout)  # slots belong to one process
        return state
