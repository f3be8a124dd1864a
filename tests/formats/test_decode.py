"""16-bit decodes (NOTE [float16 casts] in formats.precision): every bit pattern through every kernel, and the
gather that decodes runs of mapped rows into a float32 batch, bit for bit against decoding the rows gathered.

Expected bits come from numpy's own float16 cast and from integer shifts, not from the kernels under test."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _support import assert_bits_equal

import jasper_ray.formats.arrays as arrays
import jasper_ray.formats.precision as precision
from jasper_ray.formats.arrays import gather_rows
from jasper_ray.formats.precision import BFLOAT16_BITS, decode, decoder

EVERY_PATTERN = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


def float16_reference(bits: np.ndarray) -> np.ndarray:
    """numpy's cast, with a signalling NaN quieted as F16C (and so torch) quiets it, payload kept."""
    values = bits.view(np.float16).astype(np.float32)
    wide = values.view(np.uint32)
    wide[np.isnan(values)] |= np.uint32(1 << 22)
    return values


def test_float16_decodes_every_pattern_alike_through_torch_and_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    halves = EVERY_PATTERN.view(np.float16)
    want = float16_reference(EVERY_PATTERN)
    assert_bits_equal(torch.from_numpy(halves).float().numpy(), want, "torch's own cast")
    assert np.isnan(want[0x7C01]) and want[0x7C00] == np.inf and want[0x0001] == np.float32(2.0**-24)
    assert_bits_equal(decode(halves), want, "torch's cast, in pieces")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in DataLoader and Ray workers: one call, no pieces
    try:
        assert_bits_equal(decode(halves), want, "torch's cast, one call")
    finally:
        torch.set_num_threads(threads)
    assert_bits_equal(decode(halves[::-1])[::-1], want, "numpy's cast, reversed rows")
    assert_bits_equal(decode(halves, np.empty(2 * halves.size, np.float32)[::2]), want, "numpy's cast, strided out")
    read_only = halves.copy()
    read_only.flags.writeable = False
    assert_bits_equal(decode(read_only), want, "numpy's cast (read-only rows)")
    monkeypatch.setitem(sys.modules, "torch", None)  # ``import torch`` fails: numpy's cast is the kernel
    monkeypatch.setattr(precision, "_kernels", {BFLOAT16_BITS: precision._shift})
    assert decoder(np.float16) is precision._numpy_cast
    assert_bits_equal(decode(halves.reshape(256, 256)), want.reshape(256, 256), "numpy's cast without torch")


@pytest.mark.parametrize("shape", [(1 << 16,), (256, 256), (1, 1), (7, 3)])
def test_bfloat16_decodes_every_pattern_into_the_upper_halves(shape: tuple[int, ...]) -> None:
    bits = EVERY_PATTERN[: int(np.prod(shape))].reshape(shape)
    want = (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    padded = np.full(bits.size + 2, 7.0, np.float32)
    got = decode(bits, padded[1:-1].reshape(shape))
    assert_bits_equal(got, want, "widened two bytes in")
    assert padded[0] == padded[-1] == 7.0  # nothing written next to ``out``
    strided = np.empty((2 * bits.size,), np.float32)[::2].reshape(shape)
    assert_bits_equal(decode(bits, strided), want, "left_shift into a strided out")
    with pytest.raises(ValueError, match="decode into float32, not into float64"):
        decode(bits, np.empty(shape, np.float64))


def mapped_table(tmp_path: Path, values: np.ndarray, offset: int) -> np.memmap:
    """``values`` memory-mapped from a file at byte ``offset`` (an odd one: unaligned rows)."""
    path = tmp_path / f"table-{offset}.bin"
    path.write_bytes(b"\0" * offset + values.tobytes())
    return np.memmap(path, values.dtype, "r", offset=offset, shape=values.shape)


@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16_BITS], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("run_rows", [3, 0.5])
def test_gather_decodes_runs_of_mapped_rows_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: np.dtype, offset: int, run_rows: float
) -> None:
    """Runs of 3 rows (several, the last one short) or rows longer than a run (one row a run)."""
    rng = np.random.default_rng(4)
    stored = rng.integers(0, 1 << 16, (50, 40), dtype=np.uint32).astype(np.uint16).view(dtype)
    table = mapped_table(tmp_path, stored, offset)
    assert table.flags.aligned == (offset == 0)
    monkeypatch.setattr(arrays, "DECODE_RUN_BYTES", int(run_rows * stored[:1].nbytes))
    indices = np.array([49, 0, 7, 7, 12, 3, 48, 0, 25, 31, 30], dtype=np.int64)
    out = np.full((len(indices) + 1, 40), np.nan, np.float32)
    got = gather_rows(table, indices, out[: len(indices)])
    assert np.shares_memory(got, out)
    assert_bits_equal(got, decode(stored[indices]), "gathered and decoded")
    assert np.isnan(out[-1]).all()  # nothing written past the rows asked for
