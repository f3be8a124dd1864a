"""The documentation cannot rot: every command in the README's code blocks runs, the API reference is
generated from the docstrings, and the troubleshooting guide quotes the messages jasper_ray really prints."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import jasper_ray
from jasper_ray import StaleDatasetError, open_dataset
from jasper_ray.conversion.plan import plan_conversion
from jasper_ray.conversion.ranged import local_ranges, ranged_rows

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TROUBLE = (ROOT / "docs" / "troubleshooting.md").read_text()
TEST_COMMAND = "scripts/setup.sh && python -m pytest -q"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def commands(block: str) -> list[str]:
    """The commands of a bash block: one per line, comments dropped."""
    out = []
    for line in block.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def test_the_readme_test_command_is_what_ci_runs() -> None:
    all_commands = [c for b in blocks("bash") for c in commands(b)]
    assert TEST_COMMAND in all_commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert TEST_COMMAND in ci.splitlines(), ".ci/run must run exactly the README's test command"


def test_every_readme_command_runs(tmp_path: Path) -> None:
    """Runs the README's bash and python blocks in order, in a scratch directory that sees the repo's scripts.

    Two knobs keep it short and isolated: the demo runs at 10MB (JASPER_DEMO_SIZE, which its --size
    default reads) and the local cluster keeps its state in a short private directory. The test command
    itself is what this suite is; it is checked against .ci/run above instead of being run recursively."""
    work = tmp_path / "readme"
    work.mkdir()
    (work / "scripts").symlink_to(ROOT / "scripts")
    state = Path(tempfile.mkdtemp(prefix="jrd-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        JASPER_DEMO_SIZE="10MB",
        JASPER_CLUSTER_DIR=str(state),
        RAY_AUTH_MODE="disabled",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    ran = []
    try:
        for language, block in re.findall(r"```(bash|python)\n(.*?)```", README, flags=re.S):
            if language == "python":
                run = subprocess.run(
                    [sys.executable, "-c", block], cwd=work, env=env, capture_output=True, text=True, timeout=600
                )
                assert run.returncode == 0, f"README python block failed:\n{block}\n{run.stderr[-3000:]}"
                ran.append(block.splitlines()[0])
                continue
            for command in commands(block):
                if command == TEST_COMMAND:
                    continue
                run = subprocess.run(
                    ["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=900
                )
                assert run.returncode == 0, (
                    f"README command failed: {command}\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
                )
                ran.append(command)
    finally:
        subprocess.run(["bash", "-c", "scripts/local_cluster.sh down"], cwd=work, env=env, capture_output=True)
        shutil.rmtree(state, ignore_errors=True)
    assert any("demo" in c for c in ran) and any("local_cluster.sh up" in c for c in ran)
    assert len(ran) >= 12


def test_api_reference_is_generated_from_the_docstrings() -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_api_docs.py"), "--check"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    api = (ROOT / "docs" / "api.md").read_text()
    for name in jasper_ray.__all__:
        assert f"`{name}" in api, f"{name} is missing from docs/api.md"


# --- troubleshooting quotes real messages ---------------------------------------------------------


def _quoted(fragment: str) -> str:
    assert fragment in TROUBLE, f"docs/troubleshooting.md does not quote {fragment!r}"
    return fragment


def _error(fn) -> str:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the message is what is checked
        return str(exc)
    raise AssertionError("no error raised")


def test_no_dataset_files(tmp_path: Path) -> None:
    message = _error(lambda: open_dataset(tmp_path))
    assert _quoted("Expected either dataset.h5 or *.pt files (looked for question_embs.pt)") in message
    assert message.startswith(_quoted("No dataset files found in"))
    assert _quoted("Dataset directory not found") in _error(lambda: open_dataset(tmp_path / "nope"))
    assert _quoted("Config file not found") in _error(lambda: jasper_ray.JASPERSteeringDataset(tmp_path, "train"))


def _small(tmp_path: Path, compression: str | None = "gzip") -> Path:
    directory = jasper_ray.synth_dataset(tmp_path / "ds", n_pairs=300, dim=16, n_neg=4, seed=1)
    jasper_ray.convert_pt_to_hdf5(directory, compression, progress=False)
    return directory


def test_missing_h5py_and_ray(tmp_path: Path) -> None:
    directory = _small(tmp_path)
    for module, call, fragment in (
        (
            "h5py",
            f"jasper_ray.open_dataset({str(directory)!r}, 'hdf5')",
            "HDF5 format requested but h5py is not installed. Install with: pip install h5py",
        ),
        (
            "ray",
            f"jasper_ray.convert({str(directory)!r})",
            "Parallel conversion needs Ray: pip install 'ray[data,train]'",
        ),
    ):
        code = f"import sys; sys.modules[{module!r}] = None\nimport jasper_ray\n{call}"
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert run.returncode != 0 and _quoted(fragment) in run.stderr


def test_ray_not_reachable(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # In a child: this process may hold the test session's Ray, which convert() would simply use.
    # force: the dataset's dataset.h5 is up to date, and an up-to-date output never reaches for Ray.
    code = f"import jasper_ray; jasper_ray.convert({str(_small(tmp_path))!r}, address='127.0.0.1:{port}', force=True)"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode != 0 and f"{_quoted('Ray is not reachable at')} 127.0.0.1:{port}" in run.stderr


def test_stale_dataset(tmp_path: Path) -> None:
    directory = _small(tmp_path)
    negatives = torch.load(directory / "hard_negatives.pt", weights_only=True)
    torch.save(negatives.flip(0), directory / "hard_negatives.pt")
    message = _error(lambda: open_dataset(directory, "hdf5"))
    assert _quoted("is stale: hard_negatives.pt changed since it was converted") in message
    assert isinstance(_exc(lambda: open_dataset(directory, "hdf5")), StaleDatasetError)
    assert open_dataset(directory).storage_format == "pt"


def _exc(fn) -> Exception:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return exc
    raise AssertionError("no error raised")


def test_corrupt_files(tmp_path: Path) -> None:
    directory = _small(tmp_path, compression=None)
    reader = open_dataset(directory, "hdf5")
    offset = reader.file["steering/centroid"].id.get_offset()
    reader.close()
    with open(directory / "dataset.h5", "r+b") as f:
        f.seek(offset + 5)
        byte = f.read(1)
        f.seek(offset + 5)
        f.write(bytes([byte[0] ^ 0xFF]))
    problems = open_dataset(directory, "hdf5").verify_checksums()
    assert len(problems) == 1 and _quoted("(the stored bytes changed)") in problems[0]
    (directory / "dataset.h5").write_bytes(np.random.default_rng(0).bytes(4096))
    assert _quoted("not a readable HDF5 file") in _error(lambda: open_dataset(directory, "hdf5").read("question_embs"))


def test_a_source_changed_during_a_ray_conversion(tmp_path: Path) -> None:
    directory = jasper_ray.synth_dataset(tmp_path / "ds", n_pairs=300, dim=16, n_neg=4, seed=1)
    reader = open_dataset(directory, storage_format="pt", use_mmap=True)
    tensor = local_ranges(directory, reader, plan_conversion(reader, "gzip").columns)["tensor:question_embs"]
    reader.close()
    path = tensor.location.local_path
    _, planned_ns = tensor.identity or (0, 0)
    os.utime(path, ns=(planned_ns, planned_ns + 1_000_000))  # touched after the plan
    message = _error(lambda: ranged_rows(tensor))
    assert message.startswith(f"{path}: ") and _quoted("changed since this conversion was planned (size") in message
