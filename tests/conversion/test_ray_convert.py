"""Parallel PT -> HDF5 conversion on Ray (``jasper_ray.convert``): same bytes, crash safety, resume, sharded layout.

Everything runs on a real local Ray: the shared ``ray_session`` (2 CPUs), or a
Ray of its own in a subprocess where a test kills the driver or runs the CLI.
Two synthetic datasets:

- ``small``: 3000 pairs, D=32; every tensor fits one checksum block (16 MiB),
  so every tensor is one piece: 18 pieces, many more than the 2 workers;
- ``big``: 80000 pairs, D=64 (~100 MB); the steering tensors (20 MB each) are
  split into two chunk-aligned pieces, so assembly copies chunks to non-zero
  row offsets and the sharded reader concatenates shards (the pieces' files). Gzip conversions of
  it take a few seconds: long enough to kill a driver or a worker mid-run.

Reference outputs come from the single-process writer
(``convert_pt_to_hdf5``), never from the Ray path itself.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from _support import (
    SLOW_PIECES,
    assert_same_file,
    edit_config,
    h5_objects,
    kill_driver_after,
    load_pt,
    mounted_tmpfs,
    raw_chunks,
    save_pt,
)

from jasper_ray import (
    ConversionError,
    DatasetFormatError,
    JASPERSteeringDataset,
    ValidationError,
    atomic,
    convert,
    convert_pt_to_hdf5,
    open_dataset,
    synth_dataset,
    validate_dataset,
)
from jasper_ray.atomic import TEMP_MARK, reserve_space
from jasper_ray.conversion.pieces import save_keyword_csr, write_piece
from jasper_ray.conversion.plan import plan_conversion, work_dir_for
from jasper_ray.faults import FAIL_ONCE_ENV, fail_once_env
from jasper_ray.fingerprint import fingerprint
from jasper_ray.formats import hdf5_files
from jasper_ray.formats import pt as pt_format
from jasper_ray.formats.base import is_mapped
from jasper_ray.formats.hdf5_files import file_size_bound
from jasper_ray.formats.hdf5_writer import write_part
from jasper_ray.formats.sharded import ShardedHDF5Reader
from jasper_ray.schema import ATTR_CHECKSUM, CONFIG_FILE, HDF5_FILE, KEYWORD_IDS, MANIFEST, SHARDS_DIR, TENSOR, TENSORS

pytestmark = pytest.mark.usefixtures("ray_session")

SMALL = {"n_pairs": 3000, "dim": 32, "n_neg": 4, "seed": 11}
BIG = {"n_pairs": 80000, "dim": 64, "n_neg": 4, "seed": 12}
SMALL_SHARD = 64 << 10
BIG_SHARD = 1 << 20
COMPRESSIONS = ("gzip", "lzf", None)
NUM_CPUS = 2  # the shared session's (tests/conftest.py)
DEADLINE_S = 120


# --- helpers ------------------------------------------------------------------------------------


def _walk(f: Any) -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    f.visititems(lambda name, obj: found.append((name, obj)))
    return found


def checksums(path: Path) -> dict[str, str]:
    out = {}
    with h5py.File(path, "r") as f:
        for name, obj in _walk(f):
            if ATTR_CHECKSUM in obj.attrs:
                out[name] = obj.attrs[ATTR_CHECKSUM]
    return out


def assert_verifies(path: Path) -> None:
    """What ``jasper-ray verify`` checks: every recorded checksum, then the schema and id ranges."""
    reader = open_dataset(path, storage_format="hdf5", use_mmap=True)
    assert reader.verify_checksums() == []
    validate_dataset(reader)
    reader.close()


def leftovers(*dirs: Path) -> list[Path]:
    """Temp files and work directories under ``dirs``: what a finished or failed conversion must not leave."""
    found = []
    for d in dirs:
        if d.is_dir():
            found += [p for p in d.rglob("*") if TEMP_MARK in p.name or p.name.endswith(".work")]
    return found


def piece_files(work: Path) -> list[Path]:
    """Published piece files in a work directory (temp files are hidden: they start with a dot)."""
    return sorted(p for p in work.glob("*.h5") if not p.name.startswith(".")) if work.is_dir() else []


def config_only_dir(src: Path, dest: Path) -> Path:
    """A directory holding only ``config.json`` of ``src``: converted outputs go beside it, no PT files."""
    dest.mkdir(parents=True)
    shutil.copy(src / CONFIG_FILE, dest / CONFIG_FILE)
    return dest


# --- datasets and references -------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only PT source: every tensor is one piece."""
    return synth_dataset(tmp_path_factory.mktemp("ray-small") / "ds", **SMALL)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only PT source whose steering tensors span two pieces."""
    return synth_dataset(tmp_path_factory.mktemp("ray-big") / "ds", **BIG)


@pytest.fixture(scope="module")
def small_single(tmp_path_factory: pytest.TempPathFactory, small: Path) -> Callable[[str | None], Path]:
    """``small_single(compression)``: the single-process writer's dataset.h5 of ``small`` (cached)."""
    cache: dict[str | None, Path] = {}

    def get(compression: str | None) -> Path:
        if compression not in cache:
            out = config_only_dir(small, tmp_path_factory.mktemp(f"single-{compression}") / "ds") / "dataset.h5"
            convert_pt_to_hdf5(small, compression, output=out, progress=False)
            cache[compression] = out
        return cache[compression]

    return get


@pytest.fixture(scope="module")
def big_single_lzf(tmp_path_factory: pytest.TempPathFactory, big: Path) -> Path:
    """The single-process writer's lzf dataset.h5 of ``big``, beside a copy of its config.json."""
    out = config_only_dir(big, tmp_path_factory.mktemp("big-single") / "ds") / "dataset.h5"
    convert_pt_to_hdf5(big, "lzf", output=out, progress=False)
    return out


@pytest.fixture(scope="module")
def big_checksums(big_single_lzf: Path) -> dict[str, str]:
    """A tensor's sha256 is of its logical bytes: the same for every compression."""
    return checksums(big_single_lzf)


def test_big_dataset_splits_tensors_into_several_pieces(big: Path) -> None:
    plan = plan_conversion(open_dataset(big, "pt"), "gzip", piece_bytes=BIG_SHARD)
    per_tensor: dict[str, list[tuple[int, int]]] = {}
    for s in plan.pieces:
        per_tensor.setdefault(s.h5_path, []).append((s.start, s.stop))
    split = {k: v for k, v in per_tensor.items() if len(v) > 1}
    assert "steering/centroid" in split, per_tensor
    for ranges in per_tensor.values():  # consecutive, covering, and (but the last) whole chunks
        assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert plan.key == plan_conversion(open_dataset(big, "pt"), "gzip", piece_bytes=BIG_SHARD).key


# --- 1, 2: the same file as the single-process writer -------------------------------------------------


@pytest.mark.parametrize("compression", COMPRESSIONS, ids=lambda c: c or "none")
def test_equals_single_process_writer_bit_for_bit(
    tmp_path: Path, small: Path, small_single: Callable[[str | None], Path], compression: str | None
) -> None:
    out = tmp_path / "out" / "dataset.h5"
    report = convert(small, compression=compression, shard_bytes=SMALL_SHARD, output=out, progress=False)

    assert report.output == out and report.output_bytes == out.stat().st_size
    assert report.shards > 2 * NUM_CPUS, "more pieces than workers"
    assert len(report.results) == report.shards and report.shards_reused == 0
    assert report.shards == len(plan_conversion(open_dataset(small, "pt"), compression, piece_bytes=SMALL_SHARD).pieces)
    assert_same_file(out, small_single(compression))
    assert_verifies(out)
    assert leftovers(tmp_path) == [], "the work directory and temp files are removed on success"

    if compression is None:  # contiguous, so it memory-maps
        reader = open_dataset(out, storage_format="hdf5", use_mmap=True)
        with h5py.File(out, "r") as f:
            for spec in TENSORS:
                assert f[spec.h5_path].chunks is None, spec.h5_path
                if reader.shape(spec.name)[0]:
                    assert is_mapped(reader.array(spec.name)), spec.name
        reader.close()


def test_multi_piece_tensors_equal_single_process_writer(tmp_path: Path, big: Path, big_single_lzf: Path) -> None:
    """Pieces of one tensor land at their row offsets; the last chunk of a piece is whole, the tensor's last is not."""
    out = tmp_path / "dataset.h5"
    report = convert(big, compression="lzf", shard_bytes=BIG_SHARD, output=out, progress=False, validate=False)
    assert report.shards > len(TENSORS)
    assert_same_file(out, big_single_lzf)
    assert_verifies(out)


def test_reused_workers_read_the_current_files_not_a_cached_mapping(tmp_path: Path, small_single: Callable) -> None:
    """The session's workers outlive a conversion: a dataset rewritten at the same path must be read anew."""
    data = synth_dataset(tmp_path / "ds", **SMALL)
    convert(data, compression="lzf", shard_bytes=SMALL_SHARD, progress=False, validate=False)
    synth_dataset(data, **{**SMALL, "seed": SMALL["seed"] + 1})  # new files (atomic renames), same path
    convert(data, compression="lzf", shard_bytes=SMALL_SHARD, progress=False)
    reference = tmp_path / "reference" / "dataset.h5"
    reference.parent.mkdir()
    convert_pt_to_hdf5(data, "lzf", output=reference, progress=False)
    assert checksums(data / "dataset.h5") == checksums(reference)
    assert checksums(reference) != checksums(small_single("lzf")), "the second dataset differs from the first"


# --- 3: retries ----------------------------------------------------------------------------------


def _a_piece_id(directory: Path, compression: str | None, piece_bytes: int, h5_path: str) -> str:
    plan = plan_conversion(open_dataset(directory, "pt"), compression, piece_bytes=piece_bytes)
    return next(p.piece_id for p in plan.pieces if p.h5_path == h5_path)


def test_a_task_failing_once_is_retried(tmp_path: Path, small: Path, small_single: Callable, monkeypatch) -> None:
    piece_id = _a_piece_id(small, "gzip", SMALL_SHARD, "steering/residual")
    marker = tmp_path / "marker"
    out = tmp_path / "out" / "dataset.h5"
    monkeypatch.setenv(FAIL_ONCE_ENV, fail_once_env({piece_id: marker}))
    report = convert(small, compression="gzip", shard_bytes=SMALL_SHARD, output=out, progress=False)
    assert marker.exists(), "the first attempt did fail"
    assert piece_id in report.results
    assert checksums(out) == checksums(small_single("gzip"))
    assert_verifies(out)
    assert leftovers(out.parent) == []


def test_a_piece_failing_every_time_is_named_and_nothing_is_published(tmp_path: Path, small: Path, monkeypatch) -> None:
    piece_id = _a_piece_id(small, "gzip", SMALL_SHARD, "negatives/hard")
    out = tmp_path / "out" / "dataset.h5"
    monkeypatch.setenv(FAIL_ONCE_ENV, fail_once_env({piece_id: tmp_path / "marker"}))
    with pytest.raises(ConversionError) as info:
        convert(small, compression="gzip", shard_bytes=SMALL_SHARD, output=out, progress=False, max_retries=0)
    assert piece_id in str(info.value) and "injected failure" in str(info.value)
    assert not out.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("layout,compression", [("single", "gzip"), ("single", None), ("sharded", "gzip")])
def test_a_value_that_is_not_finite_is_refused_by_the_piece_writing_it(
    tmp_path: Path, small: Path, layout: str, compression: str | None
) -> None:
    """NOTE [floats checked as written]: no scan of the float tables before the pieces; the piece writing the
    value raises the single-process writer's ValidationError (not retried), naming file and position, and
    nothing is published; with ``allow_nonfinite`` the same dataset converts."""
    source = tmp_path / "src"
    shutil.copytree(small, source)
    residual = load_pt(source / TENSOR["steering_residual"].pt_file).numpy().copy()
    residual[17, 2] = np.nan
    save_pt(source, TENSOR["steering_residual"].pt_file, residual)
    out = source / (HDF5_FILE if layout == "single" else SHARDS_DIR)
    kwargs: dict[str, Any] = dict(compression=compression, layout=layout, shard_bytes=SMALL_SHARD, progress=False)
    want = "steering_residual.pt at position (17, 2): found value nan, expected a finite value"
    with pytest.raises(ValidationError, match=re.escape(want)):
        convert(source, **kwargs)
    assert not out.exists()
    assert leftovers(source) == []
    edit_config(source, allow_nonfinite=True)
    assert convert(source, **kwargs).output == out
    got = open_dataset(source, "hdf5").take("steering_residual", np.array([17]))
    assert np.isnan(got[0, 2]) and np.isfinite(np.delete(got[0], 2)).all()


class CountingRay:
    """The session's Ray with ``shutdown`` counted, not done (the session is shared by the tests); stopping it
    the project's way (``ray_session.shutdown``) is counted the same."""

    def __init__(self, ray: Any) -> None:
        self._ray, self.shutdowns = ray, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ray, name)

    def shutdown(self) -> None:
        self.shutdowns += 1


def starting_ray(monkeypatch: pytest.MonkeyPatch, planned: threading.Event) -> CountingRay:
    """Ray's start replaced by one that lasts until the plan is made (in another thread) and says it started
    Ray (validated and planned, or refused); what stops it is counted."""
    import ray

    from jasper_ray.conversion import parallel

    counting = CountingRay(ray)
    real_plan = parallel._checked_plan

    def plan(*args: Any, **kwargs: Any) -> Any:
        try:
            return real_plan(*args, **kwargs)
        finally:
            planned.set()

    def connect(address: str | None, **kwargs: Any) -> bool:
        assert threading.current_thread() is threading.main_thread(), "ray.init must run in the main thread"
        assert planned.wait(DEADLINE_S), "the plan waited for Ray to start"
        assert kwargs == {"num_cpus": NUM_CPUS}, "no runtime_env: NOTE [prestarted workers]"
        return True

    monkeypatch.setattr(parallel, "_require_ray", lambda: counting)
    monkeypatch.setattr(parallel, "_checked_plan", plan)
    monkeypatch.setattr(parallel, "connect", connect)
    monkeypatch.setattr(parallel, "shutdown", counting.shutdown)
    return counting


def test_the_plan_is_made_while_ray_starts(tmp_path: Path, small: Path, small_single: Callable, monkeypatch) -> None:
    """NOTE [planned while Ray starts]: Ray starts in the main thread while another validates and plans (the
    start above waits for the plan: made after it, the conversion would fail); the Ray convert started is
    stopped at the end, unless ``keep_ray``."""
    planned = threading.Event()
    ray = starting_ray(monkeypatch, planned)
    out = tmp_path / "out" / "dataset.h5"
    convert(small, compression="gzip", shard_bytes=SMALL_SHARD, output=out, progress=False, num_workers=NUM_CPUS)
    assert ray.shutdowns == 1
    assert_same_file(out, small_single("gzip"))
    planned.clear()
    convert(small, shard_bytes=SMALL_SHARD, output=out, progress=False, num_workers=NUM_CPUS, keep_ray=True, force=True)
    assert ray.shutdowns == 1, "keep_ray leaves the Ray convert started running"


def break_pair_index(source: Path) -> str:
    index = load_pt(source / TENSOR["pair_index"].pt_file).numpy().copy()
    index[5, 0] = 1 << 40
    save_pt(source, TENSOR["pair_index"].pt_file, index)
    return r"pair_index\.pt at position \(5, 0\)"


def break_keyword_ids(source: Path) -> str:
    lists = load_pt(source / KEYWORD_IDS.pt_file)
    lists[7] = [*lists[7], 1 << 20]
    save_pt(source, KEYWORD_IDS.pt_file, lists)
    return rf"{KEYWORD_IDS.pt_file} at position pair 7, entry {len(lists[7]) - 1}: found keyword id {1 << 20}"


def break_dtype(source: Path) -> str:
    relevance = load_pt(source / TENSOR["pair_relevance"].pt_file)
    save_pt(source, TENSOR["pair_relevance"].pt_file, relevance.double())
    return r"pair_relevance\.pt: found dtype float64"


@pytest.mark.parametrize("breaks", [break_pair_index, break_keyword_ids, break_dtype], ids=lambda f: f.__name__)
def test_a_dataset_refused_while_ray_starts_stops_that_ray(
    tmp_path: Path, small: Path, monkeypatch, breaks: Callable[[Path], str]
) -> None:
    """Refused by the structure check (before any piece) or by the value checks (while the tensor pieces run,
    NOTE [keyword lists beside the pieces]): the same error, Ray stopped, nothing left behind."""
    source = tmp_path / "src"
    shutil.copytree(small, source)
    message = breaks(source)
    ray = starting_ray(monkeypatch, threading.Event())
    with pytest.raises(ValidationError, match=message):
        convert(source, compression="gzip", shard_bytes=SMALL_SHARD, progress=False, num_workers=NUM_CPUS)
    assert ray.shutdowns == 1
    assert leftovers(source) == []


def test_damaged_keyword_lists_found_while_the_pieces_run_are_named(tmp_path: Path, small: Path) -> None:
    """A keyword file that cannot be read is found after the tensor pieces started (NOTE [keyword lists beside
    the pieces]): its error names the file, and nothing is published or left behind."""
    source = tmp_path / "src"
    shutil.copytree(small, source)
    keywords = source / KEYWORD_IDS.pt_file
    keywords.write_bytes(keywords.read_bytes()[: keywords.stat().st_size // 2])
    with pytest.raises(DatasetFormatError, match=re.escape(str(keywords))):
        convert(source, compression="gzip", shard_bytes=SMALL_SHARD, progress=False)
    assert not (source / HDF5_FILE).exists()
    assert leftovers(source) == []


def test_tensor_pieces_run_while_the_keyword_lists_are_parsed(
    tmp_path: Path, small: Path, small_single: Callable, monkeypatch
) -> None:
    """NOTE [keyword lists beside the pieces]: the keyword lists are parsed while the tensor pieces run. Here
    their parse waits until a piece has returned: planned before the pieces, it would wait out the deadline and
    fail the conversion. The file equals the single-process writer's; the keyword pieces are planned last."""
    from jasper_ray.conversion import parallel, publish

    returned = threading.Event()
    real_add, real_columns = publish.Assembly.add, parallel.keyword_columns

    def add(self: Any, result: Any, in_flight_bytes: int = 0) -> int:
        returned.set()
        return real_add(self, result, in_flight_bytes)

    def columns_once_a_piece_returned(reader: Any) -> Any:
        assert returned.wait(DEADLINE_S), "no piece ran before the keyword lists were parsed"
        return real_columns(reader)

    monkeypatch.setattr(publish.Assembly, "add", add)
    monkeypatch.setattr(parallel, "keyword_columns", columns_once_a_piece_returned)
    out = tmp_path / "dataset.h5"
    report = convert(small, compression="gzip", shard_bytes=SMALL_SHARD, output=out, progress=False)
    assert_same_file(out, small_single("gzip"))
    keyword_pieces = sorted(p for p in report.results if "keyword_ids" in p)
    assert len(keyword_pieces) == 2 and sorted(report.results)[-2:] == keyword_pieces


def test_the_plan_key_leaves_out_the_keyword_columns(big: Path) -> None:
    """Planned with or without the keyword columns (added later, numbered last), a plan has the same key and
    the same pieces before them: a resumed conversion finds its pieces whichever way it planned."""
    reader = open_dataset(big, "pt")
    whole = plan_conversion(reader, "gzip", piece_bytes=BIG_SHARD)
    first = plan_conversion(reader, "gzip", piece_bytes=BIG_SHARD, keywords=False)
    assert first.key == whole.key
    assert whole.pieces[: len(first.pieces)] == first.pieces
    keyword_paths = {KEYWORD_IDS.h5_values, KEYWORD_IDS.h5_offsets}
    assert {p.h5_path for p in whole.pieces[len(first.pieces) :]} == keyword_paths
    assert not keyword_paths & {c.h5_path for c in first.columns}
    edited = plan_conversion(reader, "gzip", piece_bytes=BIG_SHARD // 2)
    assert edited.key != whole.key


# --- 4: the driver killed mid-run ----------------------------------------------------------------------

DRIVER = """
import sys
from jasper_ray import convert
convert(sys.argv[1], compression="gzip", num_workers=2, shard_bytes=int(sys.argv[2]), progress=False)
print("finished", flush=True)
"""


def test_driver_killed_mid_run_leaves_nothing_detectable_and_rerun_resumes(
    tmp_path: Path, big: Path, big_checksums: dict[str, str], ray_subprocess_env: Callable[..., dict]
) -> None:
    data = Path(shutil.copytree(big, tmp_path / "ds"))
    output = data / "dataset.h5"
    work = work_dir_for(output)
    kill_driver_after([DRIVER, str(data), str(BIG_SHARD)], lambda: len(piece_files(work)), ray_subprocess_env())

    assert not output.exists(), "a killed driver never publishes dataset.h5"
    assert [p.name for p in data.iterdir() if "dataset" in p.name and not p.name.startswith(".")] == []
    assert open_dataset(data).storage_format == "pt", "auto-detection serves the PT files"
    done = piece_files(work)
    total = len(plan_conversion(open_dataset(data, "pt"), "gzip", piece_bytes=BIG_SHARD).pieces)
    assert 2 <= len(done) < total, f"killed mid-run: {len(done)} of {total} pieces were written"

    report = convert(data, compression="gzip", shard_bytes=BIG_SHARD, progress=False)
    assert report.shards == total
    assert report.shards_reused == len(done), "every finished piece verifies and is reused"
    assert sum(not r.reused for r in report.results.values()) == total - len(done), "only the rest is redone"
    assert checksums(output) == big_checksums, "the same final checksums as a clean conversion"
    assert_verifies(output)
    assert open_dataset(data).storage_format == "hdf5"
    assert leftovers(data) == []


# --- 4b: uncompressed, in place (NOTE [in-place assembly] in conversion/pieces) -----------------------------


@pytest.fixture(scope="module")
def big_single_none(tmp_path_factory: pytest.TempPathFactory, big: Path) -> Path:
    """The single-process writer's uncompressed dataset.h5 of ``big``: what the copying assembly made, bit for bit."""
    out = config_only_dir(big, tmp_path_factory.mktemp("big-single-none") / "ds") / "dataset.h5"
    convert_pt_to_hdf5(big, None, output=out, progress=False)
    return out


def test_in_place_pieces_equal_the_single_process_writer(tmp_path: Path, big: Path, big_single_none: Path) -> None:
    """Several pieces of one tensor write at their offsets of the preallocated file: same bytes, same attributes."""
    out = tmp_path / "dataset.h5"
    report = convert(big, compression=None, shard_bytes=BIG_SHARD, output=out, progress=False, validate=False)
    assert report.shards > len(TENSORS), "tensors span several pieces"
    assert_same_file(out, big_single_none)
    assert_verifies(out)
    assert leftovers(tmp_path) == []


IN_PLACE_DRIVER = (
    SLOW_PIECES
    + """
convert(sys.argv[1], compression=None, num_workers=2, shard_bytes=int(sys.argv[2]), progress=False)
print("finished", flush=True)
"""
)


def test_in_place_driver_killed_leaves_nothing_detectable_and_rerun_reuses_the_rows(
    tmp_path: Path, big: Path, big_single_none: Path, ray_subprocess_env: Callable[..., dict]
) -> None:
    data = Path(shutil.copytree(big, tmp_path / "ds"))
    output = data / "dataset.h5"
    work = work_dir_for(output)
    kill_driver_after(
        [IN_PLACE_DRIVER, str(data), str(BIG_SHARD)], lambda: len(list(work.glob("*.done"))), ray_subprocess_env()
    )

    assert not output.exists(), "a killed driver never publishes dataset.h5"
    assert open_dataset(data).storage_format == "pt", "auto-detection serves the PT files"
    assert piece_files(work) == [work / "dataset.h5"], "no part files: the rows went into the allocated file"
    done = list(work.glob("*.done"))
    total = len(plan_conversion(open_dataset(data, "pt"), None, piece_bytes=BIG_SHARD).pieces)
    assert 2 <= len(done) < total, f"killed mid-run: {len(done)} of {total} pieces were written"

    report = convert(data, compression=None, shard_bytes=BIG_SHARD, progress=False)
    assert report.shards_reused == len(done), "every finished piece's rows verify in the file and are reused"
    assert sum(not r.reused for r in report.results.values()) == total - len(done), "only the rest is redone"
    assert_same_file(output, big_single_none)
    assert_verifies(output)
    assert leftovers(data) == []


def test_in_place_piece_whose_rows_changed_is_rewritten(tmp_path: Path, big: Path, big_single_none: Path) -> None:
    """A record whose rows in the file no longer hash to it (a torn write, a stray writer) is not trusted."""
    from jasper_ray.conversion.pieces import WorkDir
    from jasper_ray.conversion.publish import allocate_in_place

    out = tmp_path / "dataset.h5"
    plan = plan_conversion(open_dataset(big, "pt"), None, piece_bytes=BIG_SHARD)
    with WorkDir(work_dir_for(out), plan) as work:
        offsets = allocate_in_place(plan, work.path)
    first = plan.pieces[0]
    (work.path / f"{first.piece_id}.done").write_text('["00"]')  # rows never written: zeros do not hash to it
    report = convert(big, compression=None, shard_bytes=BIG_SHARD, output=out, progress=False, validate=False)
    assert offsets and report.shards_reused == 0 and not report.results[first.piece_id].reused
    assert_same_file(out, big_single_none)


# --- 5: a worker killed mid-task ------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp session ...


def running_piece_tasks() -> list[int]:
    """Pids of this session's Ray workers now running a piece task.

    Ray titles a worker ``ray::<task name>`` while it runs a task (``ray::IDLE`` otherwise); the workers of
    this session's raylet are the children of a child of this process (the driver), which keeps the Ray
    instances of other processes on the machine out.
    """
    me, pids = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if not (entry / "cmdline").read_bytes().startswith(b"ray::_piece_task"):
                continue
            parent = int(_stat_fields(int(entry.name))[1])
            if int(_stat_fields(parent)[1]) == me:
                pids.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return pids


def _kill_a_running_task(stop: threading.Event, killed: list[int]) -> None:
    """Wait until a piece task runs (the first tasks also start the workers); SIGKILL its worker."""
    seen_at: dict[int, float] = {}
    while not stop.is_set():
        for pid in running_piece_tasks():
            # Kill a task that has run a little while: mid-task, not at its first instruction.
            if time.monotonic() - seen_at.setdefault(pid, time.monotonic()) > 0.05:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                killed.append(pid)
                return
        time.sleep(0.01)


def test_a_worker_killed_mid_task_is_survived(tmp_path: Path, big: Path, big_checksums: dict[str, str]) -> None:
    output = config_only_dir(big, tmp_path / "ds") / "dataset.h5"
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_a_running_task, args=(stop, killed), daemon=True)
    killer.start()
    try:
        report = convert(big, compression="gzip", shard_bytes=BIG_SHARD, output=output, progress=False, validate=False)
    finally:
        stop.set()
        killer.join(timeout=10)
    assert killed, "no piece task was caught running"
    assert not Path(f"/proc/{killed[0]}").exists() or _stat_fields(killed[0])[0] == "Z", "the worker died"
    assert len(report.results) == report.shards and report.shards_reused == 0
    assert checksums(output) == big_checksums
    assert_verifies(output)
    assert leftovers(output.parent) == []


# --- 6: write errors ------------------------------------------------------------------------------------


@contextmanager
def read_only_dir(where: Path) -> Iterator[Path]:
    """A directory no one can write, root included: chmod for users, a read-only tmpfs for root."""
    if os.geteuid() != 0:
        where.mkdir(parents=True)
        where.chmod(0o555)
        try:
            yield where
        finally:
            where.chmod(0o755)
    else:
        with mounted_tmpfs(where, "ro,size=1m") as d:
            yield d


def _assert_clean_failure(exc: BaseException, named: Path, output: Path) -> None:
    assert str(named) in str(exc), f"the error names {named}: {exc}"
    assert not output.exists()
    assert leftovers(output.parent, named) == []


def test_output_parent_is_a_file(tmp_path: Path, small: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a regular file")
    output = blocker / "dataset.h5"
    with pytest.raises(OSError) as info:
        convert(small, compression="gzip", shard_bytes=SMALL_SHARD, output=output, progress=False)
    _assert_clean_failure(info.value, blocker, output)
    assert blocker.read_text() == "a regular file"


def test_read_only_target(tmp_path: Path, small: Path) -> None:
    with read_only_dir(tmp_path / "ro") as target:
        output = target / "dataset.h5"
        with pytest.raises(OSError) as info:
            convert(small, compression="gzip", shard_bytes=SMALL_SHARD, output=output, progress=False)
        _assert_clean_failure(info.value, target, output)
        assert list(target.iterdir()) == []


@pytest.mark.parametrize("phase", ["pieces", "assembly", "in-place allocation"])
def test_full_target(tmp_path: Path, small: Path, small_single: Callable, phase: str) -> None:
    """A disk that fills while pieces are written, or only when the assembled file is, or that cannot hold the
    uncompressed file allocated for in-place pieces: an error, no leftovers."""
    size = small_single("gzip").stat().st_size
    room = size // 4 if phase != "assembly" else size * 3 // 2  # pieces fit, the file beside them does not
    compression = None if phase == "in-place allocation" else "gzip"
    with mounted_tmpfs(tmp_path / "full", f"size={room}") as target:
        output = target / "dataset.h5"
        with pytest.raises((OSError, ConversionError)) as info:
            convert(
                small, compression=compression, shard_bytes=SMALL_SHARD, output=output, progress=False, max_retries=1
            )
        message = str(info.value)
        assert "No space left" in message or "errno = 28" in message or "ENOSPC" in message, message
        _assert_clean_failure(info.value, target, output)
        assert list(target.iterdir()) == [], "the space is given back"


def test_published_files_are_sent_to_disk_as_they_are_written(tmp_path: Path, big: Path, monkeypatch) -> None:
    """The single-process writer's file and the assembled ``dataset.h5`` have the disk start on each block and
    part as it lands (``atomic.start_writeback`` on the file's own descriptor), so the fsync that publishes them
    waits on the last ones only; part files, published unsynced and deleted once assembled, never are."""
    from jasper_ray.formats import hdf5_writer

    started: list[str] = []
    real = hdf5_writer.start_writeback

    def start_writeback(fd: int) -> None:
        started.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    def temps_of(final: Path) -> bool:
        return bool(started) and all(
            Path(p).parent == final.parent and Path(p).name.startswith(f".{final.name}{TEMP_MARK}") for p in started
        )

    monkeypatch.setattr(hdf5_writer, "start_writeback", start_writeback)
    single = tmp_path / "single" / "dataset.h5"
    single.parent.mkdir()
    convert_pt_to_hdf5(big, "gzip", output=single, progress=False)
    columns = plan_conversion(open_dataset(big, storage_format="pt"), "gzip").columns
    assert len(started) >= len(columns), "one a block at least"
    assert temps_of(single), started

    started.clear()
    plan = plan_conversion(open_dataset(big, storage_format="pt", use_mmap=True), "gzip", piece_bytes=BIG_SHARD)
    (tmp_path / "parts").mkdir()
    for task in plan.tasks(tmp_path / "parts"):
        write_piece(task)
    assert started == [], "part files are not sent"

    assembled = tmp_path / "ray" / "dataset.h5"
    report = convert(big, compression="gzip", shard_bytes=BIG_SHARD, output=assembled, progress=False)
    assert len(started) == report.shards and temps_of(assembled), started
    assert checksums(assembled) == checksums(single)


def test_part_files_are_written_into_reserved_space(tmp_path: Path, big: Path, monkeypatch) -> None:
    """A part file is written where its largest size was reserved first, and HDF5 gives back the rest when it
    closes the file; where nothing can be reserved (no fallocate) it is built in memory: the same rows,
    attributes and stored chunks (the file's own bytes differ: HDF5 lays out metadata per file driver)."""
    reader = open_dataset(big, storage_format="pt", use_mmap=True)
    plan = plan_conversion(reader, "gzip", piece_bytes=BIG_SHARD)
    reserved: list[int] = []
    real_reserve = hdf5_files.reserve_space
    monkeypatch.setattr(hdf5_files, "reserve_space", lambda path, n: reserved.append(n) or real_reserve(path, n))
    on_disk, in_memory = tmp_path / "reserved", tmp_path / "in-memory"
    on_disk.mkdir(), in_memory.mkdir()
    tasks = plan.tasks(on_disk)
    for task in tasks:
        write_piece(task)
    assert len(reserved) == len(tasks) > len(plan.columns), "every piece reserved its space"
    for task, bound in zip(tasks, reserved):
        st = (on_disk / task.piece.file_name).stat()
        assert bound == file_size_bound([(task.column.shape, task.column.dtype, task.piece.stop - task.piece.start)])
        assert st.st_size < bound and st.st_blocks * 512 <= st.st_size + (64 << 10), "the reservation's rest is free"

    monkeypatch.setattr(atomic, "_fallocate", lambda: None)  # a platform without fallocate(2)
    assert reserve_space(on_disk / tasks[0].piece.file_name, 1 << 20) is False
    for task in plan.tasks(in_memory):
        write_piece(task)
        built, written = in_memory / task.piece.file_name, on_disk / task.piece.file_name
        assert h5_objects(built) == h5_objects(written)
        with h5py.File(built, "r") as a, h5py.File(written, "r") as b:
            assert raw_chunks(a[task.column.h5_path]) == raw_chunks(b[task.column.h5_path])
    reader.close()


def test_a_part_file_the_disk_cannot_hold_is_refused_before_hdf5_writes(tmp_path: Path, big: Path) -> None:
    reader = open_dataset(big, storage_format="pt", use_mmap=True)
    task = max(plan_conversion(reader, "gzip", piece_bytes=BIG_SHARD).tasks(tmp_path), key=lambda t: t.column.nbytes)
    bound = file_size_bound([(task.column.shape, task.column.dtype, task.piece.stop - task.piece.start)])
    with mounted_tmpfs(tmp_path / "full", f"size={bound // 2}") as target:
        path = target / task.piece.file_name
        with pytest.raises(OSError, match="No space left") as info:
            write_part(path, task.column, task.column.rows(reader), task.piece.start, task.piece.stop, "gzip")
        assert str(path.parent) in str(info.value) and f"reserving {bound} bytes" in str(info.value)
        assert list(target.iterdir()) == [], "the space is given back"
    reader.close()


def test_keyword_pieces_map_the_drivers_csr_not_the_lists(tmp_path: Path, small: Path, monkeypatch) -> None:
    """NOTE [keyword lists once]: the driver leaves the keyword CSR in the work directory; the keyword pieces
    write the same rows from it without loading pair_keyword_ids.pt again."""
    reader = open_dataset(small, storage_format="pt", use_mmap=True)
    plan = plan_conversion(reader, "gzip", piece_bytes=SMALL_SHARD)
    save_keyword_csr(reader, plan.columns, tmp_path)
    csr = (KEYWORD_IDS.h5_values, KEYWORD_IDS.h5_offsets)
    keyword_tasks = [t for t in plan.tasks(tmp_path) if t.column.h5_path in csr]
    assert len(keyword_tasks) >= 2

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a keyword piece unpickled the keyword lists")

    monkeypatch.setattr(pt_format, "load_pt", refuse)
    values, offsets = reader.keyword_csr()
    for task in keyword_tasks:
        write_piece(task)
        expected = values if task.column.h5_path == KEYWORD_IDS.h5_values else offsets
        with h5py.File(tmp_path / task.piece.file_name, "r") as f:
            assert np.array_equal(f[task.column.h5_path][:], expected[task.piece.start : task.piece.stop])
    reader.close()


# --- 7: the sharded layout ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_sharded(tmp_path_factory: pytest.TempPathFactory, big: Path) -> Path:
    """``big`` converted to ``dataset.shards/`` (lzf), beside a copy of its config.json."""
    out = config_only_dir(big, tmp_path_factory.mktemp("big-sharded") / "ds")
    report = convert(
        big, compression="lzf", layout="sharded", shard_bytes=BIG_SHARD, output=out / SHARDS_DIR, progress=False
    )
    assert report.output == out / SHARDS_DIR
    return out


def test_sharded_layout_reads_the_same_as_the_single_file(big: Path, big_sharded: Path, big_single_lzf: Path) -> None:
    sharded = open_dataset(big_sharded, storage_format="hdf5", use_mmap=True)
    single = open_dataset(big_single_lzf.parent, storage_format="hdf5", use_mmap=True)
    assert isinstance(sharded, ShardedHDF5Reader) and not isinstance(single, ShardedHDF5Reader)
    assert open_dataset(big_sharded).storage_format == "hdf5", "auto-detection finds the manifest"
    shards = {p.name for p in (big_sharded / SHARDS_DIR).iterdir()}
    assert {n for n in shards if not n.endswith(".h5")} == {MANIFEST}, "only shards and the manifest: no work files"
    assert sharded.verify_checksums() == []
    # The sources' whole fingerprint, its crc32s hashed while the pieces ran (NOTE [crc32 beside the work]).
    whole = fingerprint(open_dataset(big, "pt").files())
    assert all("crc32" in entry for entry in whole.values())
    assert sharded.source_fingerprint() == single.source_fingerprint() == whole
    validate_dataset(sharded)
    boundary = 65536  # the steering tensors' first shard ends here
    rng = np.random.default_rng(0)
    for spec in TENSORS:
        n = single.shape(spec.name)[0]
        assert sharded.shape(spec.name) == single.shape(spec.name)
        assert sharded.read(spec.name).tobytes() == single.read(spec.name).tobytes(), spec.name
        if n:
            across = np.arange(n)[boundary - 3 : boundary + 3]
            idx = np.concatenate([rng.integers(0, n, 300), [n - 1, 0, n - 1], across])
            assert sharded.take(spec.name, idx).tobytes() == single.take(spec.name, idx).tobytes(), spec.name
            a, b = max(0, min(boundary, n) - 5), min(n, boundary + 5)
            assert sharded.read(spec.name, a, b).tobytes() == single.read(spec.name, a, b).tobytes(), spec.name
    assert sharded.split_names() == single.split_names()
    for split in single.split_names():
        assert np.array_equal(sharded.split(split), single.split(split)), split
    pairs = np.concatenate([rng.integers(0, BIG["n_pairs"], 500), [0, BIG["n_pairs"] - 1]])
    for x, y in zip(sharded.keyword_ids(pairs), single.keyword_ids(pairs)):
        assert np.array_equal(x, y)

    train_ids = single.split("train")
    near = int(np.searchsorted(train_ids, boundary))
    positions = [*range(64), *range(max(0, near - 64), near + 64), *range(len(train_ids) - 32, len(train_ids))]
    ds_sharded = JASPERSteeringDataset(big_sharded, "train", storage_format="hdf5")
    ds_single = JASPERSteeringDataset(big_single_lzf.parent, "train", storage_format="hdf5")
    assert ds_sharded.storage_format == ds_single.storage_format == "hdf5"
    batch_a, batch_b = ds_sharded.get_batch(positions), ds_single.get_batch(positions)
    assert sorted(batch_a) == sorted(batch_b)
    for key in batch_b:
        assert torch.equal(batch_a[key], batch_b[key]), key
    sharded.close()
    single.close()


@pytest.fixture(scope="module")
def small_sharded(tmp_path_factory: pytest.TempPathFactory, small: Path) -> Path:
    out = config_only_dir(small, tmp_path_factory.mktemp("small-sharded") / "ds")
    convert(
        small, compression="gzip", layout="sharded", shard_bytes=SMALL_SHARD, output=out / SHARDS_DIR, progress=False
    )
    assert_verifies(out)
    assert leftovers(out) == []
    return out


def _a_shard_file(directory: Path, h5_path: str = "steering/centroid") -> Path:
    reader = open_dataset(directory, storage_format="hdf5")
    tensor = next(t for t in reader.manifest["tensors"] if t["h5_path"] == h5_path)
    return directory / SHARDS_DIR / tensor["shards"][0]["file"]


def test_sharded_missing_shard_is_an_error_naming_it(tmp_path: Path, small_sharded: Path) -> None:
    data = Path(shutil.copytree(small_sharded, tmp_path / "ds"))
    shard = _a_shard_file(data)
    shard.unlink()
    for fmt in ("hdf5", "auto"):
        with pytest.raises(Exception, match="missing") as info:
            reader = open_dataset(data, storage_format=fmt)
            reader.read("steering_centroid")
        assert str(shard) in str(info.value)


def test_sharded_truncated_shard_is_an_error_naming_it(tmp_path: Path, small_sharded: Path) -> None:
    data = Path(shutil.copytree(small_sharded, tmp_path / "ds"))
    shard = _a_shard_file(data)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(Exception, match="corrupt") as info:
        open_dataset(data, storage_format="hdf5").read("steering_centroid")
    assert str(shard) in str(info.value)


def test_sharded_flipped_bytes_are_named_by_verify(tmp_path: Path, small_sharded: Path) -> None:
    data = Path(shutil.copytree(small_sharded, tmp_path / "ds"))
    shard = _a_shard_file(data)
    with h5py.File(shard, "r") as f:
        info = f["steering/centroid"].id.get_chunk_info(1)
    with open(shard, "r+b") as f:  # one byte inside a stored (gzip) chunk; the file size is unchanged
        f.seek(info.byte_offset + info.size // 2)
        byte = f.read(1)
        f.seek(info.byte_offset + info.size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    problems = open_dataset(data, storage_format="hdf5").verify_checksums()
    assert len(problems) == 1 and str(shard) in problems[0], problems


# --- 8: without Ray ---------------------------------------------------------------------------------------

NO_RAY = """
import sys
sys.modules["ray"] = None  # import ray now raises ImportError
import jasper_ray
from jasper_ray import JASPERSteeringDataset, convert, convert_pt_to_hdf5, open_dataset
try:
    convert(sys.argv[1], progress=False, output=sys.argv[2])
except ImportError as exc:
    print("IMPORT-ERROR:", exc)
else:
    print("NO ERROR")
report = convert_pt_to_hdf5(sys.argv[1], "lzf", output=sys.argv[2], progress=False)
print("SINGLE:", report.output)
JASPERSteeringDataset.convert_pt_to_hdf5(sys.argv[1], "lzf", output=sys.argv[3], progress=False)
print("FALLBACK:", open_dataset(sys.argv[3]).verify_checksums())
print("RAY LOADED:", any(m == "ray" or m.startswith("ray.") for m, v in sys.modules.items() if v is not None))
"""


def test_without_ray_convert_says_how_to_install_and_the_single_process_writer_works(
    tmp_path: Path, small: Path, ray_subprocess_env: Callable[..., dict]
) -> None:
    one, two = tmp_path / "a" / "dataset.h5", tmp_path / "b" / "dataset.h5"
    for p in (one, two):
        config_only_dir(small, p.parent)
    proc = subprocess.run(
        [sys.executable, "-c", NO_RAY, str(small), str(one), str(two)],
        env=ray_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    error = next(line for line in lines if line.startswith(("IMPORT-ERROR", "NO ERROR")))
    assert error.startswith("IMPORT-ERROR") and "pip install" in error and "ray" in error, error
    assert "convert_pt_to_hdf5" in error, "it names the way that works without Ray"
    assert f"SINGLE: {one}" in lines and "FALLBACK: []" in lines and "RAY LOADED: False" in lines, lines
    assert_verifies(one)


# --- 9: the CLI -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_cli_convert(tmp_path: Path, small: Path, ray_subprocess_env: Callable[..., dict], layout: str) -> None:
    data = Path(shutil.copytree(small, tmp_path / "ds"))
    args = ["-q", "convert", str(data), "--workers", "2", "--shard-size", "1MB", "--layout", layout]
    proc = subprocess.run(
        [sys.executable, "-m", "jasper_ray", *args],
        env=ray_subprocess_env(),  # no RAY_ADDRESS: the CLI starts a local Ray of its own
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )
    assert proc.returncode == 0, proc.stderr
    output = data / ("dataset.h5" if layout == "single" else SHARDS_DIR)
    assert f"Conversion complete. HDF5 file saved to {output}" in proc.stdout
    assert "File sizes: PT format=" in proc.stdout and "(compression: " in proc.stdout
    assert "Wall time: " in proc.stdout and "shards (0 reused)" in proc.stdout
    started = re.search(r"Wall time: (\d+\.\d+) s \(.*MB/s\), Ray's start (\d+\.\d\d) s of it", proc.stdout)
    assert started, f"the CLI started Ray: its report says how long that took\n{proc.stdout}"
    assert 0 < float(started[2]) < float(started[1])
    if layout == "sharded":
        assert (output / MANIFEST).is_file() and not (data / "dataset.h5").exists()
    reader = open_dataset(data)
    assert reader.storage_format == "hdf5" and isinstance(reader, ShardedHDF5Reader) == (layout == "sharded")
    assert reader.verify_checksums() == []
    assert leftovers(data) == []
