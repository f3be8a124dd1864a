"""``read_jasper``: the Ray Data adapter, on the shared ``ray_session`` (2 CPUs).

One small synthetic dataset (1500 pairs, D=32, n_neg=4: three 512-row HDF5
chunks per pair tensor) in four layouts: PT, gzip HDF5, contiguous
(memory-mapped) HDF5, and sharded gzip HDF5 (``jasper_ray.convert`` on the
test session). HDF5 copies are written by the single-process writer, except
the sharded one. The reference for every sample is the local
``JASPERSteeringDataset`` over the same files, never ``read_jasper`` itself.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from jasper_ray import SAMPLE_KEYS, JASPERSteeringDataset, convert, convert_pt_to_hdf5, synth_dataset
from jasper_ray.faults import FAIL_ONCE_ENV, fail_once_env
from jasper_ray.ray_data import (
    MIN_ROWS_PER_TASK,
    READ_RETRIES,
    JasperDatasource,
    read_jasper,
    read_task_options,
    shuffle_units,
    task_ranges,
)
from jasper_ray.schema import HDF5_FILE, TENSOR

pytestmark = pytest.mark.usefixtures("ray_session")

SMALL = {"n_pairs": 1500, "dim": 32, "n_neg": 4, "seed": 5}
DIM, NEG = SMALL["dim"], SMALL["n_neg"]
REPO = Path(__file__).resolve().parents[1]
# What each layout is called here -> (fixture key, storage_format for both readers).
LAYOUTS = {"gzip": "hdf5", "contiguous": "hdf5", "pt": "pt", "sharded": "hdf5"}
JOIN_S = 120


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def quiet_progress(ray_session: Any) -> Iterator[None]:
    """No progress bars in test output (restored after the module)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    old = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    yield
    ctx.enable_progress_bars = old


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory, ray_session: Any) -> dict[str, Path]:
    """layout -> dataset directory (the HDF5 ones also hold the PT sources they came from)."""
    root = tmp_path_factory.mktemp("ray-data")
    pt = synth_dataset(root / "pt", **SMALL)
    out = {"pt": pt}
    for name, compression in (("gzip", "gzip"), ("contiguous", None)):
        out[name] = Path(shutil.copytree(pt, root / name))
        convert_pt_to_hdf5(out[name], compression, progress=False)
    out["sharded"] = Path(shutil.copytree(pt, root / "sharded"))
    convert(out["sharded"], compression="gzip", layout="sharded", shard_bytes=16 << 10, progress=False)
    assert not (out["sharded"] / HDF5_FILE).exists()
    return out


@pytest.fixture(scope="module")
def split_ids(dirs: dict[str, Path]) -> dict[str, np.ndarray]:
    """split -> its pair ids, sorted, read with torch.load (not through jasper_ray's readers)."""
    return {s: np.sort(torch.load(dirs["pt"] / f"{s}_idx.pt", weights_only=True).numpy()) for s in ("train", "val")}


@contextmanager
def preserve_order() -> Iterator[None]:
    """Ray Data delivers blocks in task order inside this block (datasets must be created inside it)."""
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    old = options.preserve_order
    options.preserve_order = True
    try:
        yield
    finally:
        options.preserve_order = old


# --- helpers --------------------------------------------------------------------------------------


def columns_of(ds: Any) -> dict[str, np.ndarray]:
    """Every row of a Ray dataset as numpy columns, in delivery order."""
    parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    assert parts, "the dataset yielded no blocks"
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def by_pair(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    order = np.argsort(cols["pair_id"], kind="stable")
    return {key: value[order] for key, value in cols.items()}


def local_samples(directory: Path, storage_format: str, split: str, epoch: int) -> dict[str, np.ndarray]:
    """The local dataset's batch over the whole split, rows sorted by pair id, plus ``pair_id``."""
    local = JASPERSteeringDataset(directory, split, epoch, storage_format=storage_format)
    try:
        batch = local.get_batch(np.arange(len(local)))
        out = {key: value.numpy() for key, value in batch.items()}
        out["pair_id"] = local.split_indices.numpy().copy()
    finally:
        local.close()
    return by_pair(out)


def assert_same_samples(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want) == {*SAMPLE_KEYS, "pair_id"}
    np.testing.assert_array_equal(got["pair_id"], want["pair_id"])
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert got[key].shape == want[key].shape, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)  # exact: same bytes


def pair_ids(ds: Any) -> np.ndarray:
    return columns_of(ds.select_columns(["pair_id"]))["pair_id"]


def h5_chunk_rows(directory: Path) -> int:
    with h5py.File(directory / HDF5_FILE, "r") as f:
        return int(f[TENSOR["steering_centroid"].h5_path].chunks[0])


# --- same samples as the local dataset ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "split", "epoch", "shuffle"),
    [
        ("gzip", "train", 0, False),
        ("gzip", "train", 7, True),
        ("contiguous", "train", 0, False),
        ("contiguous", "val", 4, True),
        ("pt", "train", 0, False),
        ("pt", "train", 3, True),
        ("sharded", "train", 2, False),
    ],
)
def test_same_samples_as_local_dataset(
    dirs: dict[str, Path], layout: str, split: str, epoch: int, shuffle: bool
) -> None:
    """The multiset of samples equals JASPERSteeringDataset's, key for key, value for value."""
    fmt = LAYOUTS[layout]
    want = local_samples(dirs[layout], fmt, split, epoch)
    got = by_pair(
        columns_of(
            read_jasper(dirs[layout], split, epoch=epoch, storage_format=fmt, shuffle=shuffle, rows_per_block=97)
        )
    )
    assert_same_samples(got, want)
    # Every variant is drawn, so "steering" really mixes zero, centroid, keyword and residual rows.
    assert set(np.unique(got["steering_variant"])) == {0, 1, 2, 3}
    assert not got["steering"][got["steering_variant"] == 0].any()


def test_h5_file_path_and_epochs_differ(dirs: dict[str, Path]) -> None:
    """A path to the .h5 file reads the same samples; another epoch draws other variants."""
    h5 = dirs["contiguous"] / HDF5_FILE
    got = by_pair(columns_of(read_jasper(h5, "train", epoch=5)))
    assert_same_samples(got, local_samples(dirs["contiguous"], "hdf5", "train", 5))
    other = by_pair(columns_of(read_jasper(h5, "train", epoch=0, columns=["steering_variant", "pair_id"])))
    assert (other["steering_variant"] != got["steering_variant"]).mean() > 0.3


def test_epoch_follows_the_curriculum(dirs: dict[str, Path], tmp_path: Path) -> None:
    """A linear curriculum moves P(zero) from 0.7 to 0.1 over 10 epochs; read_jasper's variants follow it."""
    copy = Path(shutil.copytree(dirs["pt"], tmp_path / "ds"))
    config = json.loads((copy / "config.json").read_text())
    config["curriculum"] = {"mode": "linear", "zero_prob_start": 0.7, "zero_prob_end": 0.1, "epochs_total": 10}
    (copy / "config.json").write_text(json.dumps(config))
    for epoch, p_zero in ((0, 0.7), (10, 0.1)):
        got = by_pair(columns_of(read_jasper(copy, "train", epoch=epoch, storage_format="pt")))
        assert abs((got["steering_variant"] == 0).mean() - p_zero) < 0.05
        assert_same_samples(got, local_samples(copy, "pt", "train", epoch))


def pair_ids_and(ds: Any, key: str) -> np.ndarray:
    return by_pair(columns_of(ds.select_columns(["pair_id", key])))[key]


# --- every pair exactly once per epoch ----------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "gzip", "pt", "sharded"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_every_pair_once_per_epoch(
    dirs: dict[str, Path], split_ids: dict[str, np.ndarray], layout: str, shuffle: bool
) -> None:
    ids = pair_ids(
        read_jasper(
            dirs[layout], "train", epoch=1, shuffle=shuffle, storage_format=LAYOUTS[layout], override_num_blocks=8
        )
    )
    np.testing.assert_array_equal(np.sort(ids), split_ids["train"])  # sorted multiset: no pair twice, none missing


# --- shuffling ------------------------------------------------------------------------------------------


def ordered_ids(directory: Path, override_num_blocks: int | None = 8, **kwargs: Any) -> np.ndarray:
    with preserve_order():
        ds = read_jasper(directory, "train", override_num_blocks=override_num_blocks, rows_per_block=50, **kwargs)
        return pair_ids(ds)


def test_shuffle_reproducible_and_epoch_and_seed_dependent(
    dirs: dict[str, Path], split_ids: dict[str, np.ndarray]
) -> None:
    d = dirs["contiguous"]
    first = ordered_ids(d, shuffle=True, epoch=3, seed=1)
    np.testing.assert_array_equal(first, ordered_ids(d, shuffle=True, epoch=3, seed=1))
    np.testing.assert_array_equal(np.sort(first), split_ids["train"])
    assert not np.array_equal(first, split_ids["train"])
    other_epoch = ordered_ids(d, shuffle=True, epoch=4, seed=1)
    other_seed = ordered_ids(d, shuffle=True, epoch=3, seed=2)
    for other in (other_epoch, other_seed):
        np.testing.assert_array_equal(np.sort(other), split_ids["train"])
        assert (other != first).mean() > 0.9


def test_no_shuffle_is_sorted_by_pair_id(dirs: dict[str, Path], split_ids: dict[str, np.ndarray]) -> None:
    for layout in ("contiguous", "pt"):
        ids = ordered_ids(dirs[layout], storage_format=LAYOUTS[layout])
        np.testing.assert_array_equal(ids, split_ids["train"])


def test_shuffle_does_not_depend_on_parallelism(dirs: dict[str, Path], split_ids: dict[str, np.ndarray]) -> None:
    """Same (seed, epoch), same order, however many read tasks Ray asks for (cluster size, placement groups)."""
    d = dirs["contiguous"]
    orders = [ordered_ids(d, override_num_blocks=k, shuffle=True, epoch=2, seed=9) for k in (None, 1, 2, 3, 8)]
    for order in orders[1:]:
        np.testing.assert_array_equal(order, orders[0])
    np.testing.assert_array_equal(np.sort(orders[0]), split_ids["train"])


def test_shuffle_is_unit_order_plus_permutation_within_chunk_aligned_units(
    dirs: dict[str, Path], split_ids: dict[str, np.ndarray]
) -> None:
    """As documented: units of whole HDF5 chunks come in a seeded order, each unit's rows permuted."""
    chunk = h5_chunk_rows(dirs["gzip"])
    assert SMALL["n_pairs"] // chunk >= 2  # several chunks, or this test proves nothing
    ids = ordered_ids(dirs["gzip"], shuffle=True, epoch=0)
    chunk_of = ids // chunk
    runs = chunk_of[np.r_[0, np.flatnonzero(np.diff(chunk_of)) + 1]]
    assert len(runs) == len(set(runs.tolist())) == len(np.unique(split_ids["train"] // chunk))
    orders = {tuple(runs.tolist())}
    for epoch in range(1, 6):
        ids = ordered_ids(dirs["gzip"], shuffle=True, epoch=epoch)
        chunk_of = ids // chunk
        orders.add(tuple(chunk_of[np.r_[0, np.flatnonzero(np.diff(chunk_of)) + 1]].tolist()))
    assert len(orders) > 1  # the units' order changes with the epoch, not only the rows within units


def test_shuffle_units() -> None:
    ids = np.sort(np.random.default_rng(0).choice(10_000, 7000, replace=False))
    order, bounds = shuffle_units(ids, 512, seed=3, epoch=1)
    np.testing.assert_array_equal(np.sort(order), ids)
    units = [order[a:b] for a, b in zip(bounds, bounds[1:])]
    assert all(len(np.unique(u // 512)) == 1 for u in units)  # a unit is one aligned block of pair rows
    assert len({int(u[0]) // 512 for u in units}) == len(units) == len(np.unique(ids // 512))
    assert [int(u[0]) // 512 for u in units] != sorted(int(u[0]) // 512 for u in units)
    assert not all(np.all(np.diff(u) > 0) for u in units)  # rows permuted within units
    again, _ = shuffle_units(ids, 512, seed=3, epoch=1)
    np.testing.assert_array_equal(order, again)
    for other in (shuffle_units(ids, 512, seed=3, epoch=2)[0], shuffle_units(ids, 512, seed=4, epoch=1)[0]):
        assert (other != order).mean() > 0.9
    empty, empty_bounds = shuffle_units(ids[:0], 512, 0, 0)
    assert len(empty) == 0 and empty_bounds.tolist() == [0]


def test_task_ranges_align_to_chunks() -> None:
    ids = np.sort(np.random.default_rng(0).choice(10_000, 7000, replace=False))
    for n_tasks in (1, 3, 8, 50):
        ranges = task_ranges(ids, n_tasks, 512)
        assert ranges[0][0] == 0 and ranges[-1][1] == len(ids)
        assert all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:]))  # contiguous, no gaps
        assert all(int(ids[a]) // 512 != int(ids[a - 1]) // 512 for a, _ in ranges[1:])  # boundaries on chunks
        assert len(ranges) <= n_tasks
    assert task_ranges(ids[:0], 4, 512) == []


# --- streaming_split ----------------------------------------------------------------------------------


def consume_split(ds: Any, n: int, equal: bool) -> list[list[int]]:
    """Ids seen by each of ``n`` consumers of ``streaming_split``, iterating concurrently (as they must)."""
    iterators = ds.streaming_split(n, equal=equal)
    seen: list[list[int]] = [[] for _ in range(n)]
    errors: list[BaseException] = []

    def consume(i: int) -> None:
        try:
            for batch in iterators[i].iter_batches(batch_size=64):
                seen[i].extend(batch["pair_id"].tolist())
        except BaseException as exc:  # surfaced in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=consume, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
    assert not any(t.is_alive() for t in threads), "streaming_split consumers hung"
    assert not errors, errors
    return seen


def test_streaming_split_covers_the_split(dirs: dict[str, Path], split_ids: dict[str, np.ndarray]) -> None:
    ds = read_jasper(dirs["contiguous"], "train", shuffle=True, columns=["pair_id"], override_num_blocks=8)
    a, b = consume_split(ds, 2, equal=False)
    assert a and b
    np.testing.assert_array_equal(np.sort(a + b), split_ids["train"])


def test_streaming_split_equal_drops_at_most_n_minus_1(dirs: dict[str, Path], split_ids: dict[str, np.ndarray]) -> None:
    """equal=True (what Ray Train uses) keeps shards equal and may drop up to n-1 rows: read_jasper says so."""
    assert "equal=True" in read_jasper.__doc__ and "n-1" in read_jasper.__doc__
    n_rows = len(split_ids["train"])
    n = next(k for k in (3, 2, 4, 5) if n_rows % k)  # consumers that cannot share the rows equally
    ds = read_jasper(dirs["contiguous"], "train", shuffle=True, columns=["pair_id"], override_num_blocks=8)
    shards = consume_split(ds, n, equal=True)
    seen = np.concatenate([np.array(s, dtype=np.int64) for s in shards])
    assert len({len(s) for s in shards}) == 1  # equal: hence at least one row dropped
    assert len(np.unique(seen)) == len(seen)
    assert np.isin(seen, split_ids["train"]).all()
    assert 1 <= n_rows - len(seen) <= n - 1


# --- columns and projection ---------------------------------------------------------------------------------

PROJECTION = ["question_emb", "steering", "pair_id"]


@pytest.mark.parametrize("layout", ["contiguous", "pt"])
def test_columns_reads_only_those(dirs: dict[str, Path], layout: str) -> None:
    ds = read_jasper(dirs[layout], "train", epoch=2, columns=PROJECTION, storage_format=LAYOUTS[layout])
    assert ds.schema().names == PROJECTION
    got = by_pair(columns_of(ds))
    assert list(got) == PROJECTION
    want = local_samples(dirs[layout], LAYOUTS[layout], "train", 2)
    for key in PROJECTION:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def break_negatives(directory: Path, layout: str) -> None:
    """Make the negative tensors unreadable (the rest of the dataset stays intact)."""
    if layout == "contiguous":
        with h5py.File(directory / HDF5_FILE, "r+") as f:
            for name in ("hard_negatives", "negative_tiers"):
                del f[TENSOR[name].h5_path]
    else:
        for name in ("hard_negatives", "negative_tiers"):
            (directory / TENSOR[name].pt_file).write_bytes(b"not a torch file")


@pytest.mark.parametrize("layout", ["contiguous", "pt"])
def test_projection_does_not_touch_negatives(dirs: dict[str, Path], tmp_path: Path, layout: str) -> None:
    broken = Path(shutil.copytree(dirs[layout], tmp_path / "broken"))
    break_negatives(broken, layout)
    fmt = LAYOUTS[layout]
    # validate=False: validation reads the negatives (it refuses this dataset; tested elsewhere).
    got = by_pair(columns_of(read_jasper(broken, "train", columns=PROJECTION, storage_format=fmt, validate=False)))
    want = local_samples(dirs[layout], fmt, "train", 0)
    for key in PROJECTION:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    # The same files with the default columns do need the negatives, and fail (no retries: not transient).
    with pytest.raises(Exception, match="hard_negatives|negative_tiers|not a torch|zip"):
        columns_of(read_jasper(broken, "train", storage_format=fmt, validate=False, ray_remote_args={"max_retries": 0}))


def test_unknown_column_rejected(dirs: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="unknown column"):
        read_jasper(dirs["pt"], "train", columns=["question_emb", "nope"])


# --- torch batches -----------------------------------------------------------------------------------------


# Run in a fresh interpreter: torch warns about a read-only array once per process, so in the test
# session an earlier test may have spent the warning this test looks for.
READ_ONLY_CHECK = """
import json, sys, warnings
import numpy as np, ray, torch
from jasper_ray import read_jasper

def read_only_warnings(caught):
    return [str(w.message) for w in caught if "not writable" in str(w.message)]

torch.set_warn_always(True)  # the control does not spend the once-per-process warning
with warnings.catch_warnings(record=True) as control:
    warnings.simplefilter("always")
    torch.as_tensor(np.frombuffer(bytes(8), dtype=np.float32))
torch.set_warn_always(False)
ray.init(num_cpus=2, object_store_memory=256 << 20, include_dashboard=False, log_to_driver=False)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ds = read_jasper(sys.argv[1], "train", shuffle=True)
    n, shapes = 0, set()
    for batch in ds.iter_torch_batches(batch_size=128):
        shapes.add((tuple(batch["negative_embs"].shape[1:]), str(batch["negative_embs"].dtype),
                    str(batch["steering_variant"].dtype), tuple(batch["question_emb"].shape[1:])))
        batch["steering"].mul_(2)  # in place: the batch is the user's to change
        n += len(batch["pair_id"])
print(json.dumps({"control": read_only_warnings(control), "caught": read_only_warnings(caught), "rows": n,
                  "expected": len(ds.select_columns(["pair_id"]).take_all()), "shapes": sorted(map(list, shapes))}))
"""


def test_iter_torch_batches_without_read_only_warnings(dirs: dict[str, Path], ray_subprocess_env: Any) -> None:
    run = subprocess.run(
        [sys.executable, "-c", READ_ONLY_CHECK, str(dirs["contiguous"])],
        env=ray_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["control"], "the check can see the warning: torch does warn on a read-only array"
    assert seen["rows"] == seen["expected"] > 0
    assert seen["shapes"] == [[[NEG, DIM], "torch.float32", "torch.int64", [DIM]]]
    assert not seen["caught"], seen["caught"]


# --- retries ------------------------------------------------------------------------------------------------


def test_injected_failure_is_retried(dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clean = by_pair(columns_of(read_jasper(dirs["gzip"], "train", epoch=1)))
    # Without retries the injected error really fails the read...
    monkeypatch.setenv(FAIL_ONCE_ENV, fail_once_env({"read_jasper": tmp_path / "once"}))
    with pytest.raises(Exception, match="injected transient I/O error"):
        columns_of(read_jasper(dirs["gzip"], "train", ray_remote_args={"max_retries": 0}))
    # ... and with read_jasper's default retries, Ray runs the task again and the epoch is whole.
    marker = tmp_path / "marker"
    monkeypatch.setenv(FAIL_ONCE_ENV, fail_once_env({"read_jasper": marker}))
    got = by_pair(columns_of(read_jasper(dirs["gzip"], "train", epoch=1)))
    assert marker.exists()
    assert_same_samples(got, clean)


def test_read_task_options_keep_the_callers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller's options win over read_jasper's; the fault variable joins their runtime_env, replacing nothing."""
    monkeypatch.delenv(FAIL_ONCE_ENV, raising=False)
    assert read_task_options(None) == {"max_retries": READ_RETRIES, "retry_exceptions": [OSError]}
    assert read_task_options({"max_retries": 0})["max_retries"] == 0
    monkeypatch.setenv(FAIL_ONCE_ENV, "read_jasper=/tmp/marker")
    user = {"runtime_env": {"env_vars": {"A": "1"}, "pip": ["x"]}, "num_cpus": 2}
    options = read_task_options(user)
    assert options["num_cpus"] == 2
    assert options["runtime_env"] == {"env_vars": {"A": "1", FAIL_ONCE_ENV: "read_jasper=/tmp/marker"}, "pip": ["x"]}
    assert user == {"runtime_env": {"env_vars": {"A": "1"}, "pip": ["x"]}, "num_cpus": 2}  # the caller's dict unchanged
    assert read_task_options(None)["runtime_env"] == {"env_vars": {FAIL_ONCE_ENV: "read_jasper=/tmp/marker"}}
    # A test seam, not a parameter: the public signatures carry no failure hook.
    for public in (read_jasper, JasperDatasource):
        assert not [p for p in inspect.signature(public).parameters if "inject" in p]


# --- the datasource without Ray's executor ------------------------------------------------------------------


def expected_row_bytes(columns: list[str]) -> int:
    """Bytes of one row, spelled out by hand: 3 [D] float32, [NEG, D] float32, [NEG] int64, scalars."""
    sizes = {
        "question_emb": 4 * DIM,
        "target_source_emb": 4 * DIM,
        "steering": 4 * DIM,
        "negative_embs": 4 * NEG * DIM,
        "cluster_id": 8,
        "relevance": 4,
        "centroid_distance": 4,
        "steering_variant": 8,
        "negative_tiers": 8 * NEG,
        "pair_id": 8,
    }
    return sum(sizes[c] for c in columns)


@contextmanager
def no_io(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any attempt to open a file through h5py, torch.load or np.memmap fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"I/O in get_read_tasks: {args[:2]}")

    with monkeypatch.context() as mp:
        mp.setattr(h5py.File, "__init__", refuse)
        mp.setattr(torch, "load", refuse)
        mp.setattr(np, "memmap", refuse)
        yield


@pytest.mark.parametrize("layout", ["contiguous", "gzip", "pt"])
def test_get_read_tasks_does_no_io(
    dirs: dict[str, Path],
    split_ids: dict[str, np.ndarray],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    layout: str,
) -> None:
    from ray.data import DataContext

    copy = Path(shutil.copytree(dirs[layout], tmp_path / "ds"))
    source = JasperDatasource(copy, "train", storage_format=LAYOUTS[layout], shuffle=True, epoch=1, min_task_bytes=0)
    moved = copy.rename(tmp_path / "elsewhere")  # no file of the dataset is where the datasource thinks
    n_rows, row_bytes = len(split_ids["train"]), expected_row_bytes([*SAMPLE_KEYS, "pair_id"])
    with no_io(monkeypatch):
        calls = {
            "2.40": lambda: source.get_read_tasks(4),
            "2.60": lambda: source.get_read_tasks(4, per_task_row_limit=None, data_context=DataContext.get_current()),
            "metadata": lambda: source.get_read_tasks(1),
        }
        for name, call in calls.items():
            tasks = call()
            assert tasks, name
            assert sum(t.metadata.num_rows for t in tasks) == n_rows, name
            assert all(t.metadata.size_bytes == t.metadata.num_rows * row_bytes for t in tasks), name
        assert len(source.get_read_tasks(4)) > 1  # several chunks: several tasks
        limited = source.get_read_tasks(4, per_task_row_limit=10, data_context=DataContext.get_current())
        assert all(t.per_task_row_limit == 10 for t in limited)
        assert source.estimate_inmemory_data_size() == n_rows * row_bytes

    # Put the files back: each task yields exactly the rows its metadata promised.
    moved.rename(copy)
    tasks = source.get_read_tasks(4)
    seen = []
    for task in tasks:
        blocks = list(task())
        rows = sum(b.num_rows for b in blocks)
        assert rows == task.metadata.num_rows
        seen += [pid for b in blocks for pid in b.column("pair_id").to_pylist()]
    np.testing.assert_array_equal(np.sort(seen), split_ids["train"])


def test_task_sizing(dirs: dict[str, Path], split_ids: dict[str, np.ndarray]) -> None:
    """Not Ray's default of 200 read tasks: two per CPU, or more for tasks of at most one block of Ray's target size."""
    from ray.data import DataContext

    n_rows = len(split_ids["train"])
    source = JasperDatasource(dirs["contiguous"], "train")
    assert len(source.get_read_tasks(200)) == 1  # 1.3 MB of samples: one task when used directly
    assert source.default_num_tasks(2) == 4
    assert source.default_num_tasks(1000) == math.ceil(n_rows / MIN_ROWS_PER_TASK)
    assert source.block_bytes == DataContext.get_current().target_max_block_size
    assert source.default_num_tasks(1) * source.block_bytes >= n_rows * expected_row_bytes([*SAMPLE_KEYS, "pair_id"])


def test_estimate_inmemory_data_size_of_a_projection(dirs: dict[str, Path], split_ids: dict[str, np.ndarray]) -> None:
    for columns in (PROJECTION, ["negative_embs", "negative_tiers"], ["pair_id"]):
        source = JasperDatasource(dirs["gzip"], "train", columns=columns)
        assert source.estimate_inmemory_data_size() == len(split_ids["train"]) * expected_row_bytes(columns)
    # The estimate is what the numpy columns really take.
    cols = columns_of(read_jasper(dirs["gzip"], "train"))
    assert sum(v.nbytes for v in cols.values()) == len(split_ids["train"]) * expected_row_bytes(list(cols))


# --- Ray Train ----------------------------------------------------------------------------------------------


def load_train_script() -> Any:
    path = REPO / "scripts" / "train_ray.py"
    spec = importlib.util.spec_from_file_location("jasper_train_ray", path)
    module = importlib.util.module_from_spec(spec)
    # Not in sys.modules: cloudpickle then ships the train loop by value (workers cannot import this module).
    spec.loader.exec_module(module)
    return module


def test_ray_train_run(dirs: dict[str, Path], tmp_path: Path) -> None:
    """2 workers of half a CPU each (the session has 2 CPUs; read tasks need one), 3 short epochs of one
    Dataset (tests/test_ray_passes.py checks each epoch's samples)."""
    script = load_train_script()
    result = script.fit(
        dirs["contiguous"],
        epochs=3,
        num_workers=2,
        batch_size=64,
        steps_per_epoch=6,
        cpus_per_worker=0.5,
        storage_path=tmp_path / "runs",
    )
    losses = result["losses"]
    assert len(losses) == 3
    assert all(math.isfinite(x) for x in losses)
    assert result["steps"] == [6, 6, 6]  # each worker's shard (~600 rows) has 9 full batches of 64
    assert losses[-1] < losses[0]
    # Each epoch's share of each steering variant, over the samples both workers trained on.
    assert len(result["shares"]) == 3
    for shares in result["shares"]:
        assert len(shares) == 4 and abs(sum(shares) - 1.0) < 1e-9 and min(shares) > 0
