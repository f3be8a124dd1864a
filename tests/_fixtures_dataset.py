"""Fixtures and helpers for the dataset / sampling / loader tests (issue 3).

Loaded as a pytest plugin (``pytest_plugins = ["_fixtures_dataset"]`` in the
test modules), so its session fixtures are built once for all of them.

``write_mock_dataset`` writes a directory the way upstream's test fixture
``mock_dataset_dir`` does (random tensors, ``torch.save`` per file, keyword
ids as a pickled list of lists), but from a seeded ``torch.Generator``.
Expected values are read back with plain ``torch.load(weights_only=True)``,
independently of jasper_ray's readers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from jasper_ray import JASPERSteeringDataset, convert_pt_to_hdf5, synth_dataset

UPSTREAM_CURRICULUM = {"zero_prob_start": 0.5, "zero_prob_end": 0.1, "epochs_total": 100}
UNIFORM_PROBS = {"zero": 0.25, "centroid": 0.25, "keyword": 0.25, "residual": 0.25}
BUILDER_CURRICULUM = {"mode": "linear", "start_distance": 0.3, "end_distance": 0.7, "warmup_epochs": 10}

SAMPLE_SHAPES = {  # upstream's per-sample shapes (D, NEG symbolic) and dtypes
    "question_emb": (("D",), torch.float32),
    "target_source_emb": (("D",), torch.float32),
    "steering": (("D",), torch.float32),
    "negative_embs": (("NEG", "D"), torch.float32),
    "cluster_id": ((), torch.int64),
    "relevance": ((), torch.float32),
    "centroid_distance": ((), torch.float32),
    "steering_variant": ((), torch.int64),
    "negative_tiers": (("NEG",), torch.int64),
}
STEERING_FILE = {1: "steering_centroid", 2: "steering_keyword_weighted", 3: "steering_residual"}

# The small synthetic dataset most tests share (train split ~ 480 pairs).
SYNTH = {"n_pairs": 600, "dim": 32, "n_neg": 4, "seed": 3}


# --- upstream-style mock --------------------------------------------------------------------------


def write_mock_dataset(
    root: Path,
    *,
    curriculum: dict[str, Any] | None = UPSTREAM_CURRICULUM,
    probs: dict[str, float] | None = None,
    dim: int = 64,
    n_neg: int = 4,
    n_pairs: int = 100,
    n_questions: int = 50,
    n_sources: int = 80,
    n_keywords: int = 30,
    n_clusters: int = 5,
    seed: int = 0,
    config_extra: dict[str, Any] | None = None,
) -> Path:
    """Upstream's ``mock_dataset_dir``: random tensors, splits 70% / 15% / 15% in pair order."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)

    def save(name: str, obj: Any) -> None:
        torch.save(obj, root / f"{name}.pt")

    save("question_embs", torch.randn(n_questions, dim, generator=g))
    save("source_embs", torch.randn(n_sources, dim, generator=g))
    save("keyword_embs", torch.randn(n_keywords, dim, generator=g))
    save("centroid_embs", torch.randn(n_clusters, dim, generator=g))
    q = torch.randint(0, n_questions, (n_pairs,), generator=g)
    s = torch.randint(0, n_sources, (n_pairs,), generator=g)
    save("pair_index", torch.stack([q, s], dim=1))
    save("pair_cluster_id", torch.randint(0, n_clusters, (n_pairs,), generator=g))
    save("pair_relevance", torch.rand(n_pairs, generator=g))
    counts = torch.randint(0, 4, (n_pairs,), generator=g).tolist()
    keyword_ids = [sorted(set(torch.randint(0, n_keywords, (k,), generator=g).tolist())) for k in counts]
    save("pair_keyword_ids", keyword_ids)  # a pickled List[List[int]], as upstream's builder writes
    save("hard_negatives", torch.randint(0, n_sources, (n_pairs, n_neg), generator=g))
    save("negative_tiers", torch.randint(1, 5, (n_pairs, n_neg), generator=g))
    for name in ("steering_centroid", "steering_keyword_weighted", "steering_residual"):
        save(name, torch.randn(n_pairs, dim, generator=g))
    save("centroid_distances", torch.rand(n_pairs, generator=g) * 2)
    n_train, n_val = int(n_pairs * 0.7), int(n_pairs * 0.15)
    save("train_idx", torch.arange(0, n_train))
    save("val_idx", torch.arange(n_train, n_train + n_val))
    save("test_idx", torch.arange(n_train + n_val, n_pairs))
    config: dict[str, Any] = {
        "embedding_dim": dim,
        "n_neg": n_neg,
        "steering_probabilities": dict(probs or UNIFORM_PROBS),
        "n_pairs": n_pairs,
        "n_questions": n_questions,
        "n_sources": n_sources,
        "n_keywords": n_keywords,
        "n_clusters": n_clusters,
    }
    if curriculum is not None:
        config["curriculum"] = dict(curriculum)
    config.update(config_extra or {})
    (root / "config.json").write_text(json.dumps(config, indent=2))
    return root


def raw(directory: Path, name: str) -> torch.Tensor:
    """One PT file, read with plain torch.load (not through jasper_ray)."""
    return torch.load(Path(directory) / f"{name}.pt", map_location="cpu", weights_only=True)


def edit_config(directory: Path, **changes: Any) -> None:
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2))


def expected_batch(directory: Path, pair_ids: Any, variants: Any) -> dict[str, torch.Tensor]:
    """The batch upstream's per-sample algorithm gives for these pairs and variants, from the raw PT files."""
    pair_ids = torch.as_tensor(np.asarray(pair_ids), dtype=torch.int64)
    variants = torch.as_tensor(np.asarray(variants), dtype=torch.int64)
    index = raw(directory, "pair_index")[pair_ids]
    questions, sources = raw(directory, "question_embs"), raw(directory, "source_embs")
    steering = torch.zeros(len(pair_ids), questions.shape[1])
    for variant, name in STEERING_FILE.items():
        rows = (variants == variant).nonzero().flatten()
        steering[rows] = raw(directory, name)[pair_ids[rows]]
    return {
        "question_emb": questions[index[:, 0]],
        "target_source_emb": sources[index[:, 1]],
        "steering": steering,
        "negative_embs": sources[raw(directory, "hard_negatives")[pair_ids]],
        "cluster_id": raw(directory, "pair_cluster_id")[pair_ids],
        "relevance": raw(directory, "pair_relevance")[pair_ids],
        "centroid_distance": raw(directory, "centroid_distances")[pair_ids],
        "steering_variant": variants,
        "negative_tiers": raw(directory, "negative_tiers")[pair_ids],
    }


def assert_batches_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str = "") -> None:
    """Same keys; per key same dtype, shape and values (exactly)."""
    assert set(got) == set(want), f"{what}: keys {sorted(got)} != {sorted(want)}"
    for key in want:
        g, w = got[key].cpu(), want[key].cpu()
        assert g.dtype == w.dtype, f"{what}[{key}]: dtype {g.dtype} != {w.dtype}"
        assert g.shape == w.shape, f"{what}[{key}]: shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert torch.equal(g, w), f"{what}[{key}]: values differ"


def stack_samples(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def concat_batches(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def mock_dataset_dir(tmp_path: Path) -> Path:
    """Upstream's dataset-test fixture (with its curriculum); private to the test, may be changed."""
    return write_mock_dataset(tmp_path / "mock")


@pytest.fixture
def mock_loader_dir(tmp_path: Path) -> Path:
    """Upstream's loader-test fixture: the same data, no curriculum (0.25 each at every epoch)."""
    return write_mock_dataset(tmp_path / "mock_loader", curriculum=None)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small realistic dataset (builder-style config); never modified by tests."""
    return synth_dataset(tmp_path_factory.mktemp("synth") / "ds", **SYNTH)


@pytest.fixture
def synth_copy(tmp_path: Path, synth_dir: Path) -> Path:
    """A private copy of ``synth_dir`` that the test may change (no dataset.h5 in it)."""
    return Path(shutil.copytree(synth_dir, tmp_path / "ds"))


@pytest.fixture(scope="session")
def storage_variants(tmp_path_factory: pytest.TempPathFactory, synth_dir: Path) -> dict[str, tuple[Path, dict]]:
    """The same data in every storage the dataset serves: name -> (directory, constructor kwargs).

    The HDF5 files live alone in their directory (dataset.h5 only, config inside): upstream could
    not load such a directory at all.
    """
    out: dict[str, tuple[Path, dict]] = {
        "pt_mmap": (synth_dir, {"storage_format": "pt", "use_mmap": True}),
        "pt_ram": (synth_dir, {"storage_format": "pt", "use_mmap": False}),
    }
    for name, compression in (("h5_gzip", "gzip"), ("h5_contiguous", None)):
        target = tmp_path_factory.mktemp(name) / "dataset.h5"
        convert_pt_to_hdf5(synth_dir, compression, output=target, progress=False)
        out[name] = (target.parent, {"storage_format": "hdf5", "use_mmap": True})
    out["h5_gzip_ram"] = (out["h5_gzip"][0], {"storage_format": "hdf5", "use_mmap": False})
    return out


def open_variant(storage_variants: dict[str, tuple[Path, dict]], name: str, split: str = "train", **kwargs: Any):
    directory, options = storage_variants[name]
    return JASPERSteeringDataset(directory, split, **{**options, **kwargs})
