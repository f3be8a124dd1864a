"""``jasper-ray bench``: every script end to end into one report with its tables and three plots; the pieces.

The end-to-end test runs every benchmark script (bench_scale included) at the ``--tiny`` scale, two at a
time (most of its time: fresh interpreters and Ray start-ups); the others use fake scripts and records.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _support import REPO, subprocess_env

from jasper_ray import cli
from jasper_ray.cli import bench_report, main

bench = bench_report()

# Table titles (their beginnings) each script prints.
TABLES = {
    "formats": [
        "Setup",
        "Conversion of the",
        "Open time",
        "512-random-row gathers",
        "Reading every pair's keyword ids",
        "Memory of a pass",
        "Read verification: whole passes",
        "Storage precision: dataset.h5 size",
        "Storage precision: batched samples/s",
    ],
    "loader": [
        "DataLoader samples/s",
        "Workers beside a training step",
        "Read verification through create_loader",
        "Storage precision through create_loader",
    ],
    "convert": ["PT -> HDF5 conversion", "Scaling model (gzip)"],
    "ray_data": ["Ray Data rows/s"],
    "actors": ["One epoch of", "A killed actor", "Memory after the runs"],
    "remote": ["Remote gzip dataset through the node-local cache"],
    "scale": ["Scale: "],
}
# Raw records each script leaves: name -> how many.
RECORDS = {
    "formats": {
        "formats_open": 12,
        "formats_pass": 4,
        "formats_verify": 8,
        "formats_precision_size": 9,
        "formats_precision": 10,
    },
    "loader": {"loader": 19, "loader_overlap": 18, "loader_verify": 4, "loader_precision": 5},
    "convert": {"convert": 4, "convert_model": 1, "convert_capacity": 1},  # tiny: gzip only
    "ray_data": {"ray_data": 8},
    "actors": {"actors": 4},
    "remote": {"remote": 1},
    "scale": {"scale": 9, "scale_speedup": 1, "scale_speedup_running": 1, "scale_capacity": 1},
}


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, (path, len(data))


def test_bench_tiny_writes_every_table_and_plot(tmp_path: Path, capsys) -> None:
    """Every script, bench_scale (opt-in) included, tiny and end to end into one report."""
    out = tmp_path / "report"
    every = ",".join(bench.KNOWN)
    rc = main(["bench", "--tiny", "--only", every, "--out", str(out), "--work-dir", str(tmp_path / "work")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    md = (out / "report.md").read_text()
    doc = json.loads((out / "report.json").read_text())

    assert [r["script"] for r in doc["runs"]] == [f"bench_{n}.py" for n in bench.KNOWN]
    for run in doc["runs"]:
        name = run["script"][len("bench_") : -len(".py")]
        assert run["returncode"] == 0
        assert f"## {run['script']}" in md
        titles = [t["title"] for t in run["tables"]]
        assert len(titles) == len(TABLES[name]), titles
        for title, start in zip(titles, TABLES[name]):
            assert title.startswith(start), (title, start)
            assert f"### {title}\n" in md  # the script's stdout, verbatim
        counts: dict[str, int] = {}
        for r in run["records"]:
            counts[r["name"]] = counts.get(r["name"], 0) + 1
        assert counts == RECORDS[name], (name, counts)
    for name, file in bench.PLOTS.items():
        assert doc["plots"][name]["file"] == file
        assert_png(out / file)
        assert f"]({file})" in md
    assert "Skipped" not in md
    assert "## Machine" in md and f"| CPUs | {os.cpu_count()} " in md
    assert not list((tmp_path / "work").iterdir())  # the scripts' data is gone
    (scale,) = [r for r in doc["runs"] if r["script"] == "bench_scale.py"]
    steps = {r["values"]["step"]: r["values"] for r in scale["records"] if r["name"] == "scale"}
    assert steps["convert_gzip"]["processes"] > 2, "Ray's processes are in the sampled tree"
    assert all(s["peak_owned_bytes"] > 0 and s["seconds"] > 0 for s in steps.values())
    (speedup,) = [r["values"] for r in scale["records"] if r["name"] == "scale_speedup"]
    assert speedup["ray_start_seconds"] > 0, "the convert command started its own Ray, and its report says so"
    assert 0 < speedup["ratio"] < float("inf")
    (running,) = [r["values"] for r in scale["records"] if r["name"] == "scale_speedup_running"]
    assert 0 < running["ratio"] < float("inf") and running["seconds"] == steps["convert_gzip_running"]["seconds"]
    assert steps["convert_gzip_running"]["processes"] > 2, "the running Ray's processes are in the sampled trees"
    assert "on a Ray already running" in md
    (capacity,) = [r["values"] for r in scale["records"] if r["name"] == "scale_capacity"]
    assert capacity["writers"] == os.cpu_count() and steps["capacity"]["processes"] > capacity["writers"]
    assert 0 < capacity["capacity"] < float("inf") and capacity["ray_share"] > 0


def test_bench_scale_is_opt_in() -> None:
    """bench_scale (a dataset larger than RAM at its size) runs only when --only names it (the test above does)."""
    assert "scale" not in bench.parse_only(None) and bench.parse_only("convert,scale") == ["convert", "scale"]
    assert bench.script_args("scale", "quick") == ["--quick"]  # its --quick size: 2GB, not its 30GB


def test_bench_scale_stops_when_the_disk_is_too_small(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_scale.py"), "--size", "100000TB", "--out", str(tmp_path)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "Nothing was run" in proc.stderr and "free" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


# --- the pieces, without the real scripts ---------------------------------------------------------

FAKE_SCRIPT = """
import sys
sys.path.insert(0, {scripts!r})
from _bench_common import print_table, record
{body}
"""
FAKE_BODIES = {
    "loader": """
print_table("DataLoader samples/s (fake)", ["path", "samples/s"], [["ceiling", "100.0 k"]])
record("loader", path="ceiling", storage="PT in RAM", workers=0, samples_per_s=1e5)
record("loader", path="upstream-style", storage="PT in RAM", workers=0, samples_per_s=1e4)
record("loader", path="batched", storage="PT + mmap", workers=0, samples_per_s=6e4)
""",
    "actors": """
import sys
print("partial output", flush=True)
print("\\x1b[33m(raylet)\\x1b[0m A worker died", flush=True)
print("actor trouble", file=sys.stderr)
sys.exit(3)
""",
}


@pytest.fixture
def fake_scripts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "scripts"
    directory.mkdir()
    for name in bench.KNOWN:
        body = FAKE_BODIES.get(name, "")
        (directory / f"bench_{name}.py").write_text(FAKE_SCRIPT.format(scripts=str(REPO / "scripts"), body=body))
    monkeypatch.setattr(bench, "scripts_dir", lambda: directory)
    return directory


def test_failed_script_is_named_and_missing_plots_are_notes(tmp_path: Path, fake_scripts: Path, capsys) -> None:
    out = tmp_path / "report"
    (out).mkdir()
    (out / bench.PLOTS["rss"]).write_bytes(b"stale")  # an earlier run's plot must not stay beside this report
    rc = main(["bench", "--only", "actors,loader", "--out", str(out), "--work-dir", str(tmp_path / "work")])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.strip().splitlines()[-1].startswith("jasper-ray bench: error: bench_actors.py (exit code 3) failed")
    assert "actor trouble" in err  # stderr streamed through
    md = (out / "report.md").read_text()
    assert md.index("## bench_loader.py") < md.index("## bench_actors.py")  # the report's order, not --only's
    assert "### DataLoader samples/s (fake)" in md
    assert "**bench_actors.py failed** (exit code 3)" in md and "actor trouble" in md and "partial output" in md
    assert_png(out / bench.PLOTS["throughput"])
    assert "No panel for bench_ray_data, bench_actors" in md
    assert "Skipped: no data from bench_convert" in md
    assert "Skipped: no data from bench_formats" in md
    assert not (out / bench.PLOTS["rss"]).exists() and not (out / bench.PLOTS["conversion"]).exists()
    assert "\x1b" not in md and "```\n(raylet) A worker died\n```" in md  # Ray's log lines below the tables
    doc = json.loads((out / "report.json").read_text())
    assert doc["plots"]["conversion"]["file"] is None
    assert [r["name"] for r in doc["runs"][0]["records"]] == ["loader"] * 3
    again = tmp_path / "again"  # report.json holds all it takes to draw the report again
    bench.write_report(again, *bench.load_runs(out / "report.json"))
    assert (again / "report.md").read_text() == md


def test_bad_input_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    assert main(["bench", "--only", "loader,nope", "--out", str(tmp_path / "r")]) == 1
    assert capsys.readouterr().err.strip() == (
        "jasper-ray bench: error: --only 'loader,nope': expected a comma-separated subset of "
        "formats,loader,convert,ray_data,actors,remote,scale"
    )
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "jasper_ray" / "cli.py"))
    assert main(["bench", "--tiny", "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("jasper-ray bench: error: benchmark scripts not found:") and "\n" not in err
    assert not (tmp_path / "r").exists()


def test_script_args_per_scale() -> None:
    assert bench.script_args("formats") == []
    assert bench.script_args("convert", "quick") == ["--quick"]
    assert bench.script_args("loader", "quick", 0.5) == ["--quick", "--size", "50MB"]
    assert bench.script_args("actors", "full", 2) == ["--size", "2000MB"]
    assert bench.script_args("ray_data", "tiny") == ["--quick", "--size", "16MB", "--rounds", "1"]
    with pytest.raises(ValueError):
        bench.script_args("loader", "full", 0)


def test_record_keeps_tables_and_numbers_without_changing_stdout(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys, numpy as np
        sys.path.insert(0, {str(REPO / "scripts")!r})
        from _bench_common import print_table, record
        print_table("T", ["a", "b"], ([x, f"{{x:.1f}}"] for x in (1, 2)), notes=["n"])
        record("r", x=np.float32(1.5), xs=np.arange(3), nan=float("nan"), path=__import__("pathlib").Path("/p"))
        """
    )
    env = subprocess_env()
    env.pop(bench.JSON_ENV, None)
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    env[bench.JSON_ENV] = str(tmp_path / "doc.json")
    recorded = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert recorded.stdout == plain.stdout and "### T" in plain.stdout
    doc = json.loads((tmp_path / "doc.json").read_text())
    assert doc["tables"] == [{"title": "T", "headers": ["a", "b"], "rows": [[1, "1.0"], [2, "2.0"]], "notes": ["n"]}]
    assert doc["records"] == [{"name": "r", "values": {"x": 1.5, "xs": [0, 1, 2], "nan": None, "path": "/p"}}]
