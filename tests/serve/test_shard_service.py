"""The shard-actor sample service (``ShardedJasper`` + ``ShardServer``) on a real local Ray.

Everything runs on the shared ``ray_session`` (2 CPUs; actors take 0.25 CPU
each so that several clients fit), or in a subprocess with a Ray of its own
where a test needs a two-node cluster, or a driver that exits. Datasets are
synthetic and converted to contiguous (memory-mappable) HDF5; one test also
serves the PT files of the same directory.

The reference is always the local ``JASPERSteeringDataset`` with the same seed
and epoch, in the order ``ResumableSampler`` gives: the service must deliver the
same batches (every key of every sample, bit for bit, steering variants
included; inside a batch the samples come grouped by shard) in the same
order, whatever happens to its actors.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from subprocess import PIPE
from typing import Any

import numpy as np
import pytest

from jasper_ray import JASPERSteeringDataset, ShardedJasper, ShardUnavailableError, convert_pt_to_hdf5, synth_dataset
from jasper_ray.assembly import PAIR_ID
from jasper_ray.local.sampler import make_sampler
from jasper_ray.serve.settings import ServeOverrides, ServeSettings
from jasper_ray.serve.slots import SHM_DIR, PacingTable
from jasper_ray.serve.transport import PACED_AHEAD

pytestmark = pytest.mark.usefixtures("ray_session")

HERE = Path(__file__).resolve().parent
SMALL = {"n_pairs": 1500, "dim": 32, "n_neg": 4, "seed": 3}  # train split: 1199 pairs (odd: ranks pad)
BIG = {"n_pairs": 20000, "dim": 256, "n_neg": 4, "seed": 4}  # steering tensors ~60 MB
SEED, EPOCH = 7, 1
CPUS = 0.25  # per actor: the shared session has 2 CPUs
DEADLINE_S = 60  # for things that happen asynchronously (actor exits)


# --- fixtures and helpers -----------------------------------------------------------------------


def _make(directory: Path, spec: dict[str, int]) -> Path:
    synth_dataset(directory, **spec)
    convert_pt_to_hdf5(directory, None, progress=False)  # contiguous: memory-mappable
    return directory


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make(tmp_path_factory.mktemp("small"), SMALL)


@pytest.fixture(scope="module")
def local(small: Path) -> dict[str, Any]:
    """The local dataset's epoch EPOCH (seed SEED): split positions in order, and the whole batch in that order."""
    with JASPERSteeringDataset(small, "train", epoch=EPOCH, seed=SEED) as ds:
        order = make_sampler(len(ds), shuffle=True, seed=SEED, epoch=EPOCH).epoch_indices()
        batch = {k: v.numpy() for k, v in ds.get_batch(order).items()}
        batch[PAIR_ID] = ds.split_indices.numpy()[order]
        return {"order": order, "batch": batch, "split": ds.split_indices.numpy().copy()}


def client(directory: Path, **kwargs: Any) -> ShardedJasper:
    args = {"batch_size": 64, "num_shards": 2, "seed": SEED, "epoch": EPOCH, "num_cpus": CPUS, **kwargs}
    return ShardedJasper(directory, "train", **args)


def as_numpy(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """A copy of a batch (torch or numpy) that owns its memory."""
    return {k: (v.numpy() if hasattr(v, "numpy") else np.asarray(v)).copy() for k, v in batch.items()}


def concat(batches: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    batches = list(batches)
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def assert_batches_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray], what: str = "") -> None:
    assert set(got) == set(want), what
    for key in want:
        assert got[key].dtype == want[key].dtype, f"{what} {key}: dtype {got[key].dtype} != {want[key].dtype}"
        assert got[key].shape == want[key].shape, f"{what} {key}: shape {got[key].shape} != {want[key].shape}"
        assert np.array_equal(got[key], want[key]), f"{what} {key}: values differ"


def assert_plan_batches(
    got: list[dict[str, np.ndarray]], want: dict[str, np.ndarray], what: str = "", start: int = 0
) -> None:
    """Batch i holds exactly the plan's samples ``start + i * size ...`` (the local epoch ``want``), each
    equal key by key; inside a batch they come grouped by shard, so both sides are put in pair id order."""
    at = start
    for i, batch in enumerate(got):
        n = len(batch[PAIR_ID])
        plan = {k: v[at : at + n] for k, v in want.items()}
        mine, theirs = np.argsort(batch[PAIR_ID]), np.argsort(plan[PAIR_ID])
        mine_by_id = {k: v[mine] for k, v in batch.items()}
        assert_batches_equal(mine_by_id, {k: v[theirs] for k, v in plan.items()}, f"{what} batch {i}")
        at += n
    assert at == len(want[PAIR_ID]), f"{what}: {at - start} samples, the plan has {len(want[PAIR_ID]) - start}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_until(predicate: Any, timeout: float = DEADLINE_S) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def run_child(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run a child Python in a session of its own; on timeout kill its whole group (a Ray it started too)."""
    proc = subprocess.Popen(
        [sys.executable, *args], env=env, stdout=PIPE, stderr=PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{args[0]} ran over {timeout} s: {err[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def kill_actor_after(it: Iterator[dict[str, Any]], actor: Any, after: int) -> Iterator[dict[str, Any]]:
    """Pass batches through; SIGKILL ``actor``'s process right after batch ``after`` (the rest is in flight)."""
    import ray

    for i, batch in enumerate(it):
        yield batch
        if i == after:
            os.kill(ray.get(actor.pid.remote()), signal.SIGKILL)


# --- 1. same epoch as the local dataset ------------------------------------------------------------


@pytest.mark.parametrize(
    "storage, paced", [("hdf5", True), ("pt", True), ("hdf5", False)], ids=["hdf5", "pt", "hdf5-ray-calls"]
)
def test_epoch_equals_local_epoch(small: Path, local: dict[str, Any], storage: str, paced: bool) -> None:
    want = local["batch"]
    assert len(np.unique(want["steering_variant"])) == 4, "the epoch should mix all four variants"
    with client(small, storage_format=storage, pace_in_shared_memory=paced) as c:
        assert c.storage_format == storage
        assert len(c.actors) == 2 and len(c) == -(-len(local["split"]) // 64)
        batches = [as_numpy(b) for b in c]  # the torch face, as a training loop sees it
        stats = c.stats()
    assert len(batches) == len(c.split_ids) // 64 + 1
    assert all(len(b[PAIR_ID]) == 64 for b in batches[:-1])
    got = concat(batches)
    # Same multiset of samples, each sample equal key by key, matched by pair id ...
    assert Counter(got[PAIR_ID].tolist()) == Counter(local["split"].tolist())
    by_id = np.argsort(got[PAIR_ID])
    want_by_id = np.argsort(want[PAIR_ID])
    assert_batches_equal({k: v[by_id] for k, v in got.items()}, {k: v[want_by_id] for k, v in want.items()})
    # ... and batch by batch the plan's: the sampler's permutation of the split, cut into batches.
    assert_plan_batches(batches, want, "plan")
    # Both actors served; each owns its own row range and maps the file.
    assert [s["rows"] for s in stats] == [b - a for a, b in c.ranges]
    assert all(s["batches_served"] > 0 and s["bytes_mapped"] > 0 for s in stats)


# --- 2. a killed actor costs latency, never a sample --------------------------------------------


@pytest.mark.parametrize("paced", [True, False], ids=["paced", "ray-calls"])
def test_killed_actor_loses_no_sample(
    small: Path, local: dict[str, Any], caplog: pytest.LogCaptureFixture, paced: bool
) -> None:
    import ray

    with client(small, batch_size=32, max_restarts=3, pace_in_shared_memory=paced) as c:
        pids = ray.get([a.pid.remote() for a in c.actors])
        with caplog.at_level("WARNING", logger="jasper_ray.serve"):
            batches = [as_numpy(b) for b in kill_actor_after(iter(c), c.actors[0], after=5)]
        # The client served the dead actor's rows itself while it restarted; it is back for the next epoch.
        deadline = time.monotonic() + DEADLINE_S
        while True:
            try:
                new_pids = ray.get([a.pid.remote() for a in c.actors], timeout=DEADLINE_S)
                break
            except ray.exceptions.ActorUnavailableError:
                assert time.monotonic() < deadline, "actor 0 did not restart"
                time.sleep(0.2)
        before = [s["batches_served"] for s in c.stats()]
        list(c.iter_numpy())
        served = [s["batches_served"] - b for s, b in zip(c.stats(), before)]
    assert not pid_alive(pids[0])
    assert new_pids[0] != pids[0] and new_pids[1] == pids[1], "actor 0 restarted in a new process, actor 1 untouched"
    assert served[0] > 0, "the restarted actor serves its rows again"
    assert any(" lost " in r.getMessage() for r in caplog.records), "the kill hit work in flight"
    got = concat(batches)
    assert sorted(got[PAIR_ID].tolist()) == sorted(local["split"].tolist()), "every sample exactly once"
    assert_plan_batches(batches, local["batch"], "after a kill")


def test_actor_that_cannot_restart_is_named(small: Path) -> None:
    with client(small, batch_size=32, max_restarts=0, max_retries=2) as c:
        name = c.names[0]
        with pytest.raises(ShardUnavailableError, match=re.escape(name)):
            for _ in kill_actor_after(c.iter_numpy(), c.actors[0], after=2):
                pass
    assert name.startswith("shard 0 (pair rows 0:")


# --- 3. two nodes: spread, and a node removed mid-epoch ---------------------------------------------


def test_two_node_cluster_survives_node_removal(small: Path, ray_subprocess_env: Any) -> None:
    # A short private RAY_TMPDIR: the Cluster's address file stays out of /tmp/ray (where every plain
    # ray.init() on this machine would attach to it), and socket paths stay under the 107-byte limit.
    ray_tmp = tempfile.mkdtemp(prefix="jr-", dir="/tmp")
    try:
        proc = run_child(
            [str(HERE / "_two_node_cluster.py"), str(small), "--remove-after", "6"],
            ray_subprocess_env(RAY_TMPDIR=ray_tmp),
            timeout=240,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    head, worker = out["head"], out["worker"]
    assert set(out["nodes_before"]) == {head, worker}, "actors spread over both nodes"
    assert out["served_by_worker_node"] > 0, "batches came from the other node, through the object store"
    assert out["nodes_after"] == [head] * 4, "the worker node's actors restarted on the head"
    for before, after, node in zip(out["pids_before"], out["pids_after"], out["nodes_before"]):
        assert (before != after) == (node == worker)
    assert out["mismatches"] == [], "every batch equals the local dataset's, before and after the removal"
    assert out["delivered"] == out["n_split"] and out["same_multiset"] and out["same_batches"]


# --- 4. resume, ranks, pickling --------------------------------------------------------------------


def test_resume_from_state_dict_yields_exactly_the_rest(small: Path, local: dict[str, Any]) -> None:
    taken = 7
    with client(small) as c:
        first = []
        for i, batch in enumerate(c.iter_numpy()):
            first.append(as_numpy(batch))
            if i + 1 == taken:
                break
        state = c.state_dict()
    assert state["samples_seen"] == taken * 64 and state["epoch"] == EPOCH and state["seed"] == SEED
    with client(small) as fresh:
        fresh.load_state_dict(state)
        assert len(fresh) == -(-(len(local["split"]) - taken * 64) // 64)
        rest = [as_numpy(b) for b in fresh.iter_numpy()]
        assert fresh.state_dict()["samples_seen"] == len(local["split"])
    want = local["batch"]
    assert_plan_batches(rest, want, "the rest", start=taken * 64)
    assert_plan_batches(first + rest, want, "first + rest")


def test_rank_views_split_the_epoch(small: Path, local: dict[str, Any]) -> None:
    import ray

    n = len(local["split"])
    with client(small) as owner:
        epochs = []
        for rank in range(2):
            view = owner.for_rank(rank, 2)
            try:
                assert view.actors == owner.actors
                epochs.append([as_numpy(b) for b in view.iter_numpy()])
                if rank == 0:
                    # A view pickles (into Ray Train workers); the copy iterates the same epoch.
                    copy = pickle.loads(pickle.dumps(view))
                    try:
                        again = concat(as_numpy(b) for b in copy.iter_numpy())
                        assert_batches_equal(again, concat(epochs[0]), "copy")
                    finally:
                        copy.close()
            finally:
                view.close()
            # Closing a view (or its copy) leaves the owner's actors running.
            assert len(ray.get([a.pid.remote() for a in owner.actors], timeout=DEADLINE_S)) == 2
        assert next(iter(owner.iter_numpy()))[PAIR_ID].shape == (64,)
    ids = [concat(e)[PAIR_ID] for e in epochs]
    assert len(ids[0]) == len(ids[1]) == -(-n // 2)
    assert set(ids[0]) | set(ids[1]) == set(local["split"].tolist())
    counts = Counter(ids[0].tolist() + ids[1].tolist())
    padded = [i for i, c in counts.items() if c > 1]
    assert len(padded) == 2 * -(-n // 2) - n == 1, "disjoint except for the padding"
    assert padded == [local["batch"][PAIR_ID][0]], "padding repeats the start of the epoch"
    with JASPERSteeringDataset(small, "train", epoch=EPOCH, seed=SEED) as ds:
        for rank in range(2):
            order = make_sampler(n, shuffle=True, seed=SEED, epoch=EPOCH, num_replicas=2, rank=rank).epoch_indices()
            want = {k: v.numpy() for k, v in ds.get_batch(order).items()}
            want[PAIR_ID] = local["split"][order]
            assert_plan_batches(epochs[rank], want, f"rank {rank}")


# --- 5. memory: actors map their shard ------------------------------------------------------------------


def test_actor_rss_stays_under_its_shard(tmp_path: Path) -> None:
    big = _make(tmp_path / "big", BIG)
    with client(big, batch_size=256, num_shards=1) as c:
        (before,) = c.stats()
        for _ in c.iter_numpy():
            pass
        (after,) = c.stats()
    shard_bytes = 3 * before["rows"] * BIG["dim"] * 4  # its steering rows: what dominates a shard
    assert before["rows"] == BIG["n_pairs"] and after["batches_served"] == len(c.split_ids) // 256 + 1
    assert after["bytes_mapped"] >= shard_bytes
    # RssAnon is memory the actor owns (heap, copies): reading the shard into RAM would grow it by the
    # shard's size. RssFile is file-backed page cache mapped into the actor: it grows by what the epoch
    # touched (shared with every process mapping the file, and reclaimable), so it shows the reads went
    # through the mapping. Batches written into the client's shared memory count as RssShmem.
    anon = after["RssAnon"] - before["RssAnon"]
    file_backed = after["RssFile"] - before["RssFile"]
    assert anon < 0.2 * shard_bytes, f"RssAnon grew by {anon / 2**20:.1f} MiB for a {shard_bytes / 2**20:.0f} MiB shard"
    assert file_backed > 0.5 * shard_bytes, f"RssFile grew by only {file_backed / 2**20:.1f} MiB"


# --- 6. shutdown -----------------------------------------------------------------------------------


def test_leaving_the_with_block_kills_the_actors(small: Path) -> None:
    import ray

    with client(small) as c:
        actors = list(c.actors)
        pids = ray.get([a.pid.remote() for a in actors])
    for actor in actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.pid.remote(), timeout=DEADLINE_S)
    assert wait_until(lambda: not any(pid_alive(p) for p in pids)), "actor processes exited"


_CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    import ray
    from jasper_ray import ShardedJasper
    c = ShardedJasper(sys.argv[1], num_shards=2, num_cpus=0.25, batch_size=64)  # RAY_ADDRESS: the test's Ray
    next(iter(c))
    slots = [slot.name for slot in c._pool.slots]
    print(json.dumps({"pids": ray.get([a.pid.remote() for a in c.actors]), "slots": slots}), flush=True)
    if sys.argv[2] == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


_VIEW_CHILD = textwrap.dedent(
    """
    import os, pickle, signal, sys
    import ray
    ray.init()  # RAY_ADDRESS: the test's Ray
    with open(sys.argv[1], "rb") as f:
        view = pickle.load(f)
    for i, _ in enumerate(view.iter_numpy()):
        if i == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # mid-epoch: the actors are in its paced calls
    """
)


def test_a_rank_view_that_dies_mid_epoch_frees_the_actors(small: Path, ray_subprocess_env: Any, tmp_path) -> None:
    """A view in another process (a Ray Train worker) cannot cancel when it is killed: the actors'
    paced calls notice its process is gone and end; the owner's next epoch is served whole."""
    import ray

    with client(small, batch_size=32) as owner:
        view = tmp_path / "view.pkl"
        view.write_bytes(pickle.dumps(owner.for_rank(1, 2)))
        env = ray_subprocess_env(RAY_ADDRESS=ray.get_runtime_context().gcs_address)
        proc = run_child(["-c", _VIEW_CHILD, str(view)], env, timeout=120)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
        assert wait_until(lambda: [s["paced_calls"] for s in owner.stats()] == [0, 0]), "calls still running"
        assert sum(len(b[PAIR_ID]) for b in owner.iter_numpy()) == len(owner.split_ids)


@pytest.mark.parametrize("how", ["exits", "killed"])
def test_actors_end_with_the_process_that_made_them(small: Path, ray_subprocess_env: Any, how: str) -> None:
    """A driver that never closes its client, on a Ray that outlives it: its actors and memory go when it does."""
    import ray

    env = ray_subprocess_env(RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    proc = run_child(["-c", _CHILD, str(small), how], env, timeout=120)
    assert proc.returncode == (-signal.SIGKILL if how == "killed" else 0), proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    pids, slots = out["pids"], out["slots"]
    assert len(pids) == 2 and slots
    assert wait_until(lambda: not any(pid_alive(p) for p in pids)), f"actor processes {pids} outlived their driver"
    # Its shared-memory batch slots go too (Python's resource tracker unlinks them when the driver dies).
    assert wait_until(lambda: not any(os.path.exists(f"{SHM_DIR}/{name}") for name in slots)), "leaked slots"


# --- 7. shared-memory batches -------------------------------------------------------------------------


def test_stopping_early_ends_the_actors_calls(small: Path, local: dict[str, Any]) -> None:
    """Leaving a paced epoch early cancels the actors' calls and frees its table; the next epoch is whole."""
    before = set(os.listdir(SHM_DIR))
    with client(small, batch_size=32) as c:
        for i, _ in enumerate(c.iter_numpy()):
            if i == 3:
                break
        assert [s["paced_calls"] for s in c.stats()] == [0, 0], "the actors' serve calls ended"
        c.sampler.start = 0  # the whole epoch again, not the rest of it
        assert_plan_batches([as_numpy(b) for b in c.iter_numpy()], local["batch"], "after an early stop")
        tables = {n for n in set(os.listdir(SHM_DIR)) - before if n.startswith(PacingTable.PREFIX)}
        assert not tables, f"pacing tables left behind: {tables}"


def test_held_batches_are_never_overwritten(small: Path, local: dict[str, Any]) -> None:
    with client(small, batch_size=32, max_in_flight=4) as c:
        held, copies, rest = [], [], []
        for i, batch in enumerate(c):
            if i < 3:
                held.append(batch)  # torch tensors over the client's shared memory
                copies.append(as_numpy(batch))
            else:
                rest.append(as_numpy(batch))
        for h, copy in zip(held, copies):
            assert_batches_equal(as_numpy(h), copy, "held batch")
        names = [slot.name for slot in c._pool.slots]
        assert all(os.path.exists(f"{SHM_DIR}/{name}") for name in names)
        ahead = min(c.settings.max_in_flight, PACED_AHEAD)  # batches in flight besides the 3 held
        assert len(names) >= 3 + ahead, "held slots were not reused: the pool grew instead"
    # Closing unlinked every segment; memory a caller still holds stays valid until dropped.
    assert not [name for name in names if os.path.exists(f"{SHM_DIR}/{name}")]
    for h, copy in zip(held, copies):
        assert_batches_equal(as_numpy(h), copy, "held batch after close")
    assert_plan_batches(copies + rest, local["batch"], "shared-memory epoch")


# --- 8. settings and views --------------------------------------------------------------------------

# The constructor's defaults when it took 22 keyword parameters: ServeSettings keeps them.
DEFAULTS_BEFORE = {
    "batch_size": 256,
    "num_shards": None,
    "seed": 42,
    "shuffle": True,
    "storage_format": "auto",
    "drop_last": False,
    "max_in_flight": 8,
    "batches_per_call": 4,
    "max_restarts": 3,
    "max_retries": 5,
    "restart_timeout_s": 60.0,
    "serve_while_restarting": True,
    "pace_in_shared_memory": True,
    "num_cpus": 1.0,
    "cache_dir": None,
    "cache_limit": None,
    "dtype": None,  # added with 16-bit storage: None serves float32, as before
    "verify": "first-touch",  # added with verify=: what the actors already did
}


def test_settings_keep_the_old_defaults() -> None:
    assert dataclasses.asdict(ServeSettings()) == DEFAULTS_BEFORE
    assert set(ServeOverrides.__annotations__) == set(DEFAULTS_BEFORE), "the keyword types name every field"
    view = inspect.signature(ShardedJasper).parameters
    assert {k: view[k].default for k in ("split", "epoch", "rank", "world_size", "address")} == {
        "split": "train",
        "epoch": 0,
        "rank": 0,
        "world_size": 1,
        "address": None,
    }


def test_an_unknown_keyword_is_refused_naming_the_valid_ones(small: Path) -> None:
    refused = r"ShardedJasper\(\) got unexpected keyword argument\(s\) 'batchsize'; "
    valid = r"valid: settings, epoch, rank, world_size, address, filesystem, validate, batch_size, .*, cache_limit"
    with pytest.raises(TypeError, match=refused + valid):
        ShardedJasper(small, "train", batchsize=64)
    with pytest.raises(TypeError, match="'batchsize'"):
        ServeSettings().with_overrides({"batchsize": 64})


def test_a_rank_view_shares_the_owners_actors_and_does_not_own_them(small: Path) -> None:
    import ray

    base = ServeSettings(batch_size=32, num_shards=2, seed=SEED, num_cpus=CPUS)
    with ShardedJasper(small, "train", settings=base, epoch=EPOCH, max_in_flight=2) as owner:
        assert owner.settings == dataclasses.replace(base, max_in_flight=2), "keywords apply over settings"
        assert owner.batch_size == 32 and owner.epoch == EPOCH and len(owner.actors) == 2
        view = owner.for_rank(1, 2)
        assert view.actors is owner.actors and view.settings is owner.settings and view.epoch == EPOCH
        assert view._pool is not owner._pool, "each view hands out batches from its own slots"
        per_rank = -(-len(owner.split_ids) // 2)
        assert len(view) == -(-per_rank // 32)
        view.close()
        assert view.actors == [] and owner.actors, "closing a view leaves the owner's actors to the owner"
        assert len(ray.get([a.pid.remote() for a in owner.actors], timeout=DEADLINE_S)) == 2
        assert sum(len(b[PAIR_ID]) for b in owner.iter_numpy()) == len(owner.split_ids)
