"""Activation patching between twins (a model A and its DPR-trained copy B, same architecture).

Patch (R <- D, layer, site): run the recipient R on the query, but at that layer and site use the donor D's
activation for the same input, at every token position. Sites per layer: the FFN intermediate activation (the
input of the FFN down projection), the FFN output (its output, before the residual add and LayerNorm) and the
layer output (the residual stream after the layer).

Target: e = B's indexed embedding of one passage (default: B's top-1), the same for both directions, so every
score s = pooled(q) . e lives in B's score space, and ranks are taken in B's index.
Recovered fraction of R <- D: (s_patched - s_R) / (s_D - s_R), 0 = the recipient's own score, 1 = the donor's.
For A <- B this is "how much of B's preference moves into A"; B <- A is the same formula with the roles
swapped: how much of A's score moves into B (1 = B falls all the way back to A's score). Over many queries
the fractions are averaged with each query's |s_D - s_R| as its weight (`summarise_cells`). The patched run pools
as the recipient pools, so the last layer's residual stream reproduces the donor's embedding exactly when both
models pool the same way.

All patches of one direction run as rows of one forward pass: row 0 is the clean recipient and every other row
is patched at its own (layer, site) only. Rows never mix in an encoder, so each row equals its own pass.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .adapters import layer_hidden, with_layer_hidden
from .cache import Analysis, ResultCache
from .corpus import Corpus, LabelledQuery
from .errors import LensError
from .index import DenseIndex
from .neuron_attribution import top1_passages
from .pair import ModelPair, Tower
from .retrieval import prepare_query, retrieve
from .runtime import model_work, require_model_job

PATCH_SITES: tuple[str, ...] = ("intermediate", "output", "layer")
SITE_TITLES = {"intermediate": "FFN intermediate", "output": "FFN output", "layer": "layer output (residual)"}
DIRECTIONS: dict[str, tuple[str, str]] = {"A←B": ("A", "B"), "B←A": ("B", "A")}  # name: (recipient, donor)
MIN_GAP = 1e-6  # |s_D - s_R| below this leaves the recovered fraction undefined
NEAR_TIE = 0.05  # a gap below this share of the larger clean score makes one query's fractions unstable
Site = tuple[int, str]
Progress = Callable[[int, int], None]


class TwinError(LensError):
    """An analysis that needs twins was asked about two models of different architectures."""


def twin_mismatch(a: Tower, b: Tower) -> str | None:
    """Why two towers are not twins (family, layer count, widths), or None."""
    checks = (
        ("family", a.adapter.family, b.adapter.family),
        ("layer count", a.layer_count, b.layer_count),
        ("hidden width", a.dim, b.dim),
    )
    for what, value_a, value_b in checks:
        if value_a != value_b:
            return f"A's {what} is {value_a} and B's is {value_b}"
    width_a, width_b = a.ffn_sites[0].down.in_features, b.ffn_sites[0].down.in_features
    if width_a != width_b:
        return f"A's FFN width is {width_a} and B's is {width_b}"
    return None


def require_twins(pair: ModelPair, analysis: str) -> None:
    problem = twin_mismatch(pair.a.query, pair.b.query)
    if problem:
        raise TwinError(f"{analysis} needs twins (same family, layer count and widths), but {problem}.")


# --------------------------------------------------------------------------- hooks


@contextmanager
def editing_sites(tower: Tower, edit: Callable[[Site, torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """While active, every site's activation passes through edit((layer, site), activation)."""
    require_model_job("Patching activations")
    handles = []
    for layer, (ffn, block) in enumerate(zip(tower.ffn_sites, tower.adapter.layer_outputs(tower.model))):
        handles += [
            ffn.down.register_forward_pre_hook(
                lambda module, args, layer=layer: (edit((layer, "intermediate"), args[0]),) + args[1:]
            ),
            ffn.down.register_forward_hook(lambda module, args, output, layer=layer: edit((layer, "output"), output)),
            block.register_forward_hook(
                lambda module, args, output, layer=layer: with_layer_hidden(
                    output, edit((layer, "layer"), layer_hidden(output))
                )
            ),
        ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@model_work
@torch.inference_mode()
def site_activations(tower: Tower, batch: dict[str, torch.Tensor]) -> dict[Site, torch.Tensor]:
    """Every (layer, site) activation of one forward pass."""
    recorded = {}

    def record(site: Site, activation: torch.Tensor) -> torch.Tensor:
        recorded[site] = activation.detach().clone()
        return activation

    with editing_sites(tower, record):
        tower.forward(batch)
    return recorded


@model_work
@torch.inference_mode()
def patched_embeddings(
    tower: Tower, batch: dict[str, torch.Tensor], donor: dict[Site, torch.Tensor], patches: Sequence[Site | None]
) -> np.ndarray:
    """Pooled vectors of one input, one row per entry of `patches`: row r has its site (None: nothing)
    replaced by the donor's activation at every position."""
    rows_of: dict[Site, list[int]] = defaultdict(list)
    for row, site in enumerate(patches):
        if site is not None:
            rows_of[site].append(row)

    def patch(site: Site, activation: torch.Tensor) -> torch.Tensor:
        rows = rows_of.get(site)
        if not rows:
            return activation
        patched = activation.clone()
        patched[rows] = donor[site].to(activation.dtype)
        return patched

    rows = {key: value.expand(len(patches), *value.shape[1:]) for key, value in batch.items()}
    with editing_sites(tower, patch):
        return tower.forward(rows).float().cpu().numpy()


def ranks_in_index(embeddings: np.ndarray, vectors: np.ndarray, passage: int) -> np.ndarray:
    """1-based rank of `passage` for each query vector (ties counted in its favour)."""
    scores = vectors @ embeddings.T
    return 1 + (scores > scores[:, passage : passage + 1]).sum(1)


# --------------------------------------------------------------------------- one query


def fraction(gains: np.ndarray, gap: float) -> np.ndarray:
    """The recovered fraction of one query, gains / gap; NaN when the gap (nearly) vanishes."""
    return np.full(gains.shape, np.nan) if abs(gap) < MIN_GAP else gains / gap


@dataclass(frozen=True)
class DirectionPatching:
    """One direction R <- D: clean scores and ranks, and per (layer, site) the patched score and rank."""

    recipient: str
    donor: str
    recipient_score: float
    donor_score: float
    recipient_rank: int
    donor_rank: int
    scores: np.ndarray  # (layers, sites) in PATCH_SITES order
    ranks: np.ndarray  # (layers, sites)

    @property
    def recovered(self) -> np.ndarray:
        """(s_patched - s_R) / (s_D - s_R) per (layer, site); NaN when the two clean scores (nearly) tie."""
        return fraction(self.scores - self.recipient_score, self.donor_score - self.recipient_score)


@dataclass(frozen=True)
class QueryPatching:
    query: str
    passage: int  # the target: e = B's indexed embedding of this passage
    directions: dict[str, DirectionPatching]

    @property
    def layers(self) -> int:
        return next(iter(self.directions.values())).scores.shape[0]


def near_tie_note(result: QueryPatching) -> str | None:
    """One sentence when A's and B's clean scores of the target nearly tie, so that this query's fractions divide
    by a small gap; None otherwise."""
    clean = next(iter(result.directions.values()))
    gap = abs(clean.donor_score - clean.recipient_score)
    larger = max(abs(clean.donor_score), abs(clean.recipient_score))
    if gap >= max(NEAR_TIE * larger, MIN_GAP):
        return None
    share = f", {gap / larger:.1%} of the larger score" if larger else ""
    return (
        f"A and B score the target almost alike: they differ by {gap:.4f}{share}. Every fraction divides by that "
        "difference, so small score changes read as large fractions here; the aggregate over many queries is "
        "steadier."
    )


PATCHING = Analysis(
    "twin-patching", version=1, fields=("A", "B", "index", "query", "passage"), result_type=QueryPatching
)


def patch_sites(layers: int) -> list[Site]:
    return [(layer, site) for layer in range(layers) for site in PATCH_SITES]


@model_work
def patch_twins(towers: dict[str, Tower], embeddings: np.ndarray, text: str, passage: int) -> QueryPatching:
    """Both directions for one query; `embeddings` is B's index, whose row `passage` is the target."""
    batches = {name: tower.tokenize([text]) for name, tower in towers.items()}
    if not torch.equal(batches["A"]["input_ids"], batches["B"]["input_ids"]):
        raise TwinError("Patching needs twins with the same tokenizer, but A and B split this query differently.")
    activations = {name: site_activations(tower, batches[name]) for name, tower in towers.items()}
    layers = towers["A"].layer_count
    sites = patch_sites(layers)
    target = embeddings[passage]
    vectors = {
        recipient: patched_embeddings(towers[recipient], batches[recipient], activations[donor], [None, *sites])
        for recipient, donor in DIRECTIONS.values()
    }
    clean_scores = {name: float(rows[0] @ target) for name, rows in vectors.items()}
    clean_ranks = {name: int(ranks_in_index(embeddings, rows[:1], passage)[0]) for name, rows in vectors.items()}
    directions = {}
    for direction, (recipient, donor) in DIRECTIONS.items():
        patched = vectors[recipient][1:]
        directions[direction] = DirectionPatching(
            recipient,
            donor,
            clean_scores[recipient],
            clean_scores[donor],
            clean_ranks[recipient],
            clean_ranks[donor],
            (patched @ target).reshape(layers, len(PATCH_SITES)),
            ranks_in_index(embeddings, patched, passage).reshape(layers, len(PATCH_SITES)),
        )
    return QueryPatching(text, passage, directions)


def patch_query(
    pair: ModelPair,
    index_b: DenseIndex,
    corpus: Corpus,
    text: str,
    passage: int | None = None,
    cache: ResultCache | None = None,
) -> QueryPatching:
    """Patching of one query; the target defaults to B's top-1 passage in B's index."""
    require_twins(pair, "Patching")
    query = prepare_query(pair.b, text)
    if passage is None:
        passage = retrieve(pair.b, index_b, corpus, query.text, k=1, cache=cache).hits[0].index

    def compute() -> QueryPatching:
        return patch_twins({"A": pair.a.query, "B": pair.b.query}, index_b.embeddings, query.text, passage)

    return PATCHING.get_or_compute(
        cache,
        compute,
        A=pair.a.fingerprint,
        B=pair.b.fingerprint,
        index=index_b.params,
        query=query.text,
        passage=passage,
    )


# --------------------------------------------------------------------------- many queries


@dataclass(frozen=True)
class CellSummary:
    """Per (layer, site), over queries: the pooled recovered fraction (`summarise_cells`), its bootstrap interval
    (95%), and the median of the per-query fractions."""

    pooled: np.ndarray
    low: np.ndarray
    high: np.ndarray
    median: np.ndarray
    defined: np.ndarray  # queries that count (their two clean scores do not tie)


def summarise_cells(gains: np.ndarray, gaps: np.ndarray, samples: int = 1000, seed: int = 0) -> CellSummary:
    """gains: (queries, layers, sites), s_patched - s_R; gaps: (queries,), s_D - s_R.

    The pooled fraction is the mean of the per-query fractions weighted by |gap|: sum(sign x gains) / sum(|gaps|),
    with each query turned so that its gap is positive. The weights keep near ties from dominating (a gap of 0.01
    turns a score change of 0.03 into a fraction of 3); turning the signs keeps a query whose gap runs the other
    way (A scores B's top-1 higher than B does) from cancelling the others, as in a plain ratio of sums. A query
    whose two clean scores tie counts nowhere; the interval needs two queries that count."""
    signs = np.where(np.abs(gaps) < MIN_GAP, 0.0, np.sign(gaps))
    counted = signs != 0
    shape = gains.shape[1:]
    undefined = np.full(shape, np.nan)
    if not counted.any():
        return CellSummary(undefined, undefined, undefined, undefined, np.zeros(shape, dtype=int))
    turned, sizes = (gains * signs[:, None, None]).reshape(len(gaps), -1), np.abs(gaps) * counted
    # Each bootstrap sample as how often it draws each query, so that sums over a sample are one matrix product;
    # row 0 counts every query once: the pooled fraction itself.
    counts = np.random.default_rng(seed).multinomial(len(gaps), np.full(len(gaps), 1 / len(gaps)), size=samples)
    weights = np.vstack([np.ones(len(gaps)), counts])
    totals = weights @ sizes
    with np.errstate(divide="ignore", invalid="ignore"):
        shares = (weights @ turned) / totals[:, None]
    shares[totals == 0] = np.nan  # a sample that drew only ties
    shares = shares.reshape(-1, *shape)
    low, high = np.nanpercentile(shares[1:], [2.5, 97.5], axis=0) if counted.sum() > 1 else (undefined, undefined)
    median = np.median(gains[counted] / gaps[counted, None, None], axis=0)
    return CellSummary(shares[0], low, high, median, np.full(shape, counted.sum()))


@dataclass(frozen=True)
class PatchingAggregate:
    queries: list[str]
    passages: list[int]
    results: list[QueryPatching]

    def ranks(self, direction: str) -> np.ndarray:
        return np.stack([result.directions[direction].ranks for result in self.results])

    def summary(self, direction: str) -> CellSummary:
        patched = [result.directions[direction] for result in self.results]
        gains = np.stack([d.scores - d.recipient_score for d in patched])
        return summarise_cells(gains, np.array([d.donor_score - d.recipient_score for d in patched]))


PATCHING_AGGREGATE = Analysis(
    "twin-patching-aggregate", version=1, fields=("A", "B", "index", "queries"), result_type=PatchingAggregate
)


def aggregate_patching(
    pair: ModelPair,
    index_b: DenseIndex,
    corpus: Corpus,
    queries: Sequence[LabelledQuery],
    cache: ResultCache | None = None,
    progress: Progress | None = None,
) -> PatchingAggregate:
    """Patching of each query against B's own top-1 (each query cached on its own, so a stopped run resumes)."""
    require_twins(pair, "Patching")
    if not queries:
        raise ValueError("the aggregate needs at least one query")

    def compute() -> PatchingAggregate:
        texts = [prepare_query(pair.b, q.text).text for q in queries]
        passages = top1_passages(pair.b, index_b, texts)
        results = []
        for done, (text, passage) in enumerate(zip(texts, passages), start=1):
            results.append(patch_query(pair, index_b, corpus, text, passage, cache))
            if progress:
                progress(done, len(texts))
        return PatchingAggregate(texts, passages, results)

    return PATCHING_AGGREGATE.get_or_compute(cache, compute, **_aggregate_key(pair, index_b, queries))


def _aggregate_key(pair: ModelPair, index_b: DenseIndex, queries: Sequence[LabelledQuery]) -> dict:
    return {
        "A": pair.a.fingerprint,
        "B": pair.b.fingerprint,
        "index": index_b.params,
        "queries": [q.text for q in queries],
    }


def lookup_patching_aggregate(
    pair: ModelPair, index_b: DenseIndex, queries: Sequence[LabelledQuery], cache: ResultCache
) -> PatchingAggregate | None:
    """The stored aggregate, or None (never computes)."""
    return PATCHING_AGGREGATE.lookup(cache, **_aggregate_key(pair, index_b, queries))
