"""Bringing one remote file down: parallel ranged GETs into a local part file that survives interruption.

S3's guidance (and what moto's endpoint rewards) is ranges of 8-16 MiB in
parallel; a whole-object GET of a large file is slow and not resumable. Each
range, once written and synced, is appended to a ``.ranges`` journal beside
the part file, under the remote object's identity: a later call with the same
identity fetches only the ranges missing; another identity starts over.
Failed reads are retried with backoff, then raise an error naming the URI and
the byte range. pyarrow releases the GIL while reading, so threads suffice.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import CacheError, RemoteAccessError
from .location import Location, remote_error

log = logging.getLogger(__name__)

RANGE_BYTES = 16 << 20
PARALLEL_RANGES = 8
# Endpoints whose GETs cost the whole object however small the range (moto, some gateways) download
# faster with larger ranges: this variable sets the range size in bytes for every process of a node.
RANGE_ENV = "JASPER_RAY_RANGE_BYTES"
RETRIES = 4
BACKOFF_S = 0.25


@dataclass(frozen=True)
class RemoteIdentity:
    """What names one version of a remote object: a new PUT changes its ETag and modification time."""

    size: int
    mtime: str | None
    etag: str | None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def remote_identity(location: Location) -> RemoteIdentity:
    """Size, modification time and ETag of a remote file (one HEAD)."""
    assert location.filesystem is not None
    try:
        info = location.filesystem.get_file_info(location.path)
        if info.size is None:
            raise FileNotFoundError(f"Path does not exist '{location.path}'")
        with location.filesystem.open_input_file(location.path) as f:
            meta = f.metadata() if hasattr(f, "metadata") else {}
    except OSError as exc:
        raise remote_error(exc, location.uri) from exc
    etag = meta.get("ETag") or meta.get(b"ETag") if meta else None
    if isinstance(etag, bytes):
        etag = etag.decode()
    mtime = info.mtime.isoformat() if info.mtime is not None else None
    return RemoteIdentity(int(info.size), mtime, etag)


def _journal(part: Path) -> Path:
    return part.with_name(part.name + ".ranges")


def _done_ranges(part: Path, identity: Mapping[str, Any]) -> set[int]:
    """Ranges already in ``part`` for this identity (none when the journal is another version's)."""
    journal = _journal(part)
    if not part.is_file() or not journal.is_file():
        return set()
    lines = journal.read_text().splitlines()
    if not lines or json.loads(lines[0]) != dict(identity):
        return set()
    return {int(line) for line in lines[1:] if line.strip().isdigit()}


def discard_part(part: Path) -> None:
    part.unlink(missing_ok=True)
    _journal(part).unlink(missing_ok=True)


def ensure_free(directory: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise CacheError(
            errno.ENOSPC,
            f"not enough space in {directory} for {what}: needs {needed} bytes, {free} free. "
            "Free space there, or give cache_dir= (CLI --cache-dir) on a larger disk.",
        )


def download(
    location: Location,
    part: Path,
    size: int,
    identity: Mapping[str, Any],
    *,
    range_bytes: int | None = None,
    parallel: int = PARALLEL_RANGES,
    on_bytes: Callable[[int], object] | None = None,
) -> Path:
    """Fetch the ``size`` bytes at ``location`` into ``part``; returns ``part``.

    What an interrupted call with the same ``identity`` (the object's version) left is kept.
    """
    assert location.filesystem is not None
    range_bytes = range_bytes or int(os.environ.get(RANGE_ENV) or RANGE_BYTES)
    n_ranges = max(1, -(-size // range_bytes))
    done = _done_ranges(part, identity)
    if not done:
        discard_part(part)
    missing = [k for k in range(n_ranges) if k not in done]
    ensure_free(part.parent, sum(min(range_bytes, size - k * range_bytes) for k in missing), location.uri)
    if done:
        log.info("resuming %s: %d of %d ranges already here", location.uri, len(done), n_ranges)
        if on_bytes is not None:
            on_bytes(sum(min(range_bytes, size - k * range_bytes) for k in done))
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    journal = open(_journal(part), "a")  # noqa: SIM115 - closed below, shared by the worker threads
    try:
        if not done:
            os.ftruncate(fd, size)
            journal.write(json.dumps(dict(identity)) + "\n")
            journal.flush()

        def fetch(k: int) -> None:
            start = k * range_bytes
            length = min(range_bytes, size - start)
            data = read_range(location, start, length)
            try:
                os.pwrite(fd, data, start)
                os.fdatasync(fd)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise CacheError(errno.ENOSPC, f"disk full in {part.parent} while fetching {location.uri}") from exc
                raise
            journal.write(f"{k}\n")
            journal.flush()
            if on_bytes is not None:
                on_bytes(length)

        with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(missing) or 1))) as pool:
            for future in [pool.submit(fetch, k) for k in missing]:
                future.result()
    except CacheError:
        journal.close()
        os.close(fd)
        discard_part(part)  # a full disk gets its space back; nothing half-written stays
        raise
    except BaseException:
        journal.close()
        os.close(fd)
        raise
    journal.close()
    os.close(fd)
    return part


_fetched = [0]  # bytes this process has read with read_range


def fetched_bytes() -> int:
    """Bytes this process has read from object storage with ``read_range`` (what a conversion task reports)."""
    return _fetched[0]


def read_range(location: Location, start: int, length: int) -> bytes:
    """One ranged GET, retried with backoff; an error naming the URI and range when all attempts fail."""
    assert location.filesystem is not None
    if length <= 0:
        return b""
    last: BaseException | None = None
    for attempt in range(RETRIES):
        try:
            with location.filesystem.open_input_file(location.path) as f:
                data = f.read_at(length, start)
            if len(data) != length:
                raise OSError(f"short read: {len(data)} of {length} bytes")
            _fetched[0] += length
            return bytes(data)
        except FileNotFoundError as exc:
            raise remote_error(exc, location.uri) from exc
        except OSError as exc:
            last = exc
            log.warning(
                "%s bytes %d-%d: %s (attempt %d of %d)", location.uri, start, start + length, exc, attempt + 1, RETRIES
            )
            time.sleep(BACKOFF_S * 2**attempt)
    raise RemoteAccessError(
        f"could not read {location.uri} bytes {start}-{start + length} after {RETRIES} attempts: {last}. "
        "The endpoint went away or refused; run again to resume the download where it stopped."
    )


class RemoteFile(io.RawIOBase):
    """A read-only, seekable file over a remote object: reads inside the windows fetched up front are served
    from them, others are ranged GETs. For parsers that look at a few places of a large object (a zip
    directory at its end, headers at its start) without downloading it."""

    def __init__(self, location: Location, size: int, windows: dict[int, bytes]):
        super().__init__()
        self.location, self.size, self.windows, self._pos = location, size, windows, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, n: int = -1) -> bytes:
        stop = self.size if n is None or n < 0 else min(self.size, self._pos + n)
        start, self._pos = self._pos, max(self._pos, stop)
        for at, data in self.windows.items():
            if at <= start and stop <= at + len(data):
                return data[start - at : stop - at]
        return read_range(self.location, start, stop - start)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def upload_file(path: Path, where: Location, chunk_bytes: int = 64 << 20) -> None:
    """The local file ``path`` to the object ``where`` (one PUT stream: an object appears whole or not at all).

    The object's size is checked after the upload: moto was once seen, from a Ray task, to store a
    request's aws-chunked framing with the bytes; a size that differs is refused here rather than found
    by a reader's checksum later.
    """
    assert where.filesystem is not None
    size = path.stat().st_size
    try:
        with open(path, "rb") as src, where.filesystem.open_output_stream(where.path) as out:
            while chunk := src.read(chunk_bytes):
                out.write(chunk)
        _check_stored(where, size, str(path))
    except OSError as exc:
        raise remote_error(exc, where.uri) from exc


def _check_stored(where: Location, size: int, what: str) -> None:
    assert where.filesystem is not None
    stored = where.filesystem.get_file_info(where.path).size
    if stored != size:
        raise RemoteAccessError(
            f"{where.uri}: the endpoint stored {stored} bytes for the {size} bytes of {what}: the object is not "
            "what was uploaded (an endpoint or proxy that keeps transfer framing?). Run the conversion again "
            "(verified pieces are reused) or check the endpoint."
        )


def write_object(where: Location, data: bytes) -> None:
    """Small bytes (a record, a manifest) as the object ``where``."""
    assert where.filesystem is not None
    try:
        with where.filesystem.open_output_stream(where.path) as out:
            out.write(data)
        _check_stored(where, len(data), "the bytes written")
    except OSError as exc:
        raise remote_error(exc, where.uri) from exc


def read_object(where: Location) -> bytes | None:
    """The whole of a small object, or None when there is none."""
    assert where.filesystem is not None
    try:
        with where.filesystem.open_input_stream(where.path) as f:
            return bytes(f.read())
    except FileNotFoundError:
        return None
    except OSError as exc:
        if "does not exist" in str(exc) or "NoSuchKey" in str(exc):
            return None
        raise remote_error(exc, where.uri) from exc


def listing(location: Location) -> dict[str, Any]:
    """Names in the remote directory ``location`` -> pyarrow FileInfo (one LIST; empty when there is none)."""
    import pyarrow.fs as pafs  # lazy: pyarrow's filesystems load only for remote datasets

    assert location.filesystem is not None
    try:
        infos = location.filesystem.get_file_info(pafs.FileSelector(location.path, recursive=False))
    except OSError as exc:
        raise remote_error(exc, location.uri) from exc
    return {info.base_name: info for info in infos}


def delete(where: Location, recursive: bool = False) -> None:
    """Delete the object (or, ``recursive``, the prefix) ``where``; nothing there is not an error."""
    assert where.filesystem is not None
    try:
        if recursive:
            where.filesystem.delete_dir(where.path)
        else:
            where.filesystem.delete_file(where.path)
    except FileNotFoundError:
        return
    except OSError as exc:
        if "does not exist" in str(exc) or "NoSuchKey" in str(exc) or "not found" in str(exc).lower():
            return
        raise remote_error(exc, where.uri) from exc
