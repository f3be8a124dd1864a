"""Passes over one ``read_jasper`` Dataset are successive epochs (NOTE [passes over one read_jasper Dataset]).

On the shared ``ray_session`` (2 CPUs) and the session's small dataset converted to contiguous HDF5. The
reference for every pass is the local ``JASPERSteeringDataset`` at that pass's epoch, never read_jasper.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jasper_ray import JASPERSteeringDataset
from jasper_ray.ray_data import read_jasper

pytestmark = pytest.mark.usefixtures("ray_session")
FIRST_EPOCH = 3
JOIN_S = 120


@pytest.fixture(scope="module")
def data(converted: Any) -> Path:
    return converted(None)


@pytest.fixture(scope="module")
def local_epochs(data: Path) -> dict[int, dict[str, np.ndarray]]:
    """epoch -> the local dataset's whole train split at that epoch, rows sorted by pair id, plus pair_id."""
    out = {}
    for epoch in range(FIRST_EPOCH, FIRST_EPOCH + 3):
        local = JASPERSteeringDataset(data, "train", epoch)
        try:
            batch = {k: v.numpy() for k, v in local.get_batch(np.arange(len(local))).items()}
            batch["pair_id"] = local.split_indices.numpy().copy()
        finally:
            local.close()
        order = np.argsort(batch["pair_id"], kind="stable")
        out[epoch] = {k: v[order] for k, v in batch.items()}
    # Epochs draw different variants, or these tests could not tell epochs apart.
    assert (out[FIRST_EPOCH]["steering_variant"] != out[FIRST_EPOCH + 1]["steering_variant"]).mean() > 0.3
    return out


def by_pair(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    order = np.argsort(cols["pair_id"], kind="stable")
    return {k: np.asarray(v)[order] for k, v in cols.items()}


def assert_epoch(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """Each pair once, every value bit for bit the local dataset's at that epoch."""
    got = by_pair(got)
    np.testing.assert_array_equal(got["pair_id"], want["pair_id"])  # sorted: no pair twice, none missing
    for key, value in got.items():
        np.testing.assert_array_equal(value, want[key], err_msg=key)


def rows_of_numpy_batches(batches: Iterator[dict[str, Any]]) -> dict[str, np.ndarray]:
    parts = [{k: np.asarray(v) for k, v in b.items()} for b in batches]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_rays_hook_one_data_context_call_per_execution() -> None:
    """What the pass counter rests on (Ray 2.60): every execution calls get_read_tasks once with a data_context;
    planning calls, count() and schema() (read tasks with a schema) pass none; a materialized dataset none."""
    import ray.data
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockAccessor, BlockMetadata

    calls: list[bool] = []
    block = BlockAccessor.batch_to_block({"x": np.arange(10)})

    class Spy(Datasource):
        def estimate_inmemory_data_size(self) -> int:
            return 80

        def get_read_tasks(self, parallelism: int, per_task_row_limit: Any = None, data_context: Any = None) -> list:
            calls.append(data_context is not None)
            meta = BlockMetadata(num_rows=10, size_bytes=80, input_files=None, exec_stats=None)
            return [ReadTask(lambda: [block], meta, schema=block.schema)]

    ds = ray.data.read_datasource(Spy())
    assert ds.count() == 10 and ds.schema().names == ["x"]
    assert sum(calls) == 0
    for executions in (1, 2):
        assert len(ds.take_all()) == 10
        assert sum(calls) == executions
    frozen = ds.materialize()
    frozen.take_all()
    frozen.take_all()
    assert sum(calls) == 3
    assert not all(calls)  # Ray's planning calls exist, and carry no data_context


def test_three_passes_are_three_epochs(data: Path, local_epochs: dict[int, dict[str, np.ndarray]]) -> None:
    """iter_batches, take_all and iter_torch_batches over one Dataset: epochs e, e+1, e+2, each shuffled anew.

    count() and schema() between passes run no pass (Ray answers them from the read tasks' metadata)."""
    ds = read_jasper(data, "train", epoch=FIRST_EPOCH, shuffle=True)
    assert ds.count() == len(local_epochs[FIRST_EPOCH]["pair_id"])
    assert "steering_variant" in ds.schema().names
    first = rows_of_numpy_batches(ds.iter_batches(batch_size=None, batch_format="numpy"))
    rows = ds.take_all()
    second = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    third = rows_of_numpy_batches(ds.iter_torch_batches(batch_size=100))
    for k, got in enumerate((first, second, third)):
        assert_epoch(got, local_epochs[FIRST_EPOCH + k])
    # A new order each pass (the per-epoch shuffle), not only new variants.
    assert (first["pair_id"] != second["pair_id"]).mean() > 0.5
    assert (second["pair_id"] != third["pair_id"]).mean() > 0.5


def test_derived_datasets_advance_the_same_passes(data: Path, local_epochs: dict[int, dict[str, np.ndarray]]) -> None:
    """A pass of a dataset derived from it (map_batches, select_columns) is a pass of the read: the next epoch."""
    ds = read_jasper(data, "train", epoch=FIRST_EPOCH, columns=["pair_id", "steering_variant"])
    doubled = ds.map_batches(lambda b: {**b, "twice": 2 * b["steering_variant"]}, batch_format="numpy")
    first = rows_of_numpy_batches(doubled.iter_batches(batch_size=None, batch_format="numpy"))
    second = rows_of_numpy_batches(ds.iter_batches(batch_size=None, batch_format="numpy"))
    for k, got in enumerate((first, second)):
        want = local_epochs[FIRST_EPOCH + k]
        got = by_pair(got)
        np.testing.assert_array_equal(got["pair_id"], want["pair_id"])
        np.testing.assert_array_equal(got["steering_variant"], want["steering_variant"])
    np.testing.assert_array_equal(by_pair(first)["twice"], 2 * local_epochs[FIRST_EPOCH]["steering_variant"])


def test_materialize_freezes_its_pass(data: Path, local_epochs: dict[int, dict[str, np.ndarray]]) -> None:
    """materialize() runs one pass and keeps it: the materialized dataset serves that epoch every time."""
    ds = read_jasper(data, "train", epoch=FIRST_EPOCH, columns=["pair_id", "steering_variant"])
    frozen = ds.materialize()
    for _ in range(2):
        got = rows_of_numpy_batches(frozen.iter_batches(batch_size=None, batch_format="numpy"))
        assert_epoch(got, {k: local_epochs[FIRST_EPOCH][k] for k in got})
    after = rows_of_numpy_batches(ds.iter_batches(batch_size=None, batch_format="numpy"))
    assert_epoch(after, {k: local_epochs[FIRST_EPOCH + 1][k] for k in after})


def consume_split_epoch(iterators: list[Any]) -> list[dict[str, np.ndarray]]:
    """One epoch of each ``streaming_split`` iterator, consumed concurrently (as they must be)."""
    seen: list[dict[str, np.ndarray]] = [{} for _ in iterators]
    errors: list[BaseException] = []

    def consume(i: int) -> None:
        try:
            seen[i] = rows_of_numpy_batches(iterators[i].iter_batches(batch_size=64, batch_format="numpy"))
        except BaseException as exc:  # surfaced in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=consume, args=(i,), daemon=True) for i in range(len(iterators))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
    assert not any(t.is_alive() for t in threads), "streaming_split consumers hung"
    assert not errors, errors
    return seen


def test_streaming_split_epochs_advance(data: Path, local_epochs: dict[int, dict[str, np.ndarray]]) -> None:
    """Each epoch of a streaming_split (Ray Train's path) is the next pass; the split's coordinator holds a
    copy of the datasource made after one driver pass, so its first epoch is e+1."""
    ds = read_jasper(data, "train", epoch=FIRST_EPOCH, shuffle=True, columns=["pair_id", "steering_variant"])
    ds.take_all()  # one pass in the driver: epoch e
    iterators = ds.streaming_split(2)
    for k in (1, 2):
        a, b = consume_split_epoch(iterators)
        assert len(a["pair_id"]) and len(b["pair_id"])
        both = {key: np.concatenate([a[key], b[key]]) for key in a}
        assert_epoch(both, {key: local_epochs[FIRST_EPOCH + k][key] for key in both})


# --- Ray Train -----------------------------------------------------------------------------------------


def record_epochs_loop(config: dict[str, Any]) -> None:
    """A Ray Train worker that trains nothing: it writes the pair ids and variants of each epoch's shard."""
    import numpy as np
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    shard = ray.train.get_dataset_shard("train")  # taken once: each iteration is the next epoch
    for epoch in range(config["epochs"]):
        ids, variants = [], []
        for batch in shard.iter_torch_batches(batch_size=128):
            ids.append(batch["pair_id"].numpy())
            variants.append(batch["steering_variant"].numpy())
        out = Path(config["out"]) / f"epoch{epoch}-rank{rank}.npz"
        np.savez(out, pair_id=np.concatenate(ids), steering_variant=np.concatenate(variants))
        ray.train.report({"epoch": epoch})


def test_ray_train_epochs_over_one_dataset(
    data: Path, local_epochs: dict[int, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    """TorchTrainer(datasets={"train": ds}), 2 workers, 2 epochs: epoch k of the run is the dataset's e+k, each
    pair at most once over both workers (equal=True drops the odd row of an odd split)."""
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    n_rows = len(local_epochs[FIRST_EPOCH]["pair_id"])
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    ds = read_jasper(data, "train", epoch=FIRST_EPOCH, shuffle=True, columns=["pair_id", "steering_variant"])
    out = tmp_path / "seen"
    out.mkdir()
    trainer = TorchTrainer(
        record_epochs_loop,
        train_loop_config={"epochs": 2, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="passes", storage_path=str(tmp_path / "runs")),
        datasets={"train": ds},
    )
    result = trainer.fit()
    assert result.error is None, result.error
    for epoch in range(2):
        parts = [np.load(out / f"epoch{epoch}-rank{rank}.npz") for rank in range(2)]
        assert len(parts[0]["pair_id"]) == len(parts[1]["pair_id"]) == n_rows // 2  # equal shards
        got = by_pair({key: np.concatenate([p[key] for p in parts]) for key in ("pair_id", "steering_variant")})
        want = local_epochs[FIRST_EPOCH + epoch]
        assert len(np.unique(got["pair_id"])) == len(got["pair_id"])  # no pair twice
        at = np.searchsorted(want["pair_id"], got["pair_id"])
        np.testing.assert_array_equal(want["pair_id"][at], got["pair_id"])  # only the split's pairs
        np.testing.assert_array_equal(got["steering_variant"], want["steering_variant"][at])
