"""``ShardServer``: the Ray actor that owns a memory-mapped pair-row shard and serves batches of it.

Kept apart from the client so that an actor (and its restarts) imports
neither torch nor the client: for HDF5 data a restarted actor is up in about
a second. It receives a path and a row range, never data or handles.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import partial
from typing import Any

import numpy as np
import ray

from ..assembly import PAIR_ID, ReaderSource, assemble_batch
from ..formats import StorageFormat, open_dataset
from ..formats.base import RowArray, is_mapped
from ..sampling import SteeringSchedule, steering_variants
from ..schema import TENSORS
from ..shm import BatchLayout, SlotWriter
from ..storage import Location
from .slots import PacingTable


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def _mapped_bytes(arrays: list[RowArray]) -> int:
    """Bytes of ``arrays`` whose memory lies in a file mapping, read from ``/proc/self/maps``: covers
    ``np.memmap`` (HDF5) and ``torch.load(mmap=True)`` (PT, whose arrays' base is a tensor, not a memmap)."""
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                spans.append((lo, hi))
    total = 0
    for a in arrays:
        if not isinstance(a, np.ndarray):  # chunked HDF5 rows: read through h5py, nothing mapped
            continue
        address = a.__array_interface__["data"][0]
        if a.nbytes and (is_mapped(a) or any(lo <= address < hi for lo, hi in spans)):
            total += a.nbytes
    return total


class ShardServer:
    """Owns pair rows ``[start, stop)`` of one dataset; serves batches of them. Run as a Ray actor."""

    def __init__(
        self,
        path: str | Location,
        storage_format: StorageFormat,
        start: int,
        stop: int,
        seed: int,
        name: str,
        cache: Mapping[str, Any] | None = None,
        precision: str = "float32",
    ):
        os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
        # ``cache``: open_dataset's cache_dir / cache_limit / verify. A remote dataset fills this node's cache with
        # the tables and this actor's own pair rows only (shards are fetched on first use).
        self.reader = open_dataset(path, storage_format, use_mmap=True, **(cache or {}))
        for spec in TENSORS:  # map everything now: a restarted actor is ready when it answers
            self.reader.array(spec.name)
        self.source = ReaderSource(self.reader, precision)  # what the client resolved from dtype=
        self.schedule = SteeringSchedule(self.reader.config)
        self.start, self.stop, self.seed, self.name = start, stop, seed, name
        self.batches_served = 0
        self.paced_calls = 0  # serve calls running now
        self.slots = SlotWriter()
        self.node_id = ray.get_runtime_context().get_node_id()

    def get_batch(
        self, pair_ids: np.ndarray, epoch: int, out: dict[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """The batch of ``pair_ids``: new arrays, or written into ``out`` (see ``assemble_batch``)."""
        ids = np.asarray(pair_ids, dtype=np.int64)
        if ids.size and (ids.min() < self.start or ids.max() >= self.stop):
            raise ValueError(f"{self.name} owns pair rows {self.start}:{self.stop}; asked for {ids.min()}..{ids.max()}")
        variants = steering_variants(ids, epoch, self.seed, self.schedule.probs(epoch))
        batch = assemble_batch(self.source, ids, variants, out=out)
        if out is None:
            batch[PAIR_ID] = ids
        else:
            out[PAIR_ID][...] = ids
            batch[PAIR_ID] = out[PAIR_ID]
        self.batches_served += 1
        return batch

    def fill(
        self, pair_ids: np.ndarray, epoch: int, slot: str, layout: BatchLayout, rows: slice, node_id: str
    ) -> int | dict[str, np.ndarray]:
        """Write the batch into rows ``rows`` of the client's shared-memory ``slot`` when the client is on
        this node (returns the row count); otherwise return the batch through the object store."""
        if node_id != self.node_id:
            return self.get_batch(pair_ids, epoch)
        self.slots.write(slot, layout, rows, partial(self.get_batch, pair_ids, epoch))
        return len(pair_ids)

    def fill_many(
        self, requests: list[tuple[np.ndarray, str, slice]], epoch: int, layout: BatchLayout, node_id: str
    ) -> list[int | dict[str, np.ndarray]]:
        """``fill`` for several batches in one call: (pair ids, slot, rows) each. One call per actor
        for a group of batches instead of one per batch halves the per-call cost a batch pays."""
        return [self.fill(ids, epoch, slot, layout, rows, node_id) for ids, slot, rows in requests]

    def serve(
        self,
        table: str,
        ring: int,
        lanes: int,
        lane: int,
        slot_prefix: str,
        layout: BatchLayout,
        work: list[tuple[int, np.ndarray, int]],
        epoch: int,
        client_pid: int,
        pause: float,
    ) -> int:
        """Build a run of batches for a client on this node, paced through its ``PacingTable``:
        (seq, pair ids, first row) each, written in place once the client offers the batch's slot.
        One call per epoch instead of one per batch group. Returns the batches built (fewer when
        cancelled or the client is gone)."""
        pacing = PacingTable(ring, lanes, table)
        slots = SlotWriter()  # this call's own: calls of several clients run in threads of their own
        built = 0
        self.paced_calls += 1
        try:
            for seq, ids, first in work:
                slot = pacing.wait_offer(seq, client_pid, pause)
                if slot is None:
                    break
                rows = slice(first, first + len(ids))
                slots.write(f"{slot_prefix}{slot}", layout, rows, partial(self.get_batch, ids, epoch))
                pacing.mark_done(lane, seq)
                built += 1
        finally:
            self.paced_calls -= 1
        return built

    def stats(self) -> dict[str, int | str]:
        arrays = [self.reader.array(spec.name) for spec in TENSORS]
        mapped = _mapped_bytes(arrays)
        return {
            "shard": self.name,
            "rows": self.stop - self.start,
            "bytes_mapped": int(mapped),
            "batches_served": self.batches_served,
            "paced_calls": self.paced_calls,
            "pid": os.getpid(),
            "node_id": self.node_id,
            **_status(),
        }

    def pid(self) -> int:
        return os.getpid()

    def whereabouts(self) -> tuple[int, str]:
        """(pid, node id): where this actor's process runs."""
        return os.getpid(), self.node_id
