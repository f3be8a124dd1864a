"""``read_jasper``: a Ray Data datasource for JASPER datasets (PT and HDF5, single or sharded).

A front-end floor (beside ``serve/``): it imports Ray, and nothing below it imports this module.
Each read task covers a range of pair rows aligned to the HDF5 chunks of the
per-pair tensors (shuffled: a run of chunk-aligned units); it opens the files itself through the format reader
(memory-mapped) and yields the samples built by ``assemble_batch``, the same
function the local dataset uses, so a pair at an epoch is the same sample on
either path. Nothing but a ``ReadTaskSpec`` (paths, names and the task's pair
ids) travels through Ray; ``get_read_tasks`` does no I/O (the split ids and
config are read once, when ``read_jasper`` is called).

NOTE [shuffling in read_jasper]
``shuffle=True`` is a per-epoch seeded shuffle in two levels, a pure
function of (seed, epoch) and the dataset, whatever the number of read tasks
Ray asks for (it depends on the cluster's CPUs and placement groups): the
split's pair ids are cut into units, one per aligned run of ``unit_rows``
pair rows (a multiple of the HDF5 chunk rows, so a unit reads whole chunks);
the order of the units is a permutation of (seed, epoch), and the rows of
each unit are ordered by a hash of (seed, epoch, pair id). Read tasks take
consecutive units of that order. Each pair appears exactly once per epoch.
The rows' order is reproducible for the same (seed, epoch); the order in
which Ray delivers blocks is exactly reproducible only with
``DataContext.get_current().execution_options.preserve_order = True`` (Ray's
default favours throughput). A finer mix within a window is one call away:
``iter_batches(local_shuffle_buffer_size=..., local_shuffle_seed=...)``.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray.data import DataContext, Dataset, Datasource, ReadTask
from ray.data.block import Block, BlockAccessor, BlockMetadata

from . import faults
from .assembly import PAIR_ID, SAMPLE_KEYS, ReaderSource, assemble_batch
from .formats import StorageFormat, open_dataset
from .formats.base import Reader
from .formats.chunks import rows_per_chunk
from .sampling import DEFAULT_SEED, SteeringSchedule, steering_variants, uniform_hash
from .schema import TENSOR

COLUMNS = (*SAMPLE_KEYS, PAIR_ID)
MIN_ROWS_PER_TASK = 64
# Blocks and tasks: Ray asks for >= 200 read tasks by default (DataContext.read_op_min_num_blocks) and
# splits the output of fewer tasks into that many blocks; it merges task outputs smaller than its
# target_max_block_size (128 MiB by default) by copying them; and its executor pays a few ms per task and
# per block. So read_jasper yields blocks of Ray's target size and asks for its own number of tasks
# (default_num_tasks): every CPU busy twice over, each task carrying at least one block. Measured
# (D=768, 45 KiB a sample, 2 CPUs): 200 tasks of a 260 MB split ran 3-6x slower than 4; on a 2.6 GB split
# scripts/diag_ray_costs.py gave 31.0 k rows/s for 32 MiB blocks in 41 tasks, 43.6 k for 128 MiB in 21.
DEFAULT_BLOCK_BYTES = 128 << 20
READ_RETRIES = 3
SHUFFLE_STREAM = 1  # uniform_hash stream of the row order within a unit (0 draws the steering variants)
_U64 = 0xFFFFFFFFFFFFFFFF


def block_bytes() -> int:
    """Ray's target block size (``DataContext.target_max_block_size``), the size read_jasper's blocks aim at."""
    return int(DataContext.get_current().target_max_block_size or DEFAULT_BLOCK_BYTES)


def row_bytes(columns: tuple[str, ...], dim: int, n_neg: int) -> int:
    """Bytes of one row of ``columns`` as numpy columns (Ray's size estimates)."""
    sizes = {"D": dim, "NEG": n_neg}
    total = 0
    for col in columns:
        if col == PAIR_ID:
            total += 8
            continue
        shape, dtype = SAMPLE_KEYS[col]
        total += int(np.prod([sizes[s] for s in shape], dtype=np.int64)) * dtype.itemsize
    return total


def task_ranges(sorted_ids: np.ndarray, n_tasks: int, align: int) -> list[tuple[int, int]]:
    """Split sorted pair ids into about ``n_tasks`` runs whose pair-row boundaries are multiples of ``align``."""
    if len(sorted_ids) == 0:
        return []
    bounds = {0, len(sorted_ids)}
    for k in range(1, n_tasks):
        pair_row = int(sorted_ids[k * len(sorted_ids) // n_tasks])
        snapped = -(-pair_row // align) * align
        bounds.add(int(np.searchsorted(sorted_ids, snapped)))
    edges = sorted(bounds)
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def shuffle_units(sorted_ids: np.ndarray, unit_rows: int, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """The epoch's order of the split (NOTE [shuffling in read_jasper]) and the units' boundaries in it.

    Units are the runs of ``sorted_ids`` within one block of ``unit_rows`` pair
    rows; they come in a permutation of (seed, epoch), each unit's rows ordered
    by a hash of (seed, epoch, pair id). Returns ``(ids, bounds)``: unit ``k``
    of the order is ``ids[bounds[k]:bounds[k + 1]]``.
    """
    if len(sorted_ids) == 0:
        return sorted_ids.copy(), np.zeros(1, dtype=np.int64)
    unit = sorted_ids // unit_rows
    starts = np.flatnonzero(np.r_[True, unit[1:] != unit[:-1]])
    sizes = np.diff(np.r_[starts, len(sorted_ids)])
    perm = np.random.default_rng([seed & _U64, epoch & _U64, 1]).permutation(len(starts))
    rank = np.empty_like(perm)
    rank[perm] = np.arange(len(perm))
    order = np.lexsort((uniform_hash(seed, epoch, sorted_ids, SHUFFLE_STREAM), np.repeat(rank, sizes)))
    return sorted_ids[order], np.r_[0, np.cumsum(sizes[perm])]


@dataclass(frozen=True)
class ReadTaskSpec:
    """What one read task reads: picklable, no open handle (the reader is closed; each task opens its own)."""

    reader: Reader
    schedule: SteeringSchedule
    ids: np.ndarray  # the task's pair ids, in the order its rows come out
    epoch: int
    seed: int
    columns: tuple[str, ...]
    rows_per_block: int


def read_blocks(spec: ReadTaskSpec) -> Iterator[Block]:
    """The body of one read task: Arrow blocks of ``spec.rows_per_block`` samples."""
    os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
    faults.fail_once("read_jasper", f"injected transient I/O error reading {spec.reader.directory}")
    source = ReaderSource(spec.reader)
    keys = [c for c in spec.columns if c != PAIR_ID]
    probs = spec.schedule.probs(spec.epoch)
    for a in range(0, len(spec.ids), spec.rows_per_block):
        chunk = spec.ids[a : a + spec.rows_per_block]
        batch = assemble_batch(source, chunk, steering_variants(chunk, spec.epoch, spec.seed, probs), keys)
        out = dict(batch)
        if PAIR_ID in spec.columns:
            out[PAIR_ID] = chunk.copy()
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
        min_task_bytes: int | None = None,
    ):
        self.reader = open_dataset(path, storage_format, use_mmap=use_mmap)
        self.columns = tuple(COLUMNS if columns is None else columns)
        unknown = [c for c in self.columns if c not in COLUMNS]
        if unknown:
            raise ValueError(f"unknown column(s) {unknown}; read_jasper columns are {list(COLUMNS)}")
        config = self.reader.config
        self.schedule = SteeringSchedule(config)
        self.split, self.epoch, self.seed, self.shuffle = split, int(epoch), int(seed), bool(shuffle)
        self.ids = np.sort(np.asarray(self.reader.split(split), dtype=np.int64))
        self.n_pairs = self.reader.n_pairs
        self.dim, self.n_neg = int(config["embedding_dim"]), int(config["n_neg"])
        self.row_bytes = row_bytes(self.columns, self.dim, self.n_neg)
        self.block_bytes = block_bytes()
        self.rows_per_block = rows_per_block or max(1, self.block_bytes // max(1, self.row_bytes))
        self.align = rows_per_chunk((self.n_pairs, self.dim), TENSOR["steering_centroid"].dtype.itemsize)
        self.unit_rows = self.align * max(1, -(-MIN_ROWS_PER_TASK // self.align))
        task_bytes = self.block_bytes if min_task_bytes is None else int(min_task_bytes)
        self.min_task_rows = max(MIN_ROWS_PER_TASK, task_bytes // max(1, self.row_bytes))
        self.reader.close()  # the driver keeps names only; tasks open their own

    def default_num_tasks(self, cpus: int) -> int:
        """Read tasks when the caller names none: two per CPU, more where a task would carry over a block."""
        n = len(self.ids)
        by_cpus = min(2 * max(1, cpus), math.ceil(n / MIN_ROWS_PER_TASK))
        return max(1, by_cpus, math.ceil(n * self.row_bytes / self.block_bytes))

    def get_name(self) -> str:
        return f"ReadJasper({self.split})"

    def estimate_inmemory_data_size(self) -> int:
        return len(self.ids) * self.row_bytes

    def get_read_tasks(
        self,
        parallelism: int,
        per_task_row_limit: int | None = None,
        data_context: DataContext | None = None,
        **_: Any,  # arguments of Ray versions after 2.60
    ) -> list[ReadTask]:
        """About ``parallelism`` read tasks (fewer when a task would carry under ``min_task_bytes``); no I/O."""
        n_tasks = max(1, min(parallelism, math.ceil(len(self.ids) / self.min_task_rows)))
        if self.shuffle:
            # Tasks take consecutive units of the epoch's order: the order does not depend on n_tasks.
            ids, bounds = shuffle_units(self.ids, self.unit_rows, self.seed, self.epoch)
            cuts = np.searchsorted(bounds, [k * len(ids) // n_tasks for k in range(1, n_tasks)])
            edges = sorted({0, len(ids), *bounds[cuts].tolist()})
            pieces = [ids[a:b] for a, b in zip(edges, edges[1:]) if b > a]
        else:
            pieces = [self.ids[a:b] for a, b in task_ranges(self.ids, n_tasks, self.align)]
        # Ray 2.40's ReadTask has no per_task_row_limit: pass it only when Ray gave one.
        limit = {"per_task_row_limit": per_task_row_limit} if per_task_row_limit is not None else {}
        tasks = []
        for ids in pieces:
            spec = ReadTaskSpec(
                self.reader, self.schedule, ids, self.epoch, self.seed, self.columns, self.rows_per_block
            )
            metadata = BlockMetadata(
                num_rows=len(ids), size_bytes=len(ids) * self.row_bytes, input_files=None, exec_stats=None
            )
            tasks.append(ReadTask(functools.partial(read_blocks, spec), metadata, **limit))
        return tasks


def read_task_options(ray_remote_args: dict[str, Any] | None) -> dict[str, Any]:
    """Ray options of the read tasks: retries on ``OSError``, the caller's options over them, and the
    ``faults`` variable added to (never replacing) the caller's ``runtime_env``."""
    # Ray Data retries only system errors by default; a transient I/O error (NFS hiccup) should retry too.
    options = {"max_retries": READ_RETRIES, "retry_exceptions": [OSError], **(ray_remote_args or {})}
    env = faults.task_env()
    if env:
        runtime_env = dict(options.get("runtime_env") or {})
        runtime_env["env_vars"] = {**env, **(runtime_env.get("env_vars") or {})}
        options["runtime_env"] = runtime_env
    return options


def read_jasper(
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
    override_num_blocks: int | None = None,
    ray_remote_args: dict[str, Any] | None = None,
) -> Dataset:
    """One split of a JASPER dataset as a ``ray.data.Dataset`` of samples.

    Columns: upstream's nine sample keys (fixed-shape tensor columns) plus
    ``pair_id``; ``columns=`` reads only those asked for. Samples equal the
    local ``JASPERSteeringDataset``'s for the same (path, split, seed, epoch).
    Shuffling: see NOTE [shuffling in read_jasper]. ``streaming_split(n)``
    covers every row; ``streaming_split(n, equal=True)`` (what Ray Train uses)
    may drop up to n-1 rows per epoch to keep shards equal.
    ``override_num_blocks`` sets the number of read tasks; by default two
    per CPU of the cluster, or more where a task would carry over one block
    of Ray's target size (not Ray's 200: see ``DEFAULT_BLOCK_BYTES``).
    """
    datasource = JasperDatasource(
        path,
        split,
        epoch=epoch,
        seed=seed,
        storage_format=storage_format,
        columns=columns,
        rows_per_block=rows_per_block,
        shuffle=shuffle,
        use_mmap=use_mmap,
        min_task_bytes=0,  # the number of tasks is decided here: honoured down to MIN_ROWS_PER_TASK rows a task
    )
    if override_num_blocks is None:
        cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else (os.cpu_count() or 1)
        override_num_blocks = datasource.default_num_tasks(cpus)
    with warnings.catch_warnings():
        # Ray 2.60 deprecates ray_remote_args but offers no named retry_exceptions parameter yet.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return ray.data.read_datasource(
            datasource, override_num_blocks=override_num_blocks, ray_remote_args=read_task_options(ray_remote_args)
        )
