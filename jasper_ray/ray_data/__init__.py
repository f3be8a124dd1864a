"""``read_jasper``: JASPER datasets (PT and HDF5, single or sharded) as Ray Data datasets.

A front-end floor (beside ``serve/``): it imports Ray, and nothing below it imports this package.
``plan`` cuts a split into read tasks (pure functions), ``datasource`` holds the datasource and its read
tasks' body (NOTE [passes over one read_jasper Dataset]), and this module takes Ray's reader arguments
the way ``ray.data.read_parquet`` does.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import ray
from ray.data import Dataset

from .. import faults
from ..formats import StorageFormat
from ..formats.verified import VerifyMode
from ..sampling import DEFAULT_SEED
from .datasource import DatasetRef, JasperDatasource, ReadTaskSpec, read_blocks
from .plan import COLUMNS, MIN_ROWS_PER_TASK, row_bytes, shuffle_units, task_ranges

if TYPE_CHECKING:
    import pyarrow.fs as pafs

READ_RETRIES = 3
# The oldest Ray whose executions call get_read_tasks with data_context (the pass counter's hook).
PASSES_SINCE_RAY = (2, 60)


def read_task_options(
    ray_remote_args: dict[str, Any] | None, runtime_env: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Ray options of the read tasks: retries on ``OSError``, the caller's options over them, the caller's
    ``runtime_env`` over the one in ``ray_remote_args``, and the ``faults`` variable added to (never replacing)
    its ``env_vars``."""
    # Ray Data retries only system errors by default; a transient I/O error (NFS hiccup) should retry too.
    options = {"max_retries": READ_RETRIES, "retry_exceptions": [OSError], **(ray_remote_args or {})}
    if runtime_env is not None:
        options["runtime_env"] = runtime_env
    env = faults.task_env()
    if env:
        merged = dict(options.get("runtime_env") or {})
        merged["env_vars"] = {**env, **(merged.get("env_vars") or {})}
        options["runtime_env"] = merged
    return options


def _ray_version() -> tuple[int, int]:
    major, minor = ray.__version__.split(".")[:2]
    return int(major), int(minor)


def read_jasper(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
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
    verify: VerifyMode = "first-touch",
    filesystem: pafs.FileSystem | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache_limit: int | None = None,
    concurrency: int | None = None,
    override_num_blocks: int | None = None,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    memory: float | None = None,
    runtime_env: dict[str, Any] | None = None,
    ray_remote_args: dict[str, Any] | None = None,
    dtype: str | None = None,
) -> Dataset:
    """One split of a JASPER dataset (a list of paths: their datasets concatenated) as a ``ray.data.Dataset``.

    Columns: upstream's nine sample keys (fixed-shape tensor columns) plus
    ``pair_id``; ``columns=`` reads only those asked for. Samples equal the
    local ``JASPERSteeringDataset``'s for the same (path, split, seed, epoch).

    Epochs: ``epoch`` is the first pass's; every further execution of the
    Dataset (another ``iter_*``/``take_all``, the next Ray Train epoch through
    ``streaming_split``/``get_dataset_shard``) reads the next epoch, so one
    Dataset serves a whole training run with its curriculum and a new
    shuffle per epoch. ``materialize()`` freezes the pass it ran. See NOTE
    [passes over one read_jasper Dataset]. Shuffling: NOTE [shuffling in
    read_jasper]. ``streaming_split(n)`` covers every row;
    ``streaming_split(n, equal=True)`` (what Ray Train uses) may drop up to
    n-1 rows per epoch to keep shards equal.

    The dataset is validated once, here (``validate_dataset``; the local
    dataset's checks), unless ``validate=False``. ``verify`` is the local
    dataset's: ``"first-touch"`` (each read task checks every checksum block
    its reads touch, once per worker process), ``"open"`` (everything checked
    once, here in the driver, before any task runs), ``"off"`` (NOTE
    [first-touch verification]); a changed byte raises ``ChecksumError``. Paths may be ``pyarrow.fs``
    URIs (``s3://...``) or paths inside ``filesystem``; ``cache_dir`` and
    ``cache_limit`` are the node-local cache's (``open_dataset``). Every read
    task reopens the dataset from the path or URI given here, through its own
    node's cache, never from the driver's copy.

    ``dtype``: the embedding columns' from a 16-bit dataset: float32 (None, decoded in the read tasks), or
    the stored "float16" or "bfloat16" (Arrow has no bfloat16: uint16 columns of its bits; in torch,
    ``.view(torch.bfloat16)``). docs/formats.md.

    Ray's reader arguments, as ``ray.data.read_parquet`` takes them:
    ``concurrency``, ``num_cpus``, ``num_gpus``, ``memory``, ``runtime_env``
    and ``ray_remote_args`` (read tasks retry ``OSError`` ``READ_RETRIES``
    times unless it says otherwise). ``override_num_blocks`` sets the number
    of read tasks per path; by default two per CPU of the cluster, or more
    where a task would carry over one block of Ray's target size (not Ray's
    200: see ``plan.DEFAULT_BLOCK_BYTES``).
    """
    if _ray_version() < PASSES_SINCE_RAY:
        warnings.warn(
            f"Ray {ray.__version__} gives read_jasper no hook for a pass number: every pass over this Dataset "
            f"reads epoch {epoch}. Use Ray >= {'.'.join(map(str, PASSES_SINCE_RAY))}, or one read_jasper per epoch.",
            stacklevel=2,
        )
    path_list = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    sources = [
        JasperDatasource(
            path,
            split,
            epoch=epoch,
            seed=seed,
            storage_format=storage_format,
            columns=columns,
            rows_per_block=rows_per_block,
            shuffle=shuffle,
            use_mmap=use_mmap,
            validate=validate,
            verify=verify,
            filesystem=filesystem,
            cache_dir=cache_dir,
            cache_limit=cache_limit,
            min_task_bytes=0,  # the number of tasks is decided here: honoured down to MIN_ROWS_PER_TASK rows a task
            dtype=dtype,
        )
        for path in path_list
    ]
    if not sources:
        raise ValueError("read_jasper needs at least one path")
    for other in sources[1:]:
        if other.shapes != sources[0].shapes:
            raise ValueError(
                f"read_jasper cannot concatenate {sources[0].dataset.path} and {other.dataset.path}: "
                f"their samples differ in shape (embedding_dim {sources[0].dim} vs {other.dim}, "
                f"n_neg {sources[0].n_neg} vs {other.n_neg})"
            )
    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else (os.cpu_count() or 1)
    options = read_task_options(ray_remote_args, runtime_env)
    datasets = []
    for source in sources:
        with warnings.catch_warnings():
            # Ray 2.60 deprecates ray_remote_args, but names no parameter for max_retries / retry_exceptions.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            datasets.append(
                ray.data.read_datasource(
                    source,
                    override_num_blocks=override_num_blocks or source.default_num_tasks(cpus),
                    concurrency=concurrency,
                    num_cpus=num_cpus,
                    num_gpus=num_gpus,
                    memory=memory,
                    ray_remote_args=options,
                )
            )
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


__all__ = [
    "COLUMNS",
    "MIN_ROWS_PER_TASK",
    "READ_RETRIES",
    "DatasetRef",
    "JasperDatasource",
    "ReadTaskSpec",
    "read_blocks",
    "read_jasper",
    "read_task_options",
    "row_bytes",
    "shuffle_units",
    "task_ranges",
]
