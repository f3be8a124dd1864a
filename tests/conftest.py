"""Shared fixtures: one small synthetic PT dataset per session, its converted HDF5 twins, copies to mutate.

Session fixtures are never modified by tests; a test that changes files works
on ``dataset_copy`` (a fresh ``shutil.copytree`` of the small dataset).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from _support import Expected, load_expected, save_pt

from jasper_ray import convert_pt_to_hdf5, synth_dataset
from jasper_ray.schema import KEYWORD_IDS, TENSOR

# Small but not trivial: several HDF5 chunks per pair tensor, every tier, all three splits.
SMALL = {"n_pairs": 2000, "dim": 32, "n_neg": 8, "seed": 7}


@pytest.fixture(scope="session")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The read-only source of truth: an upstream-layout PT dataset (no dataset.h5)."""
    return synth_dataset(tmp_path_factory.mktemp("small") / "ds", **SMALL)


@pytest.fixture(scope="session")
def small_expected(small_dir: Path) -> Expected:
    return load_expected(small_dir)


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory, small_dir: Path) -> Callable[[str | None], Path]:
    """``converted(compression)``: a copy of the small dataset with its dataset.h5 (cached per compression)."""
    cache: dict[str | None, Path] = {}

    def get(compression: str | None) -> Path:
        if compression not in cache:
            out = tmp_path_factory.mktemp(f"h5-{compression or 'none'}") / "ds"
            shutil.copytree(small_dir, out)
            convert_pt_to_hdf5(out, compression=compression, progress=False)
            cache[compression] = out
        return cache[compression]

    return get


@pytest.fixture
def dataset_copy(tmp_path: Path, small_dir: Path) -> Path:
    """A private copy of the small PT dataset that the test may change."""
    return Path(shutil.copytree(small_dir, tmp_path / "ds"))


@pytest.fixture(scope="session")
def empty_keywords_dir(tmp_path_factory: pytest.TempPathFactory, small_dir: Path) -> Path:
    """The small dataset with no keywords at all: keyword_embs is [0, D], every keyword list empty."""
    out = tmp_path_factory.mktemp("nokw") / "ds"
    shutil.copytree(small_dir, out)
    dim = SMALL["dim"]
    save_pt(out, TENSOR["keyword_embs"].pt_file, np.zeros((0, dim), dtype=np.float32))
    save_pt(out, KEYWORD_IDS.pt_file, [[] for _ in range(SMALL["n_pairs"])])
    return out


@pytest.fixture(scope="session")
def empty_keywords_expected(empty_keywords_dir: Path) -> Expected:
    return load_expected(empty_keywords_dir)


@pytest.fixture(scope="session")
def empty_keywords_converted(
    tmp_path_factory: pytest.TempPathFactory, empty_keywords_dir: Path
) -> Callable[[str | None], Path]:
    cache: dict[str | None, Path] = {}

    def get(compression: str | None) -> Path:
        if compression not in cache:
            out = tmp_path_factory.mktemp(f"nokw-h5-{compression or 'none'}") / "ds"
            shutil.copytree(empty_keywords_dir, out)
            convert_pt_to_hdf5(out, compression=compression, progress=False)
            cache[compression] = out
        return cache[compression]

    return get
