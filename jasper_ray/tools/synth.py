"""Synthetic JASPER datasets in upstream's PT layout, with realistic structure.

Embeddings are unit vectors clustered around centroids (cosine ~0.8 to their
centroid), not white noise, so compression and steering look like real data.
Steering tensors follow upstream's builder formulas; negatives come in tier
blocks (in-cluster, adjacent, other, random) as upstream's miner writes them.
Deterministic for a seed. Made in blocks through file-backed scratch arrays, so a dataset larger than
RAM can be made (NOTE [blocks, one stream]).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..atomic import temp_path_for
from ..formats.pt import PTWriter, write_pt_checksums

log = logging.getLogger(__name__)

MAX_KEYWORDS_PER_PAIR = 5
QUESTIONS_PER_PAIR = 0.5
SOURCES_PER_PAIR = 0.8
# Rows per block: this many bytes of a float32 [rows, D] block (a block's temporaries are ~20 of them).
BLOCK_BYTES = 4 << 20
STEERING = ("steering_centroid", "steering_keyword_weighted", "steering_residual")
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000; '512MiB' -> 536_870_912."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"size {text!r}: expected a number with a unit such as 50MB, 2GB or 1GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def bytes_per_pair(dim: int, n_neg: int) -> float:
    floats = 3 * dim + (QUESTIONS_PER_PAIR + SOURCES_PER_PAIR) * dim + 2
    ints = 2 + 1 + 2 * n_neg + 1 + MAX_KEYWORDS_PER_PAIR / 2
    return 4 * floats + 8 * ints


def pairs_for_size(size_bytes: int, dim: int, n_neg: int) -> int:
    return max(16, int(size_bytes / bytes_per_pair(dim, n_neg)))


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm >= 1e-8)


def _blocks(n: int, dim: int) -> Iterator[slice]:
    rows = max(1, BLOCK_BYTES // (4 * dim))
    return (slice(a, min(a + rows, n)) for a in range(0, n, rows))


def _clustered(
    rng: np.random.Generator, centroids: np.ndarray, clusters: np.ndarray, spread: float, out: np.ndarray, bar: tqdm
) -> np.ndarray:
    scale = np.float32(spread / math.sqrt(centroids.shape[1]))
    for sl in _blocks(len(clusters), centroids.shape[1]):
        c = clusters[sl]
        noise = rng.standard_normal((len(c), centroids.shape[1]), dtype=np.float32)
        out[sl] = _unit(centroids[c] + scale * noise)
        bar.update(len(c))
    return out


def _pick_in_cluster(
    u: np.ndarray, members_sorted: np.ndarray, starts: np.ndarray, counts: np.ndarray, clusters: np.ndarray
) -> np.ndarray:
    """One member of each given cluster (every cluster has at least one member), ``u`` uniform in [0, 1)."""
    return members_sorted[starts[clusters] + (u * counts[clusters]).astype(np.int64)]


def _fork(rng: np.random.Generator) -> np.random.Generator:
    """A generator at ``rng``'s state: it replays the draws ``rng`` makes next (see NOTE [blocks, one stream])."""
    copy = np.random.Generator(type(rng.bit_generator)())
    copy.bit_generator.state = rng.bit_generator.state
    return copy


class _Scratch:
    """File-backed arrays in a hidden folder of the output directory, removed on exit: what does not
    fit in memory lives in the page cache, which the kernel writes back and drops, not in owned memory."""

    def __init__(self, out_dir: Path):
        self.path = temp_path_for(out_dir / "synth-scratch")

    def __enter__(self) -> _Scratch:
        self.path.mkdir(parents=True)
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def array(self, name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        if 0 in shape:
            return np.empty(shape, dtype)
        return np.lib.format.open_memmap(self.path / f"{name}.npy", "w+", dtype, shape)

    def drop(self, name: str) -> None:
        (self.path / f"{name}.npy").unlink(missing_ok=True)


def tier_counts(n_neg: int) -> list[int]:
    """Upstream's default: n_neg // 4 per tier, the remainder one each from tier 1."""
    counts = [n_neg // 4] * 4
    for t in range(n_neg % 4):
        counts[t] += 1
    return counts


# NOTE [blocks, one stream]
# The dataset is generated block by block (BLOCK_BYTES of rows) into file-backed arrays and written from
# them, so owned memory stays bounded at any size; the bytes equal those of the first version, which
# made each tensor whole in memory. Two facts make that so: numpy's generators give the same numbers
# for one draw of n values as for draws of its blocks in turn; and where the first version drew all of
# one array before the next (the negatives' two tiers, then their picks), ``_fork`` copies the stream's
# state at each draw's start and the stream is run past it, so the blocks of all three are drawn together.
# tests/tools/test_synth.py checks the bytes against hashes recorded from the first version.


def synth_dataset(
    out_dir: str | os.PathLike,
    n_pairs: int = 2000,
    dim: int = 64,
    n_neg: int = 8,
    seed: int = 0,
    *,
    n_clusters: int | None = None,
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    progress: bool = False,
) -> Path:
    """Write an upstream-layout dataset of ``n_pairs`` pairs to ``out_dir`` and return it.

    Made in blocks through file-backed arrays: owned memory grows by ~160 bytes a pair (ids, splits and
    keyword ids in memory), not with the tensors' size."""
    if n_pairs < 1 or dim < 1 or n_neg < 1:
        raise ValueError("n_pairs, dim and n_neg must be positive")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    n_q = max(1, int(n_pairs * QUESTIONS_PER_PAIR))
    n_c = n_clusters or int(min(256, max(2, round(math.sqrt(n_q) / 2))))
    n_s = max(n_c, int(n_pairs * SOURCES_PER_PAIR))
    n_k = 10 * n_c
    log.info("writing %d pairs (D=%d, n_neg=%d) to %s", n_pairs, dim, n_neg, out)
    f32 = np.float32
    rows = n_q + n_s + n_k + 3 * n_pairs
    with (
        PTWriter(out) as writer,
        _Scratch(out) as scratch,
        tqdm(total=rows, unit="row", unit_scale=True, desc="synth", disable=not progress) as bar,
    ):

        def save(name: str, array: np.ndarray) -> None:
            writer.write_tensor(name, array)
            scratch.drop(name)

        centroids = _unit(rng.standard_normal((n_c, dim), dtype=f32))
        q_cluster = rng.integers(n_c, size=n_q)
        s_cluster = np.concatenate([np.arange(n_c), rng.integers(n_c, size=n_s - n_c)])
        k_cluster = np.arange(n_k) % n_c
        questions = _clustered(rng, centroids, q_cluster, 0.75, scratch.array("question_embs", (n_q, dim), f32), bar)
        save("question_embs", questions)
        save(
            "source_embs",
            _clustered(rng, centroids, s_cluster, 0.75, scratch.array("source_embs", (n_s, dim), f32), bar),
        )
        keywords = _clustered(rng, centroids, k_cluster, 0.6, np.empty((n_k, dim), f32), bar)
        save("keyword_embs", keywords)
        save("centroid_embs", centroids)

        # Pairs: every question at least once, each with a source of its own cluster.
        q = np.concatenate([np.arange(min(n_q, n_pairs)), rng.integers(n_q, size=max(0, n_pairs - n_q))])
        q = rng.permutation(q)
        c = q_cluster[q]
        src_sorted = np.argsort(s_cluster, kind="stable")
        src_counts = np.bincount(s_cluster, minlength=n_c)
        src_starts = np.concatenate([[0], np.cumsum(src_counts)[:-1]])
        s = _pick_in_cluster(rng.random(n_pairs), src_sorted, src_starts, src_counts, c)
        index = scratch.array("pair_index", (n_pairs, 2), np.int64)
        index[:, 0], index[:, 1] = q, s
        save("pair_index", index)
        save("pair_cluster_id", c)

        # Keyword ids: 0..5 distinct keywords of the pair's cluster, sorted; steering from the same blocks.
        kw_per_cluster = n_k // n_c
        n_kw = rng.integers(0, MAX_KEYWORDS_PER_PAIR + 1, size=n_pairs)
        keyword_values: list[np.ndarray] = []  # CSR: the ids of each block's pairs, and their counts
        keyword_counts = np.zeros(n_pairs + 1, np.int64)
        steer_c, steer_k, steer_r = (scratch.array(n, (n_pairs, dim), f32) for n in STEERING)
        distances = scratch.array("centroid_distances", (n_pairs,), f32)
        for sl in _blocks(n_pairs, dim):
            kw = c[sl, None] + n_c * rng.integers(kw_per_cluster, size=(sl.stop - sl.start, MAX_KEYWORDS_PER_PAIR))
            valid = np.arange(MAX_KEYWORDS_PER_PAIR)[None, :] < n_kw[sl, None]
            kw = np.sort(np.where(valid, kw, n_k), axis=1)
            m = (kw < n_k) & np.concatenate([np.ones((len(kw), 1), bool), kw[:, 1:] != kw[:, :-1]], axis=1)
            keyword_values.append(kw[m])
            keyword_counts[sl.start + 1 : sl.stop + 1] = m.sum(1)
            qv, cv = questions[q[sl]], centroids[c[sl]]
            steer_c[sl] = _unit(cv - qv)
            steer_r[sl] = qv - cv
            kw_mean = (keywords[np.minimum(kw, n_k - 1)] * m[..., None]).sum(1) / np.maximum(m.sum(1), 1)[:, None]
            steer_k[sl] = np.where(m.any(1)[:, None], _unit(kw_mean), steer_c[sl])  # upstream's "centroid" fallback
            distances[sl] = np.clip(1 - (qv * cv).sum(1), 0, 2)
            bar.update(sl.stop - sl.start)
        del questions
        scratch.drop("question_embs")
        for name, array in zip(STEERING, (steer_c, steer_k, steer_r)):
            save(name, array)
        save("centroid_distances", distances)
        writer.write_keyword_ids(np.concatenate(keyword_values), np.cumsum(keyword_counts))
        del keyword_values

        # Negatives in tier blocks: in-cluster, adjacent cluster, other cluster, random other cluster.
        tiers_n = tier_counts(n_neg)
        others = max(1, n_c - 1)
        tier_draws = []
        for t in (2, 3):  # each tier's draw replayed block by block beside the picks (NOTE [blocks, one stream])
            tier_draws.append(_fork(rng))
            for sl in _blocks(n_pairs, dim):
                rng.integers(others, size=(sl.stop - sl.start, tiers_n[t]))
        negatives = scratch.array("hard_negatives", (n_pairs, n_neg), np.int64)
        tiers = scratch.array("negative_tiers", (n_pairs, n_neg), np.int64)
        tier_row = np.repeat(np.arange(1, 5), tiers_n)
        for sl in _blocks(n_pairs, dim):
            b, cb = sl.stop - sl.start, c[sl, None]
            neg_cluster = np.concatenate(
                [
                    np.repeat(cb, tiers_n[0], 1),
                    np.repeat((cb + 1) % n_c, tiers_n[1], 1),
                    *((cb + 1 + g.integers(others, size=(b, tiers_n[t]))) % n_c for g, t in zip(tier_draws, (2, 3))),
                ],
                axis=1,
            )
            neg = _pick_in_cluster(rng.random((b, n_neg)), src_sorted, src_starts, src_counts, neg_cluster)
            clash = neg == s[sl, None]
            neg[clash] = (neg[clash] + 1) % n_s
            negatives[sl], tiers[sl] = neg, tier_row
            bar.update(b)
        save("hard_negatives", negatives)
        save("negative_tiers", tiers)

        # Question-level split: a question never crosses splits.
        order = rng.permutation(n_q)
        n_train = int(round(split_ratios[0] * n_q))
        n_val = int(round(split_ratios[1] * n_q))
        split_of_q = np.empty(n_q, np.int64)
        split_of_q[order[:n_train]], split_of_q[order[n_train : n_train + n_val]] = 0, 1
        split_of_q[order[n_train + n_val :]] = 2
        pair_split = split_of_q[q]
        for i, name in enumerate(("train", "val", "test")):
            writer.write_split(name, np.flatnonzero(pair_split == i))
        relevance = scratch.array("pair_relevance", (n_pairs,), f32)
        for sl in _blocks(n_pairs, dim):
            relevance[sl] = rng.uniform(0.5, 1.0, sl.stop - sl.start)
            bar.update(sl.stop - sl.start)
        save("pair_relevance", relevance)
        writer.write_config(_config(dim, n_neg, split_ratios, n_pairs, n_q, n_s, n_k, n_c, seed))
    write_pt_checksums(out)  # NOTE [PT checksum sidecar]: first-touch reads then cover the PT files too
    return out


def _config(
    dim: int,
    n_neg: int,
    split_ratios: tuple[float, float, float],
    n_pairs: int,
    n_q: int,
    n_s: int,
    n_k: int,
    n_c: int,
    seed: int,
) -> dict[str, Any]:
    return {
        "embedding_dim": dim,
        "n_neg": n_neg,
        "clustering_source": "synthetic",
        "split_ratios": list(split_ratios),
        "steering_probabilities": {"zero": 0.25, "centroid": 0.25, "keyword": 0.25, "residual": 0.25},
        "curriculum": {"mode": "linear", "start_distance": 0.3, "end_distance": 0.7, "warmup_epochs": 10},
        "n_pairs": n_pairs,
        "n_questions": n_q,
        "n_sources": n_s,
        "n_keywords": n_k,
        "n_clusters": n_c,
        "storage_format": "pt",
        "include_inspection_file": False,
        "random_seed": seed,
        "csv_splits": None,
    }
