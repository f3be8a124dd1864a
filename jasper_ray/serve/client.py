"""A sample service on Ray actors: each ``ShardServer`` owns a pair-row shard, memory-mapped.

``ShardedJasper`` is the client. It starts one actor per shard, spread over
the cluster's nodes (on the node that holds the shard's file, for the sharded
layout, when one does), plans each epoch as the seeded permutation of the
split that ``ResumableSampler`` gives (so a rank's batches are the local
loader's), routes each batch's pair ids to the actors that own them, keeps
several batches in flight and yields them in the plan's order. Inside a batch
the samples come grouped by shard, so each actor builds its rows as one block,
in place.

How batches travel. When every actor runs on the client's node (and
``pace_in_shared_memory``, the default), each actor takes one ``serve`` call
per epoch and the two sides pace each other through a ``PacingTable`` in
shared memory: the client offers a batch's slot up to ``PACED_AHEAD``
batches ahead, the actor writes its rows there and marks them done. A Ray
call costs about as much client CPU as building a batch part, so per-batch
calls would halve what two cores deliver. Otherwise (actors on other nodes)
the client makes one ``fill_many`` call per actor per ``batches_per_call``
batches; actors on this node still write into the slot, others send rows
through the object store.

Faults: actors restart (``max_restarts``) and reopen their files in
``__init__``; the client resubmits what a dead actor lost, so a killed actor
costs latency, never a sample. While an actor is restarting the client
builds that actor's rows itself, with the same reader and assembly
(``serve_while_restarting``, default on): a restart takes seconds (a new
worker process, imports, a lost node's detection); once it is back it gets
a new call from the current batch on. With it off, the client waits up to
``restart_timeout_s`` instead. Other actor errors count against
``max_retries`` (with backoff) on the call path, and end a paced epoch at
once. A shard that cannot be served raises ``ShardUnavailableError`` naming
it. Actors are owned by the process that made them: ``close()`` (or leaving
``with``) kills them, and Ray kills them if that process exits. Actors run
calls in threads (up to ``MAX_CLIENTS``), so the rank views of one service
never wait on each other.

Format logic stays in the reader and ``assemble_batch``; this module only
places actors and moves ids and batches.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset

from ..errors import ShardUnavailableError
from ..formats import open_dataset
from ..formats.chunks import rows_per_chunk
from ..formats.sharded import ShardedHDF5Reader
from ..ray_session import connect
from ..sampling import DEFAULT_SEED
from ..schema import TENSOR
from .server import ShardServer
from .slots import BatchLayout, PacingTable, Slot, SlotPool

log = logging.getLogger(__name__)

# A batch's request to one actor: (shard, its rows of the batch, ObjectRef, index in a fill_many result).
Part = tuple[int, slice, Any, "int | None"]
# A batch as routed: its pair ids grouped by shard, and (shard, first row, stop row) per shard.
Routed = tuple[np.ndarray, list[tuple[int, int, int]]]


PACE_S = 0.0005  # how often paced waits poll the table (0.1 ms polled the 2 cores of the benchmark away)
# Batches offered ahead in a paced epoch (``max_in_flight`` caps it). Few: slots that stay in the CPU
# cache; a ring of 8 batches of 12 MB ran ~10% slower than 2 to 4 on 2 cores (one-off, 1 GB dataset).
PACED_AHEAD = 3
MAX_CLIENTS = 16  # concurrent calls an actor runs in threads: a paced epoch holds one per client (rank view)
DEATH_POLL_S = 0.05  # how often a slow request checks that its actor's process still exists
CLOSE_TIMEOUT_S = 10.0


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except (FileNotFoundError, IndexError):
        return False


def shard_ranges(reader: Any, num_shards: int | None) -> list[tuple[int, int]]:
    """Pair-row ranges, one per actor: the sharded layout's steering shard files (grouped to
    ``num_shards``), else equal ranges aligned to the per-pair tensors' HDF5 chunks."""
    n = reader.n_pairs
    if isinstance(reader, ShardedHDF5Reader) and num_shards is None:
        tensor = next(t for t in reader.manifest["tensors"] if t["h5_path"] == TENSOR["steering_centroid"].h5_path)
        return [(s["start"], s["stop"]) for s in tensor["shards"]]
    num_shards = max(1, min(num_shards or os.cpu_count() or 1, n or 1))
    align = rows_per_chunk((max(n, 1), *reader.shape("steering_centroid")[1:]), 4)
    bounds = sorted({0, n, *(-(-(k * n // num_shards) // align) * align for k in range(1, num_shards))})
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a] or [(0, n)]


def _local_files(paths: list[str]) -> list[bool]:
    return [os.path.exists(p) for p in paths]


def _placements(ray: Any, reader: Any, ranges: list[tuple[int, int]]) -> list[Any]:
    """A scheduling strategy per actor: the node holding its shard file (sharded layout), else SPREAD."""
    if not isinstance(reader, ShardedHDF5Reader):
        return ["SPREAD"] * len(ranges)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    tensor = next(t for t in reader.manifest["tensors"] if t["h5_path"] == TENSOR["steering_centroid"].h5_path)
    files = [
        str(reader.shards_dir / next(s["file"] for s in tensor["shards"] if s["start"] <= a < s["stop"]))
        for a, _ in ranges
    ]
    probe = ray.remote(num_cpus=0)(_local_files)
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    holders = dict(
        zip(
            nodes,
            ray.get(
                [
                    probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(files)
                    for node in nodes
                ]
            ),
        )
    )
    strategies = []
    for i in range(len(ranges)):
        candidates = [node for node in nodes if holders[node][i]]
        if candidates and len(candidates) < len(nodes):  # only some nodes hold it: go there
            strategies.append(NodeAffinitySchedulingStrategy(candidates[i % len(candidates)], soft=True))
        else:
            strategies.append("SPREAD")
    return strategies


class ShardedJasper(IterableDataset):
    """Client of the shard actors: epochs of batches, per-rank views, resumable. See the module docstring."""

    def __init__(
        self,
        path: str | os.PathLike,
        split: str = "train",
        *,
        batch_size: int = 256,
        num_shards: int | None = None,
        seed: int = DEFAULT_SEED,
        epoch: int = 0,
        shuffle: bool = True,
        storage_format: str = "auto",
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        max_in_flight: int = 8,
        batches_per_call: int = 4,
        max_restarts: int = 3,
        max_retries: int = 5,
        restart_timeout_s: float = 60.0,
        serve_while_restarting: bool = True,
        pace_in_shared_memory: bool = True,
        num_cpus: float = 1.0,
        address: str | None = None,
        _actors: list[Any] | None = None,
    ):
        import ray

        from ..local.sampler import make_sampler

        connect(address)  # a local Ray unless an address (or RAY_ADDRESS) names a cluster
        reader = open_dataset(path, storage_format, use_mmap=True)
        self.path, self.split, self.seed, self.batch_size = str(Path(path)), split, int(seed), int(batch_size)
        self.storage_format = reader.storage_format
        self.split_ids = np.asarray(reader.split(split), dtype=np.int64)
        self.ranges = shard_ranges(reader, num_shards)
        self.starts = np.array([a for a, _ in self.ranges], dtype=np.int64)
        self.names = [f"shard {i} (pair rows {a}:{b} of {self.path})" for i, (a, b) in enumerate(self.ranges)]
        self.sampler = make_sampler(
            len(self.split_ids),
            shuffle=shuffle,
            seed=seed,
            epoch=epoch,
            num_replicas=world_size,
            rank=rank,
            drop_last=drop_last,
        )
        self.max_in_flight, self.max_retries, self.max_restarts = max(1, max_in_flight), max_retries, max_restarts
        self.batches_per_call = max(1, batches_per_call)
        self.restart_timeout_s = float(restart_timeout_s)
        self.serve_while_restarting = bool(serve_while_restarting)
        self.pace_in_shared_memory = bool(pace_in_shared_memory)
        self._local: ShardServer | None = None
        self.samples_delivered = 0
        self._config = dict(
            batch_size=batch_size,
            num_shards=num_shards,
            seed=seed,
            shuffle=shuffle,
            storage_format=storage_format,
            drop_last=drop_last,
            max_in_flight=max_in_flight,
            batches_per_call=batches_per_call,
            max_retries=max_retries,
            restart_timeout_s=restart_timeout_s,
            serve_while_restarting=serve_while_restarting,
            pace_in_shared_memory=pace_in_shared_memory,
        )
        self._owns_actors = _actors is None
        if _actors is None:
            server = ray.remote(ShardServer)
            strategies = _placements(ray, reader, self.ranges)
            _actors = [
                server.options(
                    max_restarts=max_restarts,
                    max_task_retries=0,
                    max_concurrency=MAX_CLIENTS,
                    num_cpus=num_cpus,
                    scheduling_strategy=strategy,
                ).remote(self.path, self.storage_format, a, b, self.seed, name)
                for (a, b), name, strategy in zip(self.ranges, self.names, strategies)
            ]
            ray.get([actor.pid.remote() for actor in _actors])  # up and mapped before the first batch
        self.actors = _actors
        # Each actor's (pid, node): a process on this node that is gone is noticed at once, without
        # waiting for Ray to report the death. None while unknown (just restarted).
        self._whereabouts: list[Any] = ray.get([actor.whereabouts.remote() for actor in _actors])
        self._homes = [node for _, node in self._whereabouts]  # the node each actor last ran on
        self._whereabouts_refs: dict[int, Any] = {}
        self._deaths = [0] * len(_actors)
        config = reader.config
        self._layout = BatchLayout.for_batch(self.batch_size, int(config["embedding_dim"]), int(config["n_neg"]))
        self._pool = SlotPool(self._layout)
        self._node_id = ray.get_runtime_context().get_node_id()
        reader.close()

    # --- epochs and ranks -------------------------------------------------------------
    def __len__(self) -> int:
        """Batches in this rank's epoch (what is left of it, after a resume)."""
        return -(-len(self.sampler) // self.batch_size)

    @property
    def epoch(self) -> int:
        """The epoch being planned and served."""
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def for_rank(self, rank: int, world_size: int) -> ShardedJasper:
        """A view for one rank of ``world_size``: equal shards of the epoch (padding or ``drop_last``,
        logged), the same actors (the view does not own them; it pickles into Ray Train workers)."""
        return ShardedJasper(
            self.path,
            self.split,
            epoch=self.epoch,
            rank=rank,
            world_size=world_size,
            _actors=self.actors,
            **self._config,
        )

    def state_dict(self) -> dict[str, int]:
        return {**self.sampler.state_dict(self.samples_delivered), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue a saved epoch: the next iteration yields exactly the samples not yet delivered."""
        self.sampler.load_state_dict(state)
        self.samples_delivered = state["samples_seen"]

    # --- batches ------------------------------------------------------------------------------
    def _route(self, ids: np.ndarray) -> Routed:
        """A batch's pair ids grouped by the shard that owns them (plan order within each shard),
        and each shard's run of rows: every actor builds its rows in place, as one block."""
        owner = np.searchsorted(self.starts, ids, side="right") - 1
        order = np.argsort(owner, kind="stable")
        ids, owner = ids[order], owner[order]
        cuts = [0, *(np.flatnonzero(np.diff(owner)) + 1).tolist(), len(ids)]
        return ids, [(int(owner[a]), a, b) for a, b in zip(cuts, cuts[1:]) if b > a]

    def _submit(self, group: list[Routed]) -> list[tuple[np.ndarray, Slot, list[Part]]]:
        """Request a group of batches: one ``fill_many`` call per actor covers its rows of all of them."""
        slots = [self._pool.acquire() for _ in group]
        requests: dict[int, list[tuple[int, np.ndarray, slice]]] = {}
        for b, (ids, runs) in enumerate(group):
            for shard, first, stop in runs:
                requests.setdefault(shard, []).append((b, ids[first:stop], slice(first, stop)))
        parts: list[list[Part]] = [[] for _ in group]
        for shard, items in requests.items():
            if self.serve_while_restarting and self._whereabouts[shard] is None and self._down_here(shard):
                for b, _, where in items:  # its actor is restarting: no request, the client builds these rows
                    parts[b].append((shard, where, None, None))
                continue
            ref = self.actors[shard].fill_many.remote(
                [(ids, slots[b].name, where) for b, ids, where in items], self.epoch, self._layout, self._node_id
            )
            for index, (b, _, where) in enumerate(items):
                parts[b].append((shard, where, ref, index))
        return [(ids, slot, part) for (ids, _), slot, part in zip(group, slots, parts)]

    def _down_here(self, shard: int) -> bool:
        """Whether the shard's actor, on this node, has exited or not come back yet (checked by pid and
        a pending ``whereabouts`` call, without waiting for Ray to report the death)."""
        import ray

        known = self._whereabouts[shard]
        if known is None:  # restarting: down until it answers where it runs now
            ref = self._whereabouts_refs[shard]
            if not ray.wait([ref], timeout=0)[0]:
                return True
            try:
                self._whereabouts[shard] = known = ray.get(ref)
                self._homes[shard] = known[1]
            except Exception:  # noqa: BLE001 - not back: ask again
                self._whereabouts_refs[shard] = self.actors[shard].whereabouts.remote()
                return True
        pid, node = known
        if node != self._node_id or _running(pid):
            return False
        self._deaths[shard] += 1
        if self._deaths[shard] > self.max_restarts:
            raise ShardUnavailableError(
                f"{self.names[shard]} died {self._deaths[shard]} times and cannot restart "
                f"(max_restarts={self.max_restarts}); its rows cannot be served"
            )
        self._whereabouts[shard] = None
        self._whereabouts_refs[shard] = self.actors[shard].whereabouts.remote()
        return True

    def _serve_here(self, ids: np.ndarray, out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """A batch part built in this process, as an actor would build it (for an actor that is restarting)."""
        if self._local is None:
            self._local = ShardServer(self.path, self.storage_format, 0, 1 << 62, self.seed, "client")
        return self._local.get_batch(ids, self.epoch, out)

    def _request(self, shard: int, ids: np.ndarray, slot: Slot, where: slice) -> Any:
        return self.actors[shard].fill.remote(ids, self.epoch, slot.name, self._layout, where, self._node_id)

    def _collect(self, ids: np.ndarray, slot: Slot, parts: list[Part]) -> dict[str, Any]:
        import ray

        for shard, where, ref, index in parts:
            attempt, polls, deadline = 0, 0, None
            if ref is None:  # planned while its actor was restarting: built here, nothing in flight
                result = self._serve_here(ids[where])
            while ref is not None:
                # Ready already (the common case): no liveness check, no /proc read.
                ready = ray.wait([ref], timeout=0)[0]
                if not ready and self.serve_while_restarting and self._down_here(shard):
                    log.warning(
                        "%s lost a request (its process is gone); serving its %d rows from the client",
                        self.names[shard],
                        where.stop - where.start,
                    )
                    result = self._serve_here(ids[where])
                    slot.quarantined = True  # the request may still run once the actor is back
                    break
                try:
                    if not ready and not ray.wait([ref], timeout=DEATH_POLL_S)[0]:
                        continue
                    result = ray.get(ref)
                    if index is not None:  # one of a fill_many call's results
                        result = result[index]
                    break
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                    if isinstance(exc, ray.exceptions.ActorUnavailableError) and self.serve_while_restarting:
                        # Restarting: rather than wait seconds for it, build these rows here, with the same
                        # reader and assembly (every process sees the files), and let the restart go on.
                        log.warning(
                            "%s lost a request (%s: restarting); serving its %d rows from the client",
                            self.names[shard],
                            type(exc).__name__,
                            where.stop - where.start,
                        )
                        result = self._serve_here(ids[where])
                        break
                    if isinstance(exc, ray.exceptions.ActorUnavailableError):  # restarting: wait for it, in time
                        now = time.monotonic()
                        deadline = deadline or now + self.restart_timeout_s
                        give_up, polls = now >= deadline, polls + 1
                        why = f"after waiting {self.restart_timeout_s:g} s for its actor to restart"
                        pause = min(0.5, 0.05 * 2 ** min(polls, 4))
                    else:
                        give_up, attempt = attempt >= self.max_retries, attempt + 1
                        why = f"after {self.max_retries} retries"
                        pause = min(2.0, 0.05 * 2**attempt)
                    if give_up:
                        slot.busy = False
                        raise ShardUnavailableError(f"{self.names[shard]} could not be served {why}: {exc}") from exc
                    level = logging.WARNING if polls <= 1 and attempt <= 1 else logging.DEBUG
                    log.log(level, "%s lost a request (%s); retrying", self.names[shard], type(exc).__name__)
                    time.sleep(pause)
                    ref, index = self._request(shard, ids[where], slot, where), None
            if isinstance(result, dict):  # the actor is on another node: its rows came through the object store
                for key, value in result.items():
                    slot.views[key][where] = value
        slot.busy = False
        # Fresh views of the slot: while the caller holds them, the pool will not reuse it.
        return {key: view[: len(ids)] for key, view in slot.views.items()}

    def iter_numpy(self) -> Iterator[dict[str, np.ndarray]]:
        """The rest of this rank's epoch as batches of numpy arrays (plus ``pair_id``), in plan order.

        Each batch holds the plan's samples, grouped by the shard that owns them (plan order within
        a shard). The arrays live in shared memory owned by this client; a batch's memory is reused
        only after the caller has dropped every reference to it."""
        positions = self.sampler.epoch_indices()[self.sampler.start :]
        self.samples_delivered = self.sampler.start
        batches = [
            self._route(self.split_ids[positions[i : i + self.batch_size]])
            for i in range(0, len(positions), self.batch_size)
        ]
        paced = self.pace_in_shared_memory and all(node == self._node_id for node in self._homes)
        with contextlib.closing(self._paced(batches) if paced else self._requested(batches)) as source:
            for ids, batch in source:
                self.samples_delivered += len(ids)
                yield batch
        self.sampler.start = 0  # the epoch is done: the next pass is a whole epoch

    def _requested(self, batches: list[Routed]) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Batches by Ray calls: one ``fill_many`` per actor per group of batches (any node)."""
        pending: deque = deque()
        submitted = 0
        try:
            while submitted < len(batches) or pending:
                # Whole groups only: a group of one would pay a call per batch again.
                size = min(self.batches_per_call, len(batches) - submitted)
                while size and len(pending) + size <= max(self.max_in_flight, size):
                    pending.extend(self._submit(batches[submitted : submitted + size]))
                    submitted += size
                    size = min(self.batches_per_call, len(batches) - submitted)
                ids, slot, parts = pending.popleft()
                yield ids, self._collect(ids, slot, parts)
        finally:
            self._abandon(pending)

    def _paced(self, batches: list[Routed]) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Batches paced through shared memory (every actor on this node): one ``serve`` call per actor
        per epoch; the client offers each batch's slot in a ``PacingTable`` up to ``PACED_AHEAD``
        batches ahead, and an actor marks its rows done there. No Ray call per batch."""
        import ray

        ring = min(self.max_in_flight, PACED_AHEAD)
        table = PacingTable(ring, len(self.actors))
        work: list[list[tuple[int, np.ndarray, int]]] = [[] for _ in self.actors]
        for seq, (ids, runs) in enumerate(batches):
            for shard, first, stop in runs:
                work[shard].append((seq, ids[first:stop], first))
        calls: list[Any] = [None] * len(self.actors)  # per shard: (ObjectRef, first seq it covers) or None
        offered: dict[int, Slot] = {}

        def start_call(shard: int, seq: int) -> None:
            todo = work[shard][bisect_left(work[shard], seq, key=lambda item: item[0]) :]
            ref = self.actors[shard].serve.remote(
                table.name, ring, len(self.actors), shard, self._pool.prefix, self._layout, todo, self.epoch,
                os.getpid(), PACE_S,
            )  # fmt: skip
            calls[shard] = (ref, seq)

        try:
            for shard in range(len(self.actors)):
                if self._whereabouts[shard] is not None:
                    start_call(shard, 0)
            for seq, (ids, runs) in enumerate(batches):
                for ahead in range(seq + len(offered), min(seq + ring, len(batches))):
                    offered[ahead] = slot = self._pool.acquire()
                    table.offer(ahead, slot.number)
                slot = offered.pop(seq)
                for shard, first, stop in runs:
                    self._await_part(table, calls, start_call, shard, seq, ids[first:stop], slot, first)
                slot.busy = False
                # Fresh views of the slot: while the caller holds them, the pool will not reuse it.
                yield ids, {key: view[: len(ids)] for key, view in slot.views.items()}
        finally:
            table.cancel()
            refs = [call[0] for call in calls if call is not None]
            # Calls see the cancel at their next wait: let them end before the slots go back. A call
            # that does not end in time may still write: its slots are never handed out again.
            ended = ray.wait(refs, num_returns=len(refs), timeout=CLOSE_TIMEOUT_S)[0] if refs else []
            for slot in offered.values():
                slot.busy, slot.quarantined = False, len(ended) < len(refs)
            table.close()

    def _await_part(
        self, table: PacingTable, calls: list[Any], start_call: Any, shard: int, seq: int,
        ids: np.ndarray, slot: Slot, first: int,
    ) -> None:  # fmt: skip
        """Wait until shard's rows of batch ``seq`` are in ``slot``. An actor that died loses its call:
        the client builds its rows (or waits, without ``serve_while_restarting``) until it is back on
        this node, then gives it a new call from this batch on. Its other errors name the shard."""
        import ray

        deadline, check = None, time.monotonic() + DEATH_POLL_S
        while not table.is_done(shard, seq):
            call = calls[shard]
            if call is not None and call[1] <= seq:
                if time.monotonic() < check:  # polls read the table only; the call and the process less often
                    time.sleep(PACE_S)
                    continue
                check, ref = time.monotonic() + DEATH_POLL_S, call[0]
                if ray.wait([ref], timeout=0)[0]:  # it ended without building this batch
                    try:
                        ray.get(ref)
                    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                        pass
                    except Exception as exc:
                        raise ShardUnavailableError(f"{self.names[shard]} failed: {exc}") from exc
                    if table.is_done(shard, seq):
                        break
                    log.warning("%s lost its call at batch %d (its actor died)", self.names[shard], seq)
                    calls[shard] = None
                elif self._down_here(shard):
                    log.warning("%s lost its call at batch %d (its process is gone)", self.names[shard], seq)
                    calls[shard] = None
                continue
            if not self._down_here(shard) and self._whereabouts[shard][1] == self._node_id:
                start_call(shard, seq)  # back: it serves from this batch on
                continue
            if self.serve_while_restarting or self._whereabouts[shard] is not None:  # down, or back elsewhere
                self._serve_here(ids, {key: view[first : first + len(ids)] for key, view in slot.views.items()})
                return
            deadline = deadline or time.monotonic() + self.restart_timeout_s
            if time.monotonic() > deadline:
                raise ShardUnavailableError(
                    f"{self.names[shard]} could not be served after waiting {self.restart_timeout_s:g} s "
                    "for its actor to restart"
                )
            time.sleep(0.05)

    def _abandon(self, pending: deque) -> None:
        """Requests still in flight when iteration stops early: let the actors finish writing, then
        give their slots back (a slot an actor may still write into is never handed out again)."""
        import ray

        for _, slot, parts in pending:
            for _, _, ref, _ in parts:
                try:
                    ray.get(ref)
                except Exception:  # noqa: BLE001 - the batch is dropped either way
                    pass
            slot.busy = False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Batches as torch tensors: iterate directly, or ``DataLoader(client, batch_size=None)`` with
        ``num_workers=0`` (the actors already work in parallel; loader workers would each replay the epoch)."""
        from torch.utils.data import get_worker_info

        from ..local.batches import to_torch

        if get_worker_info() is not None:
            raise RuntimeError(
                "ShardedJasper cannot run inside DataLoader workers: every worker would replay the whole "
                "epoch. Use DataLoader(service, batch_size=None, num_workers=0), or iterate it directly."
            )
        for batch in self.iter_numpy():
            yield to_torch(batch)

    def stats(self) -> list[dict[str, Any]]:
        import ray

        return ray.get([actor.stats.remote() for actor in self.actors])

    # --- lifetime ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Kill the actors this client started (views leave them to their owner) and free its memory."""
        self._pool.close()
        if self._owns_actors and self.actors:
            import ray

            for actor in self.actors:
                ray.kill(actor, no_restart=True)
            # ray.kill is asynchronous: return once each actor is really gone, so nothing the caller
            # does next can still reach it.
            deadline = time.monotonic() + CLOSE_TIMEOUT_S
            for actor in self.actors:
                while time.monotonic() < deadline:
                    try:
                        ray.get(actor.pid.remote(), timeout=CLOSE_TIMEOUT_S)
                    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                        break
                    time.sleep(0.05)
        self.actors = []

    def __enter__(self) -> ShardedJasper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_owns_actors"] = False  # a copy in another process never kills the owner's actors
        state["_pool"] = SlotPool(self._layout)  # slots belong to one process
        state["_node_id"] = None  # set again where the copy runs
        state["_local"] = None  # its mappings are per process
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        import ray

        self.__dict__.update(state)
        self._node_id = ray.get_runtime_context().get_node_id()
