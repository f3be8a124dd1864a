"""``assemble_batch(..., out=...)``: building into the caller's arrays gives the batch it would allocate.

Shard actors build straight into shared memory this way; every source must
give the same values either way, for every key, any variant mix and a projection.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from jasper_ray.assembly import SAMPLE_KEYS, ReaderSource, assemble_batch
from jasper_ray.formats import open_dataset
from jasper_ray.local.batches import TensorSource


def _garbage_like(batch: dict, as_torch: bool) -> dict:
    """Arrays of the batch's shapes and dtypes, full of a value no sample has."""
    out = {}
    for key, value in batch.items():
        array = np.full(tuple(value.shape), 99, dtype=SAMPLE_KEYS[key][1])
        out[key] = torch.from_numpy(array) if as_torch else array
    return out


@pytest.mark.parametrize(
    ("storage", "make_source"),
    [
        ("pt", lambda reader: ReaderSource(reader)),
        ("gzip", lambda reader: ReaderSource(reader)),  # chunked rows, not a mapping
        ("contiguous", lambda reader: ReaderSource(reader)),
        ("pt", lambda reader: TensorSource(reader)),
    ],
    ids=["pt-reader", "gzip-reader", "contiguous-reader", "tensor-source"],
)
def test_out_gives_the_allocated_batch(
    small_dir: Path, converted: Callable[[str | None], Path], storage: str, make_source: Callable
) -> None:
    directory = small_dir if storage == "pt" else converted("gzip" if storage == "gzip" else None)
    reader = open_dataset(directory, "pt" if storage == "pt" else "hdf5", use_mmap=True)
    source = make_source(reader)
    as_torch = isinstance(source, TensorSource)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, reader.n_pairs, size=300)
    variants = rng.integers(0, 4, size=300)
    assert set(variants.tolist()) == {0, 1, 2, 3}
    for keys in (None, ["negative_embs", "steering", "steering_variant"], ["relevance"]):
        want = assemble_batch(source, ids, variants, keys)
        out = _garbage_like(want, as_torch)
        got = assemble_batch(source, ids, variants, keys, out=out)
        assert set(got) == set(want)
        for key in want:
            assert got[key] is out[key], f"{key}: not built in out"
            expected = want[key].numpy() if as_torch else want[key]
            actual = out[key].numpy() if as_torch else out[key]
            np.testing.assert_array_equal(actual, expected, err_msg=f"{storage} {keys} {key}")
    reader.close()


def test_out_must_be_contiguous_rows_of_the_batch(small_dir: Path) -> None:
    source = ReaderSource(open_dataset(small_dir, "pt"))
    ids, variants = np.arange(4), np.zeros(4, dtype=np.int64)
    with pytest.raises(ValueError, match="C-contiguous with 4 rows"):
        strided = np.zeros((8, 32), np.float32)[::2]
        assemble_batch(source, ids, variants, ["question_emb"], out={"question_emb": strided})
    with pytest.raises(ValueError, match="C-contiguous with 4 rows"):
        assemble_batch(source, ids, variants, ["relevance"], out={"relevance": np.zeros(5, np.float32)})
