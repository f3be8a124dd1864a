"""Shared fixtures: one small synthetic PT dataset per session, its converted HDF5 twins, copies to mutate,
and the one Ray session every Ray-using test shares.

Session fixtures are never modified by tests; a test that changes files works
on ``dataset_copy`` (a fresh ``shutil.copytree`` of the small dataset).

Ray: a test that needs it takes the session-scoped ``ray_session`` fixture (directly, or through a
module fixture of its own); it yields the imported ``ray`` module, initialised. Starting Ray costs
~5 s on the 2-core CI machines, so it is started once per test session, on first use, and shut down
at the end: a local Ray with ``RAY_NUM_CPUS`` CPUs, a small object store, no dashboard and no runtime env
(as users start it: nothing of jasper_ray's may need HDF5_USE_FILE_LOCKING set, NOTE [prestarted workers] in
``conversion.parallel``; the workers inherit ``SDK_ENV`` from this process). Code under test that calls
``ray.init`` only when ``not ray.is_initialized()`` (as ``jasper_ray.convert`` does) runs on this
session and leaves it up. Rules for tests sharing it:

- do not call ``ray.init``/``ray.shutdown`` in a test; a test that needs a Ray of its own (a killed
  driver, the CLI) runs it in a subprocess, with the ``ray_subprocess_env`` fixture's environment
  (``ray_subprocess_env()``), so that the child starts a fresh local Ray of its own;
- a test may kill worker processes of this session (Ray restarts them), never the raylet or GCS;
- ``RAY_ADDRESS`` is removed from the environment for the whole session, so that neither this
  session nor a subprocess attaches to a developer's cluster.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _s3 import SDK_ENV
from _support import Expected, load_expected, ray_child_env, save_pt

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


# --- Ray ------------------------------------------------------------------------------------------

RAY_NUM_CPUS = 2
RAY_OBJECT_STORE_BYTES = 256 << 20
os.environ.update(SDK_ENV)  # also for a Ray that a test's code starts itself, and for child processes


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    """A local Ray (``RAY_NUM_CPUS`` CPUs) for the whole test session; yields the ``ray`` module."""
    import ray  # a hard dependency: its absence is a failure, never a skip

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.delenv("RAY_ADDRESS", raising=False)
        if ray.is_initialized():  # something outside this fixture started one: not ours to reuse
            ray.shutdown()
        ray.init(
            address="local",  # a new instance: never a cluster that `ray start` left running on this machine
            num_cpus=RAY_NUM_CPUS,
            object_store_memory=RAY_OBJECT_STORE_BYTES,
            include_dashboard=False,
        )
        try:
            yield ray
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def ray_subprocess_env() -> Callable[..., dict[str, str]]:
    """``ray_subprocess_env(**extra)``: the environment for a child Python that must start its own local Ray."""
    return ray_child_env
