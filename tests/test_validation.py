"""Validation: each bad input gets its own error naming the file or tensor, the position, the value, the rule.

Every case starts from a valid synthetic dataset and overwrites one file the
way a buggy builder would (``torch.save`` of one tensor, or an edited
config.json). Upstream accepts most of these silently (UPSTREAM.md section 3).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from _support import DELETE, Expected, edit_config, load_pt, save_pt, sha256_file

import jasper_ray.validate as validate_module
from jasper_ray import ValidationError, convert_pt_to_hdf5, open_dataset, validate_dataset
from jasper_ray.schema import KEYWORD_IDS, TENSOR, split_h5_path

PROBS = {"zero": 0.25, "centroid": 0.25, "keyword": 0.25, "residual": 0.25}


def edit(directory: Path, name: str, fn: Callable[[np.ndarray], np.ndarray | None]) -> None:
    """Load one tensor, change it, save it back with torch.save."""
    file_name = TENSOR[name].pt_file if name in TENSOR else name
    array = load_pt(directory / file_name).numpy().copy()
    out = fn(array)
    save_pt(directory, file_name, array if out is None else out)


def setter(index, value):
    def fn(a: np.ndarray) -> None:
        a[index] = value

    return fn


def edit_keywords(directory: Path, fn: Callable[[list], list | None]) -> None:
    lists = load_pt(directory / KEYWORD_IDS.pt_file)
    out = fn(lists)
    save_pt(directory, KEYWORD_IDS.pt_file, lists if out is None else out)


@dataclass
class Bad:
    """One broken input: how to break it, where the error must point, and what it must say."""

    id: str
    mutate: Callable[[Path, Expected], None]
    where: str  # PT file name (or "config.json ...") the message starts with
    message: Callable[[Expected], str]  # what follows ``where`` in the message
    position: Callable[[Expected], object] = lambda e: None
    h5_where: str | None = None  # the same error through HDF5 names this path (cheap cases only)


def n(e: Expected, name: str) -> int:
    return len(e.tensors[name])


P = "pair_index"
BAD = [
    Bad(
        "question_id_out_of_range",
        lambda d, e: edit(d, P, setter((5, 0), n(e, "question_embs"))),
        "pair_index.pt",
        lambda e: (
            f" at position (5, 0): found value {n(e, 'question_embs')}, "
            f"expected a question id in [0, {n(e, 'question_embs')})"
        ),
        lambda e: (5, 0),
    ),
    Bad(
        "question_id_negative",
        lambda d, e: edit(d, P, setter((6, 0), -3)),
        "pair_index.pt",
        lambda e: f" at position (6, 0): found value -3, expected a question id in [0, {n(e, 'question_embs')})",
        lambda e: (6, 0),
    ),
    Bad(
        "source_id_out_of_range",
        lambda d, e: edit(d, P, setter((7, 1), n(e, "source_embs") + 2)),
        "pair_index.pt",
        lambda e: (
            f" at position (7, 1): found value {n(e, 'source_embs') + 2}, "
            f"expected a source id in [0, {n(e, 'source_embs')})"
        ),
        lambda e: (7, 1),
        h5_where="pair_data/index",
    ),
    Bad(
        "hard_negative_negative",
        lambda d, e: edit(d, "hard_negatives", setter((3, 2), -1)),
        "hard_negatives.pt",
        lambda e: f" at position (3, 2): found value -1, expected a source id in [0, {n(e, 'source_embs')})",
        lambda e: (3, 2),
        h5_where="negatives/hard",
    ),
    Bad(
        "hard_negative_too_large",
        lambda d, e: edit(d, "hard_negatives", setter((1999, 7), n(e, "source_embs"))),
        "hard_negatives.pt",
        lambda e: (
            f" at position (1999, 7): found value {n(e, 'source_embs')}, "
            f"expected a source id in [0, {n(e, 'source_embs')})"
        ),
        lambda e: (1999, 7),
    ),
    Bad(
        "cluster_id_too_large",
        lambda d, e: edit(d, "pair_cluster_id", setter(10, n(e, "centroid_embs"))),
        "pair_cluster_id.pt",
        lambda e: (
            f" at position 10: found value {n(e, 'centroid_embs')}, "
            f"expected a cluster id in [0, {n(e, 'centroid_embs')})"
        ),
        lambda e: 10,
        h5_where="pair_data/cluster_id",
    ),
    Bad(
        "keyword_id_too_large",
        lambda d, e: edit_keywords(d, lambda kw: kw.__setitem__(4, [0, n(e, "keyword_embs")])),
        "pair_keyword_ids.pt",
        lambda e: (
            f" at position pair 4, entry 1: found keyword id {n(e, 'keyword_embs')}, "
            f"expected a keyword id in [0, {n(e, 'keyword_embs')}) (rows of keyword_embs)"
        ),
        lambda e: "pair 4, entry 1",
        h5_where="pair_data/keyword_ids",
    ),
    Bad(
        "keyword_id_negative",
        lambda d, e: edit_keywords(d, lambda kw: kw.__setitem__(9, [-1])),
        "pair_keyword_ids.pt",
        lambda e: " at position pair 9, entry 0: found keyword id -1",
        lambda e: "pair 9, entry 0",
    ),
    Bad(
        "split_id_out_of_range",
        lambda d, e: edit(d, "train_idx.pt", setter(3, e.n_pairs)),
        "train_idx.pt",
        lambda e: f" at position 3: found value {e.n_pairs}, expected a pair id in [0, {e.n_pairs})",
        lambda e: 3,
    ),
    Bad(
        "split_id_negative",
        lambda d, e: edit(d, "val_idx.pt", setter(0, -1)),
        "val_idx.pt",
        lambda e: f" at position 0: found value -1, expected a pair id in [0, {e.n_pairs})",
        lambda e: 0,
        h5_where=split_h5_path("val"),
    ),
    Bad(
        "split_not_1d",
        lambda d, e: save_pt(d, "test_idx.pt", torch.tensor([[0, 1]])),
        "test_idx.pt",
        lambda e: ": found shape (1, 2) dtype int64, expected a 1-D integer array of pair ids",
    ),
    Bad(
        "relevance_shorter",
        lambda d, e: edit(d, "pair_relevance", lambda a: a[:-7]),
        "pair_relevance.pt",
        lambda e: (
            f": found size {e.n_pairs - 7} on axis 0, expected {e.n_pairs} (the number of pairs (rows of pair_index))"
        ),
    ),
    Bad(
        "steering_longer",
        lambda d, e: edit(d, "steering_centroid", lambda a: np.concatenate([a, a[:1]])),
        "steering_centroid.pt",
        lambda e: f": found size {e.n_pairs + 1} on axis 0, expected {e.n_pairs}",
    ),
    Bad(
        "keyword_lists_shorter",
        lambda d, e: edit_keywords(d, lambda kw: kw[:-1]),
        "pair_keyword_ids.pt",
        lambda e: f": found {e.n_pairs - 1} entries, expected {e.n_pairs} (one per pair)",
    ),
    Bad(
        "wrong_dtype_int32",
        lambda d, e: edit(d, "pair_cluster_id", lambda a: a.astype(np.int32)),
        "pair_cluster_id.pt",
        lambda e: ": found dtype int32, expected dtype int64",
    ),
    Bad(
        "wrong_dtype_float64",
        lambda d, e: edit(d, "question_embs", lambda a: a.astype(np.float64)),
        "question_embs.pt",
        lambda e: ": found dtype float64, expected dtype float32",
    ),
    Bad(
        "wrong_ndim",
        lambda d, e: edit(d, "pair_relevance", lambda a: a[:, None]),
        "pair_relevance.pt",
        lambda e: f": found 2 dimensions ({e.n_pairs}, 1), expected 1 dimensions ['P']",
    ),
    Bad(
        "tensor_dim_vs_config",
        lambda d, e: edit(d, "steering_residual", lambda a: np.pad(a, ((0, 0), (0, 1)))),
        "steering_residual.pt",
        lambda e: ": found size 33 on axis 1, expected 32 (embedding_dim from config.json)",
    ),
    Bad(
        "config_dim_vs_tensors",
        lambda d, e: edit_config(d, embedding_dim=48),
        "question_embs.pt",
        lambda e: ": found size 32 on axis 1, expected 48 (embedding_dim from config.json)",
    ),
    Bad(
        "config_n_neg_vs_tensors",
        lambda d, e: edit_config(d, n_neg=9),
        "hard_negatives.pt",
        lambda e: ": found size 8 on axis 1, expected 9 (n_neg from config.json)",
    ),
    Bad(
        "tiers_n_neg_vs_config",
        lambda d, e: edit(d, "negative_tiers", lambda a: a[:, :7]),
        "negative_tiers.pt",
        lambda e: ": found size 7 on axis 1, expected 8 (n_neg from config.json)",
    ),
    Bad(
        "tier_0",
        lambda d, e: edit(d, "negative_tiers", setter((2, 1), 0)),
        "negative_tiers.pt",
        lambda e: " at position (2, 1): found value 0, expected a tier in [1, 4]",
        lambda e: (2, 1),
        h5_where="negatives/tiers",
    ),
    Bad(
        "tier_5",
        lambda d, e: edit(d, "negative_tiers", setter((1500, 6), 5)),
        "negative_tiers.pt",
        lambda e: " at position (1500, 6): found value 5, expected a tier in [1, 4]",
        lambda e: (1500, 6),
    ),
    Bad(
        "probabilities_sum",
        lambda d, e: edit_config(d, steering_probabilities={**PROBS, "zero": 0.5}),
        "config.json steering_probabilities",
        lambda e: ": found probabilities summing to 1.25, expected a sum of 1",
    ),
    Bad(
        "probability_unknown_key",
        lambda d, e: edit_config(d, steering_probabilities={**PROBS, "none": 0.0}),
        "config.json steering_probabilities",
        lambda e: ": found unknown variant(s) ['none'], expected only ['zero', 'centroid', 'keyword', 'residual']",
    ),
    Bad(
        "probability_upstream_docs_name",
        lambda d, e: edit_config(
            d, steering_probabilities={"zero": 0.25, "centroid": 0.25, "keyword_weighted": 0.25, "residual": 0.25}
        ),
        "config.json steering_probabilities",
        lambda e: ": found unknown variant(s) ['keyword_weighted']",
    ),
    Bad(
        "probability_missing_variant",
        lambda d, e: edit_config(d, steering_probabilities={"zero": 0.5, "centroid": 0.25, "keyword": 0.25}),
        "config.json steering_probabilities",
        lambda e: ": found missing variant(s) ['residual'], expected all of",
    ),
    Bad(
        "probability_negative",
        lambda d, e: edit_config(d, steering_probabilities={**PROBS, "zero": -0.25, "centroid": 0.75}),
        "config.json steering_probabilities['zero']",
        lambda e: ": found -0.25, expected a number in [0, 1]",
    ),
    Bad(
        "missing_embedding_dim",
        lambda d, e: edit_config(d, embedding_dim=DELETE),
        "config.json 'embedding_dim'",
        lambda e: ": found None, expected a positive integer",
    ),
    Bad(
        "missing_n_neg",
        lambda d, e: edit_config(d, n_neg=DELETE),
        "config.json 'n_neg'",
        lambda e: ": found None, expected a positive integer",
    ),
    Bad(
        "string_embedding_dim",
        lambda d, e: edit_config(d, embedding_dim="32"),
        "config.json 'embedding_dim'",
        lambda e: ": found '32', expected a positive integer",
    ),
    Bad(
        "missing_steering_probabilities",
        lambda d, e: edit_config(d, steering_probabilities=DELETE),
        "config.json 'steering_probabilities'",
        lambda e: ": found nothing, expected a mapping of the four variants",
    ),
]


def _where_prefix(directory: Path, bad: Bad) -> str:
    return bad.where if bad.where.startswith("config.json") else str(directory / bad.where)


@pytest.mark.parametrize("use_mmap", [True, False], ids=["mmap", "load"])
@pytest.mark.parametrize("bad", BAD, ids=[b.id for b in BAD])
def test_each_bad_input_has_its_own_error(dataset_copy: Path, small_expected: Expected, bad: Bad, use_mmap) -> None:
    bad.mutate(dataset_copy, small_expected)
    reader = open_dataset(dataset_copy, "pt", use_mmap=use_mmap)
    expected_text = _where_prefix(dataset_copy, bad) + bad.message(small_expected)
    with pytest.raises(ValidationError, match=re.escape(expected_text)) as info:
        validate_dataset(reader)
    assert info.value.position == bad.position(small_expected)
    assert "\n" not in str(info.value)


HDF5_BAD = [b for b in BAD if b.h5_where]


@pytest.mark.parametrize("bad", HDF5_BAD, ids=[b.id for b in HDF5_BAD])
def test_bad_input_through_hdf5_names_the_dataset(dataset_copy: Path, small_expected: Expected, bad: Bad) -> None:
    bad.mutate(dataset_copy, small_expected)
    convert_pt_to_hdf5(dataset_copy, "gzip", progress=False, validate=False)
    reader = open_dataset(dataset_copy, "hdf5", use_mmap=True)
    where = f"{dataset_copy / 'dataset.h5'}:{bad.h5_where}"
    with pytest.raises(ValidationError, match=re.escape(where + bad.message(small_expected))) as info:
        validate_dataset(reader)
    assert info.value.position == bad.position(small_expected)


def test_conversion_refuses_bad_input_and_keeps_the_old_file(dataset_copy: Path, small_expected: Expected) -> None:
    convert_pt_to_hdf5(dataset_copy, "lzf", progress=False)
    before = sha256_file(dataset_copy / "dataset.h5")
    edit(dataset_copy, "pair_cluster_id", setter(10, n(small_expected, "centroid_embs")))
    with pytest.raises(ValidationError, match=r"pair_cluster_id\.pt at position 10"):
        convert_pt_to_hdf5(dataset_copy, "gzip", progress=False)
    assert sha256_file(dataset_copy / "dataset.h5") == before
    assert not list(dataset_copy.glob(".*tmp-*"))


def test_conversion_of_bad_input_leaves_no_file(dataset_copy: Path, small_expected: Expected) -> None:
    edit(dataset_copy, "hard_negatives", setter((3, 2), -1))
    with pytest.raises(ValidationError, match=r"hard_negatives\.pt at position \(3, 2\)"):
        convert_pt_to_hdf5(dataset_copy, "gzip", progress=False)
    assert not (dataset_copy / "dataset.h5").exists() and not list(dataset_copy.glob(".*tmp-*"))


def test_positions_are_absolute_across_scan_blocks(dataset_copy: Path, small_expected: Expected, monkeypatch) -> None:
    """Scans run in blocks; the reported position is the row in the tensor, not in the block."""
    monkeypatch.setattr(validate_module, "SCAN_ELEMENTS", 100)
    s = n(small_expected, "source_embs")
    edit(dataset_copy, "hard_negatives", setter((1733, 5), s + 9))
    with pytest.raises(ValidationError, match=re.escape(f"at position (1733, 5): found value {s + 9}")):
        validate_dataset(open_dataset(dataset_copy, "pt", use_mmap=True))
    edit(dataset_copy, "hard_negatives", setter((1733, 5), 0))
    k = n(small_expected, "keyword_embs")
    pair = next(p for p in range(1900, 2000) if len(small_expected.keyword_ids[p]) >= 2)
    edit_keywords(dataset_copy, lambda kw: kw[pair].__setitem__(1, k))
    with pytest.raises(ValidationError, match=re.escape(f"at position pair {pair}, entry 1: found keyword id {k}")):
        validate_dataset(open_dataset(dataset_copy, "pt", use_mmap=True))


@pytest.mark.parametrize("storage", ["pt", "gzip", "none"])
def test_valid_datasets_pass(small_dir: Path, converted, storage) -> None:
    if storage == "pt":
        validate_dataset(open_dataset(small_dir, "pt", use_mmap=True))
        validate_dataset(open_dataset(small_dir, "pt", use_mmap=False))
    else:
        directory = converted(None if storage == "none" else storage)
        validate_dataset(open_dataset(directory, "hdf5", use_mmap=True))
        validate_dataset(open_dataset(directory, "hdf5", use_mmap=False))


def test_empty_keyword_table_is_valid(empty_keywords_dir: Path, empty_keywords_converted) -> None:
    validate_dataset(open_dataset(empty_keywords_dir, "pt"))
    validate_dataset(open_dataset(empty_keywords_converted("gzip"), "hdf5"))


def test_any_keyword_id_is_out_of_range_of_an_empty_table(empty_keywords_dir: Path, tmp_path: Path) -> None:
    import shutil

    directory = Path(shutil.copytree(empty_keywords_dir, tmp_path / "ds"))
    edit_keywords(directory, lambda kw: kw.__setitem__(0, [0]))
    expected = "pair 0, entry 0: found keyword id 0, expected a keyword id in [0, 0)"
    with pytest.raises(ValidationError, match=re.escape(expected)):
        validate_dataset(open_dataset(directory, "pt"))
