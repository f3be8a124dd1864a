"""The one Ray session every Ray-using test of the project shares.

All tests that need Ray live under ``tests/ray/`` and take the session-scoped
``ray_session`` fixture (directly, or through a module fixture of theirs):

    def test_something(ray_session):
        ray = ray_session          # the imported ``ray`` module, initialised
        ...

Starting Ray costs ~5 s on the 2-core CI machines, so it is started once per
test session, on first use, and shut down at the end. The session is a local
Ray with ``RAY_NUM_CPUS`` CPUs and a small object store, no dashboard, and the
runtime env every reader needs (``HDF5_USE_FILE_LOCKING=FALSE``). Code under
test that calls ``ray.init`` only when ``not ray.is_initialized()`` (as
``jasper_ray.convert`` does) runs on this session and leaves it up.

Rules for tests sharing it:

- do not call ``ray.init``/``ray.shutdown`` in a test; a test that needs a
  Ray of its own (a killed driver, the CLI) runs it in a subprocess, with
  the ``ray_subprocess_env`` fixture's environment (``ray_subprocess_env()``),
  so that the child starts a fresh local Ray of its own;
- a test may kill worker processes of this session (Ray restarts them), never
  the raylet or GCS;
- ``RAY_ADDRESS`` is removed from the environment for the whole session, so
  that neither this session nor a subprocess attaches to a developer's cluster.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

RAY_NUM_CPUS = 2
RAY_OBJECT_STORE_BYTES = 256 << 20
RAY_ENV_VARS = {"HDF5_USE_FILE_LOCKING": "FALSE"}
REPO = Path(__file__).resolve().parents[2]


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a child Python that starts its own local Ray (no RAY_ADDRESS, auth off, repo importable)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


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
            runtime_env={"env_vars": dict(RAY_ENV_VARS)},
        )
        try:
            yield ray
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def ray_subprocess_env() -> Callable[..., dict[str, str]]:
    """``ray_subprocess_env(**extra)``: the environment for a child Python that must start its own local Ray."""
    return subprocess_env
