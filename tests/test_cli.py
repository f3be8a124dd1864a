"""``jasper-ray``: synth, convert, inspect and verify; help, --version, --json, exit codes, flag conflicts,
--dry-run, progress that adds up, and a quiet end when stdout's reader goes away.

``convert`` runs with ``--single-process`` or ``--dry-run``: these tests never start Ray (the Ray converter
has its own tests; Ray's start-up announcement is checked here with Ray replaced).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from _support import REPO, flip_byte, load_expected, subprocess_env, write_sharded

import jasper_ray
from jasper_ray.cli import build_parser, main
from jasper_ray.conversion.writer import ConversionReport
from jasper_ray.schema import ATTR_CHECKSUM, TENSOR, TENSORS

DOCS = (REPO / "docs" / "cli.md").read_text()
SHARED_KEYS = ["report_version", "command", "ok", "dataset"]  # first, in this order; "problems" last


def run_cli(*args: str, **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jasper_ray", *args],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


def one_line_error(stderr: str, command: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line error, got {lines}"
    assert lines[0].startswith(f"jasper-ray {command}: error: "), lines[0]
    return lines[0]


def run_json(argv: list[str], capsys, code: int = 0) -> dict[str, Any]:
    """``main(argv + --json)``: its exit code, and stdout parsed as one JSON document (nothing else there)."""
    assert main([*argv, "--json"]) == code
    doc = json.loads(capsys.readouterr().out)
    assert list(doc)[: len(SHARED_KEYS)] == SHARED_KEYS and list(doc)[-1] == "problems", list(doc)
    assert doc["report_version"] == 1 and doc["command"] == argv[0] and doc["ok"] == (code == 0)
    return doc


def pt_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).glob("*.pt"))


def checksummed_bytes(h5_file: Path) -> tuple[int, int]:
    """(datasets carrying a checksum attribute, their uncompressed bytes), read with h5py."""
    found: list[int] = []
    with h5py.File(h5_file, "r") as f:
        f.visititems(lambda _, obj: found.append(obj.nbytes) if ATTR_CHECKSUM in obj.attrs else None)
    return len(found), sum(found)


# --- help, --version, -q/-v --------------------------------------------------------------------------


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _parsers(sub)
    return found


def test_every_argument_and_option_has_help() -> None:
    parsers = _parsers(build_parser())
    commands = ["synth", "checksum", "convert", "inspect", "verify", "demo", "bench"]
    assert [p.prog for p in parsers] == ["jasper-ray"] + [f"jasper-ray {c}" for c in commands]
    for parser in parsers:
        for action in parser._actions:
            name = "/".join(action.option_strings) or action.dest
            assert action.help and action.help != argparse.SUPPRESS, f"{parser.prog} {name} has no help"
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert choice.help, f"{parser.prog} {choice.dest} has no help"


def test_help_shows_plain_text_and_the_exit_codes(capsys) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "``" not in text and "Store, convert and serve the JASPER steering dataset." in text
    for command in ("synth", "checksum", "convert", "inspect", "verify", "demo", "bench"):
        assert re.search(rf"^\s+{command}\s+\S", text, flags=re.M), command
    assert "exit codes:" in text and "2    usage" in text and "docs/cli.md" in text
    assert main(["synth", "--help"]) == 0
    text = capsys.readouterr().out
    assert "embedding dimension D (default: 768)" in text and "random seed" in text


def test_version(capsys) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"jasper-ray {jasper_ray.__version__}\n"


@pytest.mark.parametrize(
    ("argv", "quiet", "verbose"),
    [
        (["verify", "D"], False, False),
        (["-q", "verify", "D"], True, False),
        (["verify", "D", "-q"], True, False),
        (["verify", "-q", "D", "--verbose"], True, True),
        (["-v", "convert", "D", "--quiet"], True, True),
        (["synth", "D", "-v"], False, True),
    ],
)
def test_quiet_and_verbose_before_or_after_the_subcommand(argv, quiet, verbose) -> None:
    args = build_parser().parse_args(argv)
    assert (args.quiet, args.verbose) == (quiet, verbose)


# --- synth, convert, inspect, verify: text --------------------------------------------------------------


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
    assert "format    hdf5, single" in said
    for spec in TENSORS:
        assert spec.name in said
    assert "train=" in said and "val=" in said and "test=" in said
    assert "300 pairs" in said and "lzf+shuffle" in said

    assert main(["inspect", str(out), "--format", "pt"]) == 0
    assert "format    pt (" in capsys.readouterr().out

    assert main(["verify", str(out), "-q"]) == 0
    captured = capsys.readouterr()
    n, _ = checksummed_bytes(out / "dataset.h5")
    assert f"ok: {out} (hdf5, single): {n} checksums match (" in captured.out and "schema validated" in captured.out
    assert captured.err == "", "-q after the subcommand silences the bars"


def test_verify_of_pt_files_says_what_it_checked(small_dir: Path, tmp_path: Path, capsys) -> None:
    """PT files: verify validates the schema and checks the checksum sidecar synth wrote; without one it says
    so; `jasper-ray checksum DIR` records one; a changed byte then fails verify naming the tensor."""
    from _support import flip_byte

    from jasper_ray.formats.pt import zip_records
    from jasper_ray.schema import PT_CHECKSUMS, TENSOR

    assert main(["-q", "verify", str(small_dir)]) == 0
    out = capsys.readouterr().out
    assert out == f"ok: {small_dir} (pt): schema validated; {PT_CHECKSUMS} matches the blocks of 13 tensors\n"
    doc = run_json(["verify", str(small_dir), "-q"], capsys)
    assert doc["checksums"] == {"recorded": 13, "bytes": 0, "mismatched": 0} and doc["schema_valid"] is True
    assert doc["format"] == "pt" and doc["layout"] is None
    d = Path(shutil.copytree(small_dir, tmp_path / "ds"))
    (d / PT_CHECKSUMS).unlink()
    assert main(["-q", "verify", str(d)]) == 0
    assert (
        "no checksum sidecar covers these PT files (`jasper-ray checksum DIR` records one)" in capsys.readouterr().out
    )
    assert main(["-q", "checksum", str(d)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {d / PT_CHECKSUMS}: block digests of 13 tensors")
    assert (d / PT_CHECKSUMS).read_bytes() == (small_dir / PT_CHECKSUMS).read_bytes()  # what synth wrote
    path = d / TENSOR["source_embs"].pt_file
    with open(path, "rb") as f:
        offset, _ = zip_records(f, str(path))["data/0"]
    flip_byte(path, offset + 100)
    assert main(["-q", "verify", str(d)]) == 1
    err = capsys.readouterr().err
    assert "source_embs.pt: rows 0:" in err and "do not match the checksum recorded" in err


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


# --- --json ---------------------------------------------------------------------------------------------


def test_inspect_json(converted, small_expected, capsys) -> None:
    directory = converted("gzip")
    doc = run_json(["inspect", str(directory)], capsys)
    assert doc["dataset"] == str(directory) and doc["problems"] == []
    assert (doc["format"], doc["layout"]) == ("hdf5", "single")
    assert doc["bytes_on_disk"] == (directory / "dataset.h5").stat().st_size
    assert doc["n_pairs"] == small_expected.n_pairs == 2000
    assert doc["config"] == small_expected.config
    assert doc["splits"] == {s: len(ids) for s, ids in small_expected.splits.items()}
    assert [t["name"] for t in doc["tensors"]] == [s.name for s in TENSORS]
    with h5py.File(directory / "dataset.h5", "r") as f:
        for t in doc["tensors"]:
            want = small_expected.tensors[t["name"]]
            assert (t["shape"], t["dtype"]) == (list(want.shape), str(want.dtype)), t["name"]
            dset = f[TENSOR[t["name"]].h5_path]
            assert t["storage"] == {
                "kind": "chunked",
                "chunks": list(dset.chunks),
                "compression": "gzip",
                "shuffle": True,
                "shards": None,
            }, t["name"]
    ids = sum(len(k) for k in small_expected.keyword_ids)
    assert doc["keywords"] == {"pairs": small_expected.n_pairs, "ids": ids}

    pt = run_json(["inspect", str(directory), "--format", "pt"], capsys)
    assert (pt["format"], pt["layout"], pt["bytes_on_disk"]) == ("pt", None, pt_bytes(directory))
    assert {t["storage"]["kind"] for t in pt["tensors"]} == {"mmap"}


def test_verify_json(converted, capsys) -> None:
    directory = converted(None)
    n, nbytes = checksummed_bytes(directory / "dataset.h5")
    assert n >= len(TENSORS)
    doc = run_json(["verify", str(directory), "-q"], capsys)
    assert doc["checksums"] == {"recorded": n, "bytes": nbytes, "mismatched": 0}
    assert doc["schema_valid"] is True and doc["problems"] == [] and doc["format"] == "hdf5"


def test_verify_json_of_a_corrupt_file(tmp_path: Path, converted, capsys) -> None:
    directory = Path(shutil.copytree(converted(None), tmp_path / "ds"))
    h5_path = TENSOR["source_embs"].h5_path
    with h5py.File(directory / "dataset.h5", "r") as f:
        offset = f[h5_path].id.get_offset() + 10
    flip_byte(directory / "dataset.h5", offset)
    assert main(["-q", "verify", str(directory), "--json"]) == 1
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["ok"] is False and doc["checksums"]["mismatched"] == 1 and doc["schema_valid"] is None
    assert len(doc["problems"]) == 1 and f"dataset.h5:{h5_path}: checksum" in doc["problems"][0]
    assert doc["problems"][0] in one_line_error(captured.err, "verify")


def test_convert_json_and_output(dataset_copy: Path, tmp_path: Path, small_expected, capsys) -> None:
    output = tmp_path / "elsewhere.h5"
    argv = ["convert", str(dataset_copy), "--single-process", "--compression", "lzf", "--output", str(output)]
    doc = run_json([*argv, "-q"], capsys)
    assert not (dataset_copy / "dataset.h5").exists(), "--output writes there, not beside the PT files"
    assert doc["output"] == str(output) and doc["output_bytes"] == output.stat().st_size
    assert doc["source_bytes"] == pt_bytes(dataset_copy)
    assert (doc["mode"], doc["dry_run"], doc["layout"], doc["compression"]) == (
        "single-process",
        False,
        "single",
        "lzf",
    )
    assert (doc["pieces"], doc["pieces_reused"]) == (1, 0) and doc["seconds"] > 0
    assert (doc["ray_start_seconds"], doc["assembly_seconds"]) == (0, 0), "no Ray, no pieces to assemble"
    with h5py.File(output, "r") as f:
        got = f[TENSOR["question_embs"].h5_path][...]
    np.testing.assert_array_equal(got, small_expected.tensors["question_embs"])


def test_a_failure_still_writes_the_json_document(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nowhere"
    assert main(["inspect", str(missing), "--json"]) == 1
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert list(doc) == [*SHARED_KEYS, "problems"]
    assert doc["ok"] is False and doc["dataset"] == str(missing)
    assert doc["problems"] == [f"Dataset directory not found: {missing}"]
    one_line_error(captured.err, "inspect")


def _keys(doc: dict[str, Any]) -> dict[str, Any]:
    """A document's keys, and for nested objects (and lists of them) their keys."""
    shape: dict[str, Any] = {}
    for key, value in doc.items():
        if key == "config":
            shape[key] = "object"
        elif isinstance(value, dict):
            shape[key] = sorted(value)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            shape[key] = [_keys(value[0])]
        else:
            shape[key] = None
    return shape


def test_docs_show_each_json_report_as_it_is(converted, dataset_copy: Path, capsys) -> None:
    """docs/cli.md's examples have exactly the keys the commands write (one example per document kind)."""
    directory = converted("gzip")
    real = {
        ("inspect", False): run_json(["inspect", str(directory)], capsys),
        ("verify", False): run_json(["verify", str(directory), "-q"], capsys),
        ("convert", True): run_json(["convert", str(dataset_copy), "--dry-run"], capsys),
        ("convert", False): run_json(["convert", str(dataset_copy), "--single-process", "-q"], capsys),
    }
    examples = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", DOCS, flags=re.S)]
    shown = {(e["command"], bool(e.get("dry_run"))): e for e in examples}
    assert set(shown) == set(real), "one example per command (and one for convert --dry-run)"
    for kind, doc in real.items():
        assert _keys(shown[kind]) == _keys(doc), kind


def test_docs_name_every_subcommand_and_option() -> None:
    for parser in _parsers(build_parser())[1:]:
        command = parser.prog.split()[-1]
        assert f"## `jasper-ray {command}`" in DOCS, command
        section = DOCS.split(f"## `jasper-ray {command}`")[1].split("\n## ")[0]
        for action in parser._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help", "-q", "--quiet", "-v", "--verbose"):
                    assert f"`{option}" in section, f"docs/cli.md: {command} {option}"


# --- exit codes and flag conflicts ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["convert", "{ds}", "--single-process", "--layout", "sharded"], "--layout sharded would not apply"),
        (["convert", "{ds}", "--single-process", "--workers", "2"], "--workers would not apply"),
        (["convert", "{ds}", "--single-process", "--address", "auto"], "--address would not apply"),
        (["convert", "{ds}", "--single-process", "--shard-size", "1MB"], "--shard-size would not apply"),
        (["convert", "{ds}", "--workers", "2", "--address", "auto"], "--workers sizes a local Ray"),
        (["convert", "{ds}", "--compression", "lzf", "--level", "3"], "does not apply to --compression lzf"),
        (["convert", "{ds}", "--compression", "none", "--no-shuffle"], "does not apply to --compression none"),
        (["convert", "{ds}", "--compression", "zstd"], "argument --compression: invalid choice: 'zstd'"),
        (["convert", "{ds}", "--level", "12"], "expected a gzip level from 0 to 9, got '12'"),
        (["convert", "{ds}", "--shard-size", "lots"], "size 'lots': expected a number with a unit"),
        (["convert", "{ds}", "--bogus"], "unrecognized arguments: --bogus"),
        (["synth", "{tmp}/x", "--size", "lots"], "size 'lots'"),
        (["synth", "{tmp}/x", "--dim", "0"], "expected a positive whole number, got '0'"),
        (["inspect"], "the following arguments are required: DIR"),
    ],
    ids=[
        "single-sharded",
        "single-workers",
        "single-address",
        "single-shard-size",
        "workers-address",
        "level-lzf",
        "no-shuffle-none",
        "bad-compression",
        "bad-level",
        "bad-shard-size",
        "unknown-option",
        "bad-size",
        "zero-dim",
        "no-dir",
    ],
)
def test_usage_errors_exit_2_with_one_line(dataset_copy: Path, tmp_path: Path, capsys, argv, needle) -> None:
    before = sorted(p.name for p in dataset_copy.iterdir())
    argv = [a.format(ds=dataset_copy, tmp=tmp_path) for a in argv]
    assert main(["-q", *argv, *(["--json"] if argv[0] == "convert" else [])]) == 2
    captured = capsys.readouterr()
    assert needle in one_line_error(captured.err, argv[0])
    assert captured.out == "", "no JSON document for a usage error"
    assert sorted(p.name for p in dataset_copy.iterdir()) == before and not (tmp_path / "x").exists()


def test_unknown_command_exits_2(capsys) -> None:
    assert main(["explode"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("jasper-ray: error: argument COMMAND: invalid choice: 'explode'")
    assert lines[0].endswith("(see jasper-ray --help)")


def test_exit_codes_by_subprocess(tmp_path: Path, converted) -> None:
    """``python -m jasper_ray``: 0 intact (``-q`` after the subcommand: nothing on stderr), 1 after a flipped
    byte, 2 for usage; each failure one line on stderr and nothing on stdout."""
    directory = Path(shutil.copytree(converted(None), tmp_path / "ds"))
    ok = run_cli("verify", str(directory), "-q")
    assert (ok.returncode, ok.stderr) == (0, "") and ok.stdout.startswith("ok: ")
    h5_path = TENSOR["pair_index"].h5_path
    with h5py.File(directory / "dataset.h5", "r") as f:
        offset = f[h5_path].id.get_offset() + 8 * 2 * 7  # question id of pair 7
    flip_byte(directory / "dataset.h5", offset)
    bad = run_cli("verify", str(directory), "-q")
    assert (bad.returncode, bad.stdout) == (1, "")
    assert f"dataset.h5:{h5_path}" in one_line_error(bad.stderr, "verify")
    usage = run_cli("convert", str(directory), "--single-process", "--workers", "2")
    assert (usage.returncode, usage.stdout) == (2, "")
    one_line_error(usage.stderr, "convert")


@pytest.mark.parametrize("command", ["inspect", "verify", "convert"])
def test_missing_directory_is_a_one_line_error(tmp_path: Path, capsys, command) -> None:
    missing = tmp_path / "nowhere"
    extra = ["--single-process"] if command == "convert" else []  # no Ray in these tests
    assert main(["-q", command, str(missing), *extra]) == 1
    line = one_line_error(capsys.readouterr().err, command)
    assert str(missing) in line


def test_empty_directory_names_what_was_looked_for(tmp_path: Path, capsys) -> None:
    assert main(["inspect", str(tmp_path)]) == 1
    line = one_line_error(capsys.readouterr().err, "inspect")
    assert f"No dataset files found in {tmp_path}" in line and "dataset.h5" in line and "question_embs.pt" in line


def test_hdf5_asked_of_a_pt_dataset(dataset_copy: Path, capsys) -> None:
    assert main(["inspect", str(dataset_copy), "--format", "hdf5"]) == 1
    assert "HDF5 file not found" in one_line_error(capsys.readouterr().err, "inspect")


def _verify_fails_naming(directory: Path, h5_path: str, capsys) -> str:
    assert main(["-q", "verify", str(directory)]) == 1
    captured = capsys.readouterr()
    line = one_line_error(captured.err, "verify")
    assert f"dataset.h5:{h5_path}" in line
    assert captured.out == ""
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


def test_verify_reports_validation_errors(dataset_copy: Path, small_expected, capsys) -> None:
    """A PT dataset has no checksums: verify runs the schema validation and names the bad position."""
    import torch

    tiers = small_expected.tensors["negative_tiers"].copy()
    tiers[4, 3] = 7
    torch.save(torch.from_numpy(tiers), dataset_copy / "negative_tiers.pt")
    doc = run_json(["verify", str(dataset_copy), "-q"], capsys, code=1)
    assert doc["schema_valid"] is False and len(doc["problems"]) == 1
    assert "negative_tiers.pt at position (4, 3): found value 7, expected a tier in [1, 4]" in doc["problems"][0]


def test_convert_none_compression_writes_a_mappable_file(dataset_copy: Path, capsys) -> None:
    assert main(["-q", "convert", str(dataset_copy), "--compression", "none", "--single-process"]) == 0
    with h5py.File(dataset_copy / "dataset.h5", "r") as f:
        assert all(f[s.h5_path].chunks is None for s in TENSORS)
        assert np.asarray(f["pair_data/index"][:2]).shape == (2, 2)


# --- convert --dry-run ------------------------------------------------------------------------------------


def _snapshot(directory: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(directory)), p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*"))


def test_dry_run_writes_nothing_and_reports_the_pieces(dataset_copy: Path, small_expected, capsys) -> None:
    parent = dataset_copy.parent
    before = _snapshot(parent)
    doc = run_json(["convert", str(dataset_copy), "--dry-run", "--workers", "2"], capsys)
    assert _snapshot(parent) == before, "a dry run writes nothing"
    assert (doc["dry_run"], doc["mode"], doc["layout"], doc["compression"]) == (True, "ray", "single", "gzip")
    assert doc["output"] == str(dataset_copy / "dataset.h5") and doc["source_bytes"] == pt_bytes(dataset_copy)
    by_source = {t["source"]: t for t in doc["tensors"]}
    for spec in TENSORS:  # the small tensors fit one piece each
        assert by_source[f"tensor:{spec.name}"] == {
            "h5_path": spec.h5_path,
            "source": f"tensor:{spec.name}",
            "pieces": 1,
            "bytes": small_expected.tensors[spec.name].nbytes,
        }
    for split, ids in small_expected.splits.items():
        assert by_source[f"split:{split}"]["bytes"] == ids.nbytes
    assert doc["pieces"] == len(doc["tensors"]) == sum(t["pieces"] for t in doc["tensors"])
    assert doc["output_bytes_max"] == sum(t["bytes"] for t in doc["tensors"]) + (1 << 20)
    assert doc["bytes_needed"] == 2 * doc["output_bytes_max"], "on Ray, one file: the parts and the file"
    assert abs(doc["free_bytes"] - shutil.disk_usage(parent).free) < 256 << 20
    assert doc["fits"] is True and doc["piece_bytes"] == 256 << 20

    assert main(["convert", str(dataset_copy), "--dry-run", "--workers", "2"]) == 0
    text = capsys.readouterr().out
    assert "nothing written" in text and "fits" in text and f"{doc['pieces']} pieces" in text
    assert _snapshot(parent) == before


def test_dry_run_cuts_large_tensors_into_pieces(
    dataset_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """With 64 KiB checksum blocks (as tests/_support.write_sharded) 64 KiB pieces split the embeddings:
    the counts are the plan's, per tensor, and the sharded layout needs no second copy."""
    import jasper_ray.formats.checksum as checksum
    from jasper_ray.conversion.plan import plan_conversion
    from jasper_ray.formats import open_dataset

    monkeypatch.setattr(checksum, "BLOCK_BYTES", 64 << 10)
    output = tmp_path / "out" / "shards"
    argv = ["convert", str(dataset_copy), "--dry-run", "--shard-size", "64KiB", "--layout", "sharded"]
    doc = run_json([*argv, "--output", str(output)], capsys)
    plan = plan_conversion(open_dataset(dataset_copy, "pt"), "gzip", piece_bytes=64 << 10)
    assert [(t["h5_path"], t["pieces"]) for t in doc["tensors"]] == [
        (c.h5_path, len(plan.pieces_of(c))) for c in plan.columns
    ]
    questions = next(t for t in doc["tensors"] if t["h5_path"] == TENSOR["question_embs"].h5_path)
    assert questions["pieces"] >= 2 and doc["pieces"] == len(plan.pieces) > len(plan.columns)
    assert doc["output"] == str(output) and doc["bytes_needed"] == doc["output_bytes_max"]
    assert not (tmp_path / "out").exists()

    single = run_json(["convert", str(dataset_copy), "--dry-run", "--single-process"], capsys)
    assert single["pieces"] == 1 and {t["pieces"] for t in single["tensors"]} == {1}
    assert single["bytes_needed"] == single["output_bytes_max"] and single["piece_bytes"] is None

    in_place = run_json(["convert", str(dataset_copy), "--dry-run", "--workers", "2", "--compression", "none"], capsys)
    assert in_place["mode"] == "ray" and in_place["bytes_needed"] == in_place["output_bytes_max"], "no part files"


def test_dry_run_that_does_not_fit_exits_1(dataset_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr("jasper_ray.cli.convert.free_bytes", lambda path: 1000)
    assert main(["convert", str(dataset_copy), "--dry-run", "--json"]) == 1
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["fits"] is False and doc["free_bytes"] == 1000 and doc["ok"] is False
    assert doc["problems"] == [
        f"not enough space for {dataset_copy / 'dataset.h5'}: the conversion needs up to "
        f"{doc['bytes_needed'] / 1e6:.1f} MB, 1.0 kB are free"
    ]
    one_line_error(captured.err, "convert")


# --- progress, Ray's start, a closed stdout -------------------------------------------------------------


class RecordingBar:
    """tqdm's interface as verify uses it; remembers its total and what it was told."""

    made: list[RecordingBar] = []

    def __init__(self, *args: Any, total: int | None = None, **kwargs: Any) -> None:
        self.total, self.n = total, 0
        RecordingBar.made.append(self)

    def update(self, n: int) -> None:
        self.n += n

    def __enter__(self) -> RecordingBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def test_verify_bar_counts_what_its_total_counts(
    converted, dataset_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr("jasper_ray.cli.datasets.tqdm", RecordingBar)
    gzip = converted("gzip")
    RecordingBar.made = []
    assert main(["verify", str(gzip)]) == 0
    capsys.readouterr()
    _, nbytes = checksummed_bytes(gzip / "dataset.h5")
    assert [(b.total, b.n) for b in RecordingBar.made] == [(nbytes, nbytes)]
    assert nbytes > 1.2 * (gzip / "dataset.h5").stat().st_size, "uncompressed bytes, not the file's"

    shards = write_sharded(dataset_copy, "gzip")
    manifest = json.loads((shards / "manifest.json").read_text())
    want = sum(
        (s["stop"] - s["start"]) * np.dtype(t["dtype"]).itemsize * int(np.prod(t["shape"][1:]))
        for t in manifest["tensors"]
        for s in t["shards"]
    )
    RecordingBar.made = []
    doc = run_json(["verify", str(dataset_copy)], capsys)
    assert doc["layout"] == "sharded" and doc["checksums"]["bytes"] == want
    assert [(b.total, b.n) for b in RecordingBar.made] == [(want, want)]


def test_verify_bar_reaches_100_percent(converted) -> None:
    run = run_cli("verify", str(converted("gzip")))
    assert run.returncode == 0, run.stderr
    assert re.search(r"checksums: 100%", run.stderr), run.stderr[-2000:]


class FakeRay:
    def is_initialized(self) -> bool:
        return False


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--layout", "sharded"], f"starting Ray ({os.cpu_count()} CPUs) ...\n"),
        (["--workers", "3"], "starting Ray (3 CPUs) ...\n"),
        (["--address", "10.0.0.1:6379"], "connecting to Ray at 10.0.0.1:6379 ...\n"),
        (["-q", "--shard-size", "1MB"], ""),
    ],
)
def test_convert_says_it_starts_ray(
    dataset_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys, flags: list[str], said: str
) -> None:
    """Ray's start-up is announced on stderr before ``convert`` starts it, with the workers and address given
    (Ray and ``convert`` replaced); ``convert`` stops the Ray it started (no ``keep_ray``). A flag only Ray uses
    chooses Ray: no line about the choice."""
    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("jasper_ray.cli.convert.require_ray", lambda purpose: FakeRay())

    def convert(directory: str, **kwargs: Any) -> ConversionReport:
        calls.append((directory, kwargs))
        assert capsys.readouterr().err == said, "announced before Ray starts"
        return ConversionReport(Path(directory) / "dataset.h5", 100, 90, 1.5, "gzip", shards=2)

    monkeypatch.setattr("jasper_ray.cli.convert.convert", convert)
    assert main(["convert", str(dataset_copy), *flags]) == 0
    assert "2 shards (0 reused)" in capsys.readouterr().out
    workers = int(flags[1]) if flags[:1] == ["--workers"] else None
    address = flags[1] if flags[:1] == ["--address"] else None
    [(_, kwargs)] = calls
    assert (kwargs["num_workers"], kwargs["address"], kwargs.get("keep_ray", False)) == (workers, address, False)


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_a_closed_stdout_ends_quietly(converted, json_flag: list[str]) -> None:
    """The reader of stdout is gone before a byte is written: exit 0, nothing on stderr."""
    read, write = os.pipe()
    os.close(read)
    try:
        run = subprocess.run(
            [sys.executable, "-m", "jasper_ray", "inspect", str(converted("gzip")), *json_flag],
            env=subprocess_env(),
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert (run.returncode, run.stderr) == (0, "")


def test_inspect_piped_to_head(converted) -> None:
    directory = converted("gzip")
    command = f"set -o pipefail; {sys.executable} -m jasper_ray inspect {directory} | head -1"
    run = subprocess.run(["bash", "-c", command], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert (run.returncode, run.stderr, run.stdout) == (0, "", f"dataset   {directory}\n")


@pytest.mark.parametrize(
    ("worthwhile", "mode", "said"),
    [
        (True, "ray", "gzip, on Ray, 18 pieces)"),
        (False, "single-process", "gzip, in this process)"),
    ],
)
def test_convert_chooses_like_the_api_and_says_which(
    dataset_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys, worthwhile: bool, mode: str, said: str
) -> None:
    """No --single-process and no flag only Ray uses: ``ray_worthwhile`` (the API's choice) decides."""
    asked = []
    monkeypatch.setattr(
        "jasper_ray.cli.convert.ray_worthwhile", lambda directory, piece: asked.append(piece) or worthwhile
    )
    doc = run_json(["convert", str(dataset_copy), "--dry-run"], capsys)
    assert doc["mode"] == mode and asked == [256 << 20]
    assert (doc["pieces"] == 1) is (mode == "single-process")
    assert main(["convert", str(dataset_copy), "--dry-run"]) == 0
    assert said in capsys.readouterr().out  # the plan line


def test_small_data_converts_in_one_process_without_ray(dataset_copy: Path, tmp_path: Path) -> None:
    """The real choice, in a child with no Ray running and no RAY_ADDRESS: a small dataset is converted in
    the CLI's own process (no Ray started), the same file as --single-process writes."""
    env = {k: v for k, v in subprocess_env().items() if k != "RAY_ADDRESS"}
    run = subprocess.run(
        [sys.executable, "-m", "jasper_ray", "convert", str(dataset_copy), "--json", "--compression", "lzf"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["mode"] == "single-process" and doc["pieces"] == 1 and doc["up_to_date"] is False
    assert "converting in this process: one piece of PT data or less" in run.stderr
    assert "starting Ray (" not in run.stderr
    reference = tmp_path / "reference.h5"
    argv = ["-q", "convert", str(dataset_copy), "--single-process", "--compression", "lzf", "--output", str(reference)]
    assert main(argv) == 0
    with h5py.File(dataset_copy / "dataset.h5") as ours, h5py.File(reference) as want:
        for spec in TENSORS:
            got, expected = ours[spec.h5_path], want[spec.h5_path]
            assert (got.compression, got.chunks) == (expected.compression, expected.chunks), spec.name
            assert got[...].tobytes() == expected[...].tobytes(), spec.name
