"""Neuron overlap between twins: per layer and site, with K_A and K_B the query-tower knowledge neurons above
t x max of the same query (each model against its own top-1 passage, as `attribute_query` does):
kept = |K_A ∩ K_B|, dropped = |K_A \\ K_B|, recruited = |K_B \\ K_A|, Jaccard = |∩| / |∪| (undefined, NaN, where
neither model has a neuron above threshold in that layer).

Neuron i of A and neuron i of B are the same unit only because B was trained from A, hence twins only.
The attributions come from the Figure-1 aggregate (core.neuron_attribution), so its cache is shared.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .cache import ResultCache
from .corpus import Corpus, LabelledQuery
from .index import DenseIndex
from .neuron_attribution import DEFAULT_STEPS, DEFAULT_THRESHOLD, SITES, above_threshold, aggregate_neurons
from .pair import ModelPair
from .patching import require_twins

COUNTS = ("kept", "dropped", "recruited")
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SetOverlap:
    """Per layer (or per query and layer, for stacks) counts and Jaccard of two neuron sets."""

    kept: np.ndarray
    dropped: np.ndarray
    recruited: np.ndarray
    jaccard: np.ndarray


def set_overlap(a: np.ndarray, b: np.ndarray) -> SetOverlap:
    """a, b: boolean masks (..., layers, neurons) of A's and B's neurons above threshold."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    kept = (a & b).sum(-1)
    union = (a | b).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        jaccard = np.where(union > 0, kept / np.maximum(union, 1), np.nan)
    return SetOverlap(kept, (a & ~b).sum(-1), (b & ~a).sum(-1), jaccard)


@dataclass(frozen=True)
class OverlapAggregate:
    """Overlap of N queries: per site a SetOverlap of (queries, layers) arrays."""

    queries: list[str]
    passages: dict[str, list[int]]  # each model's target passage per query
    threshold: float
    sites: dict[str, SetOverlap]

    def means(self, site: str) -> dict[str, np.ndarray]:
        """Per layer: mean kept / dropped / recruited over queries, and mean Jaccard over queries where defined."""
        overlap = self.sites[site]
        means = {name: getattr(overlap, name).mean(0) for name in COUNTS}
        defined = ~np.isnan(overlap.jaccard)
        means["jaccard"] = np.where(
            defined.any(0), np.nansum(overlap.jaccard, 0) / np.maximum(defined.sum(0), 1), np.nan
        )
        return means

    def recruited_share(self, site: str) -> float:
        """Of all of B's neurons above threshold (summed over queries and layers), the share A did not have."""
        overlap = self.sites[site]
        b_total = overlap.kept.sum() + overlap.recruited.sum()
        return float(overlap.recruited.sum() / b_total) if b_total else float("nan")


def neuron_overlap(
    pair: ModelPair,
    indexes: dict[str, DenseIndex],
    corpus: Corpus,
    queries: Sequence[LabelledQuery],
    cache: ResultCache,
    threshold: float = DEFAULT_THRESHOLD,
    steps: int = DEFAULT_STEPS,
    progress: Callable[[str, int, int], None] | None = None,
) -> OverlapAggregate:
    """Overlap for each query (one query is a one-element list); progress(model name, done, total)."""
    require_twins(pair, "Neuron overlap")
    aggregates = {}
    for name, encoder in pair.models.items():
        report = (lambda done, total, name=name: progress(name, done, total)) if progress else None
        aggregates[name] = aggregate_neurons(encoder, indexes[name], corpus, queries, cache, steps, report)
    sites = {
        site: set_overlap(
            above_threshold(aggregates["A"].scores[site], threshold),
            above_threshold(aggregates["B"].scores[site], threshold),
        )
        for site in SITES
    }
    return OverlapAggregate(
        aggregates["A"].queries, {name: a.passages for name, a in aggregates.items()}, threshold, sites
    )
