"""Retrieval quality on labelled queries: recall@k, MRR@10, nDCG@10, with bootstrap intervals."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .cache import ResultCache
from .corpus import Corpus, LabelledQuery
from .index import DenseIndex, load_index
from .pair import Encoder

RECALL_AT = (1, 5, 10, 100)
DEPTH = 100


def per_query_metrics(ranked: np.ndarray, relevant: Sequence[frozenset[int]]) -> dict[str, np.ndarray]:
    """Per-query metric values from a (queries x depth) array of ranked passage indices."""
    hits = np.array([[index in gold for index in row] for row, gold in zip(ranked, relevant)], dtype=bool)
    first = np.where(hits.any(1), hits.argmax(1), -1)
    metrics = {f"R@{k}": hits[:, :k].any(1).astype(float) for k in RECALL_AT if k <= hits.shape[1]}
    metrics["MRR@10"] = np.where((first >= 0) & (first < 10), 1.0 / (first + 1), 0.0)
    discounts = 1.0 / np.log2(np.arange(2, 12))
    depth = min(10, hits.shape[1])
    dcg = (hits[:, :depth] * discounts[:depth]).sum(1)
    ideal = np.array([discounts[: min(len(gold), depth)].sum() for gold in relevant])
    metrics["nDCG@10"] = dcg / np.maximum(ideal, 1e-12)
    return metrics


def bootstrap_interval(values: np.ndarray, samples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


@dataclass(frozen=True)
class Evaluation:
    model: str
    queries: int
    means: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    per_query: dict[str, list[float]]
    ranked: list[list[int]]


def evaluate_ranked(label: str, ranked: np.ndarray, queries: Sequence[LabelledQuery]) -> Evaluation:
    values = per_query_metrics(ranked, [q.relevant for q in queries])
    return Evaluation(
        model=label,
        queries=len(queries),
        means={name: float(v.mean()) for name, v in values.items()},
        intervals={name: bootstrap_interval(v) for name, v in values.items()},
        per_query={name: v.tolist() for name, v in values.items()},
        ranked=ranked.tolist(),
    )


def evaluate_encoder(encoder: Encoder, corpus: Corpus, queries: Sequence[LabelledQuery],
                     cache: ResultCache, index: DenseIndex | None = None,
                     progress: Callable[[int, int], None] | None = None) -> Evaluation:
    index = index or load_index(encoder, corpus, cache, progress=progress)
    params = {"index": index.params, "query_model": encoder.fingerprint,
              "queries": [(q.text, sorted(q.relevant)) for q in queries], "depth": DEPTH}

    def compute() -> Evaluation:
        vectors = encoder.encode_queries([q.text for q in queries], batch_size=128)
        _, ranked = index.search(vectors, DEPTH)
        return evaluate_ranked(encoder.label, ranked, queries)

    return cache.get_or_compute("evaluation", params, compute)
