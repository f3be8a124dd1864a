"""scripts/device_check.sh: where what it needs is missing, it stops before anything slow and names the
files and the command that makes them (it runs for real only on the lent GPU machine)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device_check.sh"


def run_script(tmp_path: Path, *, hide_ray: bool, whl: Path) -> subprocess.CompletedProcess[str]:
    """The script with this Python as python3, a failing nvidia-smi, and (optionally) Ray unimportable."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python3").symlink_to(sys.executable)
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DEVICE_CHECK_ALLOW_NO_GPU")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", DEVICE_CHECK_WHL=str(whl), OUT=str(tmp_path / "out"))
    if hide_ray:
        fake = tmp_path / "hide" / "ray"
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
        env["PYTHONPATH"] = str(fake.parent)
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)


def test_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_without_ray_or_its_files_it_names_them_and_the_command(tmp_path: Path) -> None:
    result = run_script(tmp_path, hide_ray=True, whl=tmp_path / "nowhere")
    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stderr
    for needed in ["ray-slim.tar.xz", "STAMP", "jsonschema==", "rpds-py==", "scripts/device_check.sh prepare", "carry"]:
        assert needed in message, message
    assert not (tmp_path / "out" / "cuda_tests.txt").exists(), "it must stop before running anything"


def test_files_built_for_another_python_are_refused(tmp_path: Path) -> None:
    whl = tmp_path / "whl"
    whl.mkdir()
    (whl / "ray-slim.tar.xz").write_bytes(b"")
    ray_pin = next(
        line.split("==")[1]
        for line in (ROOT / "cluster" / "requirements.txt").read_text().splitlines()
        if line.startswith("ray")
    )
    (whl / "STAMP").write_text(f"ray={ray_pin}\npython=3.99\nplatform=manylinux2014_x86_64\n")
    result = run_script(tmp_path, hide_ray=True, whl=whl)
    assert result.returncode == 2 and "built for Python 3.99" in result.stderr, result.stderr
    assert "DEVICE_PYTHON=" in result.stderr


def test_without_a_gpu_it_stops_and_says_so(tmp_path: Path) -> None:
    """Ray is installed here, so the next check is the GPU's (nvidia-smi fails, as on any CPU machine)."""
    result = run_script(tmp_path, hide_ray=False, whl=tmp_path / "nowhere")
    assert result.returncode == 2 and "no NVIDIA GPU" in result.stderr, result.stdout + result.stderr
    assert "DEVICE_CHECK_ALLOW_NO_GPU=1" in result.stderr
