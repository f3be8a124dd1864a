"""Publishing files so that a crash leaves the old file or none, never half a file."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

TEMP_MARK = ".tmp-"


def temp_path_for(final: Path) -> Path:
    """A hidden sibling name that no detection looks for, tagged with our pid."""
    return final.with_name(f".{final.name}{TEMP_MARK}{os.getpid()}")


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(temp: Path, final: Path) -> None:
    """fsync ``temp``, rename it over ``final`` and fsync the directory."""
    with open(temp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(temp, final)
    fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_output(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces ``final``, on error it is removed."""
    final = Path(final)
    remove_orphan_temps(final)
    temp = temp_path_for(final)
    try:
        yield temp
        publish(temp, final)
    finally:
        if temp.exists():
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
    """Delete temp files of ``final`` left by writers that died (their pid is gone)."""
    removed = []
    prefix = f".{final.name}{TEMP_MARK}"
    for path in final.parent.glob(f"{prefix}*"):
        pid = path.name[len(prefix) :]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            log.info("removing %s left by a writer that died", path)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed
