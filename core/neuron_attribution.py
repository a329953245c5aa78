"""Knowledge-neuron attribution (Dai et al. 2022, as used in arXiv 2402.11035) for FFN neurons.

For layer l and site S (FFN intermediate activation after the non-linearity, or the FFN output
dense), the site's activation a is scaled by alpha from 0 to 1 at every token position and
    Attr_i = sum over positions of a_i * mean over k=1..m of ds/d(alpha_k a_i),  alpha_k = k/m,
with s = pooled(x) . e and e the other tower's embedding, held fixed.

Both sites live on the FFN's down projection (BERT `output.dense`, DistilBERT `ffn.lin2`): the
intermediate activation is its input, the output site its output, so one Linear per layer is hooked.

`attribute_neurons` runs every (layer, site, step) row in a few batched passes: a pass starts from
the clean input alone, and each layer's rows join the batch at that layer's FFN as copies of the
clean row, so the forward below (and the layer's own attention) is computed once, not per step.
`attribute_neurons_per_layer` is the plain reference (Dai et al.): for each (layer, site), the
m+1 scaled copies through the whole model.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .cache import ResultCache
from .corpus import Corpus, LabelledQuery, description_queries, split_indices
from .index import PASSAGE_MAX_LENGTH, DenseIndex
from .pair import Encoder, Tower
from .retrieval import prepare_query, retrieve

SITES: tuple[str, ...] = ("intermediate", "output")
DEFAULT_STEPS = 20
DEFAULT_THRESHOLD = 0.1
# Activation budget of one batched pass, in (row x token x remaining layer) units: a BERT-base
# pass of this size peaked at ~1.9 GB above the model (measured, 16 tokens, m = 20).
MAX_TOKEN_LAYERS = 20_000
CACHE_VERSION = 1
Progress = Callable[[int, int], None]


class NeuronSiteError(ValueError):
    """A model whose FFN layers this analysis does not know; the message is meant for the user."""


# --------------------------------------------------------------------------- sites

def transformer_layers(tower: Tower) -> nn.ModuleList:
    backbone = tower.backbone
    for path in ("encoder.layer", "transformer.layer"):
        inner = backbone
        try:
            for name in path.split("."):
                inner = getattr(inner, name)
        except AttributeError:
            continue
        return inner
    raise NeuronSiteError(f"{type(backbone).__name__} has no BERT- or DistilBERT-style layer stack.")


@dataclass(frozen=True)
class FfnSite:
    """One layer's FFN: `down` is its second Linear (input = intermediate site, output = output site).

    `join` is where extra rows can enter the batch with the layer's FFN input and residual already
    computed: BERT's `output` module (hooked before, both arguments widened) or DistilBERT's
    `sa_layer_norm` (hooked after, its output is both the FFN input and the residual).
    """

    down: nn.Linear
    join: nn.Module
    join_before: bool


def ffn_sites(tower: Tower) -> list[FfnSite]:
    found = []
    for index, layer in enumerate(transformer_layers(tower)):
        if getattr(layer, "chunk_size_feed_forward", 0) or getattr(getattr(layer, "ffn", None), "chunk_size_feed_forward", 0):
            raise NeuronSiteError("Models with chunked feed-forward layers are not supported.")
        output, ffn = getattr(layer, "output", None), getattr(layer, "ffn", None)
        if isinstance(getattr(output, "dense", None), nn.Linear) and hasattr(layer, "intermediate"):
            found.append(FfnSite(output.dense, output, True))
        elif isinstance(getattr(ffn, "lin2", None), nn.Linear) and hasattr(layer, "sa_layer_norm"):
            found.append(FfnSite(ffn.lin2, layer.sa_layer_norm, False))
        else:
            raise NeuronSiteError(f"Layer {index} of {type(tower.backbone).__name__} has no BERT- or DistilBERT-style FFN.")
    return found


def site_sizes(tower: Tower) -> dict[str, int]:
    down = ffn_sites(tower)[0].down
    return {"intermediate": down.in_features, "output": down.out_features}


# --------------------------------------------------------------------------- results

def above_threshold(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Neurons whose attribution exceeds threshold x the largest attribution of the array.

    `scores` holds one site of one query: (layers, neurons), or a stack (queries, layers, neurons)
    where each query has its own maximum. A site whose largest attribution is not positive has none.
    """
    scores = np.asarray(scores)
    peak = scores.reshape(*scores.shape[:-2], -1).max(-1)[..., None, None]
    return (scores > threshold * peak) & (peak > 0)


@dataclass
class NeuronAttribution:
    """Attributions of one input, per site an array (layers, neurons), plus what completeness needs."""

    scores: dict[str, np.ndarray]
    score: float  # s(x)
    baseline_scores: dict[str, np.ndarray]  # per site, per layer: s with that layer's site scaled to 0
    steps: int
    tokens: list[str] = field(default_factory=list)

    @property
    def layers(self) -> int:
        return next(iter(self.scores.values())).shape[0]

    def above(self, threshold: float = DEFAULT_THRESHOLD) -> dict[str, np.ndarray]:
        return {site: above_threshold(values, threshold) for site, values in self.scores.items()}

    def layer_counts(self, threshold: float = DEFAULT_THRESHOLD) -> dict[str, np.ndarray]:
        return {site: mask.sum(1) for site, mask in self.above(threshold).items()}

    def strongly_activated(self, threshold: float = DEFAULT_THRESHOLD) -> dict[str, int]:
        """Paper's Table 2: neurons above threshold over all layers, per site."""
        return {site: int(mask.sum()) for site, mask in self.above(threshold).items()}

    def attribution_sums(self) -> dict[str, np.ndarray]:
        return {site: values.sum(1) for site, values in self.scores.items()}

    def expected_sums(self) -> dict[str, np.ndarray]:
        """s(x) - s(alpha=0) per site and layer: what the attributions sum to in the limit of many steps."""
        return {site: self.score - base for site, base in self.baseline_scores.items()}

    def completeness_deltas(self) -> dict[str, np.ndarray]:
        sums, expected = self.attribution_sums(), self.expected_sums()
        return {site: np.abs(sums[site] - expected[site]) for site in self.scores}


# --------------------------------------------------------------------------- batched rows

def _alphas(steps: int) -> torch.Tensor:
    """alpha_0 = 0 (for the baseline score) then the Riemann points k/m, k = 1..m."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    return torch.arange(steps + 1, dtype=torch.float32) / steps


def _target(target_embedding: np.ndarray | torch.Tensor, dim: int) -> torch.Tensor:
    target = torch.as_tensor(np.asarray(target_embedding, dtype=np.float32)).reshape(-1)
    if target.shape[0] != dim:
        raise ValueError(f"target embedding has {target.shape[0]} dimensions, the tower produces {dim}")
    return target


def _single_sequence(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if batch["input_ids"].shape[0] != 1:
        raise ValueError("neuron attribution analyses one sequence at a time")
    return batch


@dataclass
class _Group:
    """Rows that scale one site of one layer by `alphas`."""

    layer: int
    site: str
    alphas: torch.Tensor
    offset: int = 0


class _RowScaler:
    """Hooks on the FFNs that multiply each layer's site by a per-row factor (alpha for the rows of
    that layer's groups, 1 for every other row) and keep the product, whose gradient is wanted.

    With `grow`, the forward starts from the clean input alone (row 0) and each layer's rows join
    the batch at that layer's FFN as copies of row 0, so nothing below is computed twice; row 0's
    own gradients are the alpha = 1 gradients of every (layer, site) at once.
    """

    def __init__(self, sites: Sequence[FfnSite], groups: Sequence[_Group], grow: bool):
        self.sites = sites
        self.grow = grow
        self.by_layer: dict[int, list[_Group]] = {}
        for group in groups:
            self.by_layer.setdefault(group.layer, []).append(group)
        self.scaled: dict[tuple[int, str], torch.Tensor] = {}
        self.clean: dict[tuple[int, str], torch.Tensor] = {}

    def _join(self, layer: int, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        size = start = tensors[0].shape[0]
        for group in self.by_layer[layer]:
            group.offset = size
            size += len(group.alphas)
        return [torch.cat([t, t[0:1].detach().expand(size - start, *t.shape[1:])]) for t in tensors]

    def _scale(self, tensor: torch.Tensor, layer: int, site: str) -> torch.Tensor:
        factors = torch.ones(tensor.shape[0], dtype=tensor.dtype)
        for group in self.by_layer.get(layer, ()):
            if group.site == site:
                factors[group.offset:group.offset + len(group.alphas)] = group.alphas
        self.clean[layer, site] = tensor[0].detach()
        self.scaled[layer, site] = tensor * factors.view(-1, *([1] * (tensor.dim() - 1)))
        return self.scaled[layer, site]

    def _hooks(self, layer: int, site: FfnSite) -> list:
        handles = [
            site.down.register_forward_pre_hook(
                lambda module, args: (self._scale(args[0], layer, "intermediate"),) + args[1:]),
            site.down.register_forward_hook(lambda module, args, output: self._scale(output, layer, "output")),
        ]
        if self.grow and layer in self.by_layer:
            if site.join_before:
                handles.append(site.join.register_forward_pre_hook(
                    lambda module, args: tuple(self._join(layer, args[:2])) + args[2:]))
            else:
                handles.append(site.join.register_forward_hook(
                    lambda module, args, output: self._join(layer, [output])[0]))
        return handles

    @contextmanager
    def installed(self, first_layer: nn.Module) -> Iterator[None]:
        handles = [handle for layer, site in enumerate(self.sites) for handle in self._hooks(layer, site)]
        if torch.is_grad_enabled():
            # A graph from the bottom even when no weight requires a gradient.
            handles.append(first_layer.register_forward_pre_hook(
                lambda module, args: (args[0].detach().requires_grad_(),) + args[1:]))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def gradients(self, scores: torch.Tensor, keys: Sequence[tuple[int, str]]) -> dict[tuple[int, str], torch.Tensor]:
        grads = torch.autograd.grad(scores.sum(), [self.scaled[key] for key in keys])
        return dict(zip(keys, grads))


def _tokens(tower: Tower, batch: dict[str, torch.Tensor]) -> list[str]:
    return tower.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())


def _stack_attributions(activations: dict, gradient_sums: dict, layers: int, steps: int) -> dict[str, np.ndarray]:
    """Attr = sum over positions of a * (sum of step gradients) / m, per site as (layers, neurons)."""
    return {
        site: np.stack([(activations[layer, site] * gradient_sums[layer, site] / steps).sum(0).double().numpy()
                        for layer in range(layers)])
        for site in SITES
    }


# --------------------------------------------------------------------------- batched attribution

def _plan(layers: int, steps: int, tokens: int, max_token_layers: int) -> list[list[_Group]]:
    """The rows of alpha_1..alpha_(m-1) (alpha_m = 1 is row 0) split into passes within the budget."""
    inner = _alphas(steps)[1:-1]
    groups = []
    for layer in range(layers):
        rows_fitting = max(1, max_token_layers // (tokens * (layers - layer)))
        for site in SITES:
            for start in range(0, len(inner), rows_fitting):
                groups.append(_Group(layer, site, inner[start:start + rows_fitting]))
    passes, current, cost = [], [], 0
    for group in groups:
        group_cost = len(group.alphas) * tokens * (layers - group.layer)
        if current and cost + group_cost > max_token_layers:
            passes.append(current)
            current, cost = [], 0
        current.append(group)
        cost += group_cost
    passes.append(current)
    return passes


def attribute_neurons(tower: Tower, batch: dict[str, torch.Tensor], target_embedding: np.ndarray,
                      steps: int = DEFAULT_STEPS, max_token_layers: int = MAX_TOKEN_LAYERS) -> NeuronAttribution:
    """Attributions of every FFN neuron of every layer for s = pooled(batch) . target_embedding.

    Every row's score depends on that row alone, so one backward of the summed scores of a pass
    gives every row its gradient, taken with respect to the scaled activations (never the weights).
    """
    batch = _single_sequence(batch)
    sites, first_layer = ffn_sites(tower), transformer_layers(tower)[0]
    target = _target(target_embedding, tower.dim)
    keys = [(layer, site) for layer in range(len(sites)) for site in SITES]
    gradient_sums: dict[tuple[int, str], torch.Tensor] = {}
    activations: dict[tuple[int, str], torch.Tensor] = {}
    for number, groups in enumerate(_plan(len(sites), steps, batch["input_ids"].shape[1], max_token_layers)):
        scaler = _RowScaler(sites, groups, grow=True)
        with scaler.installed(first_layer), torch.enable_grad():
            scores = tower.forward(batch) @ target
            grads = scaler.gradients(scores, keys if number == 0 else sorted({(g.layer, g.site) for g in groups}))
        if number == 0:
            activations = scaler.clean
            gradient_sums = {key: grads[key][0] for key in keys}
        for group in groups:
            rows = grads[group.layer, group.site][group.offset:group.offset + len(group.alphas)]
            gradient_sums[group.layer, group.site] = gradient_sums[group.layer, group.site] + rows.sum(0)

    baseline_groups = [_Group(layer, site, torch.zeros(1)) for layer, site in keys]
    scaler = _RowScaler(sites, baseline_groups, grow=True)
    with scaler.installed(first_layer), torch.no_grad():
        scores = tower.forward(batch) @ target
    baselines = {site: np.array([float(scores[g.offset]) for g in baseline_groups if g.site == site]) for site in SITES}
    return NeuronAttribution(_stack_attributions(activations, gradient_sums, len(sites), steps),
                             float(scores[0]), baselines, steps, _tokens(tower, batch))


def attribute_neurons_per_layer(tower: Tower, batch: dict[str, torch.Tensor], target_embedding: np.ndarray,
                                steps: int = DEFAULT_STEPS) -> NeuronAttribution:
    """Reference (Dai et al.): per (layer, site), the m+1 scaled copies through the whole model."""
    batch = _single_sequence(batch)
    sites, first_layer = ffn_sites(tower), transformer_layers(tower)[0]
    target = _target(target_embedding, tower.dim)
    alphas = _alphas(steps)
    rows = {key: value.expand(len(alphas), -1) for key, value in batch.items()}
    gradient_sums, activations = {}, {}
    baselines = {site: np.zeros(len(sites)) for site in SITES}
    with torch.no_grad():
        score = float(tower.forward(batch)[0] @ target)
    for layer in range(len(sites)):
        for site in SITES:
            scaler = _RowScaler(sites, [_Group(layer, site, alphas)], grow=False)
            with scaler.installed(first_layer), torch.enable_grad():
                scores = tower.forward(rows) @ target
                grad = scaler.gradients(scores, [(layer, site)])[layer, site]
            activations[layer, site] = scaler.clean[layer, site]
            gradient_sums[layer, site] = grad[1:].sum(0)
            baselines[site][layer] = float(scores[0].detach())
    return NeuronAttribution(_stack_attributions(activations, gradient_sums, len(sites), steps),
                             score, baselines, steps, _tokens(tower, batch))


# --------------------------------------------------------------------------- query / passage analyses

@dataclass
class TargetedAttribution:
    """An attribution together with what it explains: which tower, which input, against which passage."""

    tower: str  # "query" or "context"
    query: str
    passage: int  # the passage whose embedding (query tower) or text (context tower) is used
    attribution: NeuronAttribution


def _vector_digest(vector: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(vector, dtype=np.float32).tobytes()).hexdigest()


def _cached_attribution(encoder: Encoder, tower_name: str, batch: dict[str, torch.Tensor], inputs: list,
                        target: np.ndarray, steps: int, cache: ResultCache | None) -> NeuronAttribution:
    tower = encoder.query if tower_name == "query" else encoder.context
    params = {"model": encoder.fingerprint, "tower": tower_name, "input": inputs,
              "input_ids": batch["input_ids"][0].tolist(), "target": _vector_digest(target),
              "steps": steps, "version": CACHE_VERSION}

    def compute() -> NeuronAttribution:
        return attribute_neurons(tower, batch, target, steps)

    if cache is None:
        return compute()
    return cache.get_or_compute("neuron-attribution", params, compute,
                                is_valid=lambda value: isinstance(value, NeuronAttribution))


def top1_passages(encoder: Encoder, index: DenseIndex, texts: Sequence[str]) -> list[int]:
    vectors = encoder.encode_queries(list(texts), batch_size=128)
    _, indices = index.search(vectors, 1)
    return [int(i) for i in indices[:, 0]]


def _top1(encoder: Encoder, index: DenseIndex, corpus: Corpus, text: str, cache: ResultCache | None) -> int:
    return retrieve(encoder, index, corpus, text, k=1, cache=cache).hits[0].index


def attribute_query(encoder: Encoder, index: DenseIndex, corpus: Corpus, text: str, passage: int | None = None,
                    steps: int = DEFAULT_STEPS, cache: ResultCache | None = None) -> TargetedAttribution:
    """Query-tower neurons; target: the passage's indexed embedding (default: the model's own top-1)."""
    query = prepare_query(encoder, text)
    if passage is None:
        passage = _top1(encoder, index, corpus, query.text, cache)
    target = index.embeddings[passage]
    batch = encoder.query.tokenize([query.text])
    attribution = _cached_attribution(encoder, "query", batch, [query.text], target, steps, cache)
    return TargetedAttribution("query", query.text, passage, attribution)


def attribute_passage(encoder: Encoder, index: DenseIndex, corpus: Corpus, text: str, passage: int | None = None,
                      steps: int = DEFAULT_STEPS, cache: ResultCache | None = None,
                      max_length: int = PASSAGE_MAX_LENGTH) -> TargetedAttribution:
    """Context-tower neurons on a (title, text) passage; target: the fixed query embedding."""
    query = prepare_query(encoder, text)
    if passage is None:
        passage = _top1(encoder, index, corpus, query.text, cache)
    target = encoder.encode_queries([query.text])[0]
    title, body = corpus.titles[passage], corpus.texts[passage]
    batch = encoder.context.tokenize([title], [body], max_length=max_length)
    attribution = _cached_attribution(encoder, "context", batch, [title, body, max_length], target, steps, cache)
    return TargetedAttribution("context", query.text, passage, attribution)


# --------------------------------------------------------------------------- Figure-1 aggregate

def aggregate_sample(corpus: Corpus, size: int, seed: int = 0) -> list[LabelledQuery]:
    """A fixed sample of held-out description queries; a smaller size is a prefix of a larger one."""
    _, held_out = split_indices(corpus)
    queries = description_queries(corpus, held_out)
    order = np.random.default_rng(seed).permutation(len(queries))
    return [queries[i] for i in order[:size]]


@dataclass
class NeuronAggregate:
    """Query-tower attributions of N queries: per site an array (queries, layers, neurons)."""

    queries: list[str]
    passages: list[int]
    scores: dict[str, np.ndarray]
    steps: int

    def query_counts(self, threshold: float = DEFAULT_THRESHOLD) -> dict[str, np.ndarray]:
        """Per site, (layers, neurons): in how many queries each neuron is above threshold."""
        return {site: above_threshold(values, threshold).sum(0) for site, values in self.scores.items()}

    def layer_counts(self, threshold: float = DEFAULT_THRESHOLD) -> dict[str, np.ndarray]:
        """Per site and layer: neurons above threshold in at least one query (Figure 1's labels)."""
        return {site: (counts > 0).sum(1) for site, counts in self.query_counts(threshold).items()}

    def strongly_activated(self, threshold: float = DEFAULT_THRESHOLD) -> dict[str, np.ndarray]:
        """Per site, the number of neurons above threshold in each query (Table 2, one value per query)."""
        return {site: above_threshold(values, threshold).sum((1, 2)) for site, values in self.scores.items()}


def _aggregate_params(encoder: Encoder, index: DenseIndex, queries: Sequence[LabelledQuery], steps: int) -> dict:
    return {"model": encoder.fingerprint, "index": index.params, "queries": [q.text for q in queries],
            "steps": steps, "version": CACHE_VERSION}


def cached_aggregate(encoder: Encoder, index: DenseIndex, queries: Sequence[LabelledQuery], steps: int,
                     cache: ResultCache) -> NeuronAggregate | None:
    value = cache.get("neuron-aggregate", _aggregate_params(encoder, index, queries, steps))
    return value if isinstance(value, NeuronAggregate) else None


def aggregate_neurons(encoder: Encoder, index: DenseIndex, corpus: Corpus, queries: Sequence[LabelledQuery],
                      cache: ResultCache, steps: int = DEFAULT_STEPS,
                      progress: Progress | None = None) -> NeuronAggregate:
    """Each query's attribution is cached on its own, so an interrupted run resumes where it stopped."""
    if not queries:
        raise ValueError("the aggregate needs at least one query")

    def compute() -> NeuronAggregate:
        texts = [prepare_query(encoder, q.text).text for q in queries]
        passages = top1_passages(encoder, index, texts)
        per_query = []
        for done, (text, passage) in enumerate(zip(texts, passages), start=1):
            per_query.append(attribute_query(encoder, index, corpus, text, passage, steps, cache).attribution)
            if progress:
                progress(done, len(texts))
        scores = {site: np.stack([a.scores[site] for a in per_query]).astype(np.float32) for site in SITES}
        return NeuronAggregate(texts, passages, scores, steps)

    return cache.get_or_compute("neuron-aggregate", _aggregate_params(encoder, index, queries, steps), compute,
                                is_valid=lambda value: isinstance(value, NeuronAggregate))
