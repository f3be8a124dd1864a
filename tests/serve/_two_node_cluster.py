"""Run by ``test_shard_service.py`` in a subprocess: shard actors on a two-node ``ray.cluster_utils.Cluster``.

    python tests/serve/_two_node_cluster.py DATASET_DIR [--remove-after N]

Starts a head and one worker node (1 CPU each) in this process's own Ray (the
test process already has a session), starts a ``ShardedJasper`` with four
actors spread over both nodes, and runs one epoch. After ``--remove-after``
batches it removes the worker node: the actors that were on it restart on the
head and the client retries what they lost. Every batch is checked against the
local ``JASPERSteeringDataset`` (same seed and epoch) as it arrives, so batches
that came through the object store (actors on the worker node: the client is on
the head) are checked too. Prints one JSON line with what the test asserts.

Run it with ``RAY_TMPDIR`` set to a private directory: ``Cluster`` records its
address in ``$RAY_TMPDIR/ray/ray_current_cluster``, where every plain
``ray.init()`` on the machine would otherwise find it and attach.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import numpy as np

SEED, EPOCH, BATCH = 5, 1, 32


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset")
    parser.add_argument("--remove-after", type=int, default=6)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    import ray
    from ray.cluster_utils import Cluster

    from jasper_ray import JASPERSteeringDataset, ShardedJasper
    from jasper_ray.local.sampler import make_sampler

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": 100 << 20, "include_dashboard": False},
    )
    worker = cluster.add_node(num_cpus=1, object_store_memory=100 << 20)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    head_id = ray.get_runtime_context().get_node_id()
    worker_id = worker.node_id
    out: dict = {"head": head_id, "worker": worker_id}

    local = JASPERSteeringDataset(args.dataset, "train", epoch=EPOCH, seed=SEED)
    order = make_sampler(len(local), shuffle=True, seed=SEED, epoch=EPOCH).epoch_indices()
    expected = local.get_batch(order)
    mismatches: list[str] = []
    ids: list[np.ndarray] = []
    t0 = time.monotonic()
    with ShardedJasper(
        args.dataset, batch_size=BATCH, num_shards=4, seed=SEED, epoch=EPOCH, num_cpus=0.25, max_restarts=3
    ) as client:
        before = client.stats()
        out["nodes_before"] = [s["node_id"] for s in before]
        out["pids_before"] = [s["pid"] for s in before]
        split = local.split_indices.numpy()
        for i, batch in enumerate(client):
            # The plan's samples of batch i, grouped by shard inside it: compare in pair id order.
            got_ids = batch["pair_id"].numpy()
            plan = order[i * BATCH : i * BATCH + len(got_ids)]
            mine, theirs = np.argsort(got_ids), np.argsort(split[plan])
            for key, want in expected.items():
                want = want[i * BATCH : i * BATCH + len(plan)].numpy()
                if not np.array_equal(batch[key].numpy()[mine], want[theirs]):
                    mismatches.append(f"batch {i} {key}")
            ids.append(got_ids.copy())
            if i + 1 == args.remove_after:
                # What the worker node's actors served so far went through the object store.
                served = client.stats()
                out["served_by_worker_node"] = sum(s["batches_served"] for s in served if s["node_id"] == worker_id)
                cluster.remove_node(worker)
                t_removed = time.monotonic()
        out["seconds_after_removal"] = time.monotonic() - t_removed
        after = client.stats()
        out["nodes_after"] = [s["node_id"] for s in after]
        out["pids_after"] = [s["pid"] for s in after]
    out["seconds"] = time.monotonic() - t0
    all_ids = np.concatenate(ids)
    out["delivered"] = len(all_ids)
    out["same_multiset"] = bool(np.array_equal(np.sort(all_ids), np.sort(local.split_indices.numpy())))
    expected_ids = local.split_indices.numpy()[order]
    out["same_batches"] = all(
        np.array_equal(np.sort(got), np.sort(expected_ids[i * BATCH : i * BATCH + len(got)]))
        for i, got in enumerate(ids)
    )
    out["n_split"] = len(expected_ids)
    out["mismatches"] = mismatches[:20]
    print(json.dumps(out), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
