"""Batch slots in POSIX shared memory: one batch each, allocated once and reused, written in place by
other processes (DataLoader workers of ``local.workers``, shard actors of ``serve``).

Floor: plumbing. Knows bytes, shapes and dtypes, never what a sample is (``assembly.sample_fields``
names the fields) and never torch or Ray. A slot crosses between processes as its number (or name):
the writer maps it by path and builds rows straight into it, the owner hands out arrays over it
without a copy.

NOTE [when a slot is reused]
A slot is free again only when nothing outside its pool references its memory: every array (and every
tensor over one) handed out from it has been dropped. So a batch a caller holds is never overwritten,
however long it is held; the pool grows by a slot instead. The owner also marks slots ``busy`` while a
writer may be writing, and ``quarantined`` when a writer may still write after its batch was given up.
Publication is ordered by the channel that announces a finished write (a pipe, or ``SharedMutex``),
never by the order of plain stores.
"""

from __future__ import annotations

import ctypes
import errno
import secrets
import sys
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

SHM_DIR = "/dev/shm"  # where POSIX shared memory lives on Linux
ALIGN = 64  # bytes: every field starts on a cache line

Field = tuple[str, tuple[int, ...], np.dtype]  # name, per-row shape, dtype


@dataclass(frozen=True)
class BatchLayout:
    """Where each field of a batch of ``rows`` rows lives in a slot: (name, offset, shape, dtype str)."""

    rows: int
    fields: tuple[tuple[str, int, tuple[int, ...], str], ...]
    nbytes: int

    @staticmethod
    def of(rows: int, fields: Iterable[Field]) -> BatchLayout:
        placed, offset = [], 0
        for name, shape, dtype in fields:
            dtype = np.dtype(dtype)
            placed.append((name, offset, (rows, *shape), dtype.str))
            offset += -(-rows * int(np.prod(shape, dtype=np.int64)) * dtype.itemsize // ALIGN) * ALIGN
        return BatchLayout(rows, tuple(placed), max(offset, 1))

    def views(self, root: np.ndarray) -> dict[str, np.ndarray]:
        """Typed views of each field over a slot's bytes (``root``)."""
        return {
            key: root[off : off + int(np.prod(shape)) * np.dtype(dt).itemsize].view(dt).reshape(shape)
            for key, off, shape, dt in self.fields
        }


def map_segment(name: str, nbytes: int) -> np.ndarray:
    """A segment's bytes, mapped by path (no SharedMemory object: attaching that way would let Python's
    resource tracker unlink the owner's segment when an attaching process exits)."""
    return np.memmap(f"{SHM_DIR}/{name}", dtype=np.uint8, mode="r+", shape=(nbytes,)).view(np.ndarray)


_MADV_POPULATE_WRITE = 23  # Linux 5.14+: map every page writable now, without changing its bytes


def populate(root: np.ndarray) -> None:
    """Map every page of a slot into this process now (writable), so that building the first batches into
    it does not stop on a page fault per 4 KiB. Leaves the bytes as they are: safe while another process
    writes the slot. Does nothing where the kernel is older than 5.14."""
    _pthread().madvise(ctypes.c_void_p(root.ctypes.data), ctypes.c_size_t(root.nbytes), _MADV_POPULATE_WRITE)


def unlink(name: str) -> None:
    """Remove segment ``name`` (and its resource-tracker entry); gone already is fine."""
    try:
        shm = shared_memory.SharedMemory(name)
    except FileNotFoundError:
        return
    shm.close()
    shm.unlink()


class Slot:
    """One batch's worth of shared memory (NOTE [when a slot is reused])."""

    def __init__(self, layout: BatchLayout, name: str, number: int):
        shm = shared_memory.SharedMemory(name, create=True, size=layout.nbytes)  # tracked: unlinked if we crash
        shm.close()
        self.name = shm.name
        root = map_segment(self.name, layout.nbytes)
        self.views = layout.views(root)
        self.root: np.ndarray | None = root  # None once released
        del root  # the baseline counts the slot's own references only
        self.busy = False
        self.number = number  # its index in the pool that made it: how a writer is told the slot
        self.quarantined = False
        self.unpin: Callable[[], None] | None = None
        self._baseline = sys.getrefcount(self.root)

    def free(self) -> bool:
        """Not in flight, not quarantined, and no batch handed out from it is still referenced."""
        return not self.busy and not self.quarantined and sys.getrefcount(self.root) <= self._baseline

    def handed_out(self, rows: int) -> dict[str, np.ndarray]:
        """Fresh views of the first ``rows`` rows: while the caller holds them, the pool will not reuse it."""
        self.busy = False
        return {key: view[:rows] for key, view in self.views.items()}

    def release(self) -> None:
        """Unlink the segment; memory still referenced by a caller's batch lives until it is dropped."""
        if self.unpin is not None:
            self.unpin()
            self.unpin = None
        self.views, self.root = {}, None
        unlink(self.name)


class SlotPool:
    """Slots of one layout; ``acquire`` returns a free one or makes a new one. Slot ``i`` is the segment
    ``prefix + str(i)``, so a writer can be told a slot by its number. ``pin(root)`` (optional) is called
    on each new slot's bytes and returns how to undo it. Closing, or collecting the pool, unlinks them."""

    def __init__(self, layout: BatchLayout, pin: Callable[[np.ndarray], Callable[[], None]] | None = None):
        self.layout = layout
        self.prefix = f"jasper_{secrets.token_hex(6)}_"
        self.slots: list[Slot] = []
        self._pin = pin
        self._names: list[str] = []  # shared with the finalizer: it must not hold the pool
        self._finalizer = weakref.finalize(self, _unlink_all, self._names)

    def acquire(self) -> Slot:
        slot = next((s for s in self.slots if s.free()), None) or self._new()
        slot.busy = True
        return slot

    def _new(self) -> Slot:
        slot = Slot(self.layout, f"{self.prefix}{len(self.slots)}", len(self.slots))
        self._names.append(slot.name)
        if self._pin is not None and slot.root is not None:
            slot.unpin = self._pin(slot.root)
        self.slots.append(slot)
        return slot

    def reserve(self, count: int) -> None:
        """Make the pool ``count`` slots at least now, their pages mapped (a ring allocated once, up front)."""
        while len(self.slots) < count:
            root = self._new().root
            if root is not None:
                populate(root)

    def close(self) -> None:
        for slot in self.slots:
            slot.release()
        self.slots = []
        self._finalizer()


def _unlink_all(names: list[str]) -> None:
    for name in names:
        unlink(name)
    names.clear()


class SlotWriter:
    """The writer's side: attach slots by name (cached) and build rows into them in place."""

    def __init__(self, max_open: int = 16):
        self.open: dict[str, dict[str, np.ndarray]] = {}
        self.max_open = max_open

    def views(self, name: str, layout: BatchLayout) -> dict[str, np.ndarray]:
        views = self.open.get(name)
        if views is None:
            if len(self.open) >= self.max_open:
                self.open.pop(next(iter(self.open)))
            root = map_segment(name, layout.nbytes)
            populate(root)
            views = self.open[name] = layout.views(root)
        return views

    def write(
        self,
        name: str,
        layout: BatchLayout,
        rows: slice,
        build: Callable[[dict[str, np.ndarray]], object],
    ) -> None:
        """Build rows ``rows`` of slot ``name`` in place: ``build(out)`` gets the slot's views of them."""
        build({key: view[rows] for key, view in self.views(name, layout).items()})


# --- a lock in shared memory --------------------------------------------------------------------------

_MUTEX_BYTES = 64  # pthread_mutex_t: 40 bytes on x86-64, 48 on aarch64 (glibc)
_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ROBUST = 1
_libc: ctypes.CDLL | None = None


def _pthread() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)  # glibc (libpthread's symbols are in the process already)
    return _libc


def _check(what: str, rc: int) -> None:
    if rc != 0:
        raise OSError(rc, f"{what}: {errno.errorcode.get(rc, rc)}")


class SharedMutex:
    """A process-shared, robust pthread mutex over ``MUTEX_BYTES`` of shared memory.

    Why: words that announce a write to another process (a batch is done, a slot may be written) must be
    ordered with the rows they announce. Plain stores are ordered on x86-64 but not on ARM; a mutex's
    lock and unlock are real barriers on every CPU, so a word read under the lock after the writer's
    unlock sees every store the writer made before it. Robust: a process killed while holding it does
    not wedge the others (the next locker takes it over)."""

    MUTEX_BYTES = _MUTEX_BYTES

    def __init__(self, memory: np.ndarray, create: bool):
        if memory.nbytes < _MUTEX_BYTES or memory.ctypes.data % 16:
            raise ValueError(f"a SharedMutex needs {_MUTEX_BYTES} bytes aligned to 16")
        self._memory = memory  # keeps the mapping alive
        self._address = ctypes.c_void_p(memory.ctypes.data)
        libc = _pthread()
        self._lock, self._unlock, self._consistent = (
            libc.pthread_mutex_lock,
            libc.pthread_mutex_unlock,
            libc.pthread_mutex_consistent,
        )
        if create:
            attr = ctypes.create_string_buffer(64)
            _check("pthread_mutexattr_init", libc.pthread_mutexattr_init(attr))
            _check("pthread_mutexattr_setpshared", libc.pthread_mutexattr_setpshared(attr, _PTHREAD_PROCESS_SHARED))
            _check("pthread_mutexattr_setrobust", libc.pthread_mutexattr_setrobust(attr, _PTHREAD_MUTEX_ROBUST))
            _check("pthread_mutex_init", libc.pthread_mutex_init(self._address, attr))
            libc.pthread_mutexattr_destroy(attr)

    def __enter__(self) -> SharedMutex:
        rc = self._lock(self._address)
        if rc == errno.EOWNERDEAD:  # its holder died: its words are single stores, so they are whole
            rc = self._consistent(self._address)
        _check("pthread_mutex_lock", rc)
        return self

    def __exit__(self, *exc: object) -> None:
        _check("pthread_mutex_unlock", self._unlock(self._address))
