"""Local PT sources read by byte range in the conversion tasks, without torch (NOTE [mapped sources] in
``conversion.ranged``): the same part files as the files opened by torch, torch's way kept for what cannot be
mapped (a view saved with its larger storage, another byte order), and a file changed after the plan refused.

On the shared local Ray (``ray_session``) where a conversion runs on Ray.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from _support import assert_same_file, h5_objects, load_pt, save_big_endian

import jasper_ray.formats.checksum as checksum
from jasper_ray import DatasetFormatError, convert, convert_pt_to_hdf5, open_dataset, synth_dataset
from jasper_ray.conversion.pieces import write_piece
from jasper_ray.conversion.plan import plan_conversion
from jasper_ray.conversion.ranged import local_ranges, ranged_rows
from jasper_ray.formats.columns import KEYWORD_SOURCE
from jasper_ray.schema import TENSOR

pytestmark = pytest.mark.usefixtures("ray_session")

DATA = {"n_pairs": 3000, "dim": 32, "n_neg": 4, "seed": 21}
PIECE_BYTES = 64 << 10
BLOCK_BYTES = 64 << 10  # checksum blocks: pieces are cut on them
# Runs the pickled piece tasks (this test's own objects) in a fresh interpreter; says whether torch was imported.
RUN_PIECES = """
import pickle, sys
import jasper_ray.formats.checksum as checksum
from jasper_ray.conversion.pieces import write_piece
checksum.BLOCK_BYTES = int(sys.argv[2])
with open(sys.argv[1], "rb") as f:
    tasks = pickle.load(f)
for task in tasks:
    write_piece(task)
print("torch imported" if "torch" in sys.modules else "no torch")
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_dataset(tmp_path_factory.mktemp("mapped") / "ds", **DATA)


def _plan(directory: Path):
    reader = open_dataset(directory, storage_format="pt", use_mmap=True)
    return reader, plan_conversion(reader, "gzip", piece_bytes=PIECE_BYTES)


def test_pieces_map_their_rows_without_torch(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tensor and split is found by byte range and maps to the values torch loads; its pieces, run in an
    interpreter that never imports torch, write the part files that pieces opening the files with torch write
    (64 KiB checksum blocks, so the tables span several pieces: rows mapped from inside the range)."""
    monkeypatch.setattr(checksum, "BLOCK_BYTES", BLOCK_BYTES)
    reader, plan = _plan(source)
    ranges = local_ranges(source, reader, plan.columns)
    assert set(ranges) == {c.source for c in plan.columns if c.source_kind != KEYWORD_SOURCE}
    for column in plan.columns:
        if column.source in ranges:
            mapped, loaded = ranged_rows(ranges[column.source]), np.asarray(column.rows(reader))
            assert (mapped.dtype, mapped.shape) == (loaded.dtype, loaded.shape), column.source
            assert mapped.tobytes() == loaded.tobytes(), column.source

    by_torch, by_range = tmp_path / "torch", tmp_path / "mapped"
    by_torch.mkdir(), by_range.mkdir()
    tasks = [t for t in plan.tasks(by_torch) if t.column.source in ranges]
    assert len(tasks) > len(ranges), "the larger tables span several pieces"
    for task in tasks:
        write_piece(task)  # ranged is None: the task opens the PT files (with torch)
    mapped_tasks = [replace(t, work_dir=str(by_range), ranged=ranges[t.column.source]) for t in tasks]
    (tmp_path / "tasks.pkl").write_bytes(pickle.dumps(mapped_tasks))
    proc = subprocess.run(
        [sys.executable, "-c", RUN_PIECES, str(tmp_path / "tasks.pkl"), str(BLOCK_BYTES)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-2:] == ["no", "torch"], proc.stdout
    for task in tasks:
        name = task.piece.file_name
        assert h5_objects(by_range / name) == h5_objects(by_torch / name), name
    reader.close()


def test_views_and_big_endian_files_are_read_by_torch(source: Path, tmp_path: Path) -> None:
    """A tensor saved as a view of a larger storage, and a file written big-endian, cannot be mapped as they lie:
    the plan leaves them to torch, and the Ray conversion still equals the single-process writer's, with the
    values as saved."""
    data = Path(shutil.copytree(source, tmp_path / "ds"))
    questions = data / TENSOR["question_embs"].pt_file
    sources = data / TENSOR["source_embs"].pt_file
    q, s = load_pt(questions), load_pt(sources)
    torch.save(torch.cat([q, q[:7]])[: len(q)], questions)  # torch saves the view's whole storage
    save_big_endian(sources)
    assert torch.equal(load_pt(sources), s)

    reader, plan = _plan(data)
    ranges = local_ranges(data, reader, plan.columns)
    assert "tensor:question_embs" not in ranges and "tensor:source_embs" not in ranges
    assert "tensor:keyword_embs" in ranges, "the others still map"
    reader.close()

    ours, reference = tmp_path / "ray.h5", tmp_path / "single.h5"
    convert(data, compression="gzip", shard_bytes=PIECE_BYTES, output=ours, progress=False)
    convert_pt_to_hdf5(data, "gzip", output=reference, progress=False)
    assert_same_file(ours, reference)
    converted = open_dataset(ours, storage_format="hdf5")
    np.testing.assert_array_equal(converted.array("question_embs")[:], q.numpy())
    np.testing.assert_array_equal(converted.array("source_embs")[:], s.numpy())
    converted.close()


def test_an_empty_table_maps_to_no_rows(empty_keywords_dir: Path, tmp_path: Path) -> None:
    """A [0, D] keyword table (a storage of 0 bytes) is a range of no rows, and converts on Ray as in one process."""
    reader, plan = _plan(empty_keywords_dir)
    ranges = local_ranges(empty_keywords_dir, reader, plan.columns)
    empty = ranged_rows(ranges["tensor:keyword_embs"])
    assert empty.shape == reader.shape("keyword_embs") and empty.shape[0] == 0
    reader.close()
    ours, reference = tmp_path / "ray.h5", tmp_path / "single.h5"
    convert(empty_keywords_dir, compression="gzip", shard_bytes=PIECE_BYTES, output=ours, progress=False)
    convert_pt_to_hdf5(empty_keywords_dir, "gzip", output=reference, progress=False)
    assert_same_file(ours, reference)


def test_a_file_changed_after_the_plan_is_refused(source: Path, tmp_path: Path) -> None:
    """A piece maps the file the plan measured, or refuses, naming it: a file rewritten since (same size, other
    values) is never read as if it were the one planned."""
    data = Path(shutil.copytree(source, tmp_path / "ds"))
    reader, plan = _plan(data)
    ranges = local_ranges(data, reader, plan.columns)
    tensor = ranges["tensor:question_embs"]
    task = next(t for t in plan.tasks(tmp_path) if t.column.source == "tensor:question_embs")
    task = replace(task, ranged=tensor)
    reader.close()

    path = data / TENSOR["question_embs"].pt_file
    torch.save(load_pt(path).flip(0).clone(), path)
    size, planned_ns = tensor.identity or (0, 0)
    os.utime(path, ns=(planned_ns, planned_ns + 1_000_000))  # a later modification, however coarse the clock
    assert path.stat().st_size == size
    refused = re.escape(f"{path}: changed since this conversion was planned")
    with pytest.raises(DatasetFormatError, match=refused):
        ranged_rows(tensor)
    with pytest.raises(DatasetFormatError, match=refused):
        write_piece(task)
    assert not list(tmp_path.glob("*.h5")), "no part file published"
