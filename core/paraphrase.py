"""Paraphrase agreement: do the phrasings p_1..p_n of one information need retrieve the same passages and
light up the same knowledge neurons?

Per model and need: the mean pairwise Jaccard of the phrasings' retrieved top-k sets, whether every phrasing
finds the gold passage in its top-k, and per layer and site the mean pairwise Jaccard of the query-tower
knowledge-neuron sets (above t x max). Every phrasing of a need is attributed against the same target, so the
sets differ only by the phrasing: the gold passage's indexed embedding when the need has a gold passage in the
corpus, else the model's own top-1 passage of the first phrasing. A pair of neuron sets both empty in a layer
has no Jaccard (NaN) and is left out of that layer's mean.

The built-in set (assets/paraphrases.jsonl) holds information needs over the bundled Wikipedia, one JSON object
per line: {"gold": "<article title>", "phrasings": ["...", ...]}.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np

from .cache import Analysis, ResultCache
from .corpus import Corpus
from .errors import LensError
from .evaluation import paired_difference
from .index import DenseIndex
from .neuron_attribution import DEFAULT_STEPS, DEFAULT_THRESHOLD, SITES, attribute_query
from .pair import ASSETS, ModelPair
from .retrieval import clean_query

PARAPHRASES = ASSETS / "paraphrases.jsonl"
DEFAULT_K = 10
MAX_PHRASINGS = 10
Progress = Callable[[int, int], None]


class ParaphraseError(LensError):
    """Phrasings that cannot be compared; the message is meant for the user."""


@dataclass(frozen=True)
class Need:
    phrasings: tuple[str, ...]
    gold: str | None = None  # the title of the passage that answers it


def load_needs(path: str | Path = PARAPHRASES) -> list[Need]:
    needs = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            needs.append(Need(tuple(record["phrasings"]), record.get("gold")))
    return needs


def parse_phrasings(text: str) -> Need:
    """A user's phrasings of one need, one per line (blank and repeated lines dropped)."""
    phrasings = tuple(dict.fromkeys(line for line in map(clean_query, (text or "").splitlines()) if line))
    if len(phrasings) < 2:
        raise ParaphraseError("Give at least two phrasings of the same need, one per line.")
    if len(phrasings) > MAX_PHRASINGS:
        raise ParaphraseError(f"Give at most {MAX_PHRASINGS} phrasings at a time.")
    return Need(phrasings)


def mean_pairwise_jaccard(sets: Sequence[np.ndarray]) -> np.ndarray:
    """sets: boolean masks (..., members) of equal shape; the mean over pairs of |∩| / |∪| per leading index,
    leaving out pairs whose union is empty (NaN if every pair's is)."""
    stack = np.stack([np.asarray(s, bool) for s in sets])
    values = []
    for i, j in combinations(range(len(stack)), 2):
        union = (stack[i] | stack[j]).sum(-1)
        values.append(np.where(union > 0, (stack[i] & stack[j]).sum(-1) / np.maximum(union, 1), np.nan))
    values = np.stack(values)
    defined = ~np.isnan(values)
    return np.where(defined.any(0), np.nansum(values, 0) / np.maximum(defined.sum(0), 1), np.nan)


def _membership(indices: Sequence[int], size: int) -> np.ndarray:
    mask = np.zeros(size, bool)
    mask[list(indices)] = True
    return mask


@dataclass(frozen=True)
class ModelAgreement:
    """One model on one need."""

    retrieved: list[list[int]]  # top-k per phrasing
    target: int  # the passage every phrasing's neurons are attributed against
    retrieval_jaccard: float
    gold_found: list[bool] | None  # per phrasing: gold in its top-k (None: no gold passage)
    neuron_jaccard: dict[str, np.ndarray]  # per site, (layers,)

    @property
    def found_by_all(self) -> bool | None:
        return None if self.gold_found is None else all(self.gold_found)


@dataclass(frozen=True)
class NeedAgreement:
    need: Need
    gold: int | None  # the gold passage's index in the corpus
    models: dict[str, ModelAgreement]


def gold_index(corpus: Corpus, title: str | None) -> int | None:
    """The gold passage: by id first (the bundled corpus's ids are its titles), then by title in memory only
    (a corpus on disk is not read through to find a title)."""
    if title is None:
        return None
    found = corpus.position(title)
    if found is not None or corpus.store is not None:
        return found
    try:
        return corpus.titles.index(title)
    except ValueError:
        return None


def need_agreement(
    pair: ModelPair,
    indexes: dict[str, DenseIndex],
    corpus: Corpus,
    need: Need,
    cache: ResultCache | None = None,
    k: int = DEFAULT_K,
    threshold: float = DEFAULT_THRESHOLD,
    steps: int = DEFAULT_STEPS,
) -> NeedAgreement:
    gold = gold_index(corpus, need.gold)
    models = {}
    for name, encoder in pair.models.items():
        index = indexes[name]
        _, top = index.search(encoder.encode_queries(list(need.phrasings)), k)
        retrieved = [[int(i) for i in row] for row in top]
        target = gold if gold is not None else retrieved[0][0]
        masks = [
            attribute_query(encoder, index, corpus, phrasing, target, steps, cache).attribution.above(threshold)
            for phrasing in need.phrasings
        ]
        models[name] = ModelAgreement(
            retrieved,
            target,
            float(mean_pairwise_jaccard([_membership(row, len(index)) for row in retrieved])),
            None if gold is None else [gold in row for row in retrieved],
            {site: mean_pairwise_jaccard([mask[site] for mask in masks]) for site in SITES},
        )
    return NeedAgreement(need, gold, models)


@dataclass(frozen=True)
class ParaphraseReport:
    needs: list[NeedAgreement]
    k: int
    threshold: float
    steps: int

    def retrieval_jaccard(self, name: str) -> np.ndarray:
        """Per need."""
        return np.array([n.models[name].retrieval_jaccard for n in self.needs])

    def neuron_jaccard(self, name: str, site: str) -> np.ndarray:
        """(needs, layers)."""
        return np.stack([n.models[name].neuron_jaccard[site] for n in self.needs])

    def model_neuron_jaccard(self, name: str, site: str) -> np.ndarray:
        """Per need, the mean over the layers where the Jaccard is defined."""
        values = self.neuron_jaccard(name, site)
        defined = ~np.isnan(values)
        return np.where(defined.any(1), np.nansum(values, 1) / np.maximum(defined.sum(1), 1), np.nan)

    def found_by_all(self, name: str) -> float:
        """Share of the needs with a gold passage whose every phrasing finds it in the top-k."""
        found = [n.models[name].found_by_all for n in self.needs if n.gold is not None]
        return float(np.mean(found)) if found else float("nan")

    def difference(self, site: str | None = None) -> tuple[float, float, float, int]:
        """B - A of the per-need agreement (retrieval Jaccard, or the site's neuron Jaccard), paired over
        the needs where both are defined: (mean, low, high, needs)."""
        if site is None:
            a, b = self.retrieval_jaccard("A"), self.retrieval_jaccard("B")
        else:
            a, b = self.model_neuron_jaccard("A", site), self.model_neuron_jaccard("B", site)
        both = ~(np.isnan(a) | np.isnan(b))
        if not both.any():
            return float("nan"), float("nan"), float("nan"), 0
        return (*paired_difference(a[both], b[both]), int(both.sum()))


PARAPHRASE = Analysis(
    "paraphrase-agreement",
    version=1,
    fields=("A", "B", "indexes", "needs", "k", "threshold", "steps"),
    result_type=ParaphraseReport,
)


def paraphrase_agreement(
    pair: ModelPair,
    indexes: dict[str, DenseIndex],
    corpus: Corpus,
    needs: Sequence[Need],
    cache: ResultCache | None = None,
    k: int = DEFAULT_K,
    threshold: float = DEFAULT_THRESHOLD,
    steps: int = DEFAULT_STEPS,
    progress: Progress | None = None,
) -> ParaphraseReport:
    if not needs:
        raise ParaphraseError("There are no information needs to compare.")

    def compute() -> ParaphraseReport:
        results = []
        for done, need in enumerate(needs, start=1):
            results.append(need_agreement(pair, indexes, corpus, need, cache, k, threshold, steps))
            if progress:
                progress(done, len(needs))
        return ParaphraseReport(results, k, threshold, steps)

    return PARAPHRASE.get_or_compute(cache, compute, **_report_key(pair, indexes, needs, k, threshold, steps))


def _report_key(
    pair: ModelPair, indexes: dict[str, DenseIndex], needs: Sequence[Need], k: int, threshold: float, steps: int
) -> dict:
    return {
        "A": pair.a.fingerprint,
        "B": pair.b.fingerprint,
        "indexes": {name: index.params for name, index in indexes.items()},
        "needs": [(need.phrasings, need.gold) for need in needs],
        "k": k,
        "threshold": threshold,
        "steps": steps,
    }


def lookup_paraphrase_agreement(
    pair: ModelPair,
    indexes: dict[str, DenseIndex],
    needs: Sequence[Need],
    cache: ResultCache,
    k: int = DEFAULT_K,
    threshold: float = DEFAULT_THRESHOLD,
    steps: int = DEFAULT_STEPS,
) -> ParaphraseReport | None:
    """The stored report, or None (never computes)."""
    return PARAPHRASE.lookup(cache, **_report_key(pair, indexes, needs, k, threshold, steps))
