"""A conversion killed by SIGKILL mid-write leaves the previous dataset.h5 (or none), nothing auto-detection serves.

The conversion runs in a child process, slowed down deterministically by
writing one row per block into an uncompressed file (``block_bytes=1``). The
test waits until the child's temporary file exists and changes, then kills
the child with SIGKILL: no cleanup code of the child runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _support import assert_bits_equal, sha256_file, subprocess_env

from jasper_ray import convert_pt_to_hdf5, open_dataset
from jasper_ray.atomic import temp_path_for
from jasper_ray.formats.hdf5 import HDF5Reader

CHILD = """
import sys
from jasper_ray.conversion.writer import convert_pt_to_hdf5
convert_pt_to_hdf5(sys.argv[1], compression=None, progress=False, block_bytes=1)
print("finished")
"""

DEADLINE_S = 120


def kill_mid_write(directory: Path) -> Path:
    """Start a conversion of ``directory``, SIGKILL it while its temp file grows; return the orphan temp file."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory)],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    temp = temp_path_for(directory / "dataset.h5", proc.pid)
    first = None
    deadline = time.monotonic() + DEADLINE_S
    try:
        while True:
            assert proc.poll() is None, (
                f"the conversion ended (rc={proc.returncode}) before it could be killed mid-write: {proc.communicate()}"
            )
            assert time.monotonic() < deadline, "the temp file never appeared or changed"
            st = temp.stat() if temp.exists() else None
            if st is not None:
                # Size and mtime: the file's space is reserved at once (HDF5Writer's size_bound), then written into.
                if first is None:
                    first = (st.st_size, st.st_mtime_ns)
                elif (st.st_size, st.st_mtime_ns) != first:
                    break  # the file exists and is being written: kill now
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert temp.exists(), "the killed writer's temp file is left behind (the orphan the next convert cleans up)"
    return temp


def test_killed_first_conversion_leaves_no_dataset_h5(dataset_copy: Path, small_expected) -> None:
    temp = kill_mid_write(dataset_copy)
    assert not (dataset_copy / "dataset.h5").exists()
    assert temp.stat().st_size > 0
    reader = open_dataset(dataset_copy)  # auto: the half-written temp file is never picked up
    assert reader.storage_format == "pt"
    idx = np.array([3, 1999, 3])
    assert_bits_equal(reader.take("steering_centroid", idx), small_expected.tensors["steering_centroid"][idx], "sc")

    convert_pt_to_hdf5(dataset_copy, "gzip", progress=False)
    assert not temp.exists(), "a fresh conversion removes the dead writer's temp file"
    assert not list(dataset_copy.glob(".*tmp-*"))
    reader = open_dataset(dataset_copy)
    assert reader.storage_format == "hdf5"
    assert reader.verify_checksums() == []
    assert_bits_equal(reader.read("steering_residual"), small_expected.tensors["steering_residual"], "sr")


def test_killed_reconversion_keeps_the_previous_file(dataset_copy: Path, small_expected) -> None:
    convert_pt_to_hdf5(dataset_copy, "lzf", progress=False)
    h5 = dataset_copy / "dataset.h5"
    before, stat_before = sha256_file(h5), h5.stat()

    temp = kill_mid_write(dataset_copy)

    assert sha256_file(h5) == before, "the previous dataset.h5 is byte-identical"
    assert h5.stat().st_ino == stat_before.st_ino and h5.stat().st_mtime_ns == stat_before.st_mtime_ns
    reader = open_dataset(dataset_copy)
    assert reader.storage_format == "hdf5" and reader.file.attrs["compression"] == "lzf"
    assert reader.verify_checksums() == []
    assert_bits_equal(reader.read("hard_negatives"), small_expected.tensors["hard_negatives"], "hard_negatives")

    convert_pt_to_hdf5(dataset_copy, None, progress=False)
    assert not temp.exists() and not list(dataset_copy.glob(".*tmp-*"))
    reader = open_dataset(dataset_copy)
    assert reader.file.attrs["compression"] == "none" and reader.verify_checksums() == []


def test_a_live_writers_temp_file_is_not_removed(dataset_copy: Path) -> None:
    """Orphan cleanup removes only temp files of dead writers: a concurrent writer keeps its own."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        temp = temp_path_for(dataset_copy / "dataset.h5", live.pid)
        temp.write_bytes(b"half a file")
        convert_pt_to_hdf5(dataset_copy, "gzip", progress=False)
        assert temp.exists()
        assert isinstance(open_dataset(dataset_copy), HDF5Reader)
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("junk", [b"", b"\x89HDF\r\n\x1a\n truncated"], ids=["no-previous", "previous-file"])
def test_conversion_error_midway_leaves_nothing(dataset_copy: Path, junk: bytes, monkeypatch) -> None:
    """An exception inside the writer (not a kill) removes its temp file and publishes nothing."""
    import jasper_ray.formats.hdf5_writer as hdf5_writer

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(hdf5_writer, "write_rows", boom)
    with pytest.raises(OSError, match="disk full"):
        convert_pt_to_hdf5(dataset_copy, "gzip", progress=False)
    assert not (dataset_copy / "dataset.h5").exists() and not list(dataset_copy.glob(".*tmp-*"))
    if junk:
        (dataset_copy / "dataset.h5").write_bytes(junk)
        before = sha256_file(dataset_copy / "dataset.h5")
        with pytest.raises(OSError, match="disk full"):
            convert_pt_to_hdf5(dataset_copy, "gzip", progress=False)
        assert sha256_file(dataset_copy / "dataset.h5") == before
