"""Batch buffers in shared memory, so shard actors on the client's node write batches in place.

Going through Ray's object store costs a serialisation copy into plasma, page
faults on fresh plasma memory, and a merge copy when a batch spans several
actors: ten times the gather itself, for the ~12 MB of a 256-sample batch.
Instead the client owns a small pool of ``SharedMemory`` slots, each laid out
as one batch; actors on the same node write their rows at their positions,
and the client yields tensors over the slot without copying. A slot is reused
only when nothing outside the pool still references its memory (the training
loop has dropped the batch), so a yielded batch is never overwritten.

Torch-free; used by ``serve.server`` (writer side) and ``serve.client`` (owner side).
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

from ..assembly import PAIR_ID, SAMPLE_KEYS

SHM_DIR = "/dev/shm"  # where POSIX shared memory lives on Linux


@dataclass(frozen=True)
class BatchLayout:
    """Where each key of a batch of ``rows`` samples lives in a slot: (offset, shape, dtype str)."""

    rows: int
    fields: tuple[tuple[str, int, tuple[int, ...], str], ...]
    nbytes: int

    @staticmethod
    def for_batch(rows: int, dim: int, n_neg: int) -> BatchLayout:
        sizes = {"D": dim, "NEG": n_neg}
        specs = [(key, tuple(sizes[s] for s in shape), dtype) for key, (shape, dtype) in SAMPLE_KEYS.items()]
        specs.append((PAIR_ID, (), np.dtype("int64")))
        fields, offset = [], 0
        for key, shape, dtype in specs:
            fields.append((key, offset, (rows, *shape), dtype.str))
            offset += -(-rows * int(np.prod(shape, dtype=np.int64)) * dtype.itemsize // 64) * 64  # 64-byte aligned
        return BatchLayout(rows, tuple(fields), max(offset, 1))

    def views(self, root: np.ndarray) -> dict[str, np.ndarray]:
        """Typed views of each key over a slot's bytes (``root``)."""
        return {
            key: root[off : off + int(np.prod(shape)) * np.dtype(dt).itemsize].view(dt).reshape(shape)
            for key, off, shape, dt in self.fields
        }


def _map(name: str, nbytes: int) -> np.ndarray:
    """A slot's bytes, mapped from its POSIX shared-memory file (no SharedMemory object: mapping by
    path keeps Python's resource tracker from unlinking it when an attaching process exits)."""
    return np.memmap(f"{SHM_DIR}/{name}", dtype=np.uint8, mode="r+", shape=(nbytes,)).view(np.ndarray)


class Slot:
    def __init__(self, layout: BatchLayout, name: str, number: int):
        shm = shared_memory.SharedMemory(name, create=True, size=layout.nbytes)  # tracked: unlinked if we crash
        shm.close()
        self._shm = shm
        self.name = shm.name
        root = _map(self.name, layout.nbytes)
        self.views = layout.views(root)
        self.root: np.ndarray | None = root  # None once released
        del root  # the baseline counts the slot's own references only
        self.busy = False
        self.number = number  # its index in the pool that made it: how a writer is told the slot
        # Set when a request into this slot was abandoned (served elsewhere) but may still run: the
        # slot is never reused, so a late write cannot land in someone else's batch.
        self.quarantined = False
        self._baseline = sys.getrefcount(self.root)

    def free(self) -> bool:
        """Not in flight, not quarantined, and no batch handed out from it is still referenced."""
        return not self.busy and not self.quarantined and sys.getrefcount(self.root) <= self._baseline

    def release(self) -> None:
        """Unlink the segment; memory still referenced by a caller's batch lives until it is dropped."""
        self.views, self.root = {}, None
        try:
            self._shm.unlink()
        except FileNotFoundError:
            pass


class SlotPool:
    """Slots of one layout; ``acquire`` returns a free one or makes a new one. Slot ``i`` is the
    shared-memory segment ``prefix + str(i)``, so a writer can be told a slot by its number."""

    def __init__(self, layout: BatchLayout):
        self.layout = layout
        self.prefix = f"jasper_{secrets.token_hex(6)}_"
        self.slots: list[Slot] = []

    def acquire(self) -> Slot:
        slot = next((s for s in self.slots if s.free()), None)
        if slot is None:
            slot = Slot(self.layout, f"{self.prefix}{len(self.slots)}", len(self.slots))
            self.slots.append(slot)
        slot.busy = True
        return slot

    def close(self) -> None:
        for slot in self.slots:
            slot.release()
        self.slots = []


class SlotWriter:
    """The actor side: attach slots by name (cached) and build rows into them in place."""

    def __init__(self, max_open: int = 16):
        self.open: dict[str, dict[str, np.ndarray]] = {}
        self.max_open = max_open

    def write(
        self,
        name: str,
        layout: BatchLayout,
        rows: slice,
        build: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    ) -> None:
        """Build rows ``rows`` of slot ``name`` in place: ``build(out)`` gets the slot's views of them
        (a batch's rows come grouped by shard, so an actor's part is always one run)."""
        views = self.open.get(name)
        if views is None:
            if len(self.open) >= self.max_open:
                self.open.pop(next(iter(self.open)))
            views = self.open[name] = layout.views(_map(name, layout.nbytes))
        build({key: view[rows] for key, view in views.items()})


class PacingTable:
    """The control words of a ring of batches, in shared memory: how a client and its shard actors
    on one node hand batches over without a Ray call per batch.

    Per ring position ``k``: ``offer[k]`` is ``seq * SLOTS + slot`` once batch ``seq`` may be built
    into pool slot ``slot`` (written by the client); ``done[lane, k]`` is ``seq`` once the actor of
    ``lane`` has written its rows of batch ``seq`` (written by that actor). ``cancel`` non-zero: stop.
    Every word has one writer, and a word is one aligned int64 store. The flag is stored after the
    rows it announces: x86-64 keeps stores in order (on weaker memory models the last rows could
    become visible after the flag).
    """

    SLOTS = 1 << 20  # slot numbers per seq in an offer word

    def __init__(self, ring: int, lanes: int, name: str | None = None):
        shape = (2 + lanes, ring)
        self._shm: shared_memory.SharedMemory | None  # the client's segment; None where attached (an actor)
        if name is None:
            self._shm = shared_memory.SharedMemory(create=True, size=8 * shape[0] * shape[1])
            self.name = self._shm.name
            words = np.ndarray(shape, dtype=np.int64, buffer=self._shm.buf)
            words[:] = -1
            words[1, 0] = 0
        else:  # attach (an actor): by path, so exiting never unlinks the client's segment
            self._shm, self.name = None, name
            words = np.memmap(f"{SHM_DIR}/{name}", dtype=np.int64, mode="r+", shape=shape).view(np.ndarray)
        self.ring, self.words = ring, words
        self.offers, self.done = words[0], words[2:]

    @property
    def cancelled(self) -> bool:
        return bool(self.words[1, 0])

    def cancel(self) -> None:
        self.words[1, 0] = 1

    def offer(self, seq: int, slot: int) -> None:
        self.offers[seq % self.ring] = seq * self.SLOTS + slot

    def offered_slot(self, seq: int) -> int | None:
        """The slot batch ``seq`` goes into, once offered; None before."""
        word = int(self.offers[seq % self.ring])
        return word % self.SLOTS if word >= 0 and word // self.SLOTS == seq else None

    def mark_done(self, lane: int, seq: int) -> None:
        self.done[lane, seq % self.ring] = seq

    def is_done(self, lane: int, seq: int) -> bool:
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
        """Unlink the segment (the client's side)."""
        self.words = self.offers = self.done = None
        if self._shm is not None:
            try:
                self._shm.close()
            except BufferError:  # a view of the words is still alive somewhere: the mapping goes with it
                pass
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass
