"""Retrieval quality on labelled queries: recall@k, MRR@10, nDCG@10 with bootstrap intervals, the
paired B - A difference, per-query wins/losses, and a user's JSONL of labelled queries."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cache import Analysis, ResultCache
from .corpus import Corpus, LabelledQuery
from .errors import LensError
from .index import DenseIndex, load_index
from .pair import Encoder, ModelPair
from .retrieval import clean_query, search_queries

RECALL_AT = (1, 5, 10, 100)
DEPTH = 100


def per_query_metrics(ranked: np.ndarray, relevant: Sequence[frozenset[int]]) -> dict[str, np.ndarray]:
    """Per-query metric values from a (queries x depth) array of ranked passage indices."""
    hits = np.array([[index in gold for index in row] for row, gold in zip(ranked, relevant)], dtype=bool)
    first = np.where(hits.any(1), hits.argmax(1), -1)
    metrics = {f"R@{k}": hits[:, :k].any(1).astype(float) for k in RECALL_AT if k <= hits.shape[1]}
    metrics["MRR@10"] = np.where((first >= 0) & (first < 10), 1.0 / np.maximum(first + 1, 1), 0.0)
    discounts = 1.0 / np.log2(np.arange(2, 12))
    depth = min(10, hits.shape[1])
    dcg = (hits[:, :depth] * discounts[:depth]).sum(1)
    ideal = np.array([discounts[: min(len(gold), depth)].sum() for gold in relevant])
    metrics["nDCG@10"] = dcg / np.maximum(ideal, 1e-12)
    return metrics


def bootstrap_interval(
    values: np.ndarray, samples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
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


EVALUATION = Analysis(
    "evaluation", version=1, fields=("index", "query_model", "queries", "depth"), result_type=Evaluation
)


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


def evaluation_key(encoder: Encoder, index: DenseIndex, queries: Sequence[LabelledQuery]) -> dict:
    return {
        "index": index.params,
        "query_model": encoder.fingerprint,
        "queries": [(q.text, sorted(q.relevant)) for q in queries],
        "depth": DEPTH,
    }


def evaluate_encoder(
    encoder: Encoder,
    corpus: Corpus,
    queries: Sequence[LabelledQuery],
    cache: ResultCache,
    index: DenseIndex | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Evaluation:
    index = index or load_index(encoder, corpus, cache, progress=progress)

    def compute() -> Evaluation:
        _, ranked = search_queries(encoder, index, [q.text for q in queries], DEPTH)
        return evaluate_ranked(encoder.label, ranked, queries)

    return EVALUATION.get_or_compute(cache, compute, **evaluation_key(encoder, index, queries))


def evaluate_pair(
    pair: ModelPair,
    corpus: Corpus,
    queries: Sequence[LabelledQuery],
    cache: ResultCache,
    indexes: dict[str, DenseIndex] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Evaluation]:
    """Both models of a pair on the same queries; progress(model name, done, total) while indexing."""
    results = {}
    for name, encoder in pair.models.items():
        report = (lambda done, total, name=name: progress(name, done, total)) if progress else None
        results[name] = evaluate_encoder(
            encoder, corpus, queries, cache, index=(indexes or {}).get(name), progress=report
        )
    return results


def paired_difference(
    a: Sequence[float], b: Sequence[float], samples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean of b - a over the same queries, with a paired bootstrap interval (queries resampled together)."""
    difference = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    low, high = bootstrap_interval(difference, samples, seed, level)
    return float(difference.mean()), low, high


# ---- per-query wins and losses ------------------------------------------------------------------

B_WINS, A_WINS, BOTH, NEITHER = "B only", "A only", "both", "neither"
OUTCOMES = (B_WINS, A_WINS, BOTH, NEITHER)


@dataclass(frozen=True)
class QueryOutcome:
    position: int
    query: str
    gold: tuple[int, ...]
    rank_a: int | None  # rank of the first relevant passage in the top DEPTH, None if absent
    rank_b: int | None
    outcome: str


def first_relevant_rank(ranked: Sequence[int], relevant: frozenset[int]) -> int | None:
    for rank, index in enumerate(ranked, start=1):
        if index in relevant:
            return rank
    return None


def wins_losses(queries: Sequence[LabelledQuery], a: Evaluation, b: Evaluation, k: int = 1) -> list[QueryOutcome]:
    """Per query: does each model put a relevant passage in its top k? 'B only' = B gets it, A misses."""
    outcomes = []
    for position, (query, ranked_a, ranked_b) in enumerate(zip(queries, a.ranked, b.ranked)):
        rank_a = first_relevant_rank(ranked_a, query.relevant)
        rank_b = first_relevant_rank(ranked_b, query.relevant)
        hit_a, hit_b = rank_a is not None and rank_a <= k, rank_b is not None and rank_b <= k
        outcome = {(False, True): B_WINS, (True, False): A_WINS, (True, True): BOTH}.get((hit_a, hit_b), NEITHER)
        outcomes.append(QueryOutcome(position, query.text, tuple(sorted(query.relevant)), rank_a, rank_b, outcome))
    return outcomes


def outcome_counts(outcomes: Sequence[QueryOutcome]) -> dict[str, int]:
    return {name: sum(o.outcome == name for o in outcomes) for name in OUTCOMES}


# ---- a user's labelled queries ------------------------------------------------------------------

GOLD_KEYS = ("gold_ids", "gold_id", "gold")
QUERY_FILE_FORMAT = (
    'one JSON object per line: {"query": "...", "gold_ids": ["<passage id>", ...]} (or "gold_id": "<id>")'
)


class QueryFileError(LensError):
    """A labelled-query file that cannot be used; the message names the bad lines."""


def _gold_ids(record: dict) -> list[str] | None:
    for key in GOLD_KEYS:
        if key in record:
            value = record[key]
            values = value if isinstance(value, list) else [value]
            if values and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
                return [str(v) for v in values]
            return None
    return None


def parse_query_lines(lines: Iterable[str], corpus: Corpus, source: str = "query file") -> list[LabelledQuery]:
    """Labelled queries from JSONL lines; any bad line is an error naming its line number."""
    queries, problems = [], []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(f"line {line_number}: not valid JSON ({error.msg})")
            continue
        if not isinstance(record, dict):
            problems.append(f"line {line_number}: not a JSON object")
            continue
        text = clean_query(record["query"]) if isinstance(record.get("query"), str) else ""
        gold = _gold_ids(record)
        if not text:
            problems.append(f'line {line_number}: missing a non-empty "query"')
        elif gold is None:
            problems.append(f'line {line_number}: missing gold passage ids ("gold_ids": [...] or "gold_id")')
        elif None in (relevant := [corpus.position(g) for g in gold]):
            unknown = gold[relevant.index(None)]
            problems.append(f"line {line_number}: gold id {unknown!r} is not in corpus {corpus.name}")
        else:
            queries.append(LabelledQuery(text, relevant[0], frozenset(relevant)))
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise QueryFileError(f"{source}: {len(problems)} bad line(s): {shown}. Expected {QUERY_FILE_FORMAT}.")
    if not queries:
        raise QueryFileError(f"{source} has no queries. Expected {QUERY_FILE_FORMAT}.")
    return queries


def load_query_file(path: str | Path, corpus: Corpus) -> list[LabelledQuery]:
    path = Path(path)
    if not path.is_file():
        raise QueryFileError(f"Query file {path} does not exist.")
    with path.open(encoding="utf-8", errors="replace") as handle:
        return parse_query_lines(handle, corpus, path.name)
