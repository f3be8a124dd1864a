"""Loader workers that build batches straight into shared-memory slots: only slot numbers cross.

Floor: local. ``ResumableLoader`` (``create_loader``) runs its workers here instead of torch's. torch's
workers build a batch, copy it into a fresh shared-memory segment, and the main process maps that
segment: per 11.5 MB batch, a copy, a new segment and page faults on both sides, which cost more than
the batch itself (issue 20: 2 torch workers ran at 0.16x the in-process rate). Here a ring of slots
(``jasper_ray.shm.SlotPool``) is allocated once per loader; a worker gets (seq, slot, positions) over
its pipe, assembles the batch into the slot in place (``JASPERSteeringDataset.get_batch(out=)``) and
answers (seq, rows); the main process hands out tensors over the slot, no copy.

NOTE [a held batch is never overwritten]
The rule of ``jasper_ray.shm`` (NOTE [when a slot is reused]): a slot goes back to the ring only once
every tensor of the batch it holds has been dropped. Keep batches as long as you like; each one held
costs a slot (~batch bytes of shared memory) while held. ``copy=True`` hands out private copies and
frees the slot at once.

A worker's answer travels over a pipe after its writes: the pipe is the barrier that makes the rows
visible to the reader, on any CPU. A worker that dies is seen through its process sentinel; its batch
is never handed out (no torn batch), and the error names the worker, its pid and how it ended.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.context import BaseContext
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..assembly import sample_fields
from ..errors import LoaderWorkerError
from ..shm import BatchLayout, Slot, SlotPool, SlotWriter
from .batches import to_torch

if TYPE_CHECKING:
    from .dataset import JASPERSteeringDataset

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often an idle worker checks that its parent is alive (fork children share pipe ends)
CLOSE_TIMEOUT_S = 10.0
# A worker answers (seq, rows, None), or (seq, 0, (its exception, the traceback as text)).


def pin_with_cuda(root: np.ndarray) -> Callable[[], None]:
    """Page-lock a slot's bytes for the accelerator (``cudaHostRegister``): copies from it run at pinned
    speed and ``non_blocking=True`` overlaps them. Returns the undo."""
    cudart = torch.cuda.cudart()
    address, nbytes = root.ctypes.data, root.nbytes
    rc = int(cudart.cudaHostRegister(address, nbytes, 0))
    if rc != 0:
        log.warning("could not pin a %d-byte batch slot (cudaHostRegister: %d); batches stay unpinned", nbytes, rc)
        return lambda: None
    return lambda: cudart.cudaHostUnregister(address)


def _work(
    worker_id: int,
    dataset: JASPERSteeringDataset,
    conn: multiprocessing.connection.Connection,
    prefix: str,
    layout: BatchLayout,
    base_seed: int,
    init: Callable[[int], None] | None,
    parent: int,
    ready: int,
) -> None:
    """A worker's loop: build each (seq, slot, positions) it is sent into that slot, answer (seq, rows)."""
    torch.set_num_threads(1)  # as torch's workers: the parallelism is the workers
    torch.manual_seed(base_seed + worker_id)
    if init is not None:
        init(worker_id)
    slots = SlotWriter(max_open=256)
    for number in range(ready):  # the ring as it is now, mapped before the first batch
        slots.views(f"{prefix}{number}", layout)
    try:
        while True:
            while not conn.poll(POLL_S):
                if os.getppid() != parent:
                    return  # the main process is gone (a fork child also holds the parent's pipe ends)
            task = conn.recv()
            if task is None:
                return
            seq, slot, positions = task
            try:
                out = {key: view[: len(positions)] for key, view in slots.views(f"{prefix}{slot}", layout).items()}
                dataset.get_batch(positions, out=out)
                conn.send((seq, len(positions), None))
            except Exception as exc:  # noqa: BLE001 - sent to the main process, which raises it
                conn.send((seq, 0, _sendable(exc)))
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        return  # Ctrl-C reaches the whole process group: the main process reports it


def _sendable(exc: Exception) -> tuple[BaseException, str]:
    """The exception (itself where it pickles, else a RuntimeError with its text) and its traceback."""
    import pickle  # lazy: only on a worker's error path
    import traceback  # lazy: only on a worker's error path

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        pickle.dumps(exc)
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(f"{type(exc).__name__}: {exc}"), text
    return exc, text


class WorkerTraceback(Exception):
    """Where an exception raised in a loader worker came from (its traceback, as text)."""


def _context(context: str | BaseContext | None) -> BaseContext:
    if isinstance(context, BaseContext):
        return context
    return multiprocessing.get_context(context)


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is None:
        return "its pipe closed"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


class SlotWorkers:
    """``num_workers`` processes over one dataset, writing batches of up to ``batch_size`` samples into a
    ring of shared-memory slots (module docstring). ``batches`` yields them in order; ``close`` (or
    collecting the object) stops the workers. The slots are the pool's: closing the pool unlinks them."""

    def __init__(
        self,
        dataset: JASPERSteeringDataset,
        num_workers: int,
        batch_size: int,
        *,
        pool: SlotPool | None = None,
        context: str | BaseContext | None = None,
        worker_init_fn: Callable[[int], None] | None = None,
        timeout: float = 0,
        prefetch: int = 2,
    ):
        self.pool = pool or slot_pool(dataset, batch_size)
        self.prefetch = max(1, prefetch)
        # The ring: the batches in flight, the one the caller holds and the one its loop still holds while
        # asking for the next. Made and mapped now, so that no batch waits on page faults.
        self.pool.reserve(self.prefetch + 2)
        self.timeout = timeout
        ctx = _context(context)
        base_seed = int(torch.empty((), dtype=torch.int64).random_().item())
        self.conns: list[multiprocessing.connection.Connection] = []
        self.procs: list[Any] = []
        for worker_id in range(num_workers):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(  # type: ignore[attr-defined]
                target=_work,
                args=(worker_id, dataset, theirs, self.pool.prefix, self.pool.layout, base_seed, worker_init_fn,
                      os.getpid(), len(self.pool.slots)),
                name=f"jasper_ray loader worker {worker_id}",
                daemon=True,
            )  # fmt: skip
            proc.start()
            theirs.close()
            self.conns.append(mine)
            self.procs.append(proc)
        self.broken = False
        self._stop = weakref.finalize(self, _stop, self.conns, self.procs)  # collected without close: stop them

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs]

    def batches(self, positions: Iterable[Any], copy: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """The batch of each list of positions, in order; ``prefetch`` batches are built ahead."""
        pending: deque[tuple[int, int, Slot]] = deque()  # (seq, worker, slot)
        todo = iter(positions)
        submitted = 0

        def submit() -> bool:
            nonlocal submitted
            batch = next(todo, None)
            if batch is None:
                return False
            worker, slot = submitted % len(self.procs), self.pool.acquire()
            pending.append((submitted, worker, slot))  # before sending: a failed send still gives it back
            try:
                self.conns[worker].send((submitted, slot.number, np.asarray(batch, dtype=np.int64)))
            except (BrokenPipeError, ConnectionResetError):
                pass  # the worker is dead: waiting for its answer names it (its sentinel is set)
            submitted += 1
            return True

        try:
            while len(pending) < self.prefetch and submit():
                pass
            while pending:
                seq, worker, slot = pending[0]
                rows, error = self._answer(worker, seq)
                pending.popleft()
                if error is not None:
                    slot.busy = False
                    raise error[0] from WorkerTraceback(f"in loader worker {worker}:\n{error[1]}")
                batch = slot.handed_out(rows)
                submit()
                yield {k: torch.from_numpy(v.copy()) for k, v in batch.items()} if copy else to_torch(batch)
                del batch
        finally:
            self._drain(pending)

    def _answer(self, worker: int, seq: int) -> tuple[int, tuple[BaseException, str] | None]:
        """Worker ``worker``'s answer for batch ``seq``: (rows, its error or None); raises if it died."""
        conn, proc = self.conns[worker], self.procs[worker]
        start = time.monotonic()
        while True:
            wait = POLL_S if not self.timeout else max(0.0, min(POLL_S, start + self.timeout - time.monotonic()))
            ready = multiprocessing.connection.wait([conn, proc.sentinel], timeout=wait)
            if conn in ready:
                try:
                    got, rows, error = conn.recv()
                except (EOFError, OSError):
                    ready = [proc.sentinel]
                else:
                    if got != seq:
                        raise RuntimeError(f"loader worker {worker} answered batch {got}, expected {seq}")
                    return rows, error
            if proc.sentinel in ready or not proc.is_alive():
                self.broken = True
                proc.join(timeout=1.0)
                raise LoaderWorkerError(
                    f"loader worker {worker} (pid {proc.pid}) exited unexpectedly ({_how_it_ended(proc.exitcode)}) "
                    f"while building batch {seq} of this pass; that batch was not delivered. Start the epoch "
                    "again from the loader's state_dict() to resume where the delivered batches end"
                )
            if self.timeout and time.monotonic() - start >= self.timeout:
                self.broken = True
                raise LoaderWorkerError(
                    f"loader worker {worker} (pid {proc.pid}) took more than timeout={self.timeout}s for batch {seq}"
                )

    def _drain(self, pending: deque[tuple[int, int, Slot]]) -> None:
        """Batches still being built when a pass stops early: let them finish before their slots go back
        (a slot a worker may still write is never handed out: quarantined if its worker cannot answer)."""
        for seq, worker, slot in pending:
            if not self.broken:
                try:
                    self._answer(worker, seq)
                except LoaderWorkerError:
                    pass
            slot.busy = False
            slot.quarantined = self.broken and self.procs[worker].is_alive()

    def close(self) -> None:
        """Stop the workers (they finish the batch in hand); the slots stay with the pool."""
        self._stop()


def _stop(conns: list[multiprocessing.connection.Connection], procs: list[Any]) -> None:
    for conn in conns:
        try:
            conn.send(None)
        except (BrokenPipeError, OSError):
            pass
    deadline = time.monotonic() + CLOSE_TIMEOUT_S
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=1.0)
    for conn in conns:
        conn.close()
    conns.clear()
    procs.clear()


def slot_pool(dataset: JASPERSteeringDataset, batch_size: int, pin: bool = False) -> SlotPool:
    """A ring for batches of up to ``batch_size`` of ``dataset``'s samples; page-locked when ``pin``."""
    layout = BatchLayout.of(batch_size, sample_fields(dataset.embedding_dim, dataset.n_neg, dataset.dtype))
    return SlotPool(layout, pin_with_cuda if pin else None)
