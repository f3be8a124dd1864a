"""`jasper-ray demo --size 10MB` runs end to end: its summary shows a first and a second epoch per path,
says every epoch of every path delivered the whole split, and the run is not greeted by Ray's token
authentication warning (the local Ray it starts needs none)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

PATH_LINE = re.compile(
    r"^(local JASPERSteeringDataset|read_jasper|ShardedJasper).*?"
    r"\s([\d.]+)\s+([\d,]+)\s+([\d.]+)\s+([\d,]+)\s+(yes|NO) \((\d+)/(\d+), (\d+)/(\d+)\)$",
    flags=re.M,
)


def test_demo_checks_its_own_summary(tmp_path: Path) -> None:
    # Its own local Ray, with the user's environment as a new user has it: no RAY_AUTH_MODE.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    run = subprocess.run(
        [sys.executable, "-m", "jasper_ray", "-q", "demo", "--size", "10MB", "--dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    paths = PATH_LINE.findall(run.stdout)
    assert [p[0] for p in paths] == ["local JASPERSteeringDataset", "read_jasper", "ShardedJasper"], run.stdout
    for name, s1, rate1, s2, rate2, verdict, got1, want1, got2, want2 in paths:
        assert verdict == "yes" and got1 == want1 == got2 == want2 and int(want1) > 0, f"{name}: {got1}, {got2}"
        for seconds, rate in ((s1, rate1), (s2, rate2)):  # each epoch timed on its own: a finite rate
            # A small split may pass in under half a millisecond locally: its seconds then print as 0.000.
            assert float(seconds) >= 0 and int(rate.replace(",", "")) > 0, f"{name}: {seconds} s, {rate}/s"
    assert "1st epoch (with start-up)" in run.stdout and "2nd epoch (steady)" in run.stdout
    assert "convert on Ray" in run.stdout and (tmp_path / "demo" / "pt" / "dataset.h5").is_file()
    assert "decompress into the node-local cache" in run.stdout, "one conversion: gzip, served through the cache"
    (copy,) = (tmp_path / "demo" / "cache").rglob("dataset.h5")
    assert copy.stat().st_size > (tmp_path / "demo" / "pt" / "dataset.h5").stat().st_size, "decompressed there"
    assert "Token authentication is enabled" not in run.stdout + run.stderr


def test_the_demos_own_directory_is_removed_at_its_end(tmp_path: Path, monkeypatch, ray_session) -> None:
    """Without ``--dir`` the demo writes GBs (the PT files, dataset.h5, the cache's copy) into a temporary
    directory of its own: gone when it ends, and the summary says so. With ``--dir`` (above) they stay."""
    import tempfile

    from jasper_ray.tools.demo import run_demo

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    summary = run_demo("10MB", progress=False)
    assert summary.ok and summary.removed
    assert summary.directory.parent == tmp_path and summary.directory.name.startswith("jasper-demo-")
    assert list(tmp_path.iterdir()) == []
    assert f"jasper_ray demo in {summary.directory} (removed at the end):" in summary.table()
