"""``JASPERSteeringDataset``: upstream's torch Dataset API over the format reader.

Same constructor, sample dict, methods and attributes as upstream
(RAG_supporters), without its bugs: steering variants are a pure function of
(seed, epoch, pair id) (NOTE in sampling.py); ``set_epoch`` and
``force_steering`` live in shared memory so DataLoader workers see them (the
persistent ones, and those a new pass forks or spawns); ``__getitems__``
assembles a whole batch in one vectorised call; the dataset pickles (paths,
not handles) so spawn workers work; mmap is real.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..assembly import ReaderSource, assemble_batch, output_precision
from ..config import read_config_file
from ..conversion import writer
from ..conversion.writer import ConversionReport
from ..errors import DatasetNotFoundError
from ..formats import StorageFormat, chunk_gathers_warning, open_dataset
from ..formats.base import Reader
from ..formats.verified import VerifyMode
from ..sampling import DEFAULT_SEED, VARIANT_ID, SteeringSchedule, steering_variants
from ..schema import CONFIG_FILE, HDF5_FILE, MANIFEST, SHARDS_DIR, STEERING_VARIANTS, TENSOR
from ..storage import Location, locate
from ..validate import check_epoch, check_positions, validate_dataset
from .batches import SampleBatch, TensorSource, as_tensor, to_torch

if TYPE_CHECKING:
    import pyarrow.fs as pafs

log = logging.getLogger(__name__)

_NOT_FORCED = -1
Positions = Sequence[int] | np.ndarray | torch.Tensor  # positions in the split (not pair ids)


class _Core:
    """What the splits of one dataset share: the reader, the placed tensors and the schedule."""

    def __init__(
        self, reader: Reader, device: torch.device, reopen: Callable[[bool], Reader], validate: bool, dtype: object
    ):
        if validate:
            validate_dataset(reader)  # floats: checked by the reader on first touch (NOTE [when values are checked])
        self.reader = reader
        self.reopen = reopen  # (use_mmap) -> the same dataset opened again (a picklable partial)
        self.device = device
        self.dtype = dtype  # as asked; ``precision`` is what it means for the files now open
        self.precision = output_precision(dtype, reader.precision)
        self.schedule = SteeringSchedule(reader.config)
        self.source = self._make_source()
        # Bumped by every reload, in shared memory: copies of this core in DataLoader workers (persistent
        # ones too) see it and reload before their next batch.
        self.generation = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.loaded_generation = 0

    def _make_source(self) -> ReaderSource | TensorSource:
        if self.device.type == "cpu" and self.reader.use_mmap:
            return ReaderSource(self.reader, self.precision)
        return TensorSource(self.reader, self.device, self.precision)

    def reload(self, validate: bool) -> None:
        """Reopen the files (they may have been rewritten) and place the tensors again, in every process."""
        self._reopen(validate)
        self.generation += 1
        self.loaded_generation = int(self.generation)

    def sync(self) -> None:
        """Catch up with a reload done by another process (the main one, for a worker)."""
        generation = int(self.generation)
        if generation != self.loaded_generation:
            self._reopen(validate=False)  # the process that reloaded has validated
            self.loaded_generation = generation

    def _reopen(self, validate: bool) -> None:
        self.reader.close()
        reader = self.reopen(self.reader.use_mmap)
        if validate:
            validate_dataset(reader)
        self.reader = reader
        self.precision = output_precision(self.dtype, reader.precision)
        del self.source  # the old tensors go before the new ones are placed (device memory)
        self.source = self._make_source()


def _check_local(directory: Path) -> None:
    """Upstream's errors for a local directory that is missing, or has neither config nor converted data."""
    if not directory.is_dir():
        raise DatasetNotFoundError(f"Dataset directory not found: {directory}")
    embedded = (directory / HDF5_FILE).is_file() or (directory / SHARDS_DIR / MANIFEST).is_file()
    if read_config_file(directory) is None and not embedded:  # converted files carry the config
        raise DatasetNotFoundError(f"Config file not found: {directory / CONFIG_FILE}")


def _reopen(location: Location, storage_format: StorageFormat, use_mmap: bool | None, **cache: Any) -> Reader:
    return open_dataset(location, storage_format, use_mmap, **cache)


def _check_split(reader: Reader, split: str) -> None:
    """Upstream's wording for a split that is not there."""
    if split not in reader.split_names():
        raise DatasetNotFoundError(
            f"Split file not found: {reader.location_split(split)}. "
            f"Valid splits are: {', '.join(reader.split_names()) or 'none'}"
        )


def _tensor_property(name: str) -> property:
    spec = TENSOR[name]  # a name the schema does not know fails at import

    def get(self: JASPERSteeringDataset) -> torch.Tensor:
        core = self._live_core()
        if isinstance(core.source, TensorSource):
            return core.source.tensor(spec.name)
        return as_tensor(np.asarray(core.reader.read(spec.name)))

    return property(get, doc=f"The whole ``{spec.name}`` tensor (mapped, not copied, when use_mmap).")


class JASPERSteeringDataset(Dataset):
    """One split of a JASPER dataset as a torch ``Dataset`` of upstream's nine-key samples.

    ``dtype`` (default float32) is what the embedding keys come as from a dataset stored at 16 bits:
    float32 decoded inside the gather, or the stored "float16" / "bfloat16" (``dataset.dtype``)."""

    def __init__(
        self,
        dataset_dir: str | os.PathLike,
        split: str,
        epoch: int = 0,
        device: torch.device | str | None = None,
        storage_format: StorageFormat = "auto",
        use_mmap: bool | None = None,
        *,
        seed: int = DEFAULT_SEED,
        validate: bool = True,
        filesystem: pafs.FileSystem | None = None,
        cache_dir: str | os.PathLike | None = None,
        cache_limit: int | None = None,
        verify: VerifyMode = "first-touch",
        dtype: str | torch.dtype | None = None,
        _core: _Core | None = None,
    ):
        location = locate(dataset_dir, filesystem)
        # A remote dataset keeps its URI; a local one is a Path, as upstream's attribute was.
        self.dataset_dir: Path | str = location.uri if location.is_remote else Path(dataset_dir)
        self.split = split
        self.seed = int(seed)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if _core is None:
            if not location.is_remote:
                _check_local(Path(dataset_dir))
            if use_mmap is None and self.device.type != "cpu":
                use_mmap = False  # tensors are placed on the device whole anyway
            reopen = functools.partial(
                _reopen, location, storage_format, cache_dir=cache_dir, cache_limit=cache_limit, verify=verify
            )
            reader = reopen(use_mmap)
            if (slow := chunk_gathers_warning(reader)) is not None:
                log.warning(slow)
            _check_split(reader, split)  # before validating everything, as upstream
            _core = _Core(reader, self.device, reopen, validate, dtype)
        _check_split(_core.reader, split)
        self._core: _Core | None = _core
        self.config: dict[str, Any] = _core.reader.config
        self.embedding_dim = int(self.config["embedding_dim"])
        self.n_neg = int(self.config["n_neg"])
        # numpy owns the ids and the tensor views them, not the reverse: pickling for spawn workers moves a
        # tensor's storage into shared memory, which would leave a numpy view of it dangling.
        self._split_ids = np.array(_core.reader.split(split), dtype=np.int64)
        self.split_indices = torch.from_numpy(self._split_ids)
        # [epoch, forced variant]: shared memory, so workers (persistent ones too) see set_epoch / force_steering.
        self._control = torch.tensor([check_epoch(epoch), _NOT_FORCED], dtype=torch.int64).share_memory_()
        log.info(
            "Dataset initialized: %d samples, embedding_dim=%d, n_neg=%d, device=%s, storage=%s, mmap=%s, "
            "memory=%.1f MB resident (%.1f MB on disk)",
            len(self),
            self.embedding_dim,
            self.n_neg,
            self.device,
            self.storage_format,
            self.use_mmap,
            _core.source.resident_bytes / 2**20,
            _core.reader.nbytes_on_disk() / 2**20,
        )

    @property
    def storage_format(self) -> str:
        """ "pt" or "hdf5": what is being served now (a reload may fall back from a stale dataset.h5)."""
        return self._live_core().reader.storage_format

    @property
    def dtype(self) -> str:
        """What the embedding keys are served as: "float32" (decoded inside the gather, the default), or
        the stored "float16" / "bfloat16" asked for with ``dtype=`` (torch.float16 / torch.bfloat16 tensors)."""
        return self._live_core().precision

    @property
    def use_mmap(self) -> bool:
        """Whether the tensors are memory-mapped rather than read into RAM."""
        return self._live_core().reader.use_mmap

    # --- state shared with workers -----------------------------------------
    @property
    def current_epoch(self) -> int:
        """The epoch whose variants are served (shared with DataLoader workers)."""
        return int(self._control[0])

    def set_epoch(self, epoch: int) -> None:
        """Variants (and curriculum probabilities) of ``epoch`` from the next batch on, in every worker."""
        self._control[0] = check_epoch(epoch)

    def force_steering(self, variant: str | None) -> None:
        """Serve only ``variant`` ("zero", "centroid", "keyword", "residual"), or sample again with None."""
        if variant is not None and variant not in VARIANT_ID:
            raise ValueError(
                f"Unknown steering variant: {variant!r}; expected one of {list(STEERING_VARIANTS)} or None"
            )
        self._control[1] = _NOT_FORCED if variant is None else VARIANT_ID[variant]

    @property
    def steering_probs(self) -> dict[str, float]:
        """The variant probabilities at the current epoch."""
        return self._live_core().schedule.probs(self.current_epoch)

    # --- samples -----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._split_ids)

    def variants(self, pair_ids: np.ndarray) -> np.ndarray:
        forced = int(self._control[1])
        if forced != _NOT_FORCED:
            return np.full(len(pair_ids), forced, dtype=np.int64)
        epoch = self.current_epoch
        return steering_variants(pair_ids, epoch, self.seed, self._live_core().schedule.probs(epoch))

    def _pair_ids(self, indices: Positions) -> np.ndarray:
        return self._split_ids[check_positions(indices, len(self), f"positions in split {self.split!r}")]

    def get_batch(self, indices: Positions, out: dict[str, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
        """The collated batch for split positions ``indices``, in one vectorised call; written into ``out``
        (arrays of ``len(indices)`` rows per key, a loader worker's slot) when given."""
        pair_ids = self._pair_ids(indices)
        source = self._live_core().source
        into = to_torch(out) if out is not None and isinstance(source, TensorSource) else out
        return to_torch(assemble_batch(source, pair_ids, self.variants(pair_ids), out=into))

    def __getitems__(self, indices: list[int]) -> SampleBatch:
        return SampleBatch(self.get_batch(indices))

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if isinstance(idx, torch.Tensor):
            idx = idx.item()
        if not isinstance(idx, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(idx).__name__}")
        return {key: value[0] for key, value in self.get_batch([idx]).items()}

    # --- upstream's lifecycle -----------------------------------------------------------
    def _live_core(self) -> _Core:
        if self._core is None:
            raise AttributeError(f"{type(self).__name__} for {self.dataset_dir} was closed")
        self._core.sync()
        return self._core

    def reload_negatives(self) -> None:
        """Re-read the dataset from disk (rewritten negatives included), validate and place it again."""
        self._live_core().reload(validate=True)

    def close(self) -> None:
        """Drop the tensors and handles; the dataset is unusable afterwards (as upstream)."""
        if self._core is not None:
            log.info("Closing dataset %s (%s)", self.dataset_dir, self.split)
            self._core = None

    def __enter__(self) -> JASPERSteeringDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def reader(self) -> Reader:
        """The format reader underneath (``jasper_ray.open_dataset``)."""
        return self._live_core().reader

    @property
    def pair_keyword_ids(self) -> list[list[int]]:
        """Upstream's list of lists (built on first access; use ``reader.keyword_ids`` for batches)."""
        stored, offsets = self._live_core().reader.keyword_csr()
        values = np.asarray(stored[:])
        return [values[offsets[p] : offsets[p + 1]].tolist() for p in range(len(offsets) - 1)]

    @staticmethod
    def create_combined_splits(
        dataset_dir: str | os.PathLike,
        epoch: int = 0,
        device: torch.device | str | None = None,
        storage_format: StorageFormat = "auto",
        use_mmap: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, JASPERSteeringDataset]:
        """train / val / test over one reader and one copy of the tensors (upstream loaded three)."""
        first = JASPERSteeringDataset(dataset_dir, "train", epoch, device, storage_format, use_mmap, **kwargs)
        kwargs.pop("validate", None)
        out = {"train": first}
        for split in ("val", "test"):
            out[split] = JASPERSteeringDataset(
                dataset_dir, split, epoch, device, storage_format, use_mmap, validate=False, _core=first._core, **kwargs
            )
        return out

    @staticmethod
    def convert_pt_to_hdf5(
        dataset_dir: str | os.PathLike, compression: str | None = "gzip", **kwargs: Any
    ) -> ConversionReport:
        """Write ``dataset.h5`` beside the PT files (they are kept).

        Converts in parallel with Ray tasks (``jasper_ray.convert``) when Ray is importable and worth
        its start-up: a Ray session is already running, ``RAY_ADDRESS`` names a cluster, or the data is
        larger than one shard. Otherwise in this process (``jasper_ray.convert_pt_to_hdf5``).
        """
        # lazy: the Ray converter, whose module asks for Ray; a torch user converting in this process never needs it
        from ..conversion.parallel import convert, ray_worthwhile

        if ray_worthwhile(dataset_dir):
            return convert(dataset_dir, compression=compression, **kwargs)
        return writer.convert_pt_to_hdf5(dataset_dir, compression, **kwargs)

    # Upstream's tensor attributes, one per schema.TENSORS entry: the whole tensor, mapped when use_mmap.
    question_embs = _tensor_property("question_embs")
    source_embs = _tensor_property("source_embs")
    keyword_embs = _tensor_property("keyword_embs")
    centroid_embs = _tensor_property("centroid_embs")
    pair_index = _tensor_property("pair_index")
    pair_cluster_id = _tensor_property("pair_cluster_id")
    pair_relevance = _tensor_property("pair_relevance")
    hard_negatives = _tensor_property("hard_negatives")
    negative_tiers = _tensor_property("negative_tiers")
    steering_centroid = _tensor_property("steering_centroid")
    steering_keyword_weighted = _tensor_property("steering_keyword_weighted")
    steering_residual = _tensor_property("steering_residual")
    centroid_distances = _tensor_property("centroid_distances")
