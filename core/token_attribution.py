"""Token-level Integrated Gradients of the retrieval score s(q, p) = pooled(q) · pooled(p): the API and its caching.

Method of Yuksel & Kamps 2025 (arXiv 2501.14459): the baseline keeps [CLS]/[SEP] and replaces every
other token by [PAD]; the other tower's embedding stays fixed. IG runs over the word-embedding output and a
token's attribution is the sum over the embedding dimension. IG is linear in the target, so the query
attribution summed over the top-k passages is one run on pooled(q) · Σ_i e_i.

Step counts are chosen per input by the completeness delta (adaptive quadrature): every input is first
integrated with START_STEPS nodes placed by a sinh substitution of the path variable, and only inputs whose
delta is above DELTA_TOLERANCE are run again with the plain rule at n_steps. Each TokenAttribution records
the rule it was computed with. The parts live in core.attribution; results are cached per (query, passage).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .attribution import AttributionError
from .attribution.deletion import DeletionCurve
from .attribution.deletion import deletion_curve as _deletion_curve
from .attribution.integrated_gradients import (
    Progress,
    attribute_adaptively,
    encode_inputs,
    pad_baseline,
    require_queries,
)
from .attribution.quadrature import METHODS, Quadrature, SinhSubstitution
from .attribution.results import (
    DELTA_TOLERANCE,
    PairAttribution,
    RankingAttribution,
    Token,
    TokenAttribution,
    Word,
    cloud_weights,
    is_stopword,
    token_rows,
    word_sums,
)
from .cache import Analysis, ResultCache, cache_key
from .corpus import Corpus
from .index import PASSAGE_MAX_LENGTH
from .pair import Encoder
from .runtime import model_scheduler

__all__ = [
    "DEFAULT_METHOD",
    "DEFAULT_STEPS",
    "DELTA_TOLERANCE",
    "METHODS",
    "START_STEPS",
    "TOP_K",
    "AttributionError",
    "DeletionCurve",
    "IGSettings",
    "PairAttribution",
    "Quadrature",
    "RankingAttribution",
    "RankingEntries",
    "SinhSubstitution",
    "Token",
    "TokenAttribution",
    "Word",
    "attribute_pair",
    "attribute_passages",
    "attribute_queries",
    "attribute_ranking",
    "cached_deletion_curve",
    "cached_pair",
    "cached_ranking",
    "cloud_weights",
    "deletion_curve",
    "is_stopword",
    "pad_baseline",
    "passage_embeddings",
    "ranking_params",
    "ranking_parts",
    "token_rows",
    "word_sums",
]

Side = Literal["query", "passage"]
# The smallest Gauss-Legendre step count with delta < DELTA_TOLERANCE on all 20 typical (description query,
# article) pairs, both sides, both offline models (python -m bench.token_ig --sweep; bench/results_token_ig.md).
DEFAULT_STEPS = 20
DEFAULT_METHOD = "gausslegendre"
# First pass of the adaptive quadrature (inputs above DELTA_TOLERANCE are re-run with the plain rule at n_steps).
# Plain Gauss-Legendre at 6-8 steps missed the tolerance on 23-25 of the top-25 passages; with the sinh
# substitution, 12 steps had smaller deltas and token errors than plain 20 on both offline models
# (python -m bench.token_ig --sweep; bench/results_token_ig.md).
START_STEPS = 12
TOP_K = 25

# Per item where results are per item: a (query, passage) pair is found again whatever the ranking it came in.
PAIR = Analysis("token_ig_pair", 3, ("model", "query", "title", "text", "settings"), PairAttribution)
QUERY_TOTAL = Analysis(
    "token_ig_query_total", 3, ("model", "corpus", "query", "passages", "settings"), TokenAttribution
)
DELETION = Analysis(
    "token_ig_deletion",
    3,
    ("model", "query", "title", "text", "side", "k_max", "random_orders", "seed", "settings"),
    DeletionCurve,
)


@dataclass(frozen=True)
class IGSettings:
    """n_steps and method: the full rule. start_steps (None: no first pass) and start_substitution: the adaptive
    first pass; inputs whose delta is above DELTA_TOLERANCE after it are re-run with the full rule."""

    n_steps: int = DEFAULT_STEPS
    method: str = DEFAULT_METHOD
    passage_max_length: int = PASSAGE_MAX_LENGTH
    start_steps: int | None = START_STEPS
    start_substitution: SinhSubstitution | None = SinhSubstitution()

    def __post_init__(self):
        if self.method not in METHODS:
            raise AttributionError(f"Unknown integration method {self.method!r}; choose one of {', '.join(METHODS)}.")
        if not 1 <= self.n_steps <= 512:
            raise AttributionError("The number of IG steps must be between 1 and 512.")
        if self.start_steps is not None and not 1 <= self.start_steps <= 512:
            raise AttributionError("The adaptive start step count must be between 1 and 512.")
        for quadrature in self.passes:  # a rule that cannot be built fails here, not inside an analysis
            quadrature.rule()

    @property
    def passes(self) -> tuple[Quadrature, ...]:
        """Each input stops at the first pass whose delta is within tolerance (or is flagged after the last)."""
        full = Quadrature(self.n_steps, self.method)
        if self.start_steps is None or self.start_steps >= self.n_steps:
            return (full,)
        return Quadrature(self.start_steps, self.method, self.start_substitution), full

    def params(self) -> dict:
        start = self.passes[0] if len(self.passes) > 1 else None
        return {
            "n_steps": self.n_steps,
            "method": self.method,
            "passage_max_length": self.passage_max_length,
            "start_steps": start.n_steps if start else None,
            "start_substitution": [start.substitution.center, start.substitution.width]
            if start and start.substitution
            else None,
        }


def attribute_queries(
    encoder: Encoder,
    queries: Sequence[str],
    others: np.ndarray,
    settings: IGSettings = IGSettings(),
    passes: Sequence[Quadrature] | None = None,
) -> list[TokenAttribution]:
    """Query-side IG of pooled(q_n) · others[n] (others: fixed passage embeddings or their sum).

    passes replaces settings.passes (one pass: every input with that rule, as the completeness sweeps need).
    """
    require_queries(queries)
    tower = encoder.query
    return attribute_adaptively(
        tower,
        lambda rows: encode_inputs(tower, [queries[i] for i in rows], None, None),
        [(query,) for query in queries],
        torch.as_tensor(np.asarray(others, dtype=np.float32)),
        passes or settings.passes,
    )


def attribute_passages(
    encoder: Encoder,
    titles: Sequence[str],
    texts: Sequence[str],
    query_vector: np.ndarray,
    settings: IGSettings = IGSettings(),
    progress: Progress | None = None,
    passes: Sequence[Quadrature] | None = None,
) -> list[TokenAttribution]:
    """Passage-side IG of pooled(q) · pooled(title, text) for each passage, batched by length.

    passes replaces settings.passes (one pass: every input with that rule, as the completeness sweeps need).
    """
    tower = encoder.context
    vector = torch.as_tensor(np.asarray(query_vector, dtype=np.float32)).reshape(1, -1)
    return attribute_adaptively(
        tower,
        lambda rows: encode_inputs(
            tower, [titles[i] for i in rows], [texts[i] for i in rows], settings.passage_max_length
        ),
        list(zip(titles, texts)),
        vector.expand(len(titles), -1),
        passes or settings.passes,
        progress,
    )


def attribute_pair(
    encoder: Encoder, query: str, title: str, text: str, settings: IGSettings = IGSettings()
) -> PairAttribution:
    require_queries([query])
    query_vector = encoder.encode_queries([query])[0]
    passage_vector = passage_embeddings(encoder, [title], [text], settings)
    return PairAttribution(
        attribute_queries(encoder, [query], passage_vector, settings)[0],
        attribute_passages(encoder, [title], [text], query_vector, settings)[0],
    )


def ranking_parts(
    encoder: Encoder,
    query: str,
    titles: Sequence[str],
    texts: Sequence[str],
    with_total: bool,
    pair_rows: Sequence[int],
    settings: IGSettings,
    progress: Progress | None = None,
) -> tuple[TokenAttribution | None, list[PairAttribution]]:
    """The query attribution summed over all the passages (if with_total; one IG run) and the pairs of the
    passages at pair_rows, batched.

    progress(done, total) counts the total's run, the per-passage query runs as one step, and the passage runs
    (re-runs at more steps add to the total).
    """
    require_queries([query])
    steps = int(with_total) + (1 if pair_rows else 0)
    total_steps = len(pair_rows) + steps
    rows = list(range(len(titles))) if with_total else list(pair_rows)
    embeddings = dict(
        zip(rows, passage_embeddings(encoder, [titles[i] for i in rows], [texts[i] for i in rows], settings))
    )
    query_total = None
    if with_total:
        summed = np.stack([embeddings[i] for i in rows]).sum(0, keepdims=True)
        query_total = attribute_queries(encoder, [query], summed, settings)[0]
        if progress:
            progress(1, total_steps)
    if not pair_rows:
        return query_total, []
    per_passage_query = attribute_queries(
        encoder, [query] * len(pair_rows), np.stack([embeddings[i] for i in pair_rows]), settings
    )
    if progress:
        progress(steps, total_steps)
    passages = attribute_passages(
        encoder,
        [titles[i] for i in pair_rows],
        [texts[i] for i in pair_rows],
        encoder.encode_queries([query])[0],
        settings,
        progress=(lambda done, runs: progress(done + steps, runs + steps)) if progress else None,
    )
    return query_total, [PairAttribution(q, p) for q, p in zip(per_passage_query, passages)]


def attribute_ranking(
    encoder: Encoder,
    query: str,
    titles: Sequence[str],
    texts: Sequence[str],
    passage_indices: Sequence[int],
    settings: IGSettings = IGSettings(),
    progress: Progress | None = None,
) -> RankingAttribution:
    """Query attribution summed over the passages (one IG run), per-passage query and passage attributions.

    progress(done, total) counts passage runs (re-runs at more steps add to the total); the query runs count as
    one step each.
    """
    if not titles:
        raise AttributionError("There are no passages to attribute.")
    query_total, pairs = ranking_parts(encoder, query, titles, texts, True, range(len(titles)), settings, progress)
    return RankingAttribution(tuple(int(i) for i in passage_indices), query_total, tuple(pairs))


def passage_embeddings(
    encoder: Encoder, titles: Sequence[str], texts: Sequence[str], settings: IGSettings
) -> np.ndarray:
    """The fixed other-tower embeddings, computed once per analysis (never per IG step)."""
    # Length-sorted batches of 8: one batch of the top 25 was ~40% padding (every passage padded to the longest).
    return encoder.encode_passages(titles, texts, max_length=settings.passage_max_length, batch_size=8)


def _pair_key(encoder: Encoder, query: str, title: str, text: str, settings: IGSettings) -> dict:
    return {"model": encoder.fingerprint, "query": query, "title": title, "text": text, "settings": settings.params()}


def cached_pair(
    cache: ResultCache, encoder: Encoder, query: str, title: str, text: str, settings: IGSettings = IGSettings()
) -> PairAttribution:
    return PAIR.get_or_compute(
        cache,
        lambda: attribute_pair(encoder, query, title, text, settings),
        **_pair_key(encoder, query, title, text, settings),
    )


def ranking_params(
    encoder: Encoder, corpus: Corpus, query: str, passage_indices: Sequence[int], settings: IGSettings
) -> dict:
    """The request of one ranking analysis (passages in rank order): identical requests share one job."""
    return {
        "model": encoder.fingerprint,
        "corpus": corpus.fingerprint,
        "query": query,
        "passages": [int(i) for i in passage_indices],
        **settings.params(),
    }


@dataclass(frozen=True)
class RankingEntries:
    """The cache entries a ranking is assembled from: the query total, kept under the set of passages, and one
    pair per passage, found again whatever ranking it came in."""

    total_key: dict
    pair_keys: tuple[dict, ...]

    @classmethod
    def of(
        cls, encoder: Encoder, corpus: Corpus, query: str, passage_indices: Sequence[int], settings: IGSettings
    ) -> RankingEntries:
        indices = [int(i) for i in passage_indices]
        total_key = {
            "model": encoder.fingerprint,
            "corpus": corpus.fingerprint,
            "query": query,
            "passages": sorted(set(indices)),
            "settings": settings.params(),
        }
        pair_keys = tuple(_pair_key(encoder, query, corpus.titles[i], corpus.texts[i], settings) for i in indices)
        return cls(total_key, pair_keys)

    def stored(self, cache: ResultCache) -> tuple[TokenAttribution | None, list[PairAttribution | None]]:
        return QUERY_TOTAL.lookup(cache, **self.total_key), [PAIR.lookup(cache, **key) for key in self.pair_keys]

    def store(
        self, cache: ResultCache, query_total: TokenAttribution | None, pairs: dict[int, PairAttribution]
    ) -> None:
        """Computed parts: the query total (None: not computed) and the pairs by rank position."""
        if query_total is not None:
            cache.set(QUERY_TOTAL.namespace, QUERY_TOTAL.key(self.total_key), query_total)
        for position, pair in pairs.items():
            cache.set(PAIR.namespace, PAIR.key(self.pair_keys[position]), pair)


def cached_ranking(
    cache: ResultCache,
    encoder: Encoder,
    corpus: Corpus,
    query: str,
    passage_indices: Sequence[int],
    settings: IGSettings = IGSettings(),
    progress: Progress | None = None,
) -> RankingAttribution:
    """The ranking assembled from per-item cache entries; only the missing ones are computed, in one batched run.

    A reordered top-k, or one sharing passages with an earlier one, reuses their pairs; the query total is
    kept under the set of passages.
    """
    indices = [int(i) for i in passage_indices]
    if not indices:
        raise AttributionError("There are no passages to attribute.")
    titles, texts = [corpus.titles[i] for i in indices], [corpus.texts[i] for i in indices]
    entries = RankingEntries.of(encoder, corpus, query, indices, settings)

    def assembled(query_total: TokenAttribution, pairs: Sequence[PairAttribution]) -> RankingAttribution:
        return RankingAttribution(tuple(indices), query_total, tuple(pairs))

    query_total, pairs = entries.stored(cache)
    if query_total is not None and None not in pairs:
        return assembled(query_total, pairs)

    def compute_missing() -> RankingAttribution:
        query_total, pairs = entries.stored(cache)  # a job that finished while this one was queued may have stored some
        missing = [n for n, pair in enumerate(pairs) if pair is None]
        computed_total, computed = ranking_parts(
            encoder, query, titles, texts, query_total is None, missing, settings, progress
        )
        entries.store(cache, computed_total, dict(zip(missing, computed)))
        for n, pair in zip(missing, computed):
            pairs[n] = pair
        return assembled(query_total if computed_total is None else computed_total, pairs)

    request = cache_key("token_ig_ranking", ranking_params(encoder, corpus, query, indices, settings))
    return model_scheduler().run(compute_missing, key=f"{cache.directory}|{request}")


def deletion_curve(
    encoder: Encoder,
    pair: PairAttribution,
    side: Side,
    k_max: int = 10,
    random_orders: int = 3,
    seed: int = 0,
    settings: IGSettings = IGSettings(),
) -> DeletionCurve:
    """Replace the k most attributed tokens (or k random ones) of one side by [PAD], k = 0..K, and rescore.

    K = min(k_max, number of non-special tokens). The other side's embedding stays fixed.
    """
    query, title, text = pair.query.segments[0], *pair.passage.segments
    if side == "query":
        tower, attribution = encoder.query, pair.query
        batch = encode_inputs(tower, [query], None, None)
        other = passage_embeddings(encoder, [title], [text], settings)[0]
    elif side == "passage":
        tower, attribution = encoder.context, pair.passage
        batch = encode_inputs(tower, [title], [text], settings.passage_max_length)
        other = encoder.encode_queries([query])[0]
    else:
        raise AttributionError(f"side must be 'query' or 'passage', not {side!r}")
    return _deletion_curve(tower, batch, attribution, other, side, k_max, random_orders, seed)


def cached_deletion_curve(
    cache: ResultCache,
    encoder: Encoder,
    pair: PairAttribution,
    side: Side,
    k_max: int = 10,
    random_orders: int = 3,
    seed: int = 0,
    settings: IGSettings = IGSettings(),
) -> DeletionCurve:
    query, title, text = pair.query.segments[0], *pair.passage.segments
    return DELETION.get_or_compute(
        cache,
        lambda: deletion_curve(encoder, pair, side, k_max, random_orders, seed, settings),
        model=encoder.fingerprint,
        query=query,
        title=title,
        text=text,
        side=side,
        k_max=k_max,
        random_orders=random_orders,
        seed=seed,
        settings=settings.params(),
    )
