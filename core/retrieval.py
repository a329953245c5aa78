"""Query -> ranked passages for one model, and how two models' rankings overlap."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .cache import Analysis, ResultCache
from .corpus import Corpus
from .errors import LensError
from .index import DenseIndex
from .pair import Encoder

MAX_K = 100
RETRIEVAL = Analysis("retrieval", version=1, fields=("query_model", "index", "query", "k"), result_type=tuple)
SNIPPET_CHARS = 240
QUERY_BATCH = 128  # queries are short: large batches cost little padding


class QueryError(LensError):
    """A query that cannot be run; the message is meant for the user."""


@dataclass(frozen=True)
class PreparedQuery:
    text: str
    token_count: int
    max_length: int

    @property
    def truncated(self) -> bool:
        return self.token_count > self.max_length


def clean_query(text: str | None) -> str:
    """Drops control characters (keeping ordinary whitespace) and surrounding space."""
    text = text or ""
    kept = "".join(ch if ch in "\t\n" or unicodedata.category(ch) != "Cc" else " " for ch in text)
    return kept.strip()


def prepare_query(encoder: Encoder, text: str | None) -> PreparedQuery:
    cleaned = clean_query(text)
    if not cleaned:
        raise QueryError("Type a query to retrieve passages.")
    return PreparedQuery(cleaned, encoder.query.token_count(cleaned), encoder.query.max_length)


@dataclass(frozen=True)
class Hit:
    rank: int
    index: int
    id: str
    title: str
    score: float
    snippet: str


@dataclass(frozen=True)
class Ranking:
    query: PreparedQuery
    hits: tuple[Hit, ...]

    @property
    def indices(self) -> list[int]:
        return [hit.index for hit in self.hits]


def _snippet(text: str) -> str:
    return text if len(text) <= SNIPPET_CHARS else text[:SNIPPET_CHARS].rsplit(" ", 1)[0] + " …"


def retrieve(
    encoder: Encoder, index: DenseIndex, corpus: Corpus, text: str, k: int = 10, cache: ResultCache | None = None
) -> Ranking:
    if not 1 <= k <= MAX_K:
        raise QueryError(f"top-k must be between 1 and {MAX_K}.")
    query = prepare_query(encoder, text)

    def compute() -> tuple[list[float], list[int]]:
        vector = encoder.encode_queries([query.text])
        scores, indices = index.search(vector, k)
        return scores[0].tolist(), indices[0].tolist()

    scores, indices = RETRIEVAL.get_or_compute(
        cache, compute, query=query.text, k=k, index=index.params, query_model=encoder.fingerprint
    )
    hits = tuple(
        Hit(rank, i, corpus.ids[i], corpus.titles[i], float(s), _snippet(corpus.texts[i]))
        for rank, (s, i) in enumerate(zip(scores, indices), start=1)
        if i >= 0
    )
    return Ranking(query, hits)


def search_queries(
    encoder: Encoder,
    index: DenseIndex,
    texts: Sequence[str],
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Many queries at once: (scores, passage indices), each (queries, k); encoded in length-sorted batches."""
    return index.search(encoder.encode_queries(list(texts), batch_size=QUERY_BATCH), k)


@dataclass(frozen=True)
class Overlap:
    k: int
    shared: frozenset[int]
    jaccard: float
    rank_shift: dict[int, int]  # passage index -> rank in B minus rank in A, for shared passages
    rbo: float

    @property
    def mean_abs_shift(self) -> float:
        return float(np.mean([abs(v) for v in self.rank_shift.values()])) if self.rank_shift else 0.0


def rank_biased_overlap(a: list[int], b: list[int], p: float = 0.9) -> float:
    """Extrapolated RBO (Webber et al. 2010) of two top-k lists of equal depth."""
    depth = min(len(a), len(b))
    if depth == 0:
        return 0.0
    seen_a, seen_b, overlap, total = set(), set(), 0, 0.0
    for d in range(1, depth + 1):
        x, y = a[d - 1], b[d - 1]
        if x == y:
            overlap += 1
        else:
            overlap += (x in seen_b) + (y in seen_a)
        seen_a.add(x)
        seen_b.add(y)
        total += (overlap / d) * p**d
    return float((overlap / depth) * p**depth + (1 - p) / p * total)


def compare_rankings(a: Ranking, b: Ranking) -> Overlap:
    a_idx, b_idx = a.indices, b.indices
    shared = frozenset(a_idx) & frozenset(b_idx)
    union = frozenset(a_idx) | frozenset(b_idx)
    rank_a = {i: r for r, i in enumerate(a_idx, start=1)}
    rank_b = {i: r for r, i in enumerate(b_idx, start=1)}
    return Overlap(
        k=max(len(a_idx), len(b_idx)),
        shared=shared,
        jaccard=len(shared) / len(union) if union else 0.0,
        rank_shift={i: rank_b[i] - rank_a[i] for i in shared},
        rbo=rank_biased_overlap(a_idx, b_idx),
    )
