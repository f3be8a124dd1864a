"""create_loader's workers (local.workers): batches built in shared-memory slots, only slot numbers
crossing. Same batches as num_workers=0 bit for bit (fork and spawn, ranks); a held batch is never
overwritten (NOTE [a held batch is never overwritten]) and copy=True frees slots at once; a killed worker
gives an error naming it and never a torn batch; slots are unlinked on close, on collection and when
the process exits. Resume and set_epoch with these workers: tests/local/test_dataset_workers.py."""

from __future__ import annotations

import gc
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from _support import subprocess_env

from jasper_ray import LoaderWorkerError, ResumableLoader, collate, create_loader
from jasper_ray.local.sampler import make_sampler
from jasper_ray.shm import SHM_DIR

pytest.register_assert_rewrite("_fixtures_dataset")
from _fixtures_dataset import assert_batches_equal  # noqa: E402

pytest_plugins = ["_fixtures_dataset"]

BATCH = 16


def slot_files(loader: ResumableLoader) -> list[str]:
    assert loader._pool is not None, "the loader did not use its slot workers"
    prefix = loader._pool.prefix
    return [name for name in os.listdir(SHM_DIR) if name.startswith(prefix)]


def in_slot(batch: dict[str, torch.Tensor], loader: ResumableLoader) -> bool:
    """Whether the batch's memory is one of the loader's slots (not a copy)."""
    address = batch["question_emb"].data_ptr()
    return any(
        slot.root is not None and slot.root.ctypes.data <= address < slot.root.ctypes.data + slot.root.nbytes
        for slot in loader._pool.slots
    )


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_batches_equal_num_workers_0_bit_for_bit(synth_dir: Path, context: str) -> None:
    """Every batch, in order, for a whole epoch of rank 1 of 2 (a short last batch included)."""
    loaders = {}
    for workers in (0, 2):
        ds = create_loader(synth_dir, "train", BATCH, epoch=3).dataset_obj
        sampler = make_sampler(ds, shuffle=True, num_replicas=2, rank=1, epoch=3)
        loaders[workers] = ResumableLoader(
            ds, batch_size=BATCH, sampler=sampler, num_workers=workers, collate_fn=collate,
            multiprocessing_context=context if workers else None,
        )  # fmt: skip
    want = list(loaders[0])
    assert len(want[-1]["steering_variant"]) < BATCH  # the short last batch is covered
    got = []
    for batch in loaders[2]:
        assert in_slot(batch, loaders[2])  # handed out over the slot: no copy
        got.append(batch)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_batches_equal(a, b, f"batch {i}")
    loaders[2].close()


def test_a_held_batch_is_never_overwritten_and_copy_frees_slots(synth_dir: Path) -> None:
    loader = create_loader(synth_dir, "train", BATCH, num_workers=1, shuffle=True, multiprocessing_context="fork")
    reference = list(create_loader(synth_dir, "train", BATCH, shuffle=True))
    held, held_copy = None, None
    for i, batch in enumerate(loader):
        assert_batches_equal(batch, reference[i], f"batch {i}")
        if i == 1:
            held, held_copy = batch, {k: v.clone() for k, v in batch.items()}
    assert len(reference) > 10 * 2
    assert_batches_equal(held, held_copy, "the batch held through the epoch")
    slots = len(loader._pool.slots)
    # The ring made up front (prefetch 2, the loop's batch and the one before it) and one more for the batch
    # held through the epoch: allocated once, then reused.
    assert slots == 2 + 2 + 1, slots
    # Holding every batch: each keeps its slot, nothing is overwritten; the ring grows instead.
    kept = list(loader)
    for i, batch in enumerate(kept):
        assert_batches_equal(batch, reference[i], f"kept batch {i}")
    assert len(loader._pool.slots) >= len(kept)
    del kept
    # Dropped, they are reused: a new epoch needs no new slot.
    before = len(loader._pool.slots)
    list(itertools.islice(iter(loader), 3))
    assert len(loader._pool.slots) == before
    loader.close()

    copying = create_loader(synth_dir, "train", BATCH, num_workers=1, copy=True, multiprocessing_context="fork")
    copies = list(copying)
    assert not any(in_slot(batch, copying) for batch in copies)
    assert len(copying._pool.slots) == 2 + 2  # the ring made up front (prefetch 2, two held): never grown
    plain = list(create_loader(synth_dir, "train", BATCH))
    for i, (a, b) in enumerate(zip(copies, plain)):
        assert_batches_equal(a, b, f"copied batch {i}")
    copying.close()


def test_a_killed_worker_is_named_and_no_torn_batch_is_delivered(synth_dir: Path) -> None:
    reference = list(create_loader(synth_dir, "train", BATCH, shuffle=True))
    loader = create_loader(synth_dir, "train", BATCH, num_workers=2, shuffle=True, multiprocessing_context="fork")
    delivered = []
    with pytest.raises(LoaderWorkerError) as caught:
        for i, batch in enumerate(loader):
            delivered.append(batch)
            if i == 2:
                pid = loader.worker_pids[1]
                assert loader._workers.conns[1].poll(30)  # it has answered batch 3: the next task goes to it
                os.kill(pid, signal.SIGKILL)
                while not _zombie(pid):  # dead, its pipe closed: the next task sent to it meets a broken pipe
                    time.sleep(0.01)
    message = str(caught.value)
    assert f"loader worker 1 (pid {pid}) exited unexpectedly (killed by SIGKILL)" in message, message
    assert "was not delivered" in message
    assert 3 <= len(delivered) < len(reference)
    for i, batch in enumerate(delivered):  # whole batches only, each the one expected
        assert_batches_equal(batch, reference[i], f"batch {i}")
    # Resume from what was delivered: new workers, exactly the rest.
    assert loader.worker_pids == []
    resumed = create_loader(synth_dir, "train", BATCH, num_workers=2, shuffle=True, multiprocessing_context="fork")
    resumed.load_state_dict(loader.state_dict())
    rest = list(resumed)
    assert len(delivered) + len(rest) == len(reference)
    for i, batch in enumerate(rest):
        assert_batches_equal(batch, reference[len(delivered) + i], f"resumed batch {i}")
    loader.close()
    resumed.close()


def test_slots_are_unlinked_on_close_and_on_collection(synth_dir: Path) -> None:
    loader = create_loader(
        synth_dir, "train", BATCH, num_workers=2, persistent_workers=True, multiprocessing_context="fork"
    )
    list(loader)
    pids = loader.worker_pids
    assert slot_files(loader) and len(pids) == 2
    names = slot_files(loader)
    loader.close()
    assert not [n for n in names if os.path.exists(f"{SHM_DIR}/{n}")]
    assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}") and not _zombie(pid)]

    collected = create_loader(
        synth_dir, "train", BATCH, num_workers=2, persistent_workers=True, multiprocessing_context="fork"
    )
    next(iter(collected))
    names, pids = slot_files(collected), collected.worker_pids
    del collected
    gc.collect()
    assert not [n for n in names if os.path.exists(f"{SHM_DIR}/{n}")]
    assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}") and not _zombie(pid)]


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_nothing_is_left_in_dev_shm_when_the_process_exits(synth_dir: Path) -> None:
    """A script that never closes its loader, mid-epoch, with persistent workers."""
    code = textwrap.dedent(f"""
        import json
        from jasper_ray import create_loader
        if __name__ == "__main__":
            loader = create_loader({str(synth_dir)!r}, "train", 16, num_workers=2, persistent_workers=True)
            it = iter(loader)
            batch = next(it)
            print(json.dumps([loader._pool.prefix, loader.worker_pids]), flush=True)
        """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=99)
    assert run.returncode == 0, run.stderr[-3000:]
    prefix, pids = json.loads(run.stdout.strip().splitlines()[-1])
    assert not [n for n in os.listdir(SHM_DIR) if n.startswith(prefix)]
    assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}") and not _zombie(pid)]
    assert "leaked" not in run.stderr, run.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned slots need CUDA")
def test_slots_are_pinned_where_cuda_is(synth_dir: Path) -> None:  # pragma: no cover - needs a GPU
    loader = create_loader(synth_dir, "train", BATCH, num_workers=1, multiprocessing_context="fork")
    reference = list(create_loader(synth_dir, "train", BATCH))
    for i, batch in enumerate(loader):
        assert batch["question_emb"].is_pinned()
        on_device = {k: v.to("cuda", non_blocking=True) for k, v in batch.items()}
        torch.cuda.synchronize()
        assert_batches_equal({k: v.cpu() for k, v in on_device.items()}, reference[i], f"batch {i}")
    loader.close()


def test_an_error_in_a_worker_is_raised_with_its_traceback(synth_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(self, indices, out=None):  # forked workers inherit the patch; the main process never calls it
        raise ValueError(f"no batch for positions starting {int(indices[0])}")

    loader = create_loader(synth_dir, "train", BATCH, num_workers=2, shuffle=False, multiprocessing_context="fork")
    monkeypatch.setattr(type(loader.dataset_obj), "get_batch", failing)
    with pytest.raises(ValueError, match="no batch for positions starting 0") as caught:
        next(iter(loader))
    assert "in loader worker 0" in str(caught.value.__cause__)
    assert "failing" in str(caught.value.__cause__)  # the worker's traceback
    loader.close()
