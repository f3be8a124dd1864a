"""Loader helpers with upstream's names: ``create_loader``, ``set_epoch``, ``validate_first_batch``.

``create_loader`` returns a ``ResumableLoader``: a DataLoader over the
batched path (``__getitems__`` + ``collate``) with a ``ResumableSampler``,
whose ``state_dict()`` counts the samples actually delivered to the training
loop (not the ones prefetched by workers), so resuming yields exactly the rest.
Its DataLoader arguments default as torch's do (workers are not persistent
unless asked), except ``pin_memory``, which keeps upstream's ``True`` and
pins only where an accelerator exists (NOTE [pin_memory without an accelerator]).
Its workers are ``local.workers``' (batches built in shared-memory slots, no per-batch copy; NOTE
[a held batch is never overwritten]) wherever it serves a JASPER dataset on the CPU.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator
from multiprocessing.context import BaseContext
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torch.utils.data.dataloader import _BaseDataLoaderIter

from ..assembly import SAMPLE_KEYS, sample_dtype
from ..errors import FirstBatchError
from ..sampling import DEFAULT_SEED
from ..shm import SlotPool
from .batches import collate, torch_dtype
from .dataset import JASPERSteeringDataset
from .sampler import ResumableSampler, make_sampler
from .workers import SlotWorkers, slot_pool

log = logging.getLogger(__name__)


def accelerator_available() -> bool:
    """Whether pinned host memory would serve anything: an accelerator torch can copy batches to."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6; CUDA before it
    return bool(accelerator.is_available()) if accelerator is not None else torch.cuda.is_available()


class ResumableLoader(DataLoader):
    """A DataLoader that can save and restore its place in an epoch."""

    def __init__(self, *args: Any, copy: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.copy = copy  # workers hand out private copies instead of tensors over their slots
        self.samples_delivered = 0
        self._delivered_epoch: int | None = None  # the epoch samples_delivered counts in
        self._pool: SlotPool | None = None  # the workers' batch slots: made on the first pass, kept
        self._workers: SlotWorkers | None = None  # the running ones (kept between passes when persistent)

    # A generator that counts what reached the training loop, not torch's iterator class.
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler = self.sampler
        self.samples_delivered = sampler.start if isinstance(sampler, ResumableSampler) else 0
        self._delivered_epoch = getattr(sampler, "epoch", None)
        for batch in self._slot_batches() if self._uses_slots() else super().__iter__():
            self.samples_delivered += _batch_len(batch)
            yield batch
        if isinstance(sampler, ResumableSampler):
            sampler.start = 0  # a resumed epoch is done: the next pass is a whole epoch

    def _uses_slots(self) -> bool:
        """Workers of ``local.workers`` (slots, no per-batch copy) serve a JASPER dataset on the CPU,
        batched and collated by ``collate``; anything else goes through torch's workers."""
        dataset = self.dataset
        return (
            self.num_workers > 0
            and self.batch_sampler is not None
            and self.collate_fn is collate
            and isinstance(dataset, JASPERSteeringDataset)
            and dataset.device.type == "cpu"
        )

    def _slot_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        dataset, batch_sampler = self.dataset, self.batch_sampler
        if not isinstance(dataset, JASPERSteeringDataset) or self.batch_size is None or batch_sampler is None:
            raise TypeError("slot workers serve a JASPERSteeringDataset in batches (see _uses_slots)")
        if self._pool is None:
            pin = bool(self.pin_memory) and torch.cuda.is_available()
            self._pool = slot_pool(dataset, self.batch_size, pin)
        workers = self._workers
        if workers is None:
            workers = self._workers = SlotWorkers(
                dataset,
                self.num_workers,
                self.batch_size,
                pool=self._pool,
                context=self.multiprocessing_context,
                worker_init_fn=self.worker_init_fn,
                timeout=self.timeout,
                prefetch=(self.prefetch_factor or 2) * self.num_workers,
            )
        try:
            yield from workers.batches(batch_sampler, self.copy)
        finally:
            if not self.persistent_workers or workers.broken:
                workers.close()
                self._workers = None

    @property
    def worker_pids(self) -> list[int]:
        """The pids of the slot workers running now (none between passes unless persistent)."""
        return self._workers.pids if self._workers is not None else []

    def close(self) -> None:
        """Stop the workers and unlink the batch slots now (collecting the loader does it too). Batches
        still held keep their memory until dropped."""
        if self._workers is not None:
            self._workers.close()
            self._workers = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    # NOTE [pin_memory without an accelerator]
    # Upstream's create_loader defaults to pin_memory=True, and code reads loader.pin_memory, so the
    # attribute keeps what was asked. Where no accelerator exists, torch pins nothing anyway but warns
    # on every epoch ("no accelerator is found"); the iterator is built as pin_memory=False would build it.
    def _get_iterator(self) -> _BaseDataLoaderIter:
        if not self.pin_memory or accelerator_available():
            return super()._get_iterator()
        self.pin_memory = False
        try:
            return super()._get_iterator()
        finally:
            self.pin_memory = True

    def _resumable_sampler(self, what: str) -> ResumableSampler:
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError(f"{what} needs a ResumableSampler (use create_loader)")
        return self.sampler

    def state_dict(self) -> dict[str, int]:
        sampler = self._resumable_sampler("state_dict")
        # After set_epoch and before the new epoch's first batch, nothing of the new epoch was delivered.
        seen = self.samples_delivered if self._delivered_epoch == sampler.epoch else sampler.start
        return sampler.state_dict(seen)

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the saved epoch where it stopped (the dataset moves to that epoch too)."""
        self._resumable_sampler("load_state_dict").load_state_dict(state)
        self.samples_delivered = state["samples_seen"]
        self._delivered_epoch = state["epoch"]
        dataset = _jasper_dataset(self)
        if dataset is not None:
            dataset.set_epoch(state["epoch"])


def _batch_len(batch: Any) -> int:
    if isinstance(batch, dict):
        batch = next(iter(batch.values()))
    return len(batch)


def _jasper_dataset(loader: DataLoader) -> JASPERSteeringDataset | None:
    dataset = getattr(loader, "dataset_obj", None) or loader.dataset
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset if isinstance(dataset, JASPERSteeringDataset) else None


def create_loader(
    dataset_dir: str | os.PathLike,
    split: str,
    batch_size: int,
    num_workers: int = 0,
    distributed: bool = False,
    epoch: int = 0,
    drop_last: bool | None = None,
    pin_memory: bool = True,
    *,
    shuffle: bool | None = None,
    seed: int = DEFAULT_SEED,
    persistent_workers: bool = False,
    multiprocessing_context: str | BaseContext | None = None,
    copy: bool = False,
    **dataset_kwargs: Any,
) -> ResumableLoader:
    """A DataLoader over one split; ``dataset_kwargs`` (``storage_format``, ``use_mmap``, ``device``,
    ``dtype``, ...) go to ``JASPERSteeringDataset``. ``distributed`` shards over the initialised process group.

    DataLoader arguments default as torch's: ``persistent_workers=False`` (a pass starts its workers and
    pickles the dataset again; ``set_epoch`` reaches them either way). ``pin_memory=True`` is upstream's
    default and pins only where an accelerator exists (no warning on a CPU-only machine).

    With ``num_workers > 0`` the workers build batches straight into a ring of shared-memory slots
    (``jasper_ray.local.workers``; pinned where CUDA is present): no copy per batch between processes. A
    batch you hold is never overwritten: its slot is reused only once all its tensors are dropped;
    ``copy=True`` hands out private copies instead. Same batches as ``num_workers=0``, bit for bit."""
    dataset = JASPERSteeringDataset(dataset_dir, split, epoch=epoch, seed=seed, **dataset_kwargs)
    shuffle = split == "train" if shuffle is None else shuffle
    drop_last = split == "train" if drop_last is None else drop_last
    num_replicas, rank = 1, 0
    if distributed:
        num_replicas, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    sampler = make_sampler(dataset, shuffle=shuffle, seed=seed, epoch=epoch, num_replicas=num_replicas, rank=rank)
    loader = ResumableLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        pin_memory=pin_memory and dataset.device.type == "cpu",  # batches already on a device cannot be pinned
        persistent_workers=persistent_workers,
        multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
        copy=copy,
    )
    loader.dataset_obj = dataset  # upstream's attribute names
    loader.sampler_obj = sampler
    return loader


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Move the dataset (all its workers) and the sampler to ``epoch``. With jasper_ray's samplers,
    ``loader.sampler.set_epoch(epoch)`` alone does the same; with another sampler (torch's
    ``DistributedSampler``), call this."""
    dataset = _jasper_dataset(loader)
    if dataset is not None:
        dataset.set_epoch(epoch)
    sampler = getattr(loader, "sampler_obj", None) or loader.sampler
    if isinstance(sampler, (ResumableSampler, DistributedSampler)):
        sampler.set_epoch(epoch)


def first_batch(loader: DataLoader) -> dict[str, torch.Tensor]:
    """The loader's first batch, built without iterating the loader (no state moves, no workers start)."""
    dataset = _jasper_dataset(loader)
    if dataset is None or loader.dataset is not dataset:
        return next(iter(loader))
    sampler = loader.sampler
    if isinstance(sampler, ResumableSampler):  # its positions, without starting a pass over it
        return dataset.get_batch(sampler.epoch_indices()[sampler.start :][: loader.batch_size or 1])
    indices = list(itertools.islice(iter(sampler), loader.batch_size or 1))
    return dataset.get_batch(indices)


def _check_rows(batch: dict[str, torch.Tensor], key: str, ok: torch.Tensor, expected: str) -> None:
    """Raise naming the first sample of ``batch[key]`` where ``ok`` (per element) is False."""
    ok_rows = ok.flatten(start_dim=1).all(dim=1) if ok.dim() > 1 else ok
    if not bool(ok_rows.all()):
        i = int(torch.argmin(ok_rows.to(torch.uint8)))
        value = batch[key][i]
        found = value.item() if value.dim() == 0 else "NaN or Inf"
        raise FirstBatchError(f"{key} of the first batch", found, expected, position=i)


def validate_first_batch(loader: DataLoader) -> bool:
    """Upstream's checks on the first batch (keys, shapes, dtypes, finiteness, value ranges); True when
    they pass. Each failure raises ``FirstBatchError`` naming the key, the sample, what was found and
    what was expected; explicit checks, so ``python -O`` checks too."""
    batch = first_batch(loader)
    if set(batch) != set(SAMPLE_KEYS):
        raise FirstBatchError(
            "keys of the first batch",
            sorted(batch),
            f"upstream's sample keys {sorted(SAMPLE_KEYS)}",
            summary=f"batch keys differ from the expected ones: {sorted(set(SAMPLE_KEYS) ^ set(batch))}",
        )
    b = len(batch["steering_variant"])
    sizes = {"D": batch["question_emb"].shape[-1], "NEG": batch["negative_tiers"].shape[-1]}
    dataset = _jasper_dataset(loader)
    precision = dataset.dtype if dataset is not None else "float32"
    for key, (shape, _) in SAMPLE_KEYS.items():
        dtype = sample_dtype(key, precision)
        expected = (b, *(sizes[s] for s in shape))
        if tuple(batch[key].shape) != expected:
            raise FirstBatchError(f"{key} of the first batch", f"shape {tuple(batch[key].shape)}", f"shape {expected}")
        if batch[key].dtype != torch_dtype(dtype):
            raise FirstBatchError(f"{key} of the first batch", f"dtype {batch[key].dtype}", f"dtype {dtype}")
    for key in ("question_emb", "target_source_emb", "steering", "negative_embs"):
        _check_rows(batch, key, torch.isfinite(batch[key]), "finite values")
    if dataset is not None:
        n_clusters = len(dataset.centroid_embs)
        cid = batch["cluster_id"]
        _check_rows(
            batch, "cluster_id", (cid >= 0) & (cid < n_clusters), f"a row of centroid_embs, in [0, {n_clusters})"
        )
    for key, high in (("relevance", 1), ("centroid_distance", 2), ("steering_variant", 3)):
        values = batch[key]
        _check_rows(batch, key, (values >= 0) & (values <= high), f"a value in [0, {high}]")
    log.info("first batch ok: %s", {k: tuple(v.shape) for k, v in batch.items()})
    return True
