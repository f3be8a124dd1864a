"""Synthetic JASPER datasets in upstream's PT layout, with realistic structure.

Embeddings are unit vectors clustered around centroids (cosine ~0.8 to their
centroid), not white noise, so compression and steering look like real data.
Steering tensors follow upstream's builder formulas; negatives come in tier
blocks (in-cluster, adjacent, other, random) as upstream's miner writes them.
Deterministic for a seed.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..formats.pt import write_pt_dataset

log = logging.getLogger(__name__)

MAX_KEYWORDS_PER_PAIR = 5
QUESTIONS_PER_PAIR = 0.5
SOURCES_PER_PAIR = 0.8
BLOCK_ROWS = 16384
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


def _clustered(rng: np.random.Generator, centroids: np.ndarray, clusters: np.ndarray, spread: float) -> np.ndarray:
    out = np.empty((len(clusters), centroids.shape[1]), dtype=np.float32)
    scale = np.float32(spread / math.sqrt(centroids.shape[1]))
    for a in range(0, len(clusters), BLOCK_ROWS):
        c = clusters[a : a + BLOCK_ROWS]
        noise = rng.standard_normal((len(c), centroids.shape[1]), dtype=np.float32)
        out[a : a + len(c)] = _unit(centroids[c] + scale * noise)
    return out


def _pick_in_cluster(
    rng: np.random.Generator, members_sorted: np.ndarray, starts: np.ndarray, counts: np.ndarray, clusters: np.ndarray
) -> np.ndarray:
    """One random member of each given cluster (every cluster has at least one member)."""
    u = rng.random(clusters.shape)
    return members_sorted[starts[clusters] + (u * counts[clusters]).astype(np.int64)]


def tier_counts(n_neg: int) -> list[int]:
    """Upstream's default: n_neg // 4 per tier, the remainder one each from tier 1."""
    counts = [n_neg // 4] * 4
    for t in range(n_neg % 4):
        counts[t] += 1
    return counts


def synth_dataset(
    out_dir: str | os.PathLike,
    n_pairs: int = 2000,
    dim: int = 64,
    n_neg: int = 8,
    seed: int = 0,
    *,
    n_clusters: int | None = None,
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> Path:
    """Write an upstream-layout dataset of ``n_pairs`` pairs to ``out_dir`` and return it."""
    if n_pairs < 1 or dim < 1 or n_neg < 1:
        raise ValueError("n_pairs, dim and n_neg must be positive")
    rng = np.random.default_rng(seed)
    n_q = max(1, int(n_pairs * QUESTIONS_PER_PAIR))
    n_c = n_clusters or int(min(256, max(2, round(math.sqrt(n_q) / 2))))
    n_s = max(n_c, int(n_pairs * SOURCES_PER_PAIR))
    n_k = 10 * n_c

    centroids = _unit(rng.standard_normal((n_c, dim), dtype=np.float32))
    q_cluster = rng.integers(n_c, size=n_q)
    s_cluster = np.concatenate([np.arange(n_c), rng.integers(n_c, size=n_s - n_c)])
    k_cluster = np.arange(n_k) % n_c
    questions = _clustered(rng, centroids, q_cluster, 0.75)
    sources = _clustered(rng, centroids, s_cluster, 0.75)
    keywords = _clustered(rng, centroids, k_cluster, 0.6)

    # Pairs: every question at least once, each with a source of its own cluster.
    q = np.concatenate([np.arange(min(n_q, n_pairs)), rng.integers(n_q, size=max(0, n_pairs - n_q))])
    q = rng.permutation(q)
    c = q_cluster[q]
    src_sorted = np.argsort(s_cluster, kind="stable")
    src_counts = np.bincount(s_cluster, minlength=n_c)
    src_starts = np.concatenate([[0], np.cumsum(src_counts)[:-1]])
    s = _pick_in_cluster(rng, src_sorted, src_starts, src_counts, c)

    # Keyword ids: 0..5 distinct keywords of the pair's cluster, sorted.
    kw_per_cluster = n_k // n_c
    n_kw = rng.integers(0, MAX_KEYWORDS_PER_PAIR + 1, size=n_pairs)
    kw = c[:, None] + n_c * rng.integers(kw_per_cluster, size=(n_pairs, MAX_KEYWORDS_PER_PAIR))
    valid = np.arange(MAX_KEYWORDS_PER_PAIR)[None, :] < n_kw[:, None]
    kw = np.sort(np.where(valid, kw, n_k), axis=1)
    valid = (kw < n_k) & np.concatenate([np.ones((n_pairs, 1), bool), kw[:, 1:] != kw[:, :-1]], axis=1)
    keyword_ids = [row[m].tolist() for row, m in zip(kw, valid)]

    steer_c = np.empty((n_pairs, dim), np.float32)
    steer_k = np.empty((n_pairs, dim), np.float32)
    steer_r = np.empty((n_pairs, dim), np.float32)
    distances = np.empty(n_pairs, np.float32)
    for a in range(0, n_pairs, BLOCK_ROWS):
        sl = slice(a, a + BLOCK_ROWS)
        qv, cv = questions[q[sl]], centroids[c[sl]]
        steer_c[sl] = _unit(cv - qv)
        steer_r[sl] = qv - cv
        m = valid[sl]
        kw_mean = (keywords[np.minimum(kw[sl], n_k - 1)] * m[..., None]).sum(1) / np.maximum(m.sum(1), 1)[:, None]
        steer_k[sl] = np.where(m.any(1)[:, None], _unit(kw_mean), steer_c[sl])  # upstream's "centroid" fallback
        distances[sl] = np.clip(1 - (qv * cv).sum(1), 0, 2)

    # Negatives in tier blocks: in-cluster, adjacent cluster, other cluster, random other cluster.
    tiers_n = tier_counts(n_neg)
    neg_cluster = np.concatenate(
        [
            np.repeat(c[:, None], tiers_n[0], 1),
            np.repeat(((c + 1) % n_c)[:, None], tiers_n[1], 1),
            (c[:, None] + 1 + rng.integers(max(1, n_c - 1), size=(n_pairs, tiers_n[2]))) % n_c,
            (c[:, None] + 1 + rng.integers(max(1, n_c - 1), size=(n_pairs, tiers_n[3]))) % n_c,
        ],
        axis=1,
    )
    negatives = _pick_in_cluster(rng, src_sorted, src_starts, src_counts, neg_cluster)
    clash = negatives == s[:, None]
    negatives[clash] = (negatives[clash] + 1) % n_s
    tiers = np.repeat(np.repeat(np.arange(1, 5), tiers_n)[None, :], n_pairs, 0)

    # Question-level split: a question never crosses splits.
    order = rng.permutation(n_q)
    n_train = int(round(split_ratios[0] * n_q))
    n_val = int(round(split_ratios[1] * n_q))
    split_of_q = np.empty(n_q, np.int64)
    split_of_q[order[:n_train]], split_of_q[order[n_train : n_train + n_val]], split_of_q[order[n_train + n_val :]] = (
        0,
        1,
        2,
    )
    pair_split = split_of_q[q]
    splits = {name: np.flatnonzero(pair_split == i) for i, name in enumerate(("train", "val", "test"))}

    config: dict[str, Any] = {
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
    tensors = {
        "question_embs": questions,
        "source_embs": sources,
        "keyword_embs": keywords,
        "centroid_embs": centroids,
        "pair_index": np.stack([q, s], 1).astype(np.int64),
        "pair_cluster_id": c.astype(np.int64),
        "pair_relevance": rng.uniform(0.5, 1.0, n_pairs).astype(np.float32),
        "hard_negatives": negatives.astype(np.int64),
        "negative_tiers": tiers.astype(np.int64),
        "steering_centroid": steer_c,
        "steering_keyword_weighted": steer_k,
        "steering_residual": steer_r,
        "centroid_distances": distances,
    }
    log.info("writing %d pairs (D=%d, n_neg=%d) to %s", n_pairs, dim, n_neg, out_dir)
    return write_pt_dataset(out_dir, tensors, keyword_ids, splits, config)
