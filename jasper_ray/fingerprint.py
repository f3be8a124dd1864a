"""Fingerprints of source files, so a converted file can tell that its sources changed.

A fingerprint per file is (size, mtime_ns, sampled sha256). Size changes mean
stale. Equal mtimes mean fresh. Otherwise (a copy, a touch) the sampled hash
of 64 spread 64 KiB blocks decides; it costs milliseconds on any size.
Checksums of whole tensors live in the HDF5 file itself (``verify``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SAMPLE_BLOCKS = 64
SAMPLE_BYTES = 64 << 10


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


def fingerprint(paths: Iterable[Path]) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(paths):
        if path.is_file():
            st = path.stat()
            out[path.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sample_sha256": sampled_sha256(path)}
    return out


def changed_files(directory: Path, recorded: dict[str, dict[str, Any]], present: Iterable[Path]) -> list[str]:
    """Names of source files beside the output that differ from what was recorded (new files included)."""
    changed = []
    for path in sorted(present):
        if not path.is_file():
            continue
        rec = recorded.get(path.name)
        st = path.stat()
        if rec is None or rec["size"] != st.st_size:
            changed.append(path.name)
        elif rec["mtime_ns"] != st.st_mtime_ns and rec["sample_sha256"] != sampled_sha256(path):
            changed.append(path.name)
    return changed
