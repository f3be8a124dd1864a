"""``read_jasper``: a Ray Data datasource for JASPER datasets (PT and HDF5, single or sharded).

Each read task covers a range of pair rows aligned to the HDF5 chunks of the
per-pair tensors; it opens the files itself through the format reader
(memory-mapped) and yields the samples built by ``assemble_batch``, the same
function the local dataset uses, so a pair at an epoch is the same sample on
either path. Nothing but paths, names and the task's pair ids travels through
Ray; ``get_read_tasks`` does no I/O (the split ids and config are read once,
when ``read_jasper`` is called).

NOTE [shuffling in read_jasper]
``shuffle=True`` is a per-epoch seeded shuffle in two levels: the order of
the read tasks (row ranges) is a permutation of (seed, epoch), and each task
permutes its own rows with (seed, epoch, task). Each pair appears exactly once
per epoch. The blocks' contents are reproducible for the same (seed, epoch);
the order in which Ray delivers blocks is exactly reproducible only with
``DataContext.get_current().execution_options.preserve_order = True`` (Ray's
default favours throughput). A finer mix within a window is one call away:
``iter_batches(local_shuffle_buffer_size=..., local_shuffle_seed=...)``.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .assembly import SAMPLE_KEYS, ReaderSource, assemble_batch
from .formats import open_dataset
from .formats.hdf5 import rows_per_chunk
from .sampling import DEFAULT_SEED, SteeringSchedule, steering_variants
from .schema import TENSOR

PAIR_ID = "pair_id"
COLUMNS = (*SAMPLE_KEYS, PAIR_ID)
BLOCK_TARGET_BYTES = 32 << 20
MIN_ROWS_PER_TASK = 64
READ_RETRIES = 3
_NUMPY_DTYPE = {"float32": np.float32, "int64": np.int64}


def _require_ray():
    try:
        import ray
        from ray.data import Datasource, ReadTask
        from ray.data.block import BlockMetadata
    except ImportError as exc:
        raise ImportError("read_jasper needs Ray Data: pip install 'ray[data,train]'") from exc
    return ray, Datasource, ReadTask, BlockMetadata


def row_bytes(columns: tuple[str, ...], dim: int, n_neg: int) -> int:
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


def _read_rows(
    reader: Any,
    schedule: SteeringSchedule,
    ids: np.ndarray,
    epoch: int,
    seed: int,
    columns: tuple[str, ...],
    rows_per_block: int,
    inject_failure: str | None,
):
    """The body of one read task: yields Arrow blocks of samples."""
    from ray.data.block import BlockAccessor

    os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
    if inject_failure is not None and not Path(inject_failure).exists():
        Path(inject_failure).touch()  # fails once; Ray's retry finds the marker
        raise OSError(f"injected transient I/O error reading {reader.directory}")
    source = ReaderSource(reader)
    keys = [c for c in columns if c != PAIR_ID]
    probs = schedule.probs(epoch)
    for a in range(0, len(ids), rows_per_block):
        chunk = ids[a : a + rows_per_block]
        batch = assemble_batch(source, chunk, steering_variants(chunk, epoch, seed, probs), keys)
        out = dict(batch)
        if PAIR_ID in columns:
            out[PAIR_ID] = chunk.copy()
        yield BlockAccessor.batch_to_block({c: out[c] for c in columns})


def _datasource_class():
    ray, Datasource, ReadTask, BlockMetadata = _require_ray()

    class JasperDatasource(Datasource):
        """Read tasks over one split of a JASPER dataset; see the module docstring."""

        def __init__(
            self,
            path: str | os.PathLike,
            split: str = "train",
            *,
            epoch: int = 0,
            seed: int = DEFAULT_SEED,
            storage_format: str = "auto",
            columns: list[str] | None = None,
            rows_per_block: int | None = None,
            shuffle: bool = False,
            use_mmap: bool = True,
            _inject_failure: str | None = None,
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
            self.rows_per_block = rows_per_block or max(1, BLOCK_TARGET_BYTES // max(1, self.row_bytes))
            self.align = rows_per_chunk((self.n_pairs, self.dim), TENSOR["steering_centroid"].dtype.itemsize)
            self.inject_failure = _inject_failure
            self.reader.close()  # the driver keeps names only; tasks open their own

        def get_name(self) -> str:
            return f"ReadJasper({self.split})"

        def estimate_inmemory_data_size(self) -> int:
            return len(self.ids) * self.row_bytes

        def get_read_tasks(
            self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None, **_: Any
        ) -> list[Any]:
            n_tasks = max(1, min(parallelism, math.ceil(len(self.ids) / MIN_ROWS_PER_TASK)))
            ranges = task_ranges(self.ids, n_tasks, self.align)
            order = list(range(len(ranges)))
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch, 1]).permutation(len(ranges)).tolist()
            tasks = []
            for t in order:
                a, b = ranges[t]
                ids = self.ids[a:b]
                if self.shuffle:
                    ids = np.random.default_rng([self.seed, self.epoch, 2, t]).permutation(ids)
                metadata = BlockMetadata(
                    num_rows=len(ids), size_bytes=len(ids) * self.row_bytes, input_files=None, exec_stats=None
                )
                args = (
                    self.reader,
                    self.schedule,
                    ids,
                    self.epoch,
                    self.seed,
                    self.columns,
                    self.rows_per_block,
                    self.inject_failure,
                )
                kwargs = {"per_task_row_limit": per_task_row_limit} if per_task_row_limit is not None else {}
                tasks.append(ReadTask(lambda args=args: _read_rows(*args), metadata, **kwargs))
            return tasks

    return JasperDatasource


def JasperDatasource(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - a class, built lazily so Ray stays optional
    return _datasource_class()(*args, **kwargs)


def read_jasper(
    path: str | os.PathLike,
    split: str = "train",
    *,
    epoch: int = 0,
    seed: int = DEFAULT_SEED,
    storage_format: str = "auto",
    columns: list[str] | None = None,
    rows_per_block: int | None = None,
    shuffle: bool = False,
    use_mmap: bool = True,
    override_num_blocks: int | None = None,
    ray_remote_args: dict[str, Any] | None = None,
    _inject_failure: str | None = None,
) -> Any:
    """One split of a JASPER dataset as a ``ray.data.Dataset`` of samples.

    Columns: upstream's nine sample keys (fixed-shape tensor columns) plus
    ``pair_id``; ``columns=`` reads only those asked for. Samples equal the
    local ``JASPERSteeringDataset``'s for the same (path, split, seed, epoch).
    Shuffling: see NOTE [shuffling in read_jasper]. ``streaming_split(n)``
    covers every row; ``streaming_split(n, equal=True)`` (what Ray Train uses)
    may drop up to n-1 rows per epoch to keep shards equal.
    """
    ray, *_ = _require_ray()
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
        _inject_failure=_inject_failure,
    )
    # Ray Data retries only system errors by default; a transient I/O error (NFS hiccup) should retry too.
    remote_args = {"max_retries": READ_RETRIES, "retry_exceptions": [OSError], **(ray_remote_args or {})}
    with warnings.catch_warnings():
        # Ray 2.60 deprecates ray_remote_args but offers no named retry_exceptions parameter yet.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return ray.data.read_datasource(
            datasource, override_num_blocks=override_num_blocks, ray_remote_args=remote_args
        )
