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

Numpy only.
"""

from __future__ import annotations

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


# NOTE [float16 casts]: numpy casts float16 to float32 one value at a time (~0.9 ns each on a 2-core VM with
# F16C); torch's cast is vectorised, ~6x faster. This floor imports no torch: the local front-end, which does,
# hands its cast over when it is imported (``use_half_cast``). bfloat16 needs none: its decode is one shift.
HalfCast = Callable[[np.ndarray, np.ndarray], object]
_half_cast: HalfCast | None = None


def use_half_cast(cast: HalfCast | None) -> None:
    """Decode float16 with ``cast(stored, out)`` (C-contiguous, writable arrays) instead of numpy's cast."""
    global _half_cast
    _half_cast = cast


def decode(stored: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Stored rows (float16, bfloat16 bits, float32) as float32, written into ``out`` when given."""
    stored = np.asarray(stored)
    if out is None:
        out = np.empty(stored.shape, dtype=np.float32)
    if stored.dtype == BFLOAT16_BITS:
        wide = out.view(np.uint32)
        np.left_shift(stored, np.uint32(16), out=wide, dtype=np.uint32)
    elif _half_cast is not None and stored.dtype == np.float16 and _plain(stored) and _plain(out):
        _half_cast(stored, out)
    else:
        np.copyto(out, stored, casting="same_kind")
    return out


def _plain(arr: np.ndarray) -> bool:
    return bool(arr.flags.c_contiguous and arr.flags.writeable)
