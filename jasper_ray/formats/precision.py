"""Storage precision: float32 values encoded as float16 or bfloat16 when written, decoded inside gathers.

NOTE [16-bit storage]: a conversion's ``precision`` applies to the reducible tensors (the float
``[rows, D]`` tables and steering vectors, ``schema.TensorSpec.reducible``); ids, tiers, relevance and
distances keep their dtypes (a few bytes per pair, and scalars a loss may use as they are). float16 is
HDF5's native half type. bfloat16 has none in numpy or HDF5: its bit patterns (the upper 16 bits of
the float32, rounded to nearest even) are stored as uint16, with the dataset attribute
``precision="bfloat16"`` so that plain h5py users can decode it (``docs/formats.md``). Within the
package a uint16 float tensor is bfloat16, and torch sees it as ``torch.bfloat16`` (a view, no copy).
Checksums cover the stored 16-bit bytes. Readers decode rows as they gather them into a float32 batch
(``arrays.gather_rows``): never a float32 copy of a table.

Numpy; torch only to decode float16 where it is installed, imported then (NOTE [float16 casts]).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import ValidationError
from ..schema import (
    ATTR_PRECISION,
    PRECISION_BFLOAT16,
    PRECISION_DTYPES,
    PRECISION_FLOAT16,
    PRECISION_FLOAT32,
    PRECISIONS,
    TENSOR,
    TENSORS,
)

log = logging.getLogger(__name__)
BFLOAT16_BITS = PRECISION_DTYPES[PRECISION_BFLOAT16]
# The largest error of a stored value, relative to the float32 value (round to nearest even: half a unit in
# the last place of 10 and 7 mantissa bits); below float16's normal range (6.1e-5) float16's error is instead
# at most 2**-25 absolute. docs/formats.md gives these with the measured accuracy report.
RELATIVE_ERROR = {PRECISION_FLOAT32: 0.0, PRECISION_FLOAT16: 2.0**-11, PRECISION_BFLOAT16: 2.0**-8}
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def check_precision(precision: str) -> str:
    """``precision`` if it is one of ``schema.PRECISIONS``, else a ValueError that lists them."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return precision


def precision_of(dtype: np.dtype) -> str:
    """The precision a stored float tensor of ``dtype`` holds (uint16: bfloat16 bits)."""
    dtype = np.dtype(dtype)
    for name, stored in PRECISION_DTYPES.items():
        if dtype == stored:
            return name
    raise ValueError(f"dtype {dtype} is not a storage precision (expected one of {list(PRECISION_DTYPES.values())})")


def stored_dtype(name: str, precision: str = PRECISION_FLOAT32) -> np.dtype:
    """The dtype tensor ``name`` is stored as at ``precision``."""
    spec = TENSOR[name]
    return PRECISION_DTYPES[check_precision(precision)] if spec.reducible else spec.dtype


REDUCIBLE_PATHS = frozenset(s.h5_path for s in TENSORS if s.reducible)


def mark_precision(dset: Any) -> Any:
    """A 16-bit tensor's HDF5 dataset gets the ``precision`` attribute (plain h5py users decode bfloat16 by it)."""
    if dset.name.lstrip("/") in REDUCIBLE_PATHS and dset.dtype != PRECISION_DTYPES[PRECISION_FLOAT32]:
        dset.attrs[ATTR_PRECISION] = precision_of(dset.dtype)
    return dset


def is_16bit(dtype: np.dtype) -> bool:
    return np.dtype(dtype) in (PRECISION_DTYPES[PRECISION_FLOAT16], BFLOAT16_BITS)


def encode(block: np.ndarray, precision: str, where: str = "", first_row: int = 0) -> np.ndarray:
    """Float rows as stored at ``precision`` (C-contiguous). A finite value beyond float16's range is an
    error naming ``where`` and its position (bfloat16 keeps float32's range)."""
    values = np.ascontiguousarray(block, dtype=np.float32)
    if precision == PRECISION_FLOAT32:
        return values
    if precision == PRECISION_FLOAT16:
        too_big = np.abs(values) > _FLOAT16_MAX
        if too_big.any():
            pos = np.argwhere(too_big & np.isfinite(values))
            if len(pos):
                value = values[tuple(pos[0])]
                pos[0][0] += first_row
                position = int(pos[0][0]) if values.ndim == 1 else tuple(int(x) for x in pos[0])
                raise ValidationError(
                    where,
                    f"value {value}",
                    f"|value| <= {_FLOAT16_MAX:g} to store as float16 (convert with precision 'bfloat16', which "
                    "keeps float32's range, or 'float32')",
                    position,
                )
        return values.astype(np.float16)
    bits = values.view(np.uint32)
    # Round to nearest even on the 16 bits dropped; NaN keeps a quiet NaN (rounding could carry it to inf).
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(
        BFLOAT16_BITS
    )
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = (bits[nan] >> np.uint32(16)).astype(BFLOAT16_BITS) | np.uint16(0x0040)
    return rounded


# NOTE [16-bit gather kernel]: numpy and torch gather only within one dtype, so without compiled code a decoding
# gather is two passes: a 16-bit gather into a buffer the cache holds, then a cast into the batch, a call of each
# per run of rows. ``_decode16.c`` is one pass: each stored row read once, its float32 row written once (F16C /
# AVX2 where the CPU has them, plain C otherwise, the same bits either way), with the GIL released. A batch's
# negatives (6144 random rows of 768, ``scripts/diag_decode.py``): float16 2.6-2.9 ms, against 3.6-4.0 ms for
# float32's ``np.take`` and 4.6-5.3 ms for the two passes (docs/formats.md). pip builds it where it finds a C
# compiler; elsewhere the package installs without it and the passes below serve (``fused_gather`` says False).
# So do CPUs without F16C and AVX2 (ARM among them): there the kernel would run its plain C decode, a value at a
# time, which no one has measured against torch's vectorised cast.
#
# NOTE [float16 casts]: without the kernel, numpy casts float16 to float32 one value at a time (a batch's 6144
# negative rows: 5.5 ms, against 1.9 ms for torch's vectorised cast and 1.05 ms just to copy float32 rows into the
# batch), so float16 is decoded by torch where it is installed, imported by the first float16
# decode: Ray workers serving float32 or bfloat16 data still start without it. torch runs an element-wise op over
# more than ``_TORCH_SERIAL_VALUES`` values on its thread pool, which on a loaded 2-core machine took 100x the
# cast itself: the cast is called on pieces of that many. Both casts give the same bits for all 65536 float16
# values: the F16C instruction torch uses quiets a signalling NaN (keeping its payload), and numpy's fallback is
# made to do the same. bfloat16 needs no torch: its decode is one widening cast (``_shift``), 1.5 ms a batch.
_TORCH_SERIAL_VALUES = 1 << 15  # at::internal::GRAIN_SIZE
_QUIET_BIT = np.uint32(1 << 22)
Kernel = Callable[[np.ndarray, np.ndarray], object]


def _shift(stored: np.ndarray, out: np.ndarray) -> None:
    """bfloat16 bits into the upper halves of C-contiguous float32 ``out``, zeros into the lower halves.

    One widening cast, faster than numpy's ``left_shift`` into uint32 (which widens into a buffer, then shifts:
    2x the time in the cache, 1.2x into a batch in memory): ``out`` seen as uint32 from two bytes in puts each
    widened value's bits in a float's upper half and its zero upper half in the next float's lower half. The
    two end halves are set apart."""
    bits, halves = stored.reshape(-1), out.reshape(-1).view(np.uint16)
    if bits.size:
        np.copyto(halves[1:-1].view(np.uint32), bits[:-1], casting="safe")
        halves[0], halves[-1] = 0, bits[-1]


def _numpy_cast(stored: np.ndarray, out: np.ndarray) -> None:
    np.copyto(out, stored, casting="same_kind")
    nan = np.isnan(out)
    if nan.any():
        out.view(np.uint32)[nan] |= _QUIET_BIT


def _torch_cast() -> Kernel:
    try:
        import torch  # lazy: ~1 s to import; only a float16 table decoded to float32 needs it (NOTE [float16 casts])
    except ImportError:
        return _numpy_cast
    from_numpy, threads, step = torch.from_numpy, torch.get_num_threads, _TORCH_SERIAL_VALUES

    def cast(stored: np.ndarray, out: np.ndarray) -> None:
        if threads() == 1:  # no pool to keep off (DataLoader and Ray workers): one call
            from_numpy(out).copy_(from_numpy(stored))
            return
        flat_in, flat_out = stored.reshape(-1), out.reshape(-1)
        for a in range(0, flat_in.size, step):
            from_numpy(flat_out[a : a + step]).copy_(from_numpy(flat_in[a : a + step]))

    return cast


def compiled_module() -> Any:
    """``_decode16``, or None where it was not built (no C compiler at install).

    By name: import-linter sees no C module and would take the import for one of the package itself."""
    try:
        return importlib.import_module(f"{__package__}._decode16")
    except ImportError:
        return None


def _compiled_gather() -> Callable[..., None] | None:
    """The kernel where it was built and runs vector instructions on this CPU (NOTE [16-bit gather kernel])."""
    module = compiled_module()
    return module.gather if module is not None and module.vectorised else None


compiled_gather = _compiled_gather()
_ROW_ZERO = np.zeros(1, np.int64)


def fused_gather(table: np.ndarray, indices: np.ndarray, out: np.ndarray) -> bool:
    """``table[indices]`` (16-bit rows) decoded into float32 ``out`` in one pass by the compiled kernel; False,
    with nothing written, where it was not built or an array is not C-contiguous (NOTE [16-bit gather kernel])."""
    gather = compiled_gather
    if gather is None or not is_16bit(table.dtype) or out.dtype != np.float32:
        return False
    if not (table.flags.c_contiguous and out.flags.c_contiguous and out.flags.writeable):
        return False
    if out.size:
        width = int(np.prod(table.shape[1:]))
        gather(table, width, np.ascontiguousarray(indices, np.int64), out, table.dtype == BFLOAT16_BITS)
    return True


def _compiled_decode(stored: np.ndarray, out: np.ndarray) -> None:
    """All of ``stored`` as one row through the gather kernel."""
    if stored.size:
        gather = compiled_gather
        assert gather is not None
        gather(np.ascontiguousarray(stored), stored.size, _ROW_ZERO, out, stored.dtype == BFLOAT16_BITS)


_kernels: dict[np.dtype, Kernel] = {}


def decoder(dtype: np.dtype) -> Kernel:
    """The kernel ``(stored, out)`` that decodes C-contiguous 16-bit values of ``dtype`` into the writable
    float32 ``out`` of their shape: the compiled one where it was built, else NOTE [float16 casts]."""
    dtype = np.dtype(dtype)
    kernel = _kernels.get(dtype)
    if kernel is None:
        if not is_16bit(dtype):
            raise ValueError(f"dtype {dtype} is not a 16-bit storage precision")
        if compiled_gather is not None:
            kernel = _compiled_decode
        else:
            log.info(
                "jasper_ray's compiled 16-bit gather is not built (no C compiler at install) or has no vector "
                "path for this CPU: %s rows decode in two passes, slower (NOTE [16-bit gather kernel])",
                precision_of(dtype),
            )
            kernel = _shift if dtype == BFLOAT16_BITS else _torch_cast()
        _kernels[dtype] = kernel
    return kernel


def decode(stored: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Stored rows (float16, bfloat16 bits, float32) as float32, written into ``out`` when given."""
    stored = np.asarray(stored)
    if out is None:
        out = np.empty(stored.shape, dtype=np.float32)
    if out.dtype != np.float32:
        raise ValueError(f"16-bit rows decode into float32, not into {out.dtype}")
    plain = stored.dtype == BFLOAT16_BITS or (stored.flags.c_contiguous and stored.flags.writeable)
    if not is_16bit(stored.dtype):
        np.copyto(out, stored, casting="same_kind")
    elif plain and out.flags.c_contiguous and out.flags.writeable:
        decoder(stored.dtype)(stored, out)  # torch gets no read-only rows (it would warn) nor negative strides
    elif stored.dtype == BFLOAT16_BITS:
        np.left_shift(stored, np.uint32(16), out=out.view(np.uint32), dtype=np.uint32)
    else:
        _numpy_cast(stored, out)
    return out
