"""The shard actors' pacing table (serve.slots.PacingTable) across processes: every word is read and
written under its SharedMutex, so a batch marked done is whole when read, on any memory model. A stress
run of many offer / write / done / read rounds between two processes finds no torn batch; a process
killed while holding the mutex does not wedge the other."""

from __future__ import annotations

import multiprocessing
import os
import signal

import numpy as np

from jasper_ray.serve.slots import PacingTable
from jasper_ray.shm import BatchLayout, SlotPool, SlotWriter

ROUNDS = 3000
RING = 3
LAYOUT = BatchLayout.of(64, [("rows", (128,), np.dtype("int64"))])  # 64 KiB per slot


def _actor(table_name: str, prefix: str, client_pid: int) -> None:
    """The writer's side, as ShardServer.serve runs it: wait for the offer, write the rows, mark done."""
    table, writer = PacingTable(RING, 1, table_name), SlotWriter()
    for seq in range(ROUNDS):
        slot = table.wait_offer(seq, client_pid, 0.0)
        if slot is None:
            return
        rows = writer.views(f"{prefix}{slot}", LAYOUT)["rows"]
        for r in range(len(rows)):  # row by row: many stores, any of which could land late without the mutex
            rows[r] = seq
        table.mark_done(0, seq)


def test_no_torn_batch_over_many_rounds() -> None:
    table, pool = PacingTable(RING, 1), SlotPool(LAYOUT)
    slots = [pool.acquire() for _ in range(RING)]
    actor = multiprocessing.get_context("fork").Process(target=_actor, args=(table.name, pool.prefix, os.getpid()))
    actor.start()
    try:
        for seq in range(min(RING, ROUNDS)):
            table.offer(seq, slots[seq % RING].number)
        torn = []
        for seq in range(ROUNDS):
            while not table.is_done(0, seq):
                assert actor.exitcode is None, f"the writer died at batch {seq}"
            rows = slots[seq % RING].views["rows"]
            if not (rows == seq).all():
                torn.append((seq, np.unique(rows).tolist()))
            if seq + RING < ROUNDS:
                table.offer(seq + RING, slots[seq % RING].number)  # the slot is read: the writer may reuse it
        assert not torn, f"torn batches (seq, values seen): {torn[:5]}"
        actor.join(timeout=30)
        assert actor.exitcode == 0
    finally:
        table.cancel()
        actor.join(timeout=5)
        table.close()
        pool.close()


def _die_holding(table_name: str) -> None:
    table = PacingTable(RING, 1, table_name)
    table.lock.__enter__()
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_process_killed_holding_the_mutex_does_not_wedge_the_table() -> None:
    table = PacingTable(RING, 1)
    try:
        proc = multiprocessing.get_context("fork").Process(target=_die_holding, args=(table.name,))
        proc.start()
        proc.join(timeout=30)
        assert proc.exitcode == -signal.SIGKILL
        table.offer(0, 7)  # takes the dead holder's mutex over (robust) instead of waiting forever
        assert table.offered_slot(0) == 7
        assert PacingTable(RING, 1, table.name).offered_slot(0) == 7  # an attached view reads it too
    finally:
        table.close()
