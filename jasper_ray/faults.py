"""Failures injected on purpose, for the tests of retries: one environment variable, read here only.

``JASPER_RAY_FAIL_ONCE`` holds ``key=marker-path`` entries separated by ``;``.
The first attempt at the named work (a conversion piece by its id, a
``read_jasper`` read task by ``read_jasper``) creates the marker file and
raises ``OSError``; its retry finds the marker and goes on. Unset (always,
outside tests) nothing here does anything. Ray workers may have started
before a test set the variable: front-ends hand ``task_env()`` to their
tasks' ``runtime_env``.
"""

from __future__ import annotations

import os
from pathlib import Path

FAIL_ONCE_ENV = "JASPER_RAY_FAIL_ONCE"


def fail_once(key: str, message: str) -> None:
    """Raise ``OSError(message)`` the first time ``key`` is reached, when the variable names it."""
    for entry in os.environ.get(FAIL_ONCE_ENV, "").split(";"):
        name, sep, marker = entry.partition("=")
        if sep and name == key and not Path(marker).exists():
            Path(marker).touch()
            raise OSError(message)


def task_env() -> dict[str, str]:
    """The variable, for a Ray task's ``runtime_env`` ``env_vars`` (empty when unset)."""
    value = os.environ.get(FAIL_ONCE_ENV)
    return {FAIL_ONCE_ENV: value} if value else {}


def fail_once_env(markers: dict[str, str | os.PathLike]) -> str:
    """The variable's value that fails each key once (for tests: ``monkeypatch.setenv(FAIL_ONCE_ENV, ...)``)."""
    return ";".join(f"{key}={marker}" for key, marker in markers.items())
