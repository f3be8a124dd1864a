"""``JasperDatasource``: the Ray Data datasource behind ``read_jasper``, and the body of its read tasks.

Floor: ray_data (a Ray front-end). Each read task covers a range of pair rows
aligned to the HDF5 chunks of the per-pair tensors (shuffled: a run of
chunk-aligned units, ``plan``); it opens the dataset itself from the user's
path or URI (``DatasetRef``: never a handle, never the driver's local copy,
so each node fills its own cache) and yields the samples built by
``assemble_batch``, the same function the local dataset uses, so a pair at an
epoch is the same sample on either path. ``get_read_tasks`` does no I/O (the
split ids and config are read once, in the driver, where the dataset is also
validated once).

NOTE [passes over one read_jasper Dataset]
Ray Data runs a Dataset's plan afresh on every consumption (``iter_*``,
``take_all``, each epoch of a ``streaming_split``, so each Ray Train epoch of
``get_dataset_shard``): it builds a new executor and, when it starts, calls
``get_read_tasks(parallelism, per_task_row_limit=..., data_context=...)``
exactly once, in the process that runs the executor (the driver, or the
``SplitCoordinator`` actor of ``streaming_split``, which holds its own copy
of the datasource). Ray's other calls (planning, metadata) pass no
``data_context``. Measured on Ray 2.60 (``tests/test_ray_passes.py``
keeps it true): per execution one call with it and one without; none for
``count()``, for ``schema()`` when read tasks carry a schema (they do here),
or for a materialized dataset. So the datasource counts the calls with
``data_context``: pass ``k`` reads epoch ``epoch + k``. A copy inherits the
count it was made with (a ``streaming_split`` after two driver passes starts
at ``epoch + 2``). ``materialize()`` runs one pass and keeps its blocks: the
materialized dataset serves that epoch every time. Ray 2.40 called
``get_read_tasks(parallelism)`` alone, so there every pass reads ``epoch``;
versions between were not measured: ``read_jasper`` warns below 2.60.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from ray.data import DataContext, Datasource, ReadTask
from ray.data.block import Block, BlockAccessor, BlockMetadata

from .. import faults
from ..assembly import PAIR_ID, ReaderSource, assemble_batch, output_precision
from ..formats import StorageFormat, open_dataset
from ..formats.base import Reader
from ..formats.chunks import rows_per_chunk
from ..formats.verified import VerifyMode, check_verify_mode
from ..sampling import DEFAULT_SEED, SteeringSchedule, steering_variants
from ..storage import Location, locate
from ..validate import check_epoch, validate_dataset
from .plan import COLUMNS, MIN_ROWS_PER_TASK, block_bytes, column_shapes, row_bytes, task_pieces

if TYPE_CHECKING:
    import pyarrow.fs as pafs

# Ray 2.40's ReadTask has no schema (nor per_task_row_limit): pass them only where Ray takes them.
_TASK_SCHEMA = "schema" in inspect.signature(ReadTask.__init__).parameters


@dataclass(frozen=True)
class DatasetRef:
    """How any process opens the dataset: the user's path or URI (with its filesystem) and the node-local
    cache's options, never a handle or the driver's cached copy."""

    location: Location
    storage_format: StorageFormat = "auto"
    use_mmap: bool = True
    cache_dir: str | None = None
    cache_limit: int | None = None
    verify: VerifyMode = "first-touch"  # what read tasks check (NOTE [first-touch verification])

    @property
    def path(self) -> str:
        return self.location.uri

    @property
    def key(self) -> tuple[object, ...]:
        """What tells two refs apart (the filesystem object itself is not hashable; the URI names it)."""
        where = self.location
        options = (self.storage_format, self.use_mmap, self.cache_dir, self.cache_limit, self.verify)
        return (where.uri, where.path, *options)

    def open(self, verify: VerifyMode | None = None) -> Reader:
        return open_dataset(
            self.location,
            self.storage_format,
            self.use_mmap,
            cache_dir=self.cache_dir,
            cache_limit=self.cache_limit,
            verify=self.verify if verify is None else verify,
        )


# Readers a worker process keeps between read tasks (most recently used last), each with the identity of the
# local path it opened. Ray reuses worker processes, so the files are opened, and each checksum unit verified
# (NOTE [first-touch verification]), once per process, as in a DataLoader worker, not once per task: the
# negatives of any task touch the whole source table. A local dataset replaced at its path (a new inode or
# mtime of the directory or .h5 file: atomic publishing renames) is opened again.
_OPEN: dict[tuple[object, ...], tuple[object, Reader]] = {}
OPEN_READERS = 4


def _identity(ref: DatasetRef) -> object:
    if ref.location.is_remote:
        return None  # the cache checks a remote dataset's identity when it is opened
    try:
        st = os.stat(ref.location.path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns)


def open_in_process(ref: DatasetRef) -> Reader:
    """This process's reader of ``ref``, opened on first use and kept (the ``OPEN_READERS`` latest)."""
    identity = _identity(ref)
    held = _OPEN.pop(ref.key, None)
    if held is not None and held[0] != identity:
        held[1].close()
        held = None
    reader = held[1] if held is not None else ref.open()
    _OPEN[ref.key] = (identity, reader)
    while len(_OPEN) > OPEN_READERS:
        _OPEN.pop(next(iter(_OPEN)))[1].close()
    return reader


@dataclass(frozen=True)
class ReadTaskSpec:
    """What one read task reads: picklable, no open handle (each task opens the dataset itself)."""

    dataset: DatasetRef
    schedule: SteeringSchedule
    ids: np.ndarray  # the task's pair ids, in the order its rows come out
    epoch: int
    seed: int
    columns: tuple[str, ...]
    rows_per_block: int
    precision: str = "float32"  # the embedding columns' (assembly.output_precision of dtype=)


def pooled_columns(shapes: dict[str, tuple[tuple[int, ...], np.dtype]], n: int) -> dict[str, np.ndarray]:
    """Uninitialised columns of ``n`` rows in memory from Arrow's pool.

    A block's columns are up to 128 MiB: numpy takes each from the kernel as a fresh mapping, whose
    every page faults and is zeroed on first write, and returns it when the block is freed. Arrow's
    pool keeps freed memory for the next block: read tasks ran 1.3-1.6x faster in-process (2 cores).
    The block holds the buffers (Arrow wraps the arrays without a copy), so memory returns to the
    pool only when Ray is done with the block.
    """
    columns = {}
    for name, (shape, dtype) in shapes.items():
        count = n * math.prod(shape)
        buffer = pa.allocate_buffer(count * dtype.itemsize)
        columns[name] = np.frombuffer(buffer, dtype, count).reshape(n, *shape)
    return columns


def read_blocks(spec: ReadTaskSpec) -> Iterator[Block]:
    """The body of one read task: Arrow blocks of ``spec.rows_per_block`` samples."""
    os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
    faults.fail_once("read_jasper", f"injected transient I/O error reading {spec.dataset.path}")
    source = ReaderSource(open_in_process(spec.dataset), spec.precision)
    reader = source.reader
    dim, n_neg = int(reader.config["embedding_dim"]), int(reader.config["n_neg"])
    shapes = column_shapes(spec.columns, dim, n_neg, spec.precision)
    keys = [c for c in spec.columns if c != PAIR_ID]
    probs = spec.schedule.probs(spec.epoch)
    for a in range(0, len(spec.ids), spec.rows_per_block):
        chunk = spec.ids[a : a + spec.rows_per_block]
        out = pooled_columns(shapes, len(chunk))
        assemble_batch(source, chunk, steering_variants(chunk, spec.epoch, spec.seed, probs), keys, out)
        if PAIR_ID in spec.columns:
            out[PAIR_ID][...] = chunk
        yield BlockAccessor.batch_to_block({c: out[c] for c in spec.columns})


class JasperDatasource(Datasource):
    """Read tasks over one split of a JASPER dataset; see the module docstring."""

    def __init__(
        self,
        path: str | os.PathLike,
        split: str = "train",
        *,
        epoch: int = 0,
        seed: int = DEFAULT_SEED,
        storage_format: StorageFormat = "auto",
        columns: list[str] | None = None,
        rows_per_block: int | None = None,
        shuffle: bool = False,
        use_mmap: bool = True,
        validate: bool = True,
        filesystem: pafs.FileSystem | None = None,
        cache_dir: str | os.PathLike | None = None,
        cache_limit: int | None = None,
        min_task_bytes: int | None = None,
        dtype: object = None,
        verify: VerifyMode = "first-touch",
    ):
        self.columns = tuple(COLUMNS if columns is None else columns)
        unknown = [c for c in self.columns if c not in COLUMNS]
        if unknown:
            raise ValueError(f"unknown column(s) {unknown}; read_jasper columns are {list(COLUMNS)}")
        cache = None if cache_dir is None else os.fspath(cache_dir)
        # "open" checks everything here, in the driver, once; read tasks then check nothing more.
        tasks_verify: VerifyMode = "off" if check_verify_mode(verify) == "open" else verify
        where = locate(path, filesystem)
        self.dataset = DatasetRef(where, storage_format, bool(use_mmap), cache, cache_limit, tasks_verify)
        reader = self.dataset.open(verify)
        try:
            if validate:
                validate_dataset(reader)  # once, here in the driver: the tasks then read known-good files
            config = reader.config
            self.ids = np.sort(np.asarray(reader.split(split), dtype=np.int64))
            self.n_pairs = reader.n_pairs
            self.precision = output_precision(dtype, reader.precision)
            stored_itemsize = reader.dtype("steering_centroid").itemsize  # chunks are cut by stored bytes
        finally:
            reader.close()  # the driver keeps names only; tasks open their own
        self.schedule = SteeringSchedule(config)
        self.split, self.seed, self.shuffle = split, int(seed), bool(shuffle)
        self.epoch = check_epoch(epoch)
        self.passes = 0  # executions started so far (NOTE [passes over one read_jasper Dataset])
        self._lock = threading.Lock()
        self.dim, self.n_neg = int(config["embedding_dim"]), int(config["n_neg"])
        self.row_bytes = row_bytes(self.columns, self.dim, self.n_neg, self.precision)
        self.block_bytes = block_bytes()
        self.rows_per_block = rows_per_block or max(1, self.block_bytes // max(1, self.row_bytes))
        self.align = rows_per_chunk((self.n_pairs, self.dim), stored_itemsize)
        self.unit_rows = self.align * max(1, -(-MIN_ROWS_PER_TASK // self.align))
        task_bytes = self.block_bytes if min_task_bytes is None else int(min_task_bytes)
        self.min_task_rows = max(MIN_ROWS_PER_TASK, task_bytes // max(1, self.row_bytes))
        one_row = {c: np.zeros((1, *shape), dtype) for c, (shape, dtype) in self.shapes.items()}
        self.schema = BlockAccessor.batch_to_block(one_row).schema  # so schema() never runs a pass

    @property
    def shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Per column: one row's shape and dtype."""
        return column_shapes(self.columns, self.dim, self.n_neg, self.precision)

    @property
    def next_epoch(self) -> int:
        """The epoch the next execution of a Dataset over this datasource reads."""
        return self.epoch + self.passes

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def default_num_tasks(self, cpus: int) -> int:
        """Read tasks when the caller names none: two per CPU, more where a task would carry over a block."""
        n = len(self.ids)
        by_cpus = min(2 * max(1, cpus), math.ceil(n / MIN_ROWS_PER_TASK))
        return max(1, by_cpus, math.ceil(n * self.row_bytes / self.block_bytes))

    def get_name(self) -> str:
        return f"Jasper({self.split})"  # Ray names the operator Read + this: ReadJasper(train)

    def estimate_inmemory_data_size(self) -> int:
        return len(self.ids) * self.row_bytes

    def get_read_tasks(
        self,
        parallelism: int,
        per_task_row_limit: int | None = None,
        data_context: DataContext | None = None,
        **_: Any,  # arguments of Ray versions after 2.60
    ) -> list[ReadTask]:
        """About ``parallelism`` read tasks (fewer when a task would carry under ``min_task_bytes``); no I/O.

        A call with ``data_context`` starts an execution: it reads the next pass's epoch and counts the pass.
        """
        with self._lock:
            epoch = self.next_epoch
            if data_context is not None:
                self.passes += 1
        n_tasks = max(1, min(parallelism, math.ceil(len(self.ids) / self.min_task_rows)))
        pieces = task_pieces(self.ids, n_tasks, self.align, self.unit_rows, self.shuffle, self.seed, epoch)
        extra: dict[str, Any] = {"schema": self.schema} if _TASK_SCHEMA else {}
        if per_task_row_limit is not None:
            extra["per_task_row_limit"] = per_task_row_limit
        tasks = []
        for ids in pieces:
            spec = ReadTaskSpec(
                self.dataset, self.schedule, ids, epoch, self.seed, self.columns, self.rows_per_block, self.precision
            )
            metadata = BlockMetadata(
                num_rows=len(ids), size_bytes=len(ids) * self.row_bytes, input_files=None, exec_stats=None
            )
            tasks.append(ReadTask(functools.partial(read_blocks, spec), metadata, **extra))
        return tasks
