#!/usr/bin/env python
"""Accuracy of 16-bit storage: what float16 and bfloat16 do to the values a steering model learns from.

    python scripts/precision_accuracy.py                 # synthetic + offline text embeddings, ~1-2 minutes
    python scripts/precision_accuracy.py --pairs 20000 --text-pairs 20000

For each precision: the largest absolute (and relative) error of a stored value; the change in cosine
similarity between each pair's question and its source, and between the question and each hard negative;
and how often a negative changes sides of the source (the source-vs-negative order a contrastive loss learns
from). Values go through ``formats.precision.encode`` / ``decode``, the functions every writer and reader uses
(tests/formats/test_precision.py: bit-equal to torch's casts and to the files of every conversion path).

Data:
1. synthetic: ``jasper-ray synth`` (clustered unit vectors, D=768, 12 negatives per pair);
2. real text, embedded offline: no pretrained model can be downloaded here, so the text embeddings are LSA
   (TF-IDF of words, randomized SVD to D=384, unit length) of the docstrings of the Python packages installed
   in this environment: question = a docstring's first line, source = the rest of it, hard negatives = the 12
   other sources nearest the question. Real text and real nearest-neighbour structure; not a neural model.
"""

from __future__ import annotations

import argparse
import ast
import re
import shutil
import sys
import sysconfig
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's jasper_ray
from _bench_common import print_table, record, setup_logging  # noqa: E402

from jasper_ray.formats.precision import RELATIVE_ERROR, decode, encode  # noqa: E402

PRECISIONS = ("float16", "bfloat16")
N_NEG = 12
WORD = re.compile(r"[a-z][a-z0-9_]{2,}")


def round_trip(x: np.ndarray, precision: str) -> np.ndarray:
    return decode(encode(x, precision))


def cosines(q: np.ndarray, s: np.ndarray, negs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos(question, source) per pair and cos(question, negative) per pair and negative, in float64."""
    q, s, negs = (a.astype(np.float64) for a in (q, s, negs))
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    sn = s / np.linalg.norm(s, axis=1, keepdims=True)
    nn = negs / np.linalg.norm(negs, axis=2, keepdims=True)
    return (qn * sn).sum(1), np.einsum("pd,pnd->pn", qn, nn)


def measure(name: str, tables: dict[str, np.ndarray], q: np.ndarray, s: np.ndarray, negs: np.ndarray) -> list[list]:
    """One row per precision: errors over ``tables``, cosine changes over (q, s, negs)."""
    pos32, neg32 = cosines(q, s, negs)
    margin32 = pos32[:, None] - neg32
    rows = []
    for precision in PRECISIONS:
        abs_err = max(float(np.abs(round_trip(t, precision) - t).max()) for t in tables.values() if t.size)
        rel = max(
            float((np.abs(round_trip(t, precision) - t) / np.maximum(np.abs(t), 1e-30))[np.abs(t) > 6.2e-5].max())
            for t in tables.values()
            if t.size
        )
        pos, neg = cosines(round_trip(q, precision), round_trip(s, precision), round_trip(negs, precision))
        d_pos, d_neg = np.abs(pos - pos32), np.abs(neg - neg32)
        margin = pos[:, None] - neg
        flips = float(((np.sign(margin) != np.sign(margin32)) & (margin32 != 0)).mean())
        close = float((np.abs(margin32) < 1e-3).mean())
        record(
            "precision_accuracy",
            data=name,
            precision=precision,
            max_abs_error=abs_err,
            max_rel_error=rel,
            cos_source_max=float(d_pos.max()),
            cos_source_mean=float(d_pos.mean()),
            cos_negative_max=float(d_neg.max()),
            cos_negative_mean=float(d_neg.mean()),
            order_flips=flips,
        )
        rows.append(
            [
                name,
                precision,
                f"{abs_err:.2e}",
                f"{rel:.2e} (bound {RELATIVE_ERROR[precision]:.2e})",
                f"{d_pos.max():.1e} / {d_pos.mean():.1e}",
                f"{d_neg.max():.1e} / {d_neg.mean():.1e}",
                f"{100 * flips:.3f}% ({100 * close:.3f}% within 1e-3)",
            ]
        )
    return rows


def synthetic(pairs: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    from jasper_ray.formats import open_dataset
    from jasper_ray.schema import TENSORS
    from jasper_ray.tools.synth import synth_dataset

    work = Path(tempfile.mkdtemp(prefix="precision-accuracy-"))
    try:
        reader = open_dataset(synth_dataset(work / "ds", pairs, 768, N_NEG, seed=seed), "pt", use_mmap=False)
        tables = {s.name: np.array(reader.read(s.name)) for s in TENSORS if s.reducible}
        index, negatives = reader.read("pair_index"), reader.read("hard_negatives")
        sources = tables["source_embs"]
        return tables, tables["question_embs"][index[:, 0]], sources[index[:, 1]], sources[negatives]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def docstring_pairs(limit: int) -> list[tuple[str, str]]:
    """(first line, rest) of docstrings in the installed packages' sources, deduplicated, at most ``limit``."""
    root = Path(sysconfig.get_paths()["purelib"])
    found: dict[str, str] = {}
    for path in sorted(root.rglob("*.py")):
        if len(found) >= limit:
            break
        try:
            tree = ast.parse(path.read_text(errors="ignore"))
        except (SyntaxError, ValueError, RecursionError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
                doc = ast.get_docstring(node)
                if not doc:
                    continue
                head, _, body = doc.strip().partition("\n")
                if len(WORD.findall(head.lower())) >= 4 and len(WORD.findall(body.lower())) >= 20:
                    found.setdefault(head.strip(), body)
    return list(found.items())[:limit]


def lsa(texts_a: list[str], texts_b: list[str], dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """TF-IDF (words, sublinear tf) of both lists fitted on both, randomized SVD to ``dim``, unit rows."""
    from scipy import sparse

    docs = [Counter(WORD.findall(t.lower())) for t in texts_a + texts_b]
    df = Counter(w for d in docs for w in d)
    vocab = {w: i for i, w in enumerate(sorted(w for w, n in df.items() if n >= 2))}
    idf = np.log(len(docs) / np.array([df[w] for w in sorted(vocab)], dtype=np.float64)) + 1
    rows, cols, vals = [], [], []
    for r, d in enumerate(docs):
        for w, n in d.items():
            if w in vocab:
                rows.append(r)
                cols.append(vocab[w])
                vals.append((1 + np.log(n)) * idf[vocab[w]])
    x = sparse.csr_matrix((vals, (rows, cols)), shape=(len(docs), len(vocab)))
    x = sparse.diags(1 / np.sqrt(np.asarray(x.multiply(x).sum(1)).ravel() + 1e-12)) @ x
    rng = np.random.default_rng(seed)
    basis = x.T @ rng.standard_normal((x.shape[0], dim + 16))  # range of x^T: the word space
    for _ in range(2):  # power iterations
        basis, _ = np.linalg.qr(x.T @ (x @ basis))
    basis, _ = np.linalg.qr(basis)
    u, _, vt = np.linalg.svd(x @ basis, full_matrices=False)
    emb = (x @ basis) @ vt[:dim].T
    emb /= np.linalg.norm(emb, axis=1, keepdims=True) + 1e-12
    emb = emb.astype(np.float32)
    return emb[: len(texts_a)], emb[len(texts_a) :]


def text_embeddings(pairs: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    found = docstring_pairs(pairs)
    q, s = lsa([a for a, _ in found], [b for _, b in found], 384, seed)
    negatives = np.empty((len(q), N_NEG), dtype=np.int64)
    for a in range(0, len(q), 1000):  # the nearest other sources to each question
        sims = q[a : a + 1000] @ s.T
        sims[np.arange(len(sims)), np.arange(a, a + len(sims))] = -np.inf
        top = np.argpartition(-sims, N_NEG, axis=1)[:, :N_NEG]
        negatives[a : a + len(sims)] = top
    return {"question_embs": q, "source_embs": s}, q, s, s[negatives]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=20000, help="synthetic pairs (default 20000)")
    parser.add_argument("--text-pairs", type=int, default=10000, help="docstring pairs at most (default 10000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    setup_logging()
    rows = measure(f"synthetic ({args.pairs} pairs, D=768)", *synthetic(args.pairs, args.seed))
    tables, q, s, negs = text_embeddings(args.text_pairs, args.seed)
    rows += measure(f"text, LSA of docstrings ({len(q)} pairs, D=384)", tables, q, s, negs)
    print_table(
        "Accuracy of 16-bit storage",
        [
            "data",
            "precision",
            "max abs error",
            "max relative error",
            "cos(question, source): max / mean change",
            "cos(question, negative): max / mean change",
            "negatives changing sides of the source",
        ],
        rows,
        notes=[
            "errors over every value of the embedding tables (synthetic: and the steering vectors); relative "
            "errors over values of float16's normal range (|x| >= 6.1e-5)",
            "cosines in float64 from the decoded float32 values; a negative changes sides when the sign of "
            "cos(q, source) - cos(q, negative) differs from float32's; in brackets: the share of (pair, negative) "
            "whose float32 gap is under 1e-3 (the close calls: no other can change sides at these errors)",
            "text embeddings: LSA, not a pretrained model (none can be downloaded here); unit vectors as "
            "sentence-transformer embeddings are",
        ],
        align="llrrrrr",
    )


if __name__ == "__main__":
    main()
