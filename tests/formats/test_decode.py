"""16-bit decodes (NOTE [16-bit gather kernel] and NOTE [float16 casts] in formats.precision): every bit pattern
through every kernel, the compiled one and the fallbacks, and the gathers that decode mapped rows into a float32
batch, bit for bit against decoding the rows gathered.

Expected bits come from numpy's own float16 cast and from integer shifts, not from the kernels under test."""

from __future__ import annotations

import shutil
import sys
import sysconfig
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


def without_compiled_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """As where pip found no C compiler: the two-pass fallbacks."""
    monkeypatch.setattr(precision, "compiled_gather", None)
    monkeypatch.setattr(precision, "_kernels", {})


def test_the_gather_kernel_is_built_where_a_c_compiler_is_found() -> None:
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}) on this machine")
    module = precision.compiled_module()
    assert module is not None, f"{compiler} is here, yet jasper_ray.formats._decode16 was not built"
    assert (precision.compiled_gather is not None) == bool(module.vectorised)


@pytest.mark.parametrize("portable", [False, True], ids=["cpu-instructions", "plain-c"])
@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16_BITS], ids=["float16", "bfloat16"])
def test_the_compiled_kernel_decodes_every_pattern(portable: bool, dtype: np.dtype) -> None:
    module = precision.compiled_module()
    if module is None:
        pytest.skip("no C compiler where this was installed: test_the_gather_kernel_is_built... covers that")
    gather = module.gather
    if dtype == BFLOAT16_BITS:
        want = (EVERY_PATTERN.astype(np.uint32) << np.uint32(16)).view(np.float32)
    else:
        want = float16_reference(EVERY_PATTERN)
    table = EVERY_PATTERN.view(dtype).reshape(4096, 16)  # rows of 16: vector steps and no tail
    odd = EVERY_PATTERN[: 4096 * 15].view(dtype).reshape(4096, 15)  # rows of 15: a vector step and a tail
    order = np.random.default_rng(1).permutation(4096)
    for rows, label in ((table, "rows of 16"), (odd, "rows of 15")):
        out = np.full(rows.shape, np.nan, np.float32)
        gather(rows, rows.shape[1], order, out, dtype == BFLOAT16_BITS, portable)
        assert_bits_equal(out, want[: rows.size].reshape(rows.shape)[order], f"{label}, portable={portable}")
    with pytest.raises(IndexError, match=r"index 4096 at position 2 is out of range \[0, 4096\)"):
        gather(table, 16, np.array([0, 1, 4096]), np.empty((3, 16), np.float32), False, portable)
    with pytest.raises(ValueError, match="do not fit"):
        gather(table, 16, np.array([0, 1]), np.empty((3, 16), np.float32), False, portable)


def test_float16_decodes_every_pattern_alike_through_torch_and_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    without_compiled_kernel(monkeypatch)
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
    monkeypatch.setattr(precision, "_kernels", {})
    assert decoder(np.float16) is precision._numpy_cast
    assert_bits_equal(decode(halves.reshape(256, 256)), want.reshape(256, 256), "numpy's cast without torch")


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "widening-cast"])
@pytest.mark.parametrize("shape", [(1 << 16,), (256, 256), (1, 1), (7, 3)])
def test_bfloat16_decodes_every_pattern_into_the_upper_halves(
    monkeypatch: pytest.MonkeyPatch, compiled: bool, shape: tuple[int, ...]
) -> None:
    if not compiled:
        without_compiled_kernel(monkeypatch)
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
@pytest.mark.parametrize("run_rows", [3, 0.5, None], ids=["runs-of-3", "half-row-runs", "compiled"])
def test_gather_decodes_mapped_rows_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: np.dtype, offset: int, run_rows: float | None
) -> None:
    """The compiled kernel's one pass, or the fallback's runs: of 3 rows (several, the last one short) or of rows
    longer than a run (one row a run)."""
    if run_rows is None and precision.compiled_gather is None:
        pytest.skip("no kernel with vector instructions for this CPU here: test_the_compiled_kernel... covers it")
    if run_rows is not None:
        without_compiled_kernel(monkeypatch)
    else:  # the one pass serves it all: the two passes' decoder is never asked for

        def no_two_passes(dtype: np.dtype) -> None:
            raise AssertionError(f"the {dtype} rows fell back to the two passes")

        monkeypatch.setattr(arrays, "decoder", no_two_passes)
    rng = np.random.default_rng(4)
    stored = rng.integers(0, 1 << 16, (50, 40), dtype=np.uint32).astype(np.uint16).view(dtype)
    table = mapped_table(tmp_path, stored, offset)
    assert table.flags.aligned == (offset == 0)
    monkeypatch.setattr(arrays, "DECODE_RUN_BYTES", int((run_rows or 1) * stored[:1].nbytes))
    indices = np.array([49, 0, 7, 7, 12, 3, 48, 0, 25, 31, 30], dtype=np.int64)
    out = np.full((len(indices) + 1, 40), np.nan, np.float32)
    got = gather_rows(table, indices, out[: len(indices)])
    assert np.shares_memory(got, out)
    assert_bits_equal(got, decode(stored[indices]), "gathered and decoded")
    assert np.isnan(out[-1]).all()  # nothing written past the rows asked for
