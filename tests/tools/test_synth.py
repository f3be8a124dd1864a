"""``synth_dataset``: the first version's bytes, made in blocks; owned memory that does not grow with size."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _support import subprocess_env

import jasper_ray.tools.synth as synth
from jasper_ray.formats import open_dataset
from jasper_ray.schema import PT_CHECKSUMS, TENSORS

# sha256 (first 32 hex digits) over every file's name and bytes, in name order, recorded from the first
# version of synth_dataset (commit 76f84d1, which built every tensor whole in memory; torch 2.13, numpy 2.4).
FIRST_VERSION = {
    (0, 40, 8, 4): "bdacbb85b1e5151f48e839af8feb1064",
    (1, 300, 16, 12): "6670576393df92d6c513a7607044cf79",
    (7, 1000, 24, 5): "6044b09e6ed68acff2dc3603bd67727b",
    (3, 3000, 8, 1): "c0349f94aaca576f9c499b36d9691a65",
}


def _digest(directory: Path) -> str:
    """The dataset's files (the checksum sidecar, added since, aside: tests/formats/test_pt_checksums.py)."""
    h = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.name != PT_CHECKSUMS):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:32]


@pytest.mark.parametrize("block_bytes", [synth.BLOCK_BYTES, 100], ids=["default-blocks", "tiny-blocks"])
@pytest.mark.parametrize("case", list(FIRST_VERSION), ids=lambda c: "seed{}-p{}-d{}-neg{}".format(*c))
def test_same_bytes_as_the_first_version(tmp_path: Path, monkeypatch, case, block_bytes) -> None:
    """Blocks of a few rows (many blocks per draw) or one block: the same bytes as the whole-array version."""
    monkeypatch.setattr(synth, "BLOCK_BYTES", block_bytes)
    seed, n_pairs, dim, n_neg = case
    out = synth.synth_dataset(tmp_path / "ds", n_pairs, dim, n_neg, seed)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no scratch left behind
    assert _digest(out) == FIRST_VERSION[case]
    assert (out / PT_CHECKSUMS).is_file()


MEMORY_PROBE = """
import json, re, sys, threading, time
from pathlib import Path
import numpy, torch  # imported before the baseline: their own memory is not the dataset's
import jasper_ray.tools.synth as synth

synth.BLOCK_BYTES = 256 << 10

def owned():
    return int(re.search(r"RssAnon:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) << 10

base = owned()
peak = [base]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], owned())
        time.sleep(0.002)
thread = threading.Thread(target=sample, daemon=True)
thread.start()
synth.synth_dataset(sys.argv[1], int(sys.argv[2]), 256, 4, 0)
done.set()
thread.join()
print(json.dumps({"growth": max(peak[0], owned()) - base}))
"""


def test_owned_memory_stays_bounded(tmp_path: Path) -> None:
    """A dataset 4x larger than the limit is made with owned memory (RssAnon) growing less than the limit:
    the tensors pass through file-backed pages, not owned memory (whole tensors would need > 4x)."""
    limit = 32 << 20
    n_pairs = 30_000  # ~ 4.6 kB a pair at D=256: ~140 MB of PT files
    out = tmp_path / "ds"
    run = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(out), str(n_pairs)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    growth = json.loads(run.stdout)["growth"]
    size = sum(p.stat().st_size for p in out.glob("*.pt"))
    assert size > 4 * limit, f"the dataset ({size} bytes) must be several times the limit"
    assert growth < limit, f"owned memory grew by {growth / 2**20:.1f} MiB making {size / 2**20:.0f} MiB"
    with open_dataset(out, storage_format="pt", use_mmap=True) as reader:  # torch.load(mmap=True) as before
        rows = reader.take("steering_residual", np.array([0, n_pairs - 1]))
        assert rows.shape == (2, 256) and np.isfinite(rows).all()
        assert reader.n_pairs == n_pairs and reader.n_keyword_pairs() == n_pairs
    assert len(TENSORS) == sum(1 for spec in TENSORS if (out / spec.pt_file).is_file())


def test_cli_synth_shows_progress_unless_quiet(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "jasper_ray", "synth", "--pairs", "200", "--dim", "8", "--neg", "4"]
    loud = subprocess.run([*args, str(tmp_path / "a")], env=subprocess_env(), capture_output=True, text=True)
    quiet = subprocess.run([*args, "-q", str(tmp_path / "b")], env=subprocess_env(), capture_output=True, text=True)
    assert loud.returncode == quiet.returncode == 0, loud.stderr + quiet.stderr
    assert "synth" in loud.stderr and "row" in loud.stderr
    assert "synth:" not in quiet.stderr and "row" not in quiet.stderr
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


@pytest.mark.parametrize(
    "lists",
    [
        [],
        [[]],
        [[5]],
        [[0, 255, 256, 65535, 65536, -1, 2**31 - 1, -(2**31)]],
        [[i % 7] * (i % 4) for i in range(300)],  # past 256 lists: 4-byte memo indices
        [[i] for i in range(2500)],  # batches of 1000 appends
        [list(range(1001)), [1, 2]],
        [[2**40, 1]],  # beyond 32 bits: through the lists
    ],
    ids=["none", "one-empty", "one-id", "int-widths", "memo-widths", "batches", "long-list", "wide-ids"],
)
def test_keyword_ids_from_csr_are_the_lists_bytes(tmp_path: Path, lists: list[list[int]]) -> None:
    """PTWriter.write_keyword_ids pickles straight from CSR (synth's path): the file torch.save writes
    for upstream's List[List[int]], byte for byte, loadable with weights_only=True."""
    import torch

    from jasper_ray.formats.pt import PTWriter

    offsets = np.cumsum([0] + [len(ids) for ids in lists]).astype(np.int64)
    values = np.array([v for ids in lists for v in ids], dtype=np.int64)
    with PTWriter(tmp_path / "csr") as csr, PTWriter(tmp_path / "lists") as plain:
        csr.write_keyword_ids(values, offsets)
        plain.write_keyword_lists(lists)
    ours, want = (tmp_path / d / "pair_keyword_ids.pt" for d in ("csr", "lists"))
    assert ours.read_bytes() == want.read_bytes()
    assert torch.load(ours, weights_only=True) == lists
