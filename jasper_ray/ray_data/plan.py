"""How ``read_jasper`` cuts a split into read tasks and blocks: pure functions of ids and sizes, no I/O.

Floor: ray_data (a Ray front-end), though this module imports no Ray but its ``DataContext`` for the
target block size.

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

import numpy as np
from ray.data import DataContext

from ..assembly import PAIR_ID, SAMPLE_KEYS, sample_dtype
from ..sampling import uniform_hash

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
SHUFFLE_STREAM = 1  # uniform_hash stream of the row order within a unit (0 draws the steering variants)
_U64 = 0xFFFFFFFFFFFFFFFF


def block_bytes() -> int:
    """Ray's target block size (``DataContext.target_max_block_size``), the size read_jasper's blocks aim at."""
    return int(DataContext.get_current().target_max_block_size or DEFAULT_BLOCK_BYTES)


def column_shapes(
    columns: tuple[str, ...], dim: int, n_neg: int, precision: str = "float32"
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per column: the shape of one row and its dtype (what the read tasks yield; embeddings at ``precision``)."""
    sizes = {"D": dim, "NEG": n_neg}
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for col in columns:
        if col == PAIR_ID:
            out[col] = ((), np.dtype(np.int64))
        else:
            shape = SAMPLE_KEYS[col][0]
            out[col] = (tuple(sizes[s] for s in shape), sample_dtype(col, precision))
    return out


def row_bytes(columns: tuple[str, ...], dim: int, n_neg: int, precision: str = "float32") -> int:
    """Bytes of one row of ``columns`` as numpy columns (Ray's size estimates)."""
    shapes = column_shapes(columns, dim, n_neg, precision)
    return sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for shape, dtype in shapes.values())


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


def task_pieces(
    sorted_ids: np.ndarray, n_tasks: int, align: int, unit_rows: int, shuffle: bool, seed: int, epoch: int
) -> list[np.ndarray]:
    """Each read task's pair ids, in the order its rows come out: chunk-aligned runs of the sorted split,
    or (shuffled) consecutive units of the epoch's order, which does not depend on ``n_tasks``."""
    if not shuffle:
        return [sorted_ids[a:b] for a, b in task_ranges(sorted_ids, n_tasks, align)]
    ids, bounds = shuffle_units(sorted_ids, unit_rows, seed, epoch)
    cuts = np.searchsorted(bounds, [k * len(ids) // n_tasks for k in range(1, n_tasks)])
    edges = sorted({0, len(ids), *bounds[cuts].tolist()})
    return [ids[a:b] for a, b in zip(edges, edges[1:]) if b > a]
