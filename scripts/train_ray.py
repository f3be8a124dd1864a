#!/usr/bin/env python
"""Train a small steering model with Ray Train, reading a JASPER dataset through ``read_jasper``.

    python scripts/train_ray.py                          # synthesise a small dataset, local Ray, 2 workers
    python scripts/train_ray.py --data DIR --epochs 5 --workers 4 --address auto

The model maps (question embedding, steering vector) to a query embedding,
``normalize(q + MLP([q, steering]))``, trained with an InfoNCE loss: the
target source against the pair's hard negatives and the other targets of the
batch. Torch DDP on CPU (gloo) through ``ray.train.torch.TorchTrainer``.

Epochs: one ``read_jasper(..., shuffle=True)`` Dataset serves the whole
run, passed to the trainer as ``datasets={"train": ds}``; each worker takes
``get_dataset_shard("train")`` once and iterates it once per epoch. Every
pass over the Dataset reads the next epoch (NOTE [passes over one
read_jasper Dataset] in jasper_ray/ray_data/datasource.py): a new shuffle,
and the steering variants of that epoch's curriculum, whose move the
per-epoch shares of each variant show. Ray Train splits the Dataset with
``streaming_split(n, equal=True)``: every worker gets the same number of
rows, and up to n-1 rows of an epoch may be dropped to make that so. The
synthetic dataset gets a linear curriculum (P(zero) 0.7 -> 0.1 over the
run's epochs) so that the move is visible.

CPUs: each worker asks for ``--cpus-per-worker`` CPUs (default: half of the
cluster's CPUs shared among the workers, at most 1), so that Ray Data's read
tasks always find a CPU; on a 2-core machine two workers holding a whole
CPU each would starve the reads and hang.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

log = logging.getLogger("train_ray")

COLUMNS = ["question_emb", "steering", "target_source_emb", "negative_embs", "steering_variant"]
VARIANTS = ("zero", "centroid", "keyword", "residual")  # steering_variant 0..3
HIDDEN = 256
TEMPERATURE = 0.05
LEARNING_RATE = 1e-3


def build_model(dim: int, hidden: int = HIDDEN) -> Any:
    import torch
    from torch import nn

    class SteeringModel(nn.Module):
        """Query embedding = normalize(q + MLP([q, steering]))."""

        def __init__(self) -> None:
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

        def forward(self, question: torch.Tensor, steering: torch.Tensor) -> torch.Tensor:
            out = question + self.mlp(torch.cat([question, steering], dim=-1))
            return nn.functional.normalize(out, dim=-1)

    return SteeringModel()


def info_nce(query: Any, target: Any, negatives: Any, temperature: float = TEMPERATURE) -> Any:
    """Cross-entropy of the target among [targets of the batch, the pair's hard negatives]."""
    import torch
    from torch.nn import functional as F

    target = F.normalize(target, dim=-1)
    negatives = F.normalize(negatives, dim=-1)
    in_batch = query @ target.T  # [B, B]: row i's positive is column i
    hard = torch.einsum("bd,bnd->bn", query, negatives)  # [B, NEG]
    logits = torch.cat([in_batch, hard], dim=1) / temperature
    return F.cross_entropy(logits, torch.arange(len(query), device=query.device))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: DDP over the model, one pass over its shard of ``train`` per epoch."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    torch.manual_seed(config["seed"])
    model = ray.train.torch.prepare_model(build_model(config["dim"]))
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    shard = ray.train.get_dataset_shard("train")  # one Dataset: each pass is the next epoch
    losses: list[float] = []
    steps_done: list[int] = []
    shares: list[list[float]] = []
    for epoch in range(config["epochs"]):
        total, steps = torch.zeros(2, dtype=torch.float64), 0
        counts = torch.zeros(len(VARIANTS), dtype=torch.float64)
        for batch in shard.iter_torch_batches(batch_size=config["batch_size"], drop_last=True):
            counts += torch.bincount(batch["steering_variant"], minlength=len(VARIANTS))
            query = model(batch["question_emb"], batch["steering"])
            loss = info_nce(query, batch["target_source_emb"], batch["negative_embs"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += torch.tensor([loss.item(), 1.0], dtype=torch.float64)
            steps += 1
            if config["steps_per_epoch"] is not None and steps >= config["steps_per_epoch"]:
                break
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)  # the epoch's mean loss over all workers' steps
            dist.all_reduce(counts)  # and the variants of all workers' samples
        losses.append(float(total[0] / max(total[1], 1.0)))
        steps_done.append(steps)
        shares.append((counts / counts.sum().clamp(min=1.0)).tolist())
        metrics = {"epoch": epoch, "loss": losses[-1], "losses": losses, "steps": steps_done, "shares": shares}
        # Ray Train 2.60 (Train V2) keeps metrics only with a checkpoint: rank 0 saves the model each epoch.
        with tempfile.TemporaryDirectory(prefix="jr-ckpt-") as tmp:
            checkpoint = None
            if ray.train.get_context().get_world_rank() == 0:
                torch.save(getattr(model, "module", model).state_dict(), Path(tmp) / "model.pt")
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)


def default_cpus_per_worker(num_workers: int) -> float:
    """Half the cluster's CPUs shared among the workers (at most 1 each): the other half reads data."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    return max(0.1, min(1.0, math.floor(10 * cpus / (2 * num_workers)) / 10))


def fit(
    data_dir: str | os.PathLike,
    epochs: int = 3,
    num_workers: int = 2,
    batch_size: int = 128,
    steps_per_epoch: int | None = None,
    *,
    cpus_per_worker: float | None = None,
    storage_format: str = "auto",
    seed: int = 0,
    lr: float = LEARNING_RATE,
    storage_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train on the ``train`` split of ``data_dir`` on the current Ray session (a local one is started if
    none); ``steps_per_epoch`` caps the steps each worker takes per epoch (None: the whole epoch).

    Returns the final metrics per epoch: ``losses``, ``steps`` (rank 0's) and ``shares`` (of
    each steering variant among the samples all workers trained on, in ``VARIANTS`` order).

    ``storage_path`` keeps the run (and the model checkpoint of each epoch) there; default: a temporary directory.
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from jasper_ray.formats import open_dataset
    from jasper_ray.ray_data import read_jasper

    if not ray.is_initialized():
        ray.init(include_dashboard=False, runtime_env={"env_vars": {"HDF5_USE_FILE_LOCKING": "FALSE"}})
    reader = open_dataset(data_dir, storage_format)
    dim = int(reader.config["embedding_dim"])
    reader.close()
    cpus = cpus_per_worker if cpus_per_worker is not None else default_cpus_per_worker(num_workers)
    # One Dataset for the whole run: Ray Train runs it once per epoch, and each run is the next epoch.
    dataset = read_jasper(data_dir, "train", seed=seed, shuffle=True, columns=COLUMNS, storage_format=storage_format)
    with tempfile.TemporaryDirectory(prefix="jr-train-") as tmp:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "dim": dim,
                "epochs": epochs,
                "batch_size": batch_size,
                "steps_per_epoch": steps_per_epoch,
                "seed": seed,
                "lr": lr,
            },
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=False, resources_per_worker={"CPU": cpus}),
            run_config=RunConfig(name="jasper-steering", storage_path=str(storage_path or tmp)),
            datasets={"train": dataset},
        )
        result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.metrics is None:
        raise RuntimeError("the training run reported no metrics")
    metrics = result.metrics
    return {
        "losses": [float(x) for x in metrics["losses"]],
        "steps": list(metrics["steps"]),
        "shares": [[float(x) for x in epoch] for epoch in metrics["shares"]],
    }


def synthesise(out: Path, n_pairs: int, dim: int, n_neg: int, epochs: int) -> Path:
    """A synthetic PT dataset whose curriculum moves P(zero) from 0.7 to 0.1 over ``epochs``, plus its
    uncompressed (memory-mapped) dataset.h5."""
    from jasper_ray import convert_pt_to_hdf5, synth_dataset

    synth_dataset(out, n_pairs=n_pairs, dim=dim, n_neg=n_neg, seed=0)
    config = json.loads((out / "config.json").read_text())
    last = max(1, epochs - 1)
    config["curriculum"] = {"mode": "linear", "zero_prob_start": 0.7, "zero_prob_end": 0.1, "epochs_total": last}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    convert_pt_to_hdf5(out, None, progress=False)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="a JASPER dataset directory (default: synthesise one)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="cap per worker (default: whole epoch)")
    parser.add_argument("--cpus-per-worker", type=float, default=None)
    parser.add_argument("--address", help="a Ray cluster to join (default: start a local Ray)")
    parser.add_argument("--pairs", type=int, default=20000, help="pairs of the synthetic dataset")
    parser.add_argument("--dim", type=int, default=64, help="embedding dim of the synthetic dataset")
    parser.add_argument("--n-neg", type=int, default=8, help="hard negatives per pair of the synthetic dataset")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    import ray
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False  # the per-epoch losses are the output
    with tempfile.TemporaryDirectory(prefix="jr-train-data-") as tmp:
        data = args.data
        if data is None:
            started = time.perf_counter()
            data = synthesise(Path(tmp) / "ds", args.pairs, args.dim, args.n_neg, args.epochs)
            print(
                f"synthesised {args.pairs} pairs (D={args.dim}, n_neg={args.n_neg}) in {data} "
                f"({time.perf_counter() - started:.1f} s)",
                flush=True,
            )
        if args.address:
            ray.init(address=args.address)
        else:  # a Ray of our own, even where another runs on this machine
            ray.init(
                address="local",
                include_dashboard=False,
                runtime_env={"env_vars": {"HDF5_USE_FILE_LOCKING": "FALSE"}},
            )
        try:
            started = time.perf_counter()
            result = fit(
                data,
                epochs=args.epochs,
                num_workers=args.workers,
                batch_size=args.batch_size,
                steps_per_epoch=args.steps_per_epoch,
                cpus_per_worker=args.cpus_per_worker,
            )
            elapsed = time.perf_counter() - started
        finally:
            ray.shutdown()
    losses = result["losses"]
    for epoch, (loss, shares) in enumerate(zip(losses, result["shares"])):
        mix = ", ".join(f"{name} {share:.0%}" for name, share in zip(VARIANTS, shares))
        print(f"epoch {epoch}: loss {loss:.4f}; steering variants: {mix}")
    went_down = len(losses) > 1 and losses[-1] < losses[0]
    print(
        f"trained {len(losses)} epochs on {args.workers} workers in {elapsed:.1f} s; "
        f"loss {'went down' if went_down else 'did NOT go down'}: {losses[0]:.4f} -> {losses[-1]:.4f}"
    )
    return 0 if went_down or len(losses) < 2 else 1


if __name__ == "__main__":
    sys.exit(main())
