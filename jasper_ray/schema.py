"""Every tensor of a JASPER dataset, and every file, folder and attribute name, named once.

Readers, writers, validation and conversion look tensors up here by their
``name`` (the upstream attribute name, which is also the PT file's stem); no
other module spells a file name, a suffix, an HDF5 path or an attribute name.
The bottom floor: imports nothing of the package.

Shape rules use symbols: ``P`` pairs, ``Q`` questions, ``S`` sources,
``K`` keywords, ``C`` clusters (centroids), ``D`` embedding dim, ``NEG`` the
number of hard negatives per pair, ``2`` a literal size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FORMAT_VERSION = 1
PT_SUFFIX = ".pt"
HDF5_SUFFIX = ".h5"
# What ``open_dataset`` accepts as a path to an HDF5 file (rather than to a dataset directory).
HDF5_SUFFIXES = (HDF5_SUFFIX, ".hdf5")
HDF5_FILE = f"dataset{HDF5_SUFFIX}"
CONFIG_FILE = "config.json"
# Beside PT files: the per-block digests of their tensors (NOTE [PT checksum sidecar] in formats.pt_checksums).
PT_CHECKSUMS = "pt_checksums.json"
# The sharded layout: a directory of shard files and the manifest that is their truth.
SHARDS_DIR = "dataset.shards"
MANIFEST = "manifest.json"
# The layouts a conversion writes (``convert(layout=...)``, ``--layout``): one file, or the sharded
# directory (also the manifest's "layout").
LAYOUT_SINGLE = "single"
LAYOUT_SHARDED = "sharded"
LAYOUTS = (LAYOUT_SINGLE, LAYOUT_SHARDED)

# A conversion's work directory (hidden beside its output: never auto-detected) holds its piece files
# (``<piece id>.h5``), the plan they belong to and the lock that keeps a second conversion out.
WORK_SUFFIX = ".work"
PLAN_FILE = "plan.json"
LOCK_FILE = "lock"
# Where a published sharded directory moves while its replacement is renamed into place.
OLD_SUFFIX = ".old"


def work_dir_name(output_name: str) -> str:
    return f".{output_name}{WORK_SUFFIX}"


def old_dir_name(final_name: str, mark: str) -> str:
    """``mark`` tags the name as temporary (``atomic.TEMP_MARK`` and a pid): orphan cleanup finds it."""
    return f".{final_name}{OLD_SUFFIX}{mark}"


def piece_file(piece_id: str) -> str:
    return f"{piece_id}{HDF5_SUFFIX}"


@dataclass(frozen=True)
class TensorSpec:
    """One dense tensor: where it lives in each format and what it must look like."""

    name: str
    pt_file: str
    h5_path: str
    dtype: np.dtype
    shape: tuple[str, ...]
    # Paths that older writers (upstream's converter) used for the same tensor.
    h5_aliases: tuple[str, ...] = ()

    @property
    def rows(self) -> str:
        return self.shape[0]

    @property
    def reducible(self) -> bool:
        """Whether a conversion's ``precision`` applies: the float ``[rows, D]`` tensors (tables, steering)."""
        return self.dtype.kind == "f" and self.shape[-1] == "D"


def _spec(name: str, h5_path: str, dtype: str, shape: tuple[str, ...], aliases: tuple[str, ...] = ()) -> TensorSpec:
    return TensorSpec(name, f"{name}{PT_SUFFIX}", h5_path, np.dtype(dtype), shape, aliases)


TENSORS: tuple[TensorSpec, ...] = (
    _spec("question_embs", "embeddings/questions", "float32", ("Q", "D")),
    _spec("source_embs", "embeddings/sources", "float32", ("S", "D")),
    _spec("keyword_embs", "embeddings/keywords", "float32", ("K", "D")),
    _spec("centroid_embs", "embeddings/centroids", "float32", ("C", "D")),
    _spec("pair_index", "pair_data/index", "int64", ("P", "2")),
    _spec("pair_cluster_id", "pair_data/cluster_id", "int64", ("P",)),
    _spec("pair_relevance", "pair_data/relevance", "float32", ("P",)),
    _spec("hard_negatives", "negatives/hard", "int64", ("P", "NEG"), ("negatives/hardnegatives",)),
    _spec("negative_tiers", "negatives/tiers", "int64", ("P", "NEG")),
    _spec("steering_centroid", "steering/centroid", "float32", ("P", "D")),
    _spec("steering_keyword_weighted", "steering/keyword_weighted", "float32", ("P", "D")),
    _spec("steering_residual", "steering/residual", "float32", ("P", "D")),
    _spec("centroid_distances", "steering/distances", "float32", ("P",)),
)
TENSOR = {spec.name: spec for spec in TENSORS}

# Which entity table each symbol counts the rows of.
ENTITY_OF_SYMBOL = {"Q": "question_embs", "S": "source_embs", "K": "keyword_embs", "C": "centroid_embs"}


@dataclass(frozen=True)
class RaggedSpec:
    """Keyword ids: one sorted list of keyword ids per pair.

    Upstream pickles a ``List[List[int]]`` and its HDF5 converter writes one
    dataset per pair under ``h5_group``; we write CSR (``values`` + ``offsets``,
    ``offsets[p]:offsets[p+1]`` are pair ``p``'s ids) in the same group.
    """

    name: str
    pt_file: str
    h5_group: str
    h5_values: str
    h5_offsets: str
    dtype: np.dtype


KEYWORD_IDS = RaggedSpec(
    "pair_keyword_ids",
    f"pair_keyword_ids{PT_SUFFIX}",
    "pair_data/keyword_ids",
    "pair_data/keyword_ids/values",
    "pair_data/keyword_ids/offsets",
    np.dtype("int64"),
)

SPLIT_NAMES = ("train", "val", "test")
SPLIT_DTYPE = np.dtype("int64")
SPLIT_H5_GROUP = "splits"


SPLIT_PT_SUFFIX = f"_idx{PT_SUFFIX}"
SPLIT_PT_GLOB = f"*{SPLIT_PT_SUFFIX}"


def split_pt_file(split: str) -> str:
    return f"{split}{SPLIT_PT_SUFFIX}"


def split_h5_path(split: str) -> str:
    return f"{SPLIT_H5_GROUP}/{split}"


def split_from_pt_file(file_name: str) -> str | None:
    """``train_idx.pt`` -> ``train``; anything else -> None."""
    suffix = SPLIT_PT_SUFFIX
    return file_name[: -len(suffix)] if file_name.endswith(suffix) and len(file_name) > len(suffix) else None


# Upstream's detection probes only this file to decide a directory holds PT data.
PT_PROBE = TENSOR["question_embs"].pt_file

# Files a PT dataset consists of (splits are found by pattern).
PT_FILES = tuple(spec.pt_file for spec in TENSORS) + (KEYWORD_IDS.pt_file,)

STEERING_VARIANTS = ("zero", "centroid", "keyword", "residual")
# Variant id -> the tensor its steering vector comes from (zero has none).
STEERING_TENSOR = {1: "steering_centroid", 2: "steering_keyword_weighted", 3: "steering_residual"}
TIER_RANGE = (1, 4)

# Storage precision of the reducible tensors (``TensorSpec.reducible``): ``convert(precision=...)``,
# ``--precision``. bfloat16 has no numpy or HDF5 type: its bit patterns are stored as uint16 (the upper
# half of the float32 bits), and a uint16 float tensor is bfloat16 everywhere in the package.
PRECISION_FLOAT32, PRECISION_FLOAT16, PRECISION_BFLOAT16 = "float32", "float16", "bfloat16"
PRECISIONS = (PRECISION_FLOAT32, PRECISION_FLOAT16, PRECISION_BFLOAT16)
PRECISION_DTYPES: dict[str, np.dtype] = {
    PRECISION_FLOAT32: np.dtype("float32"),
    PRECISION_FLOAT16: np.dtype("float16"),
    PRECISION_BFLOAT16: np.dtype("uint16"),
}

# HDF5 attribute names (root and per dataset).
ATTR_FORMAT_VERSION = "jasper_format_version"
ATTR_CONFIG = "config_json"
ATTR_FINGERPRINT = "source_fingerprint"
ATTR_CHECKSUM = "sha256"
ATTR_CHECKSUM_BLOCK_ROWS = "sha256_block_rows"
ATTR_LAYOUT = "layout"
ATTR_COMPRESSION = "compression"
# The storage precision: a root attribute (and the manifest's "precision"), and on each 16-bit dataset.
ATTR_PRECISION = "precision"
COMPRESSION_NONE = "none"  # ATTR_COMPRESSION (and the manifest's "compression") of uncompressed data
LAYOUT_CSR = "csr"  # ATTR_LAYOUT of the keyword-id group we write
# A piece file's dataset: the block digests of its rows, and which rows of the tensor it holds.
ATTR_BLOCK_DIGESTS = "block_digests"
# Beside them, each block's xxh3-128: what first-touch reads check (NOTE [fast block digests] in checksum).
ATTR_FAST_DIGESTS = "block_xxh3_128"
# Set (1) on a float dataset whose writer found every value finite: rows matching their digest need no scan.
ATTR_FINITE = "all_finite"
ATTR_PIECE_START = "start"
ATTR_PIECE_STOP = "stop"
