"""Fingerprints of source files, so a converted file can tell that its sources changed.

A fingerprint per file is (size, mtime_ns, sampled sha256, crc32 of the whole
file). Size changes mean stale. Equal mtimes mean fresh. Otherwise (a copy, a
touch, or an edit in place that kept the size) the whole file is hashed again
and its crc32 decides: a sampled hash alone misses a byte edited between its
samples. crc32 runs at ~1.4 GB/s per core here and files are hashed on every
core at once (``scripts/bench_formats.py`` measures it); fingerprints of earlier
versions record no crc32, and then a changed mtime means stale.
Checksums of whole tensors live in the HDF5 file itself (``verify``).

NOTE [crc32 beside the work]: a conversion hashes its sources whole while it converts them, in a thread
of its own (``fingerprint_in_background``), not before: the pass read a 28 GB dataset larger than the RAM
from disk before the first piece began (Ray, gzip: 470 s with it first, 419 s beside; scripts/bench_scale.py),
and at 2 GB took 0.5-0.7 s on both cores. What
the conversion needs at once (a resumed conversion's key) is the rest of the fingerprint: size, mtime and
samples, by the same rule as above (equal mtimes mean fresh).
"""

from __future__ import annotations

import hashlib
import os
import threading
import zlib
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

SAMPLE_BLOCKS = 64
SAMPLE_BYTES = 64 << 10
READ_BYTES = 8 << 20


def sampled_sha256(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= SAMPLE_BLOCKS * SAMPLE_BYTES:
            h.update(f.read())
        else:
            step = (size - SAMPLE_BYTES) // (SAMPLE_BLOCKS - 1)
            for i in range(SAMPLE_BLOCKS):
                f.seek(i * step)
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def file_crc32(path: Path) -> int:
    """crc32 of the whole file, read in large blocks (zlib releases the GIL: threads hash in parallel)."""
    crc = 0
    buf = bytearray(READ_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return crc


def crc32_all(paths: list[Path]) -> list[int]:
    """``file_crc32`` of each path, files hashed on every core at once."""
    if len(paths) <= 1:
        return [file_crc32(p) for p in paths]
    with ThreadPoolExecutor(min(len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(file_crc32, paths))


def _files(paths: Iterable[Path]) -> list[Path]:
    return [p for p in sorted(paths) if p.is_file()]


def _without_crc32(files: list[Path]) -> dict[str, dict[str, Any]]:
    out = {}
    for path in files:
        st = path.stat()
        out[path.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sample_sha256": sampled_sha256(path)}
    return out


def fingerprint(paths: Iterable[Path]) -> dict[str, dict[str, Any]]:
    files = _files(paths)
    out = _without_crc32(files)
    for path, crc in zip(files, crc32_all(files)):
        out[path.name]["crc32"] = crc
    return out


def fingerprint_in_background(paths: Iterable[Path]) -> tuple[dict[str, dict[str, Any]], Future]:
    """The fingerprint without its whole-file crc32s, now, and a future of the whole fingerprint, hashed by one
    thread while the caller goes on (NOTE [crc32 beside the work])."""
    files = _files(paths)
    now = _without_crc32(files)
    future: Future = Future()

    def whole() -> None:  # a daemon thread: a failed conversion exits without waiting for it
        try:
            future.set_result({p.name: {**now[p.name], "crc32": file_crc32(p)} for p in files})
        except BaseException as exc:  # noqa: BLE001 - raised by future.result() in the caller
            future.set_exception(exc)

    threading.Thread(target=whole, name="jasper-crc32", daemon=True).start()
    return {name: dict(entry) for name, entry in now.items()}, future


def changed_files(directory: Path, recorded: dict[str, dict[str, Any]], present: Iterable[Path]) -> list[str]:
    """Names of source files beside the output that differ from what was recorded (new files included)."""
    changed, rehash = [], []
    for path in sorted(present):
        if not path.is_file():
            continue
        rec = recorded.get(path.name)
        st = path.stat()
        if not isinstance(rec, dict) or rec.get("size") != st.st_size:
            changed.append(path.name)
        elif rec.get("mtime_ns") != st.st_mtime_ns:
            if rec.get("crc32") is None or rec.get("sample_sha256") != sampled_sha256(path):
                changed.append(path.name)  # no whole-file hash to decide with, or the samples differ already
            else:
                rehash.append(path)
    for path, crc in zip(rehash, crc32_all(rehash)):
        if crc != recorded[path.name]["crc32"]:
            changed.append(path.name)
    return sorted(changed)
