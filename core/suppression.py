"""Knowledge removal (the analog of 2402.11035's): zero a query's top-k knowledge neurons, re-encode
the query, re-retrieve from the model's index and follow the rank of one passage as k grows."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .index import DenseIndex
from .neuron_attribution import SITES, NeuronAttribution, TargetedAttribution
from .pair import Encoder, Tower
from .runtime import model_work, require_model_job

DEFAULT_MAX_K = 50
CURVE_POINTS = 11


@dataclass(frozen=True)
class Neuron:
    site: str
    layer: int
    index: int
    relative_score: float  # attribution / the largest attribution of its site (the threshold's scale)


def ranked_neurons(attribution: NeuronAttribution, limit: int) -> list[Neuron]:
    """The `limit` neurons with the largest attribution relative to their site's maximum, both sites together."""
    candidates = []
    for site in SITES:
        scores = attribution.scores[site]
        peak = scores.max()
        relative = scores / peak if peak > 0 else np.zeros_like(scores)
        for flat in np.argsort(-relative, axis=None, kind="stable")[:limit]:
            layer, index = np.unravel_index(flat, scores.shape)
            candidates.append(Neuron(site, int(layer), int(index), float(relative[layer, index])))
    candidates.sort(key=lambda neuron: -neuron.relative_score)
    return candidates[:limit]


def curve_ks(max_k: int, points: int = CURVE_POINTS) -> list[int]:
    """k = 0..max_k at about `points` evenly spaced values."""
    if max_k < 0:
        raise ValueError("k cannot be negative")
    return sorted({int(round(k)) for k in np.linspace(0, max_k, min(points, max_k + 1))})


@contextmanager
def suppressing(tower: Tower, neurons_per_row: Sequence[Sequence[Neuron]]) -> Iterator[None]:
    """While active, row r of a forward pass has neurons_per_row[r] set to 0 at every token position."""
    require_model_job("Zeroing neurons")
    sites = tower.ffn_sites
    rows = len(neurons_per_row)
    sizes = {"intermediate": sites[0].down.in_features, "output": sites[0].down.out_features}
    masks = {
        (layer, site): torch.ones(rows, 1, sizes[site], device=tower.device)
        for layer in range(len(sites))
        for site in SITES
    }
    touched = set()
    for row, neurons in enumerate(neurons_per_row):
        for neuron in neurons:
            masks[neuron.layer, neuron.site][row, 0, neuron.index] = 0.0
            touched.add((neuron.layer, neuron.site))
    handles = []
    for layer, site in sorted(touched):
        mask, down = masks[layer, site], sites[layer].down
        if site == "intermediate":
            handles.append(down.register_forward_pre_hook(lambda module, args, mask=mask: (args[0] * mask,) + args[1:]))
        else:
            handles.append(down.register_forward_hook(lambda module, args, output, mask=mask: output * mask))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class SuppressionCurve:
    query: str
    passage: int  # the passage whose rank is followed
    ks: tuple[int, ...]
    ranks: tuple[int, ...]  # 1-based rank of `passage` after zeroing the top-k neurons
    scores: tuple[float, ...]  # its score
    top: tuple[tuple[int, ...], ...]  # the passages retrieved first, per k
    neurons: tuple[Neuron, ...]  # zeroing order; the first k are zeroed at k


@model_work
def suppression_curve(
    encoder: Encoder,
    index: DenseIndex,
    analysed: TargetedAttribution,
    ks: Sequence[int],
    passage: int | None = None,
    top: int = 5,
) -> SuppressionCurve:
    """Zero the top-k query-tower neurons of `analysed` for each k, re-encode the query and re-retrieve.

    The followed passage defaults to the one the attribution explains (the original top-1 or a chosen one).
    """
    if analysed.tower != "query":
        raise ValueError("suppression re-encodes the query, so it needs a query-tower attribution")
    passage = analysed.passage if passage is None else passage
    neurons = ranked_neurons(analysed.attribution, max(ks, default=0))
    ks = tuple(sorted({min(k, len(neurons)) for k in ks}))
    tower = encoder.query
    batch = tower.tokenize([analysed.query])
    rows = {key: value.expand(len(ks), -1) for key, value in batch.items()}
    with suppressing(tower, [neurons[:k] for k in ks]), torch.inference_mode():
        vectors = tower.forward(rows).float().cpu().numpy()
    scores, ranked = index.search(vectors, len(index))
    ranks, followed = [], []
    for row_scores, row_ranked in zip(scores, ranked):
        position = int(np.flatnonzero(row_ranked == passage)[0])
        ranks.append(position + 1)
        followed.append(float(row_scores[position]))
    return SuppressionCurve(
        analysed.query,
        passage,
        ks,
        tuple(ranks),
        tuple(followed),
        tuple(tuple(int(i) for i in row[:top]) for row in ranked),
        tuple(neurons),
    )
