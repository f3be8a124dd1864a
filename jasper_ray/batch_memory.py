"""Batch buffers in shared memory, so shard actors on the client's node write batches in place.

Going through Ray's object store costs a serialisation copy into plasma, page
faults on fresh plasma memory, and a merge copy when a batch spans several
actors: ten times the gather itself, for the ~12 MB of a 256-sample batch.
Instead the client owns a small pool of ``SharedMemory`` slots, each laid out
as one batch; actors on the same node write their rows at their positions,
and the client yields tensors over the slot without copying. A slot is reused
only when nothing outside the pool still references its memory (the training
loop has dropped the batch), so a yielded batch is never overwritten.

Torch-free; used by ``shard_server`` (writer side) and ``shard_service`` (owner side).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

from .assembly import PAIR_ID, SAMPLE_KEYS

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
    def __init__(self, layout: BatchLayout):
        shm = shared_memory.SharedMemory(create=True, size=layout.nbytes)  # tracked: unlinked if we crash
        shm.close()
        self._shm = shm
        self.name = shm.name
        self.root = _map(self.name, layout.nbytes)
        self.views = layout.views(self.root)
        self.busy = False
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
    """Slots of one layout; ``acquire`` returns a free one or makes a new one."""

    def __init__(self, layout: BatchLayout):
        self.layout = layout
        self.slots: list[Slot] = []

    def acquire(self) -> Slot:
        slot = next((s for s in self.slots if s.free()), None)
        if slot is None:
            slot = Slot(self.layout)
            self.slots.append(slot)
        slot.busy = True
        return slot

    def close(self) -> None:
        for slot in self.slots:
            slot.release()
        self.slots = []


class SlotWriter:
    """The actor side: attach slots by name (cached) and build rows into them at positions."""

    def __init__(self, max_open: int = 16):
        self.open: dict[str, dict[str, np.ndarray]] = {}
        self.max_open = max_open

    def write(
        self,
        name: str,
        layout: BatchLayout,
        positions: np.ndarray,
        build: Callable[[dict[str, np.ndarray] | None], dict[str, np.ndarray]],
    ) -> None:
        """Land the rows ``build`` makes at ``positions`` of slot ``name``. Positions in one run: built
        in place (``build(out)``, no copy). Scattered: ``build(None)``'s new arrays, then scattered
        (measured: building into a reused scratch batch first was a third slower)."""
        views = self.open.get(name)
        if views is None:
            if len(self.open) >= self.max_open:
                self.open.pop(next(iter(self.open)))
            views = self.open[name] = layout.views(_map(name, layout.nbytes))
        n = len(positions)
        if n and positions[-1] - positions[0] + 1 == n:
            first = int(positions[0])
            build({key: view[first : first + n] for key, view in views.items()})
            return
        batch = build(None)
        for key, view in views.items():
            view[positions] = batch[key]
