"""`jasper-ray demo --size 50MB` runs end to end and its summary says every path delivered the whole split."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def test_demo_checks_its_own_summary(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    env["RAY_AUTH_MODE"] = "disabled"
    run = subprocess.run(
        [sys.executable, "-m", "jasper_ray", "-q", "demo", "--size", "50MB", "--dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    paths = re.findall(
        r"^(local JASPERSteeringDataset|read_jasper|ShardedJasper).*\s(yes|NO) \((\d+)/(\d+)\)$", run.stdout, flags=re.M
    )
    assert [p[0] for p in paths] == ["local JASPERSteeringDataset", "read_jasper", "ShardedJasper"]
    for name, verdict, got, want in paths:
        assert verdict == "yes" and got == want and int(want) > 0, f"{name}: {got}/{want}"
    assert "convert on Ray" in run.stdout and (tmp_path / "demo" / "pt" / "dataset.h5").is_file()
    assert (tmp_path / "demo" / "serve" / "dataset.h5").is_file()
