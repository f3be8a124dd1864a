"""The shard actors' batch slots and the table that paces them, so actors on the client's node write
batches in place.

Going through Ray's object store costs a serialisation copy into plasma, page faults on fresh plasma
memory, and a merge copy when a batch spans several actors: ten times the gather itself, for the
~12 MB of a 256-sample batch. Instead the client owns a ``jasper_ray.shm.SlotPool`` (the slots the
local loader's workers write too), laid out as one batch of samples and their pair ids; actors on the
same node write their rows at their positions, and the client yields tensors over the slot without
copying (NOTE [when a slot is reused] in ``jasper_ray.shm``).

Torch-free; used by ``serve.server`` (writer side) and ``serve.client`` (owner side).
"""

from __future__ import annotations

import os
import secrets
import time
from multiprocessing import shared_memory

import numpy as np

from ..assembly import PAIR_ID, sample_fields
from ..shm import SHM_DIR, BatchLayout, SharedMutex, map_segment, unlink

__all__ = ["SHM_DIR", "PacingTable", "batch_layout"]


def batch_layout(rows: int, dim: int, n_neg: int, precision: str = "float32") -> BatchLayout:
    """A slot of ``rows`` samples (embeddings at ``precision``) and their pair ids."""
    return BatchLayout.of(rows, [*sample_fields(dim, n_neg, precision), (PAIR_ID, (), np.dtype("int64"))])


class PacingTable:
    """The control words of a ring of batches, in shared memory: how a client and its shard actors
    on one node hand batches over without a Ray call per batch.

    Per ring position ``k``: ``offer[k]`` is ``seq * SLOTS + slot`` once batch ``seq`` may be built
    into pool slot ``slot`` (written by the client); ``done[lane, k]`` is ``seq`` once the actor of
    ``lane`` has written its rows of batch ``seq`` (written by that actor). ``cancel`` non-zero: stop.
    Every word is read and written under the table's ``SharedMutex``: its unlock and lock order the
    rows an actor wrote before marking them done with the client's reads after seeing the mark (and the
    client's last reads of a slot with the actor's writes after the offer), on any CPU's memory model.
    """

    SLOTS = 1 << 20  # slot numbers per seq in an offer word
    PREFIX = "jasper_pace_"  # the segment's name starts so
    HEADER = SharedMutex.MUTEX_BYTES // 8  # int64 words the mutex takes at the start

    def __init__(self, ring: int, lanes: int, name: str | None = None):
        nwords = self.HEADER + (2 + lanes) * ring
        if name is None:
            name = f"{self.PREFIX}{secrets.token_hex(6)}"
            shm = shared_memory.SharedMemory(name, create=True, size=8 * nwords)  # tracked: unlinked if we crash
            shm.close()
            self.name, self._owner = shm.name, True
        else:  # attach (an actor): by path, so exiting never unlinks the client's segment
            self.name, self._owner = name, False
        memory = map_segment(self.name, 8 * nwords)
        self.lock = SharedMutex(memory[: SharedMutex.MUTEX_BYTES], create=self._owner)
        words = memory[8 * self.HEADER :].view(np.int64).reshape(2 + lanes, ring)
        if self._owner:
            with self.lock:
                words[:] = -1
                words[1, 0] = 0
        self.ring, self.words = ring, words
        self.offers, self.done = words[0], words[2:]

    @property
    def cancelled(self) -> bool:
        with self.lock:
            return bool(self.words[1, 0])

    def cancel(self) -> None:
        with self.lock:
            self.words[1, 0] = 1

    def offer(self, seq: int, slot: int) -> None:
        with self.lock:
            self.offers[seq % self.ring] = seq * self.SLOTS + slot

    def offered_slot(self, seq: int) -> int | None:
        """The slot batch ``seq`` goes into, once offered; None before."""
        with self.lock:
            word = int(self.offers[seq % self.ring])
        return word % self.SLOTS if word >= 0 and word // self.SLOTS == seq else None

    def mark_done(self, lane: int, seq: int) -> None:
        with self.lock:
            self.done[lane, seq % self.ring] = seq

    def is_done(self, lane: int, seq: int) -> bool:
        with self.lock:
            return int(self.done[lane, seq % self.ring]) == seq

    def wait_offer(self, seq: int, client_pid: int, pause: float) -> int | None:
        """Block until batch ``seq`` is offered; None if cancelled or the client process is gone (checked
        each second, where its pid is visible here: a container may hide it)."""
        proc = f"/proc/{client_pid}"
        watch, checked = os.path.exists(proc), time.monotonic()
        while True:
            slot = self.offered_slot(seq)
            if slot is not None:
                return slot
            if self.cancelled:
                return None
            if watch and time.monotonic() - checked > 1.0:  # a client that died cannot cancel
                checked = time.monotonic()
                if not os.path.exists(proc):
                    return None
            time.sleep(pause)

    def close(self) -> None:
        """Unlink the segment (the client's side); the mapping goes with the last view of it."""
        if self._owner:
            unlink(self.name)
