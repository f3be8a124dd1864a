"""How an epoch's batches travel from the shard actors to the client: paced, or a Ray call per group.

Floor: serve (a Ray front-end). Both transports take the epoch's routed batches (``Fleet.route``)
and yield each batch's arrays over a shared-memory slot of the client's pool, in plan order; an
actor that is down goes through the one failover path (``Failover.stand_in``).

- ``PacedTransport`` (every actor on the client's node): one ``serve`` call per actor per epoch;
  the two sides pace each other through a ``PacingTable`` in shared memory: the client offers a
  batch's slot up to ``PACED_AHEAD`` batches ahead, the actor writes its rows there and marks them
  done. A Ray call costs about as much client CPU as building a batch part, so per-batch calls
  would halve what two cores deliver: no Ray call per batch.
- ``CallTransport`` (any node): one ``fill_many`` call per actor per ``batches_per_call``
  batches; actors on this node still write into the slot, others send rows through the object
  store.

Neither moves format logic: rows are built by ``ShardServer.get_batch``, in an actor or, standing
in for one, in the client.
"""

from __future__ import annotations

import logging
import os
import time
from abc import ABC, abstractmethod
from bisect import bisect_left
from collections import deque
from collections.abc import Generator

import numpy as np
import ray
from ray import ObjectRef

from ..errors import ChecksumError, ShardUnavailableError, ValidationError
from ..shm import Slot, SlotPool
from .failover import ACTOR_LOST, DEATH_POLL_S, Failover, Patience
from .placement import CLOSE_TIMEOUT_S, Fleet, Routed
from .settings import ServeSettings
from .slots import PacingTable

log = logging.getLogger(__name__)

PACE_S = 0.0005  # how often paced waits poll the table (0.1 ms polled the 2 cores of the benchmark away)
# Batches offered ahead in a paced epoch (``max_in_flight`` caps it). Few: slots that stay in the CPU
# cache; a ring of 8 batches of 12 MB ran ~10% slower than 2 to 4 on 2 cores (one-off, 1 GB dataset).
PACED_AHEAD = 3

Batch = dict[str, np.ndarray]
# A batch delivered: its pair ids (as routed: grouped by shard) and its arrays over a slot.
Delivery = tuple[np.ndarray, Batch]
# A batch's request to one actor: (shard, its rows of the batch, ObjectRef or None: built here, index in
# a fill_many result or None: a fill result).
Part = tuple[int, slice, ObjectRef | None, int | None]
# A batch in flight on the call path: its pair ids, its slot, its parts.
Pending = tuple[np.ndarray, Slot, list[Part]]


class Transport(ABC):
    """One epoch's batches from the actors, in plan order (``deliver``); close the generator to stop early."""

    def __init__(self, fleet: Fleet, pool: SlotPool, failover: Failover, settings: ServeSettings, epoch: int):
        self.fleet, self.pool, self.failover, self.settings, self.epoch = fleet, pool, failover, settings, epoch

    @abstractmethod
    def deliver(self, batches: list[Routed]) -> Generator[Delivery, None, None]:
        """Yield (pair ids, arrays) per routed batch, in order."""


def transport_for(fleet: Fleet, pool: SlotPool, failover: Failover, settings: ServeSettings, epoch: int) -> Transport:
    """Paced when allowed and every actor last ran on this node; else a Ray call per group of batches."""
    paced = settings.pace_in_shared_memory and failover.all_here()
    return (PacedTransport if paced else CallTransport)(fleet, pool, failover, settings, epoch)


class PacedTransport(Transport):
    """Batches paced through shared memory: one ``serve`` call per actor per epoch (module docstring)."""

    # The epoch being delivered (set by ``deliver``):
    ring: int  # batches offered ahead
    table: PacingTable  # the offers and the actors' done marks
    work: list[list[tuple[int, np.ndarray, int]]]  # per shard: (seq, its pair ids of batch seq, first row)
    calls: list[tuple[ObjectRef, int] | None]  # per shard: its running call and the first batch it covers

    def deliver(self, batches: list[Routed]) -> Generator[Delivery, None, None]:
        actors = self.fleet.actors
        self.ring = ring = min(max(1, self.settings.max_in_flight), PACED_AHEAD)
        self.table = table = PacingTable(ring, len(actors))
        self.work = [[] for _ in actors]
        for seq, (ids, runs) in enumerate(batches):
            for shard, first, stop in runs:
                self.work[shard].append((seq, ids[first:stop], first))
        self.calls = [None] * len(actors)
        offered: dict[int, Slot] = {}
        try:
            for shard in range(len(actors)):
                if self.failover.whereabouts[shard] is not None:
                    self._start_call(shard, 0)
            for seq, (ids, runs) in enumerate(batches):
                for ahead in range(seq + len(offered), min(seq + ring, len(batches))):
                    offered[ahead] = slot = self.pool.acquire()
                    table.offer(ahead, slot.number)
                slot = offered.pop(seq)
                for shard, first, stop in runs:
                    self._await_part(shard, seq, ids[first:stop], slot, first)
                yield ids, slot.handed_out(len(ids))
        finally:
            table.cancel()
            refs = [call[0] for call in self.calls if call is not None]
            # Calls see the cancel at their next wait: let them end before the slots go back. A call
            # that does not end in time may still write: its slots are never handed out again.
            ended = ray.wait(refs, num_returns=len(refs), timeout=CLOSE_TIMEOUT_S)[0] if refs else []
            for slot in offered.values():
                slot.busy, slot.quarantined = False, len(ended) < len(refs)
            table.close()

    def _start_call(self, shard: int, seq: int) -> None:
        """The shard's actor builds its rows of batch ``seq`` on, as the table offers them."""
        todo = self.work[shard][bisect_left(self.work[shard], seq, key=lambda item: item[0]) :]
        ref = self.fleet.actors[shard].serve.remote(
            self.table.name, self.ring, len(self.fleet.actors), shard, self.pool.prefix, self.fleet.layout, todo,
            self.epoch, os.getpid(), PACE_S,
        )  # fmt: skip
        self.calls[shard] = (ref, seq)

    def _await_part(self, shard: int, seq: int, ids: np.ndarray, slot: Slot, first: int) -> None:
        """Wait until shard's rows of batch ``seq`` are in ``slot``. An actor that died loses its call:
        the failover path stands in (builds its rows here, or waits) until it is back on this node, then
        it gets a new call from this batch on. Its other errors name the shard."""
        table, failover = self.table, self.failover
        patience: Patience | None = None
        check = time.monotonic() + DEATH_POLL_S
        while not table.is_done(shard, seq):
            call = self.calls[shard]
            if call is not None and call[1] <= seq:
                if time.monotonic() < check:  # polls read the table only; the call and the process less often
                    time.sleep(PACE_S)
                    continue
                check, ref = time.monotonic() + DEATH_POLL_S, call[0]
                if ray.wait([ref], timeout=0)[0]:  # it ended without building this batch
                    try:
                        ray.get(ref)
                    except ACTOR_LOST:
                        pass
                    except (ChecksumError, ValidationError):
                        raise  # the stored data is wrong, not the shard: the reader's own error
                    except Exception as exc:
                        raise failover.unavailable(shard, "(its call failed)", exc) from exc
                    if table.is_done(shard, seq):
                        break
                    log.warning("%s lost its call at batch %d (its actor died)", self.fleet.names[shard], seq)
                    self.calls[shard] = None
                elif failover.is_down_here(shard):
                    log.warning("%s lost its call at batch %d (its process is gone)", self.fleet.names[shard], seq)
                    self.calls[shard] = None
                continue
            if failover.is_up_here(shard):
                self._start_call(shard, seq)  # back: it serves from this batch on
                continue
            # Down, or back on another node (where a paced call cannot reach this slot): stand in for it.
            patience = patience or Patience()
            if failover.whereabouts[shard] is not None or failover.stand_in(shard, patience):
                failover.build_here(
                    ids, self.epoch, {key: view[first : first + len(ids)] for key, view in slot.views.items()}
                )
                return


class CallTransport(Transport):
    """Batches by Ray calls: one ``fill_many`` per actor per group of batches (module docstring)."""

    def deliver(self, batches: list[Routed]) -> Generator[Delivery, None, None]:
        per_call, in_flight = max(1, self.settings.batches_per_call), max(1, self.settings.max_in_flight)
        pending: deque[Pending] = deque()
        submitted = 0
        try:
            while submitted < len(batches) or pending:
                # Whole groups only: a group of one would pay a call per batch again.
                size = min(per_call, len(batches) - submitted)
                while size and len(pending) + size <= max(in_flight, size):
                    pending.extend(self._submit(batches[submitted : submitted + size]))
                    submitted += size
                    size = min(per_call, len(batches) - submitted)
                ids, slot, parts = pending.popleft()
                yield ids, self._collect(ids, slot, parts)
        finally:
            self._abandon(pending)

    def _submit(self, group: list[Routed]) -> list[Pending]:
        """Request a group of batches: one ``fill_many`` call per actor covers its rows of all of them."""
        slots = [self.pool.acquire() for _ in group]
        requests: dict[int, list[tuple[int, np.ndarray, slice]]] = {}
        for b, (ids, runs) in enumerate(group):
            for shard, first, stop in runs:
                requests.setdefault(shard, []).append((b, ids[first:stop], slice(first, stop)))
        parts: list[list[Part]] = [[] for _ in group]
        for shard, items in requests.items():
            if self.failover.is_restarting(shard):
                for b, _, where in items:  # no request: the failover path stands in for these rows
                    parts[b].append((shard, where, None, None))
                continue
            ref = self.fleet.actors[shard].fill_many.remote(
                [(ids, slots[b].name, where) for b, ids, where in items],
                self.epoch,
                self.fleet.layout,
                self.failover.node_id,
            )
            for index, (b, _, where) in enumerate(items):
                parts[b].append((shard, where, ref, index))
        return [(ids, slot, part) for (ids, _), slot, part in zip(group, slots, parts)]

    def _collect(self, ids: np.ndarray, slot: Slot, parts: list[Part]) -> Batch:
        """A batch once each of its parts is in the slot (rows from another node are copied in)."""
        try:
            for shard, where, ref, index in parts:
                result = self._part(shard, ids[where], slot, where, ref, index)
                if isinstance(result, dict):  # the actor is on another node: its rows came through the object store
                    for key, value in result.items():
                        slot.views[key][where] = value
        except ShardUnavailableError:
            slot.busy = False
            raise
        return slot.handed_out(len(ids))

    def _part(
        self, shard: int, ids: np.ndarray, slot: Slot, where: slice, ref: ObjectRef | None, index: int | None
    ) -> int | Batch:
        """One actor's rows of a batch: its request's result, or built here while the actor is down."""
        failover, name = self.failover, self.fleet.names[shard]
        patience: Patience | None = None  # made on the first fault only
        error: BaseException | None = None
        while True:
            if ref is None:  # no request in flight: planned while its actor was down, or lost
                patience = patience or Patience()
                if failover.stand_in(shard, patience, error):
                    return failover.build_here(ids, self.epoch)
                ref, index = self._request(shard, ids, slot, where), None  # waited: ask it again
            # Ready already (the common case): no liveness check, no /proc read.
            ready = ray.wait([ref], timeout=0)[0]
            if not ready and failover.watching and failover.is_down_here(shard):
                log.warning("%s lost a request (its process is gone); standing in for %d rows", name, len(ids))
                slot.quarantined = True  # the request may still run once the actor is back
                ref = None
                continue
            try:
                if not ready and not ray.wait([ref], timeout=DEATH_POLL_S)[0]:
                    continue
                result = ray.get(ref)
                return result if index is None else result[index]  # one of a fill_many call's results
            except ACTOR_LOST as exc:
                error, patience = exc, patience or Patience()
                if isinstance(exc, ray.exceptions.ActorUnavailableError):  # restarting: the failover path
                    level = logging.WARNING if not patience.waits else logging.DEBUG
                    log.log(level, "%s lost a request (%s: restarting)", name, type(exc).__name__)
                    ref = None
                else:
                    failover.retry(shard, patience, exc)
                    ref, index = self._request(shard, ids, slot, where), None

    def _request(self, shard: int, ids: np.ndarray, slot: Slot, where: slice) -> ObjectRef:
        return self.fleet.actors[shard].fill.remote(
            ids, self.epoch, slot.name, self.fleet.layout, where, self.failover.node_id
        )

    def _abandon(self, pending: deque[Pending]) -> None:
        """Requests still in flight when iteration stops early: let the actors finish writing, then
        give their slots back (a slot an actor may still write into is never handed out again)."""
        for _, slot, parts in pending:
            for _, _, ref, _ in parts:
                if ref is None:
                    continue
                try:
                    ray.get(ref)
                except Exception:  # noqa: BLE001 - the batch is dropped either way
                    pass
            slot.busy = False
