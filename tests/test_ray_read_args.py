"""``read_jasper``'s Ray conventions and checks: Ray's reader arguments reach the read tasks, a list of paths
concatenates, the operator's name, filesystem=/cache_dir= carried to every task, and the local dataset's
validation run once, in the driver, for ``read_jasper`` and ``ShardedJasper``.

On the shared ``ray_session`` (2 CPUs) and the session's small dataset (PT, and converted to contiguous HDF5).
"""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _support import load_pt, save_pt

import jasper_ray.ray_data.datasource as datasource_module
from jasper_ray import JASPERSteeringDataset, ShardedJasper, ValidationError, synth_dataset
from jasper_ray.faults import FAIL_ONCE_ENV, fail_once_env
from jasper_ray.ray_data import JasperDatasource, read_jasper
from jasper_ray.schema import TENSOR

pytestmark = pytest.mark.usefixtures("ray_session")
COLUMNS = ["pair_id", "steering_variant"]


@pytest.fixture(scope="module")
def data(converted: Any) -> Path:
    return converted(None)


def take_columns(ds: Any) -> dict[str, np.ndarray]:
    parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def local_variants(directory: Path, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """The local dataset's (pair ids, variants) of the train split at ``epoch``, sorted by pair id."""
    local = JASPERSteeringDataset(directory, "train", epoch)
    try:
        variants = local.get_batch(np.arange(len(local)))["steering_variant"].numpy()
        ids = local.split_indices.numpy().copy()
    finally:
        local.close()
    order = np.argsort(ids)
    return ids[order], variants[order]


# --- Ray's reader arguments ------------------------------------------------------------------------------


def test_ray_arguments_reach_the_read_tasks(data: Path, tmp_path: Path) -> None:
    """runtime_env reaches the tasks (its fault variable makes one fail once, and ray_remote_args' retries
    recover); num_cpus, memory and concurrency are what Ray schedules the read operator with."""
    marker = tmp_path / "failed-once"
    env = {FAIL_ONCE_ENV: fail_once_env({"read_jasper": marker})}
    ds = read_jasper(
        data,
        "train",
        columns=["pair_id"],
        num_cpus=0.5,
        memory=64 << 20,
        concurrency=1,
        runtime_env={"env_vars": env},
        ray_remote_args={"max_retries": 1},
    )
    ids = take_columns(ds)["pair_id"]
    assert marker.exists()  # a read task saw runtime_env's variable, failed once, and was retried
    np.testing.assert_array_equal(np.sort(ids), local_variants(data, 0)[0])
    read_op = ds._logical_plan.dag  # what Ray submits each read task with
    assert read_op.name == "ReadJasper(train)"
    assert read_op.ray_remote_args["num_cpus"] == 0.5
    assert read_op.ray_remote_args["memory"] == 64 << 20
    assert read_op.ray_remote_args["max_retries"] == 1
    assert OSError in read_op.ray_remote_args["retry_exceptions"]  # read_jasper's default kept
    assert read_op.ray_remote_args["runtime_env"]["env_vars"][FAIL_ONCE_ENV] == env[FAIL_ONCE_ENV]
    assert read_op.compute.size == 1  # concurrency=1: one read task at a time
    assert "ReadJasper(train)" in ds.stats()


def test_without_retries_the_injected_failure_fails(data: Path, tmp_path: Path) -> None:
    """The control of the test above: the same runtime_env with max_retries=0 fails the read."""
    env = {FAIL_ONCE_ENV: fail_once_env({"read_jasper": tmp_path / "once"})}
    ds = read_jasper(
        data, "train", columns=["pair_id"], runtime_env={"env_vars": env}, ray_remote_args={"max_retries": 0}
    )
    with pytest.raises(Exception, match="injected transient I/O error"):
        take_columns(ds)


def test_a_list_of_paths_concatenates(data: Path, small_dir: Path) -> None:
    """Two datasets (the same samples as HDF5 and as PT): every pair twice, each copy the local one's; both
    advance their epoch together on the next pass."""
    ds = read_jasper([data, small_dir], "train", epoch=2, columns=["pair_id", "steering_variant"])
    for epoch in (2, 3):
        got = take_columns(ds)
        order = np.lexsort((got["steering_variant"], got["pair_id"]))
        ids, variants = local_variants(data, epoch)
        np.testing.assert_array_equal(got["pair_id"][order], np.repeat(ids, 2))
        np.testing.assert_array_equal(got["steering_variant"][order], np.repeat(variants, 2))


def test_a_list_of_datasets_of_other_shapes_is_refused(data: Path, tmp_path: Path) -> None:
    other = synth_dataset(tmp_path / "other", n_pairs=200, dim=16, n_neg=2, seed=1)
    with pytest.raises(ValueError, match="cannot concatenate .*embedding_dim 32 vs 16"):
        read_jasper([data, other], "train")
    with pytest.raises(ValueError, match="at least one path"):
        read_jasper([], "train")


def test_storage_options_reach_open_dataset_in_every_task(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """filesystem=, cache_dir= and cache_limit= go with the user's path to open_dataset, in the driver and in the
    read tasks (run in-process here, so the recorder sees them); no reader, no cached copy is sent."""
    import pyarrow.fs as pafs

    calls: list[tuple[str, Any, dict[str, Any]]] = []
    real = datasource_module.open_dataset

    def recorder(location: Any, storage_format: Any, use_mmap: Any, **options: Any) -> Any:
        calls.append((location.uri, type(location.filesystem), options))
        return real(str(data), storage_format, use_mmap)  # the real files, without the cache

    monkeypatch.setattr(datasource_module, "open_dataset", recorder)
    monkeypatch.setattr(datasource_module, "_OPEN", {})  # this process's readers: none yet
    cache = {"cache_dir": "/node/cache", "cache_limit": 1 << 30}
    fs = pafs.LocalFileSystem()
    source = JasperDatasource(str(data), "train", filesystem=fs, **cache, columns=["pair_id"], min_task_bytes=0)
    tasks = pickle.loads(pickle.dumps(source.get_read_tasks(3)))  # as Ray ships them
    assert len(tasks) > 1
    rows = sum(block.num_rows for task in tasks for block in task())
    assert rows == len(source.ids)
    # pyarrow's LocalFileSystem resolves to a plain local path (storage.locate), as Ray's readers do. The
    # driver opens once; the tasks (one process here) open once and share that reader (open_in_process).
    assert calls == [(str(data), type(None), {**cache, "verify": "first-touch"})] * 2  # verify= goes along too
    assert all(task.read_fn.args[0].dataset == source.dataset for task in tasks)


def test_a_dataset_inside_a_filesystem_through_the_cache(converted: Any, tmp_path: Path) -> None:
    """read_jasper(path, filesystem=LocalFileSystem(), cache_dir=...) of a gzip dataset: the read tasks open it
    through the node-local cache (a decompressed copy there); two passes give the local dataset's epochs 0, 1."""
    import pyarrow.fs as pafs

    gzip, cache = converted("gzip"), tmp_path / "cache"
    ds = read_jasper(str(gzip), "train", filesystem=pafs.LocalFileSystem(), cache_dir=cache, columns=COLUMNS)
    for epoch in (0, 1):
        got = take_columns(ds)
        order = np.argsort(got["pair_id"])
        ids, variants = local_variants(gzip, epoch)
        np.testing.assert_array_equal(got["pair_id"][order], ids)
        np.testing.assert_array_equal(got["steering_variant"][order], variants)
    assert any(p.is_file() for p in cache.rglob("*.h5"))  # served from the cache's copy


# --- validation on the Ray paths ----------------------------------------------------------------------------


def tier_nine(directory: Path) -> None:
    tiers = load_pt(directory / TENSOR["negative_tiers"].pt_file).numpy().copy()
    tiers[5, 1] = 9
    save_pt(directory, TENSOR["negative_tiers"].pt_file, tiers)


def cluster_out_of_range(directory: Path) -> None:
    ids = load_pt(directory / TENSOR["pair_cluster_id"].pt_file).numpy().copy()
    n_clusters = load_pt(directory / TENSOR["centroid_embs"].pt_file).shape[0]
    ids[7] = n_clusters
    save_pt(directory, TENSOR["pair_cluster_id"].pt_file, ids)


def float64_questions(directory: Path) -> None:
    questions = load_pt(directory / TENSOR["question_embs"].pt_file)
    save_pt(directory, TENSOR["question_embs"].pt_file, questions.to(torch.float64))


BREAKS: dict[str, Callable[[Path], None]] = {
    "tier 9": tier_nine,
    "cluster id out of range": cluster_out_of_range,
    "float64 column": float64_questions,
}


@pytest.mark.parametrize("bad", list(BREAKS))
def test_ray_paths_refuse_what_the_local_dataset_refuses(
    dataset_copy: Path, bad: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same ValidationError, raised in the driver (no Ray wrapper), once per dataset."""
    BREAKS[bad](dataset_copy)
    with pytest.raises(ValidationError) as local:
        JASPERSteeringDataset(dataset_copy, "train")
    runs = []
    real = datasource_module.validate_dataset
    monkeypatch.setattr(datasource_module, "validate_dataset", lambda reader: runs.append(1) or real(reader))
    with pytest.raises(ValidationError) as through_ray:
        read_jasper(dataset_copy, "train", storage_format="pt")
    assert type(through_ray.value) is ValidationError
    assert str(through_ray.value) == str(local.value)
    assert runs == [1]
    with pytest.raises(ValidationError) as served:
        ShardedJasper(dataset_copy, "train", storage_format="pt", num_shards=1, num_cpus=0.25)
    assert str(served.value) == str(local.value)


def test_validation_runs_once_per_dataset_not_per_pass(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = []
    real = datasource_module.validate_dataset
    monkeypatch.setattr(datasource_module, "validate_dataset", lambda reader: runs.append(1) or real(reader))
    ds = read_jasper(data, "train", columns=["pair_id"])
    take_columns(ds)
    take_columns(ds)
    assert runs == [1]
    read_jasper(data, "train", columns=["pair_id"], validate=False)
    assert runs == [1]


@pytest.mark.parametrize("epoch", [1.7, 2.0, -1, True, "3"])
def test_epochs_that_are_not_integers_are_refused(data: Path, epoch: Any) -> None:
    with pytest.raises(ValueError, match="epoch must be an integer >= 0"):
        read_jasper(data, "train", epoch=epoch)
    with pytest.raises(ValueError, match="epoch must be an integer >= 0"):
        ShardedJasper(data, "train", epoch=epoch)
    assert read_jasper(data, "train", epoch=np.int64(2), columns=["pair_id"]).count() > 0  # numpy ints are ints


@pytest.mark.parametrize("batch_size", [-1, 0, 2.5, True, None])
def test_sharded_jasper_refuses_a_bad_batch_size(data: Path, batch_size: Any) -> None:
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        ShardedJasper(data, "train", batch_size=batch_size)


def test_sharded_jasper_set_epoch_refuses_a_float(data: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(data, tmp_path / "ds"))
    with ShardedJasper(copy, "train", num_shards=1, num_cpus=0.25, batch_size=64) as service:
        with pytest.raises(ValueError, match="epoch must be an integer >= 0"):
            service.set_epoch(1.7)
        service.set_epoch(2)
        assert service.epoch == 2


def test_a_worker_process_keeps_its_reader_until_the_dataset_is_replaced(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read tasks in one worker process share a reader (files opened, checksums verified once per process);
    a dataset replaced at its path (the directory's mtime moves) is opened again."""
    from jasper_ray.ray_data.datasource import DatasetRef, open_in_process
    from jasper_ray.storage import locate

    monkeypatch.setattr(datasource_module, "_OPEN", {})
    copy = Path(shutil.copytree(data, tmp_path / "ds"))
    ref = DatasetRef(locate(str(copy)))
    first = open_in_process(ref)
    assert open_in_process(ref) is first
    (copy / "republished").write_text("a rename into the directory moves its mtime")
    os.utime(copy, ns=(1, 1))  # whatever the clock's resolution
    assert open_in_process(ref) is not first
