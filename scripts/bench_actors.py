#!/usr/bin/env python
"""Shard actors (``ShardedJasper``) against the local batched dataset: throughput, latency, a killed actor.

    python scripts/bench_actors.py                    # 1GB dataset (the owner runs it on a quiet machine)
    python scripts/bench_actors.py --quick            # 100MB, for development

One synthetic dataset (D=768, n_neg=12), converted to contiguous HDF5 (memory-
mappable). One Ray (``num_cpus`` = the machine's cores) for the whole run.
Three ways through the same epoch (seed 0, epoch 0, batch 256, torch tensors):

- local: ``JASPERSteeringDataset.get_batch`` over the epoch's batches, in this
  process (the baseline);
- 1 actor / 2 actors: ``ShardedJasper`` with that many ``ShardServer`` actors
  (each maps the file). On one node they take one call per epoch and are
  paced through shared memory: the client offers each batch's slot, an actor
  builds its rows there in place and marks them done;
- 2 actors, Ray calls: the same with ``pace_in_shared_memory=False``, one
  Ray call per actor per 4 batches: what actors on other nodes cost (they
  send their rows through the object store; here they still write in place).

They run round robin (``--rounds`` epochs each, interleaved, so load from other
processes falls on all alike); throughput is over the median epoch, latency is
the time between consecutive batches delivered to the loop (the first one
includes starting the epoch), pooled over the rounds. Then one more epoch per
actor count with the first actor SIGKILLed halfway: its extra seconds over the
median undisturbed epoch is the cost of a killed actor. Every service epoch is
checked to deliver each sample of the split exactly once.

On a 2-core machine the client, the actors and the rest of Ray share the cores.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import (  # noqa: E402
    fmt_bytes,
    fmt_ms,
    fmt_rate,
    fmt_ratio,
    keep_freed_memory,
    print_table,
    proc_status,
    record,
    setup_logging,
)

import jasper_ray  # noqa: E402
from jasper_ray.local.sampler import make_sampler  # noqa: E402
from jasper_ray.serve.settings import ServeSettings  # noqa: E402
from jasper_ray.serve.transport import PACE_S, PACED_AHEAD  # noqa: E402
from jasper_ray.tools.synth import pairs_for_size, parse_size, synth_dataset  # noqa: E402

log = logging.getLogger("bench.actors")
BATCH, DIM, N_NEG, SEED, EPOCH = 256, 768, 12, 0, 0
RAY_CALLS = "2 actors, Ray calls"


def make_dataset(root: Path, n_pairs: int) -> Path:
    """The synthetic dataset with a contiguous dataset.h5 (reused when ``root`` already holds it)."""
    h5 = root / "dataset.h5"
    if h5.is_file() and jasper_ray.open_dataset(root, "hdf5").n_pairs == n_pairs:
        log.info("reusing %s", root)
        return root
    shutil.rmtree(root, ignore_errors=True)
    log.info("synthesising %d pairs in %s", n_pairs, root)
    synth_dataset(root, n_pairs, DIM, N_NEG, seed=0)
    jasper_ray.convert_pt_to_hdf5(root, None, progress=False)
    return root


class Epoch:
    """One timed pass: wall seconds, gaps between batches, samples, and the pair ids (service only)."""

    def __init__(self, batches: Iterable[dict[str, Any]], on_batch: Callable[[int], None] | None = None):
        ids, gaps, samples = [], [], 0
        t0 = last = time.perf_counter()
        for i, batch in enumerate(batches):
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
            samples += len(batch["question_emb"])
            if "pair_id" in batch:
                ids.append(batch["pair_id"].numpy().copy())
            if on_batch is not None:
                on_batch(i)
        self.seconds = time.perf_counter() - t0
        self.gaps, self.samples = gaps, samples
        self.ids = np.concatenate(ids) if ids else None


def local_epoch(ds: jasper_ray.JASPERSteeringDataset, positions: list[np.ndarray]) -> Epoch:
    return Epoch(ds.get_batch(p) for p in positions)


def killer(client: Any, at: int) -> Callable[[int], None]:
    import ray

    def on_batch(i: int) -> None:
        if i == at:
            pid = ray.get(client.actors[0].pid.remote())
            log.info("SIGKILL actor 0 (pid %d) after batch %d", pid, i)
            os.kill(pid, signal.SIGKILL)

    return on_batch


def actor_pid(client: Any, timeout: float = 60.0) -> int:
    """Actor 0's pid, waiting while it restarts (a short epoch can end before a killed actor is back)."""
    import ray

    deadline = time.monotonic() + timeout
    while True:
        try:
            return ray.get(client.actors[0].pid.remote())
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", default=None, help="dataset size (PT files), at least 1GB for the record (default 1GB; 100MB --quick)"
    )
    parser.add_argument("--quick", action="store_true", help="100MB (unless --size is given), for development")
    parser.add_argument("--out", default="/tmp", help="where the dataset is written (bench-actors-<pairs>/)")
    parser.add_argument("--rounds", type=int, default=None, help="undisturbed epochs per way (default 3; quick 5)")
    parser.add_argument("--keep", action="store_true", help="keep the dataset for the next run")
    args = parser.parse_args()
    setup_logging()
    kept = keep_freed_memory()
    args.size = args.size or ("100MB" if args.quick else "1GB")
    rounds = args.rounds or (5 if args.quick else 3)
    n_pairs = pairs_for_size(parse_size(args.size), DIM, N_NEG)
    root = Path(args.out) / f"bench-actors-{n_pairs}"

    import ray
    import torch

    from jasper_ray import JASPERSteeringDataset, ShardedJasper

    try:
        directory = make_dataset(root, n_pairs)
        h5_bytes = (directory / "dataset.h5").stat().st_size
        pt_bytes = sum(p.stat().st_size for p in directory.glob("*.pt"))
        cpus = os.cpu_count() or 2
        store = (512 if args.quick else 1024) << 20
        log.info("starting Ray: %d CPUs, object store %s", cpus, fmt_bytes(store))
        ray.init(
            address="local",  # a Ray of our own, never a cluster someone left running here
            num_cpus=cpus,
            object_store_memory=store,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"HDF5_USE_FILE_LOCKING": "FALSE"}},
        )
        ds = JASPERSteeringDataset(directory, "train", epoch=EPOCH, seed=SEED, validate=False)
        order = make_sampler(len(ds), shuffle=True, seed=SEED, epoch=EPOCH).epoch_indices()
        positions = [order[i : i + BATCH] for i in range(0, len(order), BATCH)]
        split = np.sort(ds.split_indices.numpy())
        settings = ServeSettings(batch_size=BATCH, seed=SEED, num_cpus=0.4)  # 5 actors on 2 CPUs
        clients = {n: ShardedJasper(directory, "train", settings=settings, epoch=EPOCH, num_shards=n) for n in (1, 2)}
        calls = ShardedJasper(
            directory, "train", settings=settings, epoch=EPOCH, num_shards=2, pace_in_shared_memory=False
        )
        ways: dict[str, Callable[[], Epoch]] = {
            "local JASPERSteeringDataset": lambda: local_epoch(ds, positions),
            "1 actor": lambda: Epoch(clients[1]),
            "2 actors": lambda: Epoch(clients[2]),
            RAY_CALLS: lambda: Epoch(calls),
        }
        load_before = os.getloadavg()[0]
        log.info("warm-up epoch each (page cache, actor mappings)")
        for run in ways.values():
            run()
        runs: dict[str, list[Epoch]] = {name: [] for name in ways}
        rng = random.Random(0)
        names = list(ways)
        for r in range(rounds):
            rng.shuffle(names)
            for name in names:
                runs[name].append(ways[name]())
            log.info("round %d/%d done", r + 1, rounds)
        bad = [
            name
            for name in ("1 actor", "2 actors", RAY_CALLS)
            if any(not np.array_equal(np.sort(e.ids), split) for e in runs[name])
        ]
        if bad:
            raise SystemExit(f"{bad}: an epoch did not deliver every sample exactly once")

        median = {name: statistics.median(e.seconds for e in epochs) for name, epochs in runs.items()}
        samples = len(order)
        local_rate = samples / median["local JASPERSteeringDataset"]
        rows = []
        for name, epochs in runs.items():
            gaps = [g for e in epochs for g in e.gaps]
            rate = samples / median[name]
            record("actors", way=name, samples_per_s=rate, epoch_seconds=median[name], samples=samples)
            rows.append(
                (
                    name,
                    fmt_ms(median[name]),
                    fmt_rate(len(positions) / median[name], " batches/s"),
                    fmt_rate(rate, " samples/s"),
                    fmt_ratio(rate / local_rate),
                    fmt_ms(percentile(gaps, 50)),
                    fmt_ms(percentile(gaps, 99)),
                )
            )
        two = samples / median["2 actors"] / local_rate
        print_table(
            f"One epoch of {samples} train samples, batch {BATCH}, {n_pairs} pairs, D={DIM}, n_neg={N_NEG}, "
            f"PT files {fmt_bytes(pt_bytes)}, dataset.h5 {fmt_bytes(h5_bytes)} (contiguous)",
            ["way", "epoch (median)", "batches/s", "samples/s", "vs local", "p50 batch gap", "p99 batch gap"],
            rows,
            notes=[
                f"{rounds} epochs each, interleaved in shuffled order after one warm-up epoch each; page cache warm",
                "glibc keeps freed memory (mallopt: no mmap, no trim) in this process, so the local loader's fresh "
                "batches are not page-faulted in each step: its steady state "
                f"({'set' if kept else 'NOT set: no glibc'})",
                f"1-min load average {load_before:.1f} before the runs, {os.getloadavg()[0]:.1f} after, on {cpus} "
                "cores: the numbers mean something only on a quiet machine",
                "batch gap: time between consecutive batches delivered to the loop (pooled over the epochs)",
                f"Ray: {cpus} CPUs, actors num_cpus=0.4; paced: one call per actor per epoch, {PACED_AHEAD} batches "
                f"offered ahead, polling every {PACE_S * 1e3:g} ms; {RAY_CALLS}: one call per actor per 4 "
                f"batches, 8 in flight; torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; "
                "every service epoch delivered each sample once",
                f"target: 2 actors >= 0.8x local samples/s: {fmt_ratio(two)} -> {'met' if two >= 0.8 else 'MISSED'}",
            ],
        )

        kill_rows, worst = [], 0.0
        for n, client in clients.items():
            name = f"{n} actor" + ("s" if n > 1 else "")
            pid_before = ray.get(client.actors[0].pid.remote())
            killed = Epoch(client, on_batch=killer(client, len(positions) // 2))
            once = bool(np.array_equal(np.sort(killed.ids), split))
            pid_after = actor_pid(client)
            extra = killed.seconds - median[name]
            worst = max(worst, extra)
            kill_rows.append(
                (
                    name,
                    fmt_ms(median[name]),
                    fmt_ms(killed.seconds),
                    f"{extra:+.2f} s",
                    fmt_ms(max(killed.gaps)),
                    "yes" if once else "NO",
                    "yes" if pid_after != pid_before else "NO",
                )
            )
        print_table(
            "A killed actor: one epoch with actor 0 SIGKILLed halfway",
            [
                "way",
                "undisturbed epoch",
                "epoch with kill",
                "extra",
                "longest batch gap",
                "each sample once",
                "restarted",
            ],
            kill_rows,
            notes=[
                "the actor restarts (max_restarts=3) in a new process and reopens its mapping; the client builds "
                "the dead actor's rows until it is back, then gives it a new call from the current batch on",
                f"target: a killed actor costs < 2 s: worst {worst:+.2f} s -> {'met' if worst < 2 else 'MISSED'}",
            ],
        )

        client_mem = proc_status()
        print_table(
            "Memory after the runs",
            ["process", "rows owned", "bytes mapped", "RssAnon", "RssFile", "batches served"],
            [
                (
                    f"actor {s['shard'].split(' (')[0]} of {len(c.actors)}",
                    s["rows"],
                    fmt_bytes(s["bytes_mapped"]),
                    fmt_bytes(s["RssAnon"]),
                    fmt_bytes(s["RssFile"]),
                    s["batches_served"],
                )
                for c in clients.values()
                for s in c.stats()
            ]
            + [
                (
                    "client (this process)",
                    "-",
                    "-",
                    fmt_bytes(client_mem["RssAnon"]),
                    fmt_bytes(client_mem["RssFile"]),
                    "-",
                )
            ],
            notes=[
                "RssAnon: memory a process owns; RssFile: file pages mapped into it (page cache, shared by every "
                "process mapping dataset.h5, reclaimable)",
                f"the client's batch slots are shared memory (RssShmem {fmt_bytes(client_mem['RssShmem'])}); "
                "batches served count since the actor's last (re)start",
            ],
        )
        for client in (*clients.values(), calls):
            client.close()
        ds.close()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
