"""The reader contract, written once and run against every reader (zarr's StoreTests style).

A subclass provides a ``case`` fixture: an opened reader and the PT source it
must reproduce. Every test compares values bit for bit with the source, read
by plain ``torch.load`` (see ``_support.load_expected``).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import numpy as np
import pytest
from _support import Expected, assert_bits_equal

from jasper_ray.errors import DatasetNotFoundError
from jasper_ray.formats.base import Reader
from jasper_ray.schema import TENSORS


@dataclass
class Case:
    reader: Reader
    expected: Expected


def _index_sets(n: int, seed: int) -> dict[str, np.ndarray]:
    """Random (with repeats, unsorted), explicitly repeated and reversed, edge rows, empty."""
    rng = np.random.default_rng(seed)
    sets = {"empty": np.empty(0, dtype=np.int64)}
    if n:
        sets.update(
            random=rng.integers(0, n, size=max(3, n // 3)),
            repeated=np.array([n - 1, 0, n - 1, n // 2, 0, n // 2, n - 1]),
            descending=np.arange(n)[::-1][: min(n, 700)].copy(),
            single=np.array([n // 3]),
            int32=rng.integers(0, n, size=17).astype(np.int32),
        )
    return sets


class ReaderContract:
    """Behaviour every reader (PT, HDF5 ours, sharded HDF5, HDF5 upstream's) must share."""

    @pytest.fixture
    def case(self) -> Case:  # pragma: no cover - overridden
        raise NotImplementedError

    def test_every_tensor_bit_for_bit(self, case: Case) -> None:
        for spec in TENSORS:
            assert case.reader.shape(spec.name) == case.expected.tensors[spec.name].shape, spec.name
            assert case.reader.dtype(spec.name) == spec.dtype, spec.name
            assert_bits_equal(case.reader.read(spec.name), case.expected.tensors[spec.name], spec.name)

    def test_take_equals_numpy_fancy_indexing(self, case: Case) -> None:
        for k, spec in enumerate(TENSORS):
            want = case.expected.tensors[spec.name]
            for label, idx in _index_sets(len(want), seed=k).items():
                got = case.reader.take(spec.name, idx)
                assert_bits_equal(got, want[idx], f"{spec.name} take {label}")

    def test_take_into_out_equals_take(self, case: Case) -> None:
        """take(..., out) writes the same rows into the caller's array (a shard actor's shared memory)."""
        for k, spec in enumerate(TENSORS):
            want = case.expected.tensors[spec.name]
            for label, idx in _index_sets(len(want), seed=k).items():
                out = np.full((len(idx), *want.shape[1:]), 7, dtype=want.dtype)
                got = case.reader.take(spec.name, idx, out)
                assert got is out, f"{spec.name} take {label}: not written into out"
                assert_bits_equal(out, want[idx], f"{spec.name} take into out {label}")

    def test_take_into_out_still_checks_indices(self, case: Case) -> None:
        out = np.zeros((2, 2), dtype=np.int64)
        with pytest.raises(IndexError, match="out of range"):
            case.reader.take("pair_index", [0, 10**9], out)

    def test_take_accepts_python_lists(self, case: Case) -> None:
        want = case.expected.tensors["source_embs"]
        idx = [5, 1, 5, len(want) - 1]
        assert_bits_equal(case.reader.take("source_embs", idx), want[idx], "source_embs list")

    def test_take_result_is_independent_of_storage(self, case: Case) -> None:
        """take returns a new array: writing into it changes neither the reader nor the file."""
        want = case.expected.tensors["question_embs"]
        got = case.reader.take("question_embs", [0, 1])
        got[:] = 12345.0
        assert_bits_equal(case.reader.take("question_embs", [0, 1]), want[[0, 1]], "after writing into a take")

    @pytest.mark.parametrize("bad", [[-1], [10**9], [0, 3, 10**6]])
    def test_take_rejects_out_of_range(self, case: Case, bad: list[int]) -> None:
        with pytest.raises(IndexError, match="out of range"):
            case.reader.take("pair_index", bad)

    def test_take_rejects_non_integer_indices(self, case: Case) -> None:
        with pytest.raises(IndexError, match="integer"):
            case.reader.take("pair_index", np.array([0.0, 1.0]))
        with pytest.raises(IndexError, match="1-D"):
            case.reader.take("pair_index", np.zeros((2, 2), dtype=np.int64))

    def test_read_ranges(self, case: Case) -> None:
        for spec in TENSORS:
            want = case.expected.tensors[spec.name]
            n = len(want)
            ranges = [(0, None), (0, 1), (1, 7), (n // 3, 2 * n // 3), (max(0, n - 3), n), (5, 5), (n, None)]
            ranges += [(500, 530), (1000, 1030), (max(0, n - 2), n + 10)]  # across 512-row chunk edges, past the end
            for a, b in ranges:
                assert_bits_equal(case.reader.read(spec.name, a, b), want[a:b], f"{spec.name}[{a}:{b}]")

    def test_read_defaults_to_everything(self, case: Case) -> None:
        assert_bits_equal(case.reader.read("pair_index"), case.expected.tensors["pair_index"], "pair_index")

    def test_splits(self, case: Case) -> None:
        assert set(case.reader.split_names()) == set(case.expected.splits) == {"train", "val", "test"}
        for split, want in case.expected.splits.items():
            assert_bits_equal(case.reader.split(split), want, f"split {split}")

    def test_unknown_split_names_the_valid_ones(self, case: Case) -> None:
        expected = r"Split 'holdout' not found .*Valid splits are: test, train, val"
        with pytest.raises(DatasetNotFoundError, match=expected):
            case.reader.split("holdout")

    def test_keyword_ids_random_repeated_unsorted(self, case: Case) -> None:
        want = case.expected.keyword_ids
        rng = np.random.default_rng(3)
        pairs = np.concatenate([rng.integers(0, len(want), size=200), [len(want) - 1, 0, len(want) - 1]])
        got = case.reader.keyword_ids(pairs)
        assert len(got) == len(pairs)
        for p, ids in zip(pairs, got):
            assert ids.dtype == np.int64
            assert ids.tolist() == list(want[p]), f"pair {p}"
        assert case.reader.keyword_ids([]) == []

    def test_keyword_csr_holds_every_pair(self, case: Case) -> None:
        want = case.expected.keyword_ids
        values, offsets = case.reader.keyword_csr()
        assert case.reader.n_keyword_pairs() == len(want) == case.expected.n_pairs
        assert offsets.tolist() == np.concatenate([[0], np.cumsum([len(k) for k in want])]).tolist()
        flat = [k for ids in want for k in ids]
        assert np.asarray(values[:]).tolist() == flat

    def test_keyword_ids_reject_bad_pairs(self, case: Case) -> None:
        with pytest.raises(IndexError, match="out of range"):
            case.reader.keyword_ids([case.expected.n_pairs])

    def test_verify_checksums_finds_nothing_wrong(self, case: Case) -> None:
        """Intact data verifies: every checksum it recorded matches (PT: the blocks of its checksum sidecar)."""
        seen: list[int] = []
        assert case.reader.verify_checksums(on_block=seen.append) == []
        sidecar = getattr(case.reader, "sidecar_tensors", lambda: 0)()
        assert bool(seen) == bool(case.reader.recorded_checksums() or sidecar), "on_block hears of every block read"

    def test_config(self, case: Case) -> None:
        assert case.reader.config == case.expected.config

    def test_n_pairs(self, case: Case) -> None:
        assert case.reader.n_pairs == case.expected.n_pairs

    def test_unknown_tensor(self, case: Case) -> None:
        with pytest.raises(KeyError, match="unknown tensor 'pair_ids'"):
            case.reader.take("pair_ids", [0])

    def test_pickles_as_paths_after_use(self, case: Case) -> None:
        """After reads (handles and mappings open) a reader pickles small: names, never data or handles."""
        reader = case.reader
        reader.take("steering_centroid", [0, 1])
        reader.keyword_ids([0])
        blob = pickle.dumps(reader)
        assert len(blob) < 2048, f"pickled reader is {len(blob)} bytes: it carries data"
        clone = pickle.loads(blob)
        assert (clone.storage_format, clone.directory, clone.use_mmap) == (
            reader.storage_format,
            reader.directory,
            reader.use_mmap,
        )
        idx = np.array([7, 3, 7])
        for name in ("steering_centroid", "hard_negatives", "centroid_distances"):
            assert_bits_equal(clone.take(name, idx), case.expected.tensors[name][idx], f"unpickled {name}")

    def test_close_then_reuse(self, case: Case) -> None:
        reader = case.reader
        before = reader.take("source_embs", [4, 2])
        reader.close()
        assert_bits_equal(reader.take("source_embs", [4, 2]), before, "after close")
        with reader as r:
            assert r.n_pairs == case.expected.n_pairs
        assert_bits_equal(reader.take("source_embs", [4, 2]), before, "after with-block")
