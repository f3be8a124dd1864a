#!/usr/bin/env python
"""End to end on a real multi-node Ray cluster, losing a node mid-conversion.

    python scripts/e2e_cluster.py --start-cluster          # starts (and stops) scripts/local_cluster.sh
    RAY_ADDRESS=host:6390 python scripts/e2e_cluster.py    # an existing cluster; DIR must be shared
    python scripts/e2e_cluster.py --start-cluster --from-s3   # nodes share no dataset path: S3 + caches

1. synthesise a dataset (upstream PT layout) in --out;
2. convert it through the cluster (``jasper_ray.convert`` with many small shards) while a thread
   stops worker node --kill-node (SIGKILL of its process group) once the first shards exist;
3. serve one epoch through the shard actors (``ShardedJasper``) spread over the nodes left;
4. stream one epoch through ``read_jasper``;
and check all three against the local ``JASPERSteeringDataset``, value for value. Prints a table and,
last, one JSON line with the results; exits non-zero if a check fails. With --baseline it first
converts once without a lost node, to measure what losing one costs.

With --from-s3 the dataset lives in object storage (a local S3 endpoint, moto's server, started here) and
the nodes share no dataset path (``local_cluster.sh up-own-caches``: each node its own cache directory):
the sharded layout is converted and uploaded to ``s3://``; the shard actors and then ``read_jasper`` serve
it from there, each node fetching into its own cache, while worker node --kill-node is stopped mid-epoch
(of the actors' epoch). Checked as above, plus: every node's cache holds copies, and none the whole dataset.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import jasper_ray  # noqa: E402
from jasper_ray.conversion.plan import work_dir_for  # noqa: E402
from jasper_ray.formats import open_dataset  # noqa: E402
from jasper_ray.local.sampler import make_sampler  # noqa: E402
from jasper_ray.schema import TENSORS  # noqa: E402

log = logging.getLogger("e2e")
CLUSTER = HERE / "local_cluster.sh"


def cluster(*args: str) -> str:
    return subprocess.run([str(CLUSTER), *args], check=True, capture_output=True, text=True).stdout


def kill_node_when_shards_exist(work_dir: Path, node: int, min_shards: int, done: dict) -> None:
    """Stop worker ``node`` once ``min_shards`` shard files are written: a machine lost mid-run.

    The pieces of a small conversion finish within a second of each other, so this polls often and
    records the kill before the script that sends it returns (it waits for the node's processes to end)."""
    deadline = time.time() + 300
    while time.time() < deadline and not done.get("finished"):
        written = sum(1 for p in work_dir.glob("*.h5")) if work_dir.is_dir() else 0
        if written >= min_shards:
            done["killed_at"], done["shards_when_killed"] = time.time(), written
            cluster("kill-node", str(node))
            log.info("stopped worker node %d after %d shard(s)", node, written)
            return
        time.sleep(0.01)


def _warm() -> int:
    import jasper_ray.conversion.parallel  # noqa: F401 - what conversion tasks import

    return os.getpid()


def warm_up(ray) -> None:
    """Start a worker with jasper_ray imported on every node, so timings compare conversions, not start-up."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    warm = ray.remote(num_cpus=1)(_warm)  # the conversion's worker pool (NOTE [prestarted workers])
    ray.get(
        [
            warm.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
            for n in ray.nodes()
            if n["Alive"]
        ]
    )


def local_epoch(directory: Path, split: str, seed: int, epoch: int) -> tuple[np.ndarray, dict]:
    local = jasper_ray.JASPERSteeringDataset(directory, split, epoch=epoch, seed=seed, storage_format="pt")
    return local.split_indices.numpy(), local


def by_pair(local, split_ids: np.ndarray, pair_ids: np.ndarray) -> dict:
    order = np.argsort(split_ids)
    return {k: v.numpy() for k, v in local.get_batch(order[np.searchsorted(split_ids[order], pair_ids)]).items()}


def check_equal(name: str, got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> list[str]:
    return [f"{name}: {key} differs" for key in want if not np.array_equal(got[key], want[key])]


def run(args: argparse.Namespace) -> dict:
    import ray

    address = args.address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address, log_to_driver=False)
    nodes_before = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    out = Path(args.out or tempfile.mkdtemp(prefix="jasper-e2e-"))
    data = out / "data"
    results: dict = {"nodes": len(nodes_before), "failures": []}

    jasper_ray.synth_dataset(data, args.pairs, args.dim, args.neg, seed=0)
    warm_up(ray)
    if args.baseline:
        t = time.perf_counter()
        jasper_ray.convert(data, output=out / "baseline.h5", shard_bytes=args.shard_bytes, progress=False)
        results["convert_seconds_no_loss"] = time.perf_counter() - t

    done: dict = {}
    killer = threading.Thread(
        target=kill_node_when_shards_exist,
        args=(work_dir_for(data / "dataset.h5"), args.kill_node, 1, done),
        daemon=True,
    )
    if args.kill_node:
        killer.start()
    t = time.perf_counter()
    report = jasper_ray.convert(data, shard_bytes=args.shard_bytes, max_retries=5, progress=False)
    results["convert_seconds"] = time.perf_counter() - t
    done["finished"] = True
    results["shards"] = report.shards
    # lost during it: killed before convert returned, with pieces still to write
    results["node_lost_during_conversion"] = done.get("shards_when_killed", report.shards) < report.shards
    results["shards_when_killed"] = done.get("shards_when_killed")
    if "killed_at" in done:  # let the head notice (health checks), so no actor is placed on the lost node
        for _ in range(120):
            if sum(1 for n in ray.nodes() if n["Alive"]) < len(nodes_before):
                break
            time.sleep(0.5)
    results["nodes_after"] = sum(1 for n in ray.nodes() if n["Alive"])

    # 1. the converted file against the PT sources, bit for bit, and its checksums
    h5, pt = open_dataset(data, "hdf5"), open_dataset(data, "pt")
    results["failures"] += [f"convert: {p}" for p in h5.verify_checksums()]
    results["failures"] += [
        f"convert: {s.name} differs" for s in TENSORS if not np.array_equal(h5.read(s.name), pt.read(s.name))
    ]

    split_ids, local = local_epoch(data, "train", args.seed, args.epoch)
    # 2. one epoch through the shard actors, spread over the nodes left
    with jasper_ray.ShardedJasper(
        data, "train", batch_size=128, num_shards=args.actors, seed=args.seed, epoch=args.epoch, num_cpus=0.25
    ) as service:
        results["actor_nodes"] = len({s["node_id"] for s in service.stats()})
        batches = [{k: v.copy() for k, v in b.items()} for b in service.iter_numpy()]
    served = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    plan = split_ids[make_sampler(len(split_ids), shuffle=True, seed=args.seed, epoch=args.epoch).epoch_indices()]
    cuts = np.cumsum([len(b["pair_id"]) for b in batches])[:-1]
    if not all(  # batch by batch the plan's samples (grouped by shard inside a batch)
        np.array_equal(np.sort(got), np.sort(want))
        for got, want in zip(np.split(served["pair_id"], cuts), np.split(plan, cuts))
    ) or len(served["pair_id"]) != len(plan):
        results["failures"].append("actors: the epoch's batches differ from the local plan's")
    results["failures"] += check_equal("actors", served, by_pair(local, split_ids, served["pair_id"]))

    # 3. one epoch through read_jasper
    results["failures"] += read_jasper_epoch(data, args, split_ids, local)
    results["samples_per_epoch"] = len(split_ids)
    return results


def read_jasper_epoch(path: Path | str, args: argparse.Namespace, split_ids: np.ndarray, local) -> list[str]:  # type: ignore[no-untyped-def]
    """One epoch of ``read_jasper(path)`` against the local dataset: every pair once, the same samples."""
    batches = list(
        jasper_ray.read_jasper(path, "train", seed=args.seed, epoch=args.epoch).iter_batches(
            batch_size=None, batch_format="numpy"
        )
    )
    streamed = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    if sorted(streamed["pair_id"].tolist()) != sorted(split_ids.tolist()):
        return ["read_jasper: the epoch does not hold every pair exactly once"]
    return check_equal("read_jasper", streamed, by_pair(local, split_ids, streamed["pair_id"]))


def cache_files(state: Path) -> dict[str, int]:
    """Per node of a cluster started with up-own-caches: how many shard files its cache holds."""
    return {d.name: sum(1 for _ in d.rglob("dataset.shards/*.h5")) for d in sorted(state.glob("cache-*"))}


def run_from_s3(args: argparse.Namespace) -> dict:
    import ray

    sys.path.insert(0, str(HERE.parent / "tests"))
    from _s3 import S3Endpoint

    endpoint = S3Endpoint()  # on 127.0.0.1: every node of this machine's cluster reaches it
    try:
        ray.init(address=args.address or os.environ.get("RAY_ADDRESS"), log_to_driver=False,
                 runtime_env={"env_vars": endpoint.env})  # fmt: skip
        nodes_before = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        out = Path(args.out or tempfile.mkdtemp(prefix="jasper-e2e-"))
        data = out / "data"
        results: dict = {"nodes": len(nodes_before), "failures": []}
        jasper_ray.synth_dataset(data, args.pairs, args.dim, args.neg, seed=0)
        uri = f"s3://{endpoint.bucket()}/ds"
        t = time.perf_counter()
        report = jasper_ray.convert(
            data, layout="sharded", shard_bytes=args.shard_bytes, output=f"{uri}/dataset.shards",
            progress=False, cache_dir=out / "driver-cache",
        )  # fmt: skip
        results["convert_seconds"] = time.perf_counter() - t
        results["shards"] = report.shards
        split_ids, local = local_epoch(data, "train", args.seed, args.epoch)

        with jasper_ray.ShardedJasper(
            uri, "train", batch_size=128, num_shards=args.actors, seed=args.seed, epoch=args.epoch, num_cpus=0.25
        ) as service:
            results["actor_nodes"] = len({s["node_id"] for s in service.stats()})
            batches = []
            kill_at = max(1, len(split_ids) // 128 // 3)
            for i, b in enumerate(service.iter_numpy()):
                batches.append({k: v.copy() for k, v in b.items()})
                if i == kill_at and args.kill_node:
                    cluster("kill-node", str(args.kill_node))
                    results["node_lost_mid_epoch"] = True
                    log.info("stopped worker node %d after %d batches", args.kill_node, i + 1)
        served = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
        if sorted(served["pair_id"].tolist()) != sorted(split_ids.tolist()):
            results["failures"].append("actors: the epoch does not hold every pair exactly once")
        else:
            results["failures"] += check_equal("actors", served, by_pair(local, split_ids, served["pair_id"]))
        for _ in range(120):  # the head notices the lost node before read tasks are placed
            if sum(1 for n in ray.nodes() if n["Alive"]) < len(nodes_before) or not args.kill_node:
                break
            time.sleep(0.5)
        results["nodes_after"] = sum(1 for n in ray.nodes() if n["Alive"])

        results["failures"] += read_jasper_epoch(uri, args, split_ids, local)
        results["samples_per_epoch"] = len(split_ids)
        state = os.environ.get("JASPER_CLUSTER_DIR")
        if state:
            results["node_caches"] = cache_files(Path(state))
        return results
    finally:
        ray.shutdown()
        endpoint.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS)")
    parser.add_argument("--start-cluster", action="store_true", help="run scripts/local_cluster.sh up/down around")
    parser.add_argument("--workers", type=int, default=2, help="worker nodes for --start-cluster")
    parser.add_argument("--kill-node", type=int, default=2, help="worker node to stop mid-conversion (0: none)")
    parser.add_argument("--baseline", action="store_true", help="also convert once without losing a node")
    parser.add_argument("--pairs", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--neg", type=int, default=4)
    parser.add_argument("--shard-bytes", type=int, default=512 << 10)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--epoch", type=int, default=1)
    parser.add_argument("--out", help="working directory (default: a new temporary one)")
    parser.add_argument(
        "--from-s3", action="store_true", help="serve from a local S3 endpoint; with --start-cluster, nodes own caches"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.start_cluster:
        line = cluster("up-own-caches" if args.from_s3 else "up", str(args.workers)).strip().splitlines()[-1]
        args.address = line.split("=", 1)[1]
    try:
        results = run_from_s3(args) if args.from_s3 else run(args)
    finally:
        if args.start_cluster:
            import ray

            ray.shutdown()
            cluster("down")
    rows = [
        ("nodes at start", results["nodes"]),
        ("nodes after the loss", results["nodes_after"]),
        ("node lost during conversion", results.get("node_lost_during_conversion", False)),
        ("node lost mid-epoch (actors)", results.get("node_lost_mid_epoch", False)),
        ("conversion (s)", f"{results['convert_seconds']:.1f}"),
        ("shards", results["shards"]),
        ("nodes holding actors", results["actor_nodes"]),
        ("samples per epoch", results["samples_per_epoch"]),
        ("checks failed", len(results["failures"])),
        *([("shard files per node cache", results["node_caches"])] if "node_caches" in results else []),
    ]
    if "convert_seconds_no_loss" in results:
        rows.insert(4, ("conversion without a loss (s)", f"{results['convert_seconds_no_loss']:.1f}"))
    for what, value in rows:
        print(f"{what:<32} {value}")
    for failure in results["failures"]:
        print(f"FAILED: {failure}")
    print(json.dumps(results))
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
