"""A real multi-node Ray cluster on this machine (scripts/local_cluster.sh): the end-to-end run survives a
worker node lost mid-conversion, and `down` leaves no process behind (checked by pid)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from _support import REPO
from _support import ray_child_env as subprocess_env

SCRIPT = REPO / "scripts" / "local_cluster.sh"
E2E = REPO / "scripts" / "e2e_cluster.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def _group_pids(pgid: int) -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,pgid="], capture_output=True, text=True, check=True).stdout
    return {int(p) for p, g in (line.split() for line in out.splitlines()) if int(g) == pgid and _running(int(p))}


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest):
    # A short state directory: Ray's session sockets under it must fit AF_UNIX's 107-byte paths.
    state = Path(tempfile.mkdtemp(prefix="jrc-", dir="/tmp"))
    env = subprocess_env(
        JASPER_CLUSTER_DIR=str(state),
        JASPER_CLUSTER_PORT=str(_free_port()),
        JASPER_SPILL_DIR=str(tmp_path / "spill"),
        JASPER_OBJECT_STORE_BYTES=str(200 << 20),
    )
    mode = getattr(request, "param", "up")  # "up-own-caches": nodes share no dataset path
    up = subprocess.run([str(SCRIPT), mode, "2"], env=env, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stderr[-2000:]
        address = up.stdout.strip().splitlines()[-1].split("=", 1)[1]
        pid_files = sorted(state.glob("*.pid"))
        assert [p.stem for p in pid_files] == ["head", "worker1", "worker2"]
        yield env, address, {int(p.read_text()) for p in pid_files}, state
    finally:
        subprocess.run([str(SCRIPT), "down"], env=env, capture_output=True, timeout=300)
        shutil.rmtree(state, ignore_errors=True)


def test_end_to_end_survives_a_lost_node_and_down_leaves_nothing(cluster, tmp_path: Path) -> None:
    env, address, groups, _ = cluster
    pids = set().union(*(_group_pids(g) for g in groups))
    assert len(pids) >= 6, "head (gcs, raylet, ...) and two worker nodes (raylets) are running"

    run = subprocess.run(
        [sys.executable, str(E2E), "--address", address, "--out", str(tmp_path / "e2e")],
        env={**env, "RAY_ADDRESS": address},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["failures"] == []
    assert result["node_lost_during_conversion"] is True, result  # killed with pieces still to write
    assert result["nodes"] == 3 and result["nodes_after"] == 2
    assert result["actor_nodes"] == 2, "the shard actors spread over both nodes left"
    assert result["samples_per_epoch"] > 0

    # worker2's processes are gone since the kill; `down` stops the rest.
    down = subprocess.run([str(SCRIPT), "down"], env=env, capture_output=True, text=True, timeout=300)
    assert down.returncode == 0, down.stderr
    deadline = time.time() + 30
    while time.time() < deadline and any(_running(p) for p in pids):
        time.sleep(0.5)
    assert not [p for p in pids if _running(p)], "processes of the local cluster survived `down`"
    assert not any(_group_pids(g) for g in groups)


@pytest.mark.parametrize("cluster", ["up-own-caches"], indirect=True)
def test_from_s3_without_a_shared_filesystem_survives_a_node_lost_mid_epoch(cluster, tmp_path: Path) -> None:
    """Nodes with their own caches serve an s3:// dataset (actors, then read_jasper) while a node is lost."""
    env, address, _, state = cluster
    run = subprocess.run(
        [
            sys.executable,
            str(E2E),
            "--from-s3",
            "--pairs",
            "8000",
            "--address",
            address,
            "--out",
            str(tmp_path / "e2e"),
        ],
        env={**env, "RAY_ADDRESS": address, "JASPER_RAY_CACHE": str(tmp_path / "driver-cache")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["failures"] == []
    assert result.get("node_lost_mid_epoch") is True and result["nodes"] == 3 and result["nodes_after"] == 2
    caches = result["node_caches"]
    assert set(caches) == {"cache-head", "cache-worker1", "cache-worker2"}
    assert sum(1 for n in caches.values() if n) >= 2, f"nodes fetched into their own caches: {caches}"


def test_usage_without_a_command() -> None:
    run = subprocess.run([str(SCRIPT)], capture_output=True, text=True, env=dict(os.environ))
    assert run.returncode == 2 and "up [WORKERS]" in run.stderr
