"""Publishing files so that a crash leaves the old file or none, never half a file.

Temporary names carry their writer's tag: host, pid and the process's start time
(``writer_tag``). On a filesystem shared by nodes or containers a pid alone says
nothing (the same pid lives on every node), so orphan cleanup removes a temp file
only when its writer ran on this host and is gone: its pid is dead, or now belongs
to a process that started at another time (a reused pid). Temps of other hosts are
left alone (NOTE [writer tags]).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

TEMP_MARK = ".tmp-"
# host.pid.start: the host name made safe for a file name (no dots: the tag splits on them).
_TAG = re.compile(r"^(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.(?P<start>\d+)$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "host"


def process_start(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, /proc), or None when no such process is visible."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22, counted after the command name (which may hold spaces, so split after its ")").
    return int(stat.rsplit(")", 1)[1].split()[19])


@functools.cache
def _own_start(pid: int) -> int:
    return process_start(pid) or 0


def writer_tag(pid: int | None = None) -> str:
    """``host.pid.start`` of a process on this host (default: this one): what temp names and locks carry."""
    pid = os.getpid() if pid is None else pid
    start = _own_start(pid) if pid == os.getpid() else (process_start(pid) or 0)
    return f"{_host()}.{pid}.{start}"


def temp_path_for(final: Path, pid: int | None = None) -> Path:
    """A hidden sibling name that no detection looks for, tagged with its writer (``writer_tag``)."""
    return final.with_name(f".{final.name}{TEMP_MARK}{writer_tag(pid)}")


def writer_gone(tag: str) -> bool:
    """True when the writer ``tag`` names surely died: it ran on this host, and its pid is gone or reused.

    A tag of another host (or one this version cannot parse, like the pid-only tags of earlier versions)
    is never judged gone: its files are left for their own host to clean up."""
    m = _TAG.match(tag)
    if m is None or m["host"] != _host():
        return False
    pid, start = int(m["pid"]), int(m["start"])
    if pid == os.getpid():
        return False
    alive = process_start(pid)
    if alive is None:
        return not _pid_alive(pid)  # no /proc: fall back to a signal probe
    return alive != start


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (its entries: a rename in it lasts)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(temp: Path, final: Path, durable: bool = True) -> None:
    """fsync ``temp``, rename it over ``final`` and fsync the directory (no fsync unless ``durable``: a work
    file that is verified before any reuse)."""
    if durable:
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(temp, final)
    if durable:
        fsync_path(final.parent)


@functools.cache
def _libc(name: str, *argtypes: type) -> Callable[..., int] | None:
    """A Linux system call's libc wrapper by name (``fallocate64``, ``sync_file_range``), or None where this
    platform has none."""
    try:
        call = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    call.argtypes = list(argtypes)
    call.restype = ctypes.c_int
    return call


def _fallocate() -> Callable[..., int] | None:
    """Linux's fallocate(2) itself: glibc's ``posix_fallocate`` (``os.posix_fallocate``), where a file system
    cannot allocate ahead, writes a byte into every block instead, which sends a network file system the
    whole size."""
    int64 = ctypes.c_int64
    return _libc("fallocate64", ctypes.c_int, ctypes.c_int, int64, int64) or _libc(
        "fallocate", ctypes.c_int, ctypes.c_int, int64, int64
    )


SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writing the dirty pages out, do not wait


def start_writeback(fd: int) -> None:
    """Have the kernel start writing ``fd``'s dirty pages to disk now, without waiting for them, so that the
    fsync that publishes the file finds little left (sync_file_range(2), as databases do between checkpoints).
    Only a head start: nothing on platforms without it, and its errors are the final fsync's to meet."""
    call = _libc("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    if call is not None:
        call(fd, 0, 0, SYNC_FILE_RANGE_WRITE)


def reserve_space(path: Path, nbytes: int) -> bool:
    """Allocate ``nbytes`` of disk for ``path`` now, so that writes within them cannot fail for want of space
    (the file's size becomes ``nbytes``). False where this platform or file system cannot allocate ahead; a
    full disk raises ENOSPC, naming the file."""
    allocate = _fallocate()
    if allocate is None:
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        if allocate(fd, 0, 0, nbytes) != 0:
            err = ctypes.get_errno()
            if err in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL):
                return False
            raise OSError(err, f"{os.strerror(err)} (reserving {nbytes} bytes)", str(path))
    finally:
        os.close(fd)
    return True


@contextlib.contextmanager
def atomic_output(final: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces ``final`` (``publish``), on error it is removed."""
    final = Path(final)
    remove_orphan_temps(final)
    temp = temp_path_for(final)
    try:
        yield temp
        publish(temp, final, durable)
    finally:
        if temp.exists():
            # Emptied before it goes: a writer that still holds it open (HDF5 after a failed close) no longer
            # pins its blocks, so the disk it filled is free again at once.
            with contextlib.suppress(OSError):
                os.truncate(temp, 0)
            temp.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphan_temps(final: Path) -> list[Path]:
    """Delete temp files of ``final`` left by writers on this host that died (``writer_gone``)."""
    removed = []
    prefix = f".{final.name}{TEMP_MARK}"
    for path in final.parent.glob(f"{prefix}*"):
        if writer_gone(path.name[len(prefix) :]):
            log.info("removing %s left by a writer that died", path)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# NOTE [writer tags]: pid-only tags of earlier versions are never removed automatically (their host is
# unknown); docs/troubleshooting.md says to delete them by hand once no conversion runs anywhere.
