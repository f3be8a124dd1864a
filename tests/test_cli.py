"""``jasper-ray``: synth, convert, inspect and verify; verify catches a flipped byte; bad input is one line.

``convert`` runs with ``--single-process``: these tests never start Ray (the Ray converter has its own tests).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from _support import flip_byte, load_expected, subprocess_env

from jasper_ray.cli import main
from jasper_ray.schema import TENSOR, TENSORS


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jasper_ray", *args],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line_error(stderr: str, command: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line error, got {lines}"
    assert lines[0].startswith(f"jasper-ray {command}: error: "), lines[0]
    return lines[0]


def test_synth_convert_inspect_verify(tmp_path: Path, capsys) -> None:
    out = tmp_path / "data"
    assert main(["synth", str(out), "--pairs", "300", "--dim", "16", "--neg", "4", "--seed", "3"]) == 0
    said = capsys.readouterr().out
    assert f"wrote 300 pairs (D=16, n_neg=4, seed=3) to {out}" in said
    expected = load_expected(out)
    assert expected.n_pairs == 300 and expected.tensors["hard_negatives"].shape == (300, 4)
    assert expected.tensors["question_embs"].shape[1] == 16

    assert main(["-q", "convert", str(out), "--compression", "lzf", "--single-process"]) == 0
    said = capsys.readouterr().out
    assert f"Conversion complete. HDF5 file saved to {out / 'dataset.h5'}" in said
    assert "File sizes: PT format=" in said
    with h5py.File(out / "dataset.h5", "r") as f:
        assert f["steering/centroid"].compression == "lzf"

    assert main(["inspect", str(out)]) == 0
    said = capsys.readouterr().out
    assert "format    hdf5" in said
    for spec in TENSORS:
        assert spec.name in said
    assert "train=" in said and "val=" in said and "test=" in said
    assert "300 pairs" in said

    assert main(["inspect", str(out), "--format", "pt"]) == 0
    assert "format    pt" in capsys.readouterr().out

    assert main(["-q", "verify", str(out)]) == 0
    assert "ok:" in capsys.readouterr().out
    assert main(["-q", "verify", str(out), "--format", "pt"]) == 0


def test_synth_is_deterministic_by_seed(tmp_path: Path, capsys) -> None:
    args = ["--pairs", "200", "--dim", "8", "--neg", "4"]
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        assert main(["synth", str(tmp_path / name), *args, "--seed", seed]) == 0
    a, b, c = (load_expected(tmp_path / n) for n in "abc")
    for spec in TENSORS:
        assert a.tensors[spec.name].tobytes() == b.tensors[spec.name].tobytes(), spec.name
    assert a.keyword_ids == b.keyword_ids and a.config == b.config
    assert a.tensors["question_embs"].tobytes() != c.tensors["question_embs"].tobytes()


def test_synth_size_form(tmp_path: Path, capsys) -> None:
    assert main(["synth", str(tmp_path / "d"), "--size", "2MB", "--dim", "32", "--neg", "4"]) == 0
    size = sum(p.stat().st_size for p in (tmp_path / "d").glob("*.pt"))
    assert 1.5e6 < size < 3e6, f"--size 2MB wrote {size} bytes"


def _verify_fails_naming(directory: Path, h5_path: str, capsys) -> str:
    assert main(["-q", "verify", str(directory)]) == 1
    captured = capsys.readouterr()
    line = one_line_error(captured.err, "verify")
    assert f"dataset.h5:{h5_path}" in line
    assert "ok:" not in captured.out
    return line


def test_verify_detects_a_flipped_byte_in_a_gzip_chunk(tmp_path: Path, converted, capsys) -> None:
    directory = Path(shutil.copytree(converted("gzip"), tmp_path / "ds"))
    assert main(["-q", "verify", str(directory)]) == 0
    capsys.readouterr()
    h5_path = TENSOR["steering_centroid"].h5_path
    with h5py.File(directory / "dataset.h5", "r") as f:
        info = f[h5_path].id.get_chunk_info(0)
    flip_byte(directory / "dataset.h5", info.byte_offset + info.size // 2)
    _verify_fails_naming(directory, h5_path, capsys)


def test_verify_detects_a_flipped_byte_in_a_contiguous_dataset(tmp_path: Path, converted, capsys) -> None:
    directory = Path(shutil.copytree(converted(None), tmp_path / "ds"))
    h5_path = TENSOR["source_embs"].h5_path
    with h5py.File(directory / "dataset.h5", "r") as f:
        dset = f[h5_path]
        assert dset.chunks is None
        offset = dset.id.get_offset() + dset.dtype.itemsize * dset.shape[1] * 100 + 2  # inside row 100
    flip_byte(directory / "dataset.h5", offset)
    line = _verify_fails_naming(directory, h5_path, capsys)
    assert "does not match the recorded" in line
    others = [s.h5_path for s in TENSORS if s.h5_path != h5_path]
    assert not any(f"dataset.h5:{p}:" in line for p in others), "only the changed tensor is named"


def test_verify_by_subprocess(tmp_path: Path, converted) -> None:
    """``python -m jasper_ray verify``: 0 when intact, non-zero naming the dataset after a flip."""
    directory = Path(shutil.copytree(converted(None), tmp_path / "ds"))
    ok = run_cli("-q", "verify", str(directory))
    assert ok.returncode == 0, ok.stderr
    assert "ok:" in ok.stdout
    h5_path = TENSOR["pair_index"].h5_path
    with h5py.File(directory / "dataset.h5", "r") as f:
        offset = f[h5_path].id.get_offset() + 8 * 2 * 7  # question id of pair 7
    flip_byte(directory / "dataset.h5", offset)
    bad = run_cli("-q", "verify", str(directory))
    assert bad.returncode != 0
    assert f"dataset.h5:{h5_path}" in one_line_error(bad.stderr, "verify")


def test_verify_reports_validation_errors(dataset_copy: Path, small_expected, capsys) -> None:
    """A PT dataset has no checksums: verify runs the schema validation and names the bad position."""
    import torch

    tiers = small_expected.tensors["negative_tiers"].copy()
    tiers[4, 3] = 7
    torch.save(torch.from_numpy(tiers), dataset_copy / "negative_tiers.pt")
    assert main(["-q", "verify", str(dataset_copy)]) == 1
    line = one_line_error(capsys.readouterr().err, "verify")
    assert "negative_tiers.pt at position (4, 3): found value 7, expected a tier in [1, 4]" in line


@pytest.mark.parametrize("command", ["inspect", "verify", "convert"])
def test_missing_directory_is_a_one_line_error(tmp_path: Path, capsys, command) -> None:
    missing = tmp_path / "nowhere"
    extra = ["--single-process"] if command == "convert" else []  # no Ray in these tests
    assert main(["-q", command, str(missing), *extra]) != 0
    line = one_line_error(capsys.readouterr().err, command)
    assert str(missing) in line


def test_missing_directory_by_subprocess(tmp_path: Path) -> None:
    result = run_cli("inspect", str(tmp_path / "nowhere"))
    assert result.returncode != 0
    line = one_line_error(result.stderr, "inspect")
    assert f"Dataset directory not found: {tmp_path / 'nowhere'}" in line
    assert result.stdout == ""


def test_empty_directory_names_what_was_looked_for(tmp_path: Path, capsys) -> None:
    assert main(["inspect", str(tmp_path)]) == 1
    line = one_line_error(capsys.readouterr().err, "inspect")
    assert f"No dataset files found in {tmp_path}" in line and "dataset.h5" in line and "question_embs.pt" in line


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (
            ["convert", "{ds}", "--compression", "zstd", "--single-process"],
            "compression must be 'gzip', 'lzf' or None, got 'zstd'",
        ),
        (["synth", "{tmp}/x", "--size", "lots"], "size 'lots'"),
        (["inspect", "{ds}", "--format", "hdf5"], "HDF5 file not found"),
    ],
    ids=["bad-compression", "bad-size", "hdf5-missing"],
)
def test_bad_arguments_are_one_line_errors(dataset_copy: Path, tmp_path: Path, capsys, argv, needle) -> None:
    argv = [a.format(ds=dataset_copy, tmp=tmp_path) for a in argv]
    assert main(["-q", *argv]) == 1
    assert needle in one_line_error(capsys.readouterr().err, argv[0])
    assert not (dataset_copy / "dataset.h5").exists()


def test_unknown_command_exits_non_zero(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["explode"])
    assert info.value.code != 0


def test_convert_none_compression_writes_a_mappable_file(dataset_copy: Path, capsys) -> None:
    assert main(["-q", "convert", str(dataset_copy), "--compression", "none", "--single-process"]) == 0
    with h5py.File(dataset_copy / "dataset.h5", "r") as f:
        assert all(f[s.h5_path].chunks is None for s in TENSORS)
        assert np.asarray(f["pair_data/index"][:2]).shape == (2, 2)
