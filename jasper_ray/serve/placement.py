"""Where the shard actors go: each actor's pair-row range (its shard), its node, starting and stopping them.

Floor: serve (a Ray front-end). A ``Fleet`` is what every rank view of one service shares: the
actors and what they serve. Nothing here moves batches (``serve.transport``) or decides what to do
when an actor is down (``serve.failover``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray.actor import ActorHandle, ActorProxy
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..assembly import output_precision
from ..formats import StorageFormat
from ..formats.base import Reader
from ..formats.chunks import rows_per_chunk
from ..formats.sharded import ManifestShard, ShardedHDF5Reader
from ..schema import TENSOR
from ..shm import BatchLayout
from ..storage import Location
from .server import ShardServer
from .settings import ServeSettings
from .slots import batch_layout

MAX_CLIENTS = 16  # concurrent calls an actor runs in threads: a paced epoch holds one per client (rank view)
CLOSE_TIMEOUT_S = 10.0  # how long stopping waits for actors (and a paced epoch's calls) to end

# A scheduling strategy Ray takes: "SPREAD", or a node to go to.
Strategy = str | NodeAffinitySchedulingStrategy
# A batch as routed: its pair ids grouped by shard, and (shard, first row, stop row) per shard.
Routed = tuple[np.ndarray, list[tuple[int, int, int]]]


@dataclass(frozen=True)
class Fleet:
    """The shard actors of one dataset, and what every view of them shares (read-only after start)."""

    path: str | Location  # the dataset directory (a Location: remote, or inside a given filesystem)
    storage_format: StorageFormat  # the format the actors opened ("pt" or "hdf5", resolved)
    seed: int  # the steering variants' seed the actors build with
    ranges: list[tuple[int, int]]  # per shard: its pair rows [start, stop)
    names: list[str]  # per shard: how errors and logs name it
    actors: list[ActorHandle[ShardServer]]  # per shard: its ``ShardServer`` actor
    layout: BatchLayout  # where each key of a batch lives in a shared-memory slot
    cache: dict[str, Any]  # open_dataset's cache_dir / cache_limit / verify, for every process that opens the dataset
    precision: str = "float32"  # what the embedding keys are served as (assembly.output_precision of dtype=)
    starts: np.ndarray = field(init=False, repr=False)  # per shard: its first pair row (for routing)

    def __post_init__(self) -> None:
        object.__setattr__(self, "starts", np.array([a for a, _ in self.ranges], dtype=np.int64))

    def route(self, ids: np.ndarray) -> Routed:
        """A batch's pair ids grouped by the shard that owns them (plan order within each shard),
        and each shard's run of rows: every actor builds its rows in place, as one block."""
        owner = np.searchsorted(self.starts, ids, side="right") - 1
        order = np.argsort(owner, kind="stable")
        ids, owner = ids[order], owner[order]
        cuts = [0, *(np.flatnonzero(np.diff(owner)) + 1).tolist(), len(ids)]
        return ids, [(int(owner[a]), a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def shard_ranges(reader: Reader, num_shards: int | None) -> list[tuple[int, int]]:
    """Pair-row ranges, one per actor: the sharded layout's steering shard files (grouped to
    ``num_shards``), else equal ranges aligned to the per-pair tensors' HDF5 chunks."""
    n = reader.n_pairs
    if isinstance(reader, ShardedHDF5Reader) and num_shards is None:
        return [(s.start, s.stop) for s in _steering_shards(reader)]
    num_shards = max(1, min(num_shards or os.cpu_count() or 1, n or 1))
    align = rows_per_chunk(
        (max(n, 1), *reader.shape("steering_centroid")[1:]), reader.dtype("steering_centroid").itemsize
    )
    bounds = sorted({0, n, *(-(-(k * n // num_shards) // align) * align for k in range(1, num_shards))})
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a] or [(0, n)]


def _steering_shards(reader: ShardedHDF5Reader) -> list[ManifestShard]:
    steering = TENSOR["steering_centroid"].h5_path
    return next(t.shards for t in reader.layout.tensors if t.h5_path == steering)


def _local_files(paths: list[str]) -> list[bool]:
    return [os.path.exists(p) for p in paths]


def placements(reader: Reader, ranges: list[tuple[int, int]]) -> list[Strategy]:
    """A scheduling strategy per actor: the node holding its shard file (sharded layout), else SPREAD."""
    if not isinstance(reader, ShardedHDF5Reader):
        return ["SPREAD"] * len(ranges)
    shards = _steering_shards(reader)
    files = [str(reader.shards_dir / next(s.file for s in shards if s.start <= a < s.stop)) for a, _ in ranges]
    probe = ray.remote(num_cpus=0)(_local_files)
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    found = [
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(files)
        for node in nodes
    ]
    holders = dict(zip(nodes, ray.get(found)))
    strategies: list[Strategy] = []
    for i in range(len(ranges)):
        candidates = [node for node in nodes if holders[node][i]]
        if candidates and len(candidates) < len(nodes):  # only some nodes hold it: go there
            strategies.append(NodeAffinitySchedulingStrategy(candidates[i % len(candidates)], soft=True))
        else:
            strategies.append("SPREAD")
    return strategies


def start_fleet(path: str | Location, reader: Reader, settings: ServeSettings) -> Fleet:
    """One ``ShardServer`` per shard of ``reader``'s dataset, placed, up and mapped before it returns."""
    ranges = shard_ranges(reader, settings.num_shards)
    uri = path.uri if isinstance(path, Location) else path
    names = [f"shard {i} (pair rows {a}:{b} of {uri})" for i, (a, b) in enumerate(ranges)]
    # verify="open" was done by the client, once: the actors check nothing more.
    verify = "off" if settings.verify == "open" else settings.verify
    cache = {"cache_dir": settings.cache_dir, "cache_limit": settings.cache_limit, "verify": verify}
    storage_format = _format_of(reader)
    precision = output_precision(settings.dtype, reader.precision)
    server = ray.remote(ShardServer)
    actors = [
        _handle(
            server.options(
                max_restarts=settings.max_restarts,
                max_task_retries=0,
                max_concurrency=MAX_CLIENTS,
                num_cpus=settings.num_cpus,
                scheduling_strategy=strategy,
            ).remote(path, storage_format, a, b, int(settings.seed), name, cache, precision)
        )
        for (a, b), name, strategy in zip(ranges, names, placements(reader, ranges))
    ]
    ray.get([actor.pid.remote() for actor in actors])  # up and mapped before the first batch
    config = reader.config
    layout = batch_layout(settings.batch_size, int(config["embedding_dim"]), int(config["n_neg"]), precision)
    return Fleet(path, storage_format, int(settings.seed), ranges, names, actors, layout, cache, precision)


def _format_of(reader: Reader) -> StorageFormat:
    """The reader's format, as ``open_dataset`` takes it (an actor opens exactly what the client did)."""
    if reader.storage_format == "pt":
        return "pt"
    if reader.storage_format == "hdf5":
        return "hdf5"
    raise ValueError(f"{reader.directory}: a reader of unknown format {reader.storage_format!r}")


def _handle(started: ActorProxy[ShardServer]) -> ActorHandle[ShardServer]:
    """The handle ``ActorClass.remote`` returns (Ray's stubs also allow the class itself there)."""
    if not isinstance(started, ActorHandle):
        raise TypeError(f"Ray returned {started!r} for an actor handle")
    return started


def stop_fleet(fleet: Fleet) -> None:
    """Kill the actors and return once each is really gone (``ray.kill`` is asynchronous), so nothing
    the caller does next can still reach them."""
    for actor in fleet.actors:
        ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + CLOSE_TIMEOUT_S
    for actor in fleet.actors:
        while time.monotonic() < deadline:
            try:
                ray.get(actor.pid.remote(), timeout=CLOSE_TIMEOUT_S)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                break
            time.sleep(0.05)
