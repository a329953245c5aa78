"""Knowledge-neuron attribution (Dai et al. 2022, as used in arXiv 2402.11035) for FFN neurons.

For layer l and site S (FFN intermediate activation after the non-linearity, or the FFN output
dense), the site's activation a is scaled by alpha from 0 to 1 at every token position and
    Attr_i = sum over positions of a_i * mean over k=1..m of ds/d(alpha_k a_i),  alpha_k = k/m,
with s = pooled(x) . e and e the other tower's embedding, held fixed.

Both sites live on the FFN's down projection (BERT/RoBERTa `output.dense`, DistilBERT `ffn.lin2`; the model
family's adapter in core.adapters finds it): the intermediate activation is its input, the output site its
output, so one Linear per layer is hooked.

`attribute_neurons` runs every (layer, site, step) row in a few batched passes: a pass starts from
the clean input alone, and each layer's rows join the batch at that layer's FFN as copies of the
clean row, so the forward below (and the layer's own attention) is computed once, not per step.
`attribute_neurons_per_layer` is the plain reference (Dai et al.): for each (layer, site), the
m+1 scaled copies through the whole model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .adapters import FfnSite, NeuronSiteError  # noqa: F401 (NeuronSiteError is re-exported)
from .cache import Analysis, ResultCache
from .corpus import Corpus, LabelledQuery, description_queries, split_indices
from .device import scaled
from .index import PASSAGE_MAX_LENGTH, DenseIndex
from .pair import Encoder, Tower
from .retrieval import prepare_query, retrieve, search_queries
from .runtime import model_work, require_model_job

SITES: tuple[str, ...] = ("intermediate", "output")
DEFAULT_STEPS = 20
DEFAULT_THRESHOLD = 0.1
# Activation budget of one batched pass, in (row x token x remaining layer) units: a BERT-base
# pass of this size peaked at ~1.9 GB above the model (measured, 16 tokens, m = 20). Scaled to the device
# (core.device).
MAX_TOKEN_LAYERS = 20_000
# The Figure-1 aggregate runs queries together: of similar length (the shortest at least this share of the
# longest, so padding stays small), as many as fill this many passes.
MIN_LENGTH_SHARE = 0.8
BUNDLE_PASSES = 4
Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------- sites
# Where a family keeps its layers and FFNs is its adapter's business (core.adapters, asked through the
# Tower); FfnSite and NeuronSiteError live there and are re-exported here.


def transformer_layers(tower: Tower) -> nn.ModuleList:
    return tower.layers


def ffn_sites(tower: Tower) -> list[FfnSite]:
    return tower.ffn_sites


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


NEURON_ATTRIBUTION = Analysis(
    "neuron-attribution",
    version=1,
    fields=("model", "tower", "input", "input_ids", "target", "steps"),
    result_type=NeuronAttribution,
)


# --------------------------------------------------------------------------- batched rows


def _alphas(steps: int) -> torch.Tensor:
    """alpha_0 = 0 (for the baseline score) then the Riemann points k/m, k = 1..m."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    return torch.arange(steps + 1, dtype=torch.float32) / steps


def _targets(target_embeddings: np.ndarray, dim: int, device: torch.device) -> torch.Tensor:
    """(queries, dim) on the model's device; one vector is the target of one query."""
    targets = np.asarray(target_embeddings, dtype=np.float32)
    targets = targets.reshape(1, -1) if targets.ndim == 1 else targets
    if targets.shape[1] != dim:
        raise ValueError(f"target embedding has {targets.shape[1]} dimensions, the tower produces {dim}")
    return torch.as_tensor(targets, device=device)


def _single_sequence(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if batch["input_ids"].shape[0] != 1:
        raise ValueError("neuron attribution analyses one sequence at a time")
    return batch


@dataclass
class _Group:
    """Rows that scale one site of one layer of one query (a row of the input batch) by `alphas`."""

    layer: int
    site: str
    alphas: torch.Tensor
    query: int = 0
    offset: int = 0


class _RowScaler:
    """Hooks on the FFNs that multiply each layer's site by a per-row factor (alpha for the rows of
    that layer's groups, 1 for every other row) and keep the product, whose gradient is wanted.

    With `grow`, the forward starts from the clean inputs alone (rows 0..queries-1, one per query) and
    each layer's rows join the batch at that layer's FFN as copies of their query's row, so nothing below
    is computed twice; a query's own row gives the alpha = 1 gradients of every (layer, site) at once.
    `source` is the input row each row copies: the layers above a join and the pooling read its mask.
    """

    def __init__(self, sites: Sequence[FfnSite], groups: Sequence[_Group], grow: bool, queries: int = 1):
        self.sites = sites
        self.grow = grow
        self.queries = queries
        self.by_layer: dict[int, list[_Group]] = {}
        for group in groups:
            self.by_layer.setdefault(group.layer, []).append(group)
        self.scaled: dict[tuple[int, str], torch.Tensor] = {}
        self.clean: dict[tuple[int, str], torch.Tensor] = {}
        sources = [torch.arange(queries)]
        if grow:
            size = queries
            for layer in sorted(self.by_layer):
                for group in self.by_layer[layer]:
                    group.offset = size
                    size += len(group.alphas)
                    sources.append(torch.full((len(group.alphas),), group.query))
        self.source = torch.cat(sources)

    def _join(self, layer: int, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        start = tensors[0].shape[0]
        copies = self.source[start : start + sum(len(g.alphas) for g in self.by_layer[layer])].to(tensors[0].device)
        return [torch.cat([t, t.detach()[copies]]) for t in tensors]

    def _widen(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """A layer above a join gets its per-row inputs (the attention mask) for the rows that joined."""
        rows = args[0].shape[0]
        if rows == self.queries:
            return None
        source = self.source[:rows].to(args[0].device)

        def widen(value):
            per_row = isinstance(value, torch.Tensor) and value.dim() > 1 and value.shape[0] == self.queries
            return value[source] if per_row else value

        return (args[0], *map(widen, args[1:])), {key: widen(value) for key, value in kwargs.items()}

    def _scale(self, tensor: torch.Tensor, layer: int, site: str) -> torch.Tensor:
        factors = torch.ones(tensor.shape[0], dtype=tensor.dtype, device=tensor.device)
        for group in self.by_layer.get(layer, ()):
            if group.site == site:
                factors[group.offset : group.offset + len(group.alphas)] = group.alphas.to(tensor.device)
        self.clean[layer, site] = tensor[: self.queries].detach()
        self.scaled[layer, site] = tensor * factors.view(-1, *([1] * (tensor.dim() - 1)))
        return self.scaled[layer, site]

    def _hooks(self, layer: int, site: FfnSite) -> list:
        handles = [
            site.down.register_forward_pre_hook(
                lambda module, args: (self._scale(args[0], layer, "intermediate"),) + args[1:]
            ),
            site.down.register_forward_hook(lambda module, args, output: self._scale(output, layer, "output")),
        ]
        if self.grow and layer in self.by_layer:
            if site.join_before:
                handles.append(
                    site.join.register_forward_pre_hook(
                        lambda module, args: tuple(self._join(layer, args[:2])) + args[2:]
                    )
                )
            else:
                handles.append(
                    site.join.register_forward_hook(lambda module, args, output: self._join(layer, [output])[0])
                )
        return handles

    @contextmanager
    def installed(self, layers: nn.ModuleList) -> Iterator[None]:
        require_model_job("Scaling FFN neurons")
        handles = [handle for layer, site in enumerate(self.sites) for handle in self._hooks(layer, site)]
        if self.grow and self.queries > 1:  # one query's masks broadcast over its rows
            handles += [layer.register_forward_pre_hook(self._widen, with_kwargs=True) for layer in layers]
        if torch.is_grad_enabled():
            # A graph from the bottom even when no weight requires a gradient.
            handles.append(
                layers[0].register_forward_pre_hook(
                    lambda module, args: (args[0].detach().requires_grad_(),) + args[1:]
                )
            )
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def gradients(self, scores: torch.Tensor, keys: Sequence[tuple[int, str]]) -> dict[tuple[int, str], torch.Tensor]:
        grads = torch.autograd.grad(scores.sum(), [self.scaled[key] for key in keys])
        return dict(zip(keys, grads))


def _tokens(tower: Tower, batch: dict[str, torch.Tensor], query: int = 0) -> list[str]:
    return tower.convert_ids_to_tokens(batch["input_ids"][query][batch["attention_mask"][query].bool()].tolist())


def _stack_attributions(
    activations: dict, gradient_sums: dict, layers: int, steps: int, query: int = 0, keep: torch.Tensor | None = None
) -> dict[str, np.ndarray]:
    """Attr = sum over the query's positions (`keep`: not padding) of a * (sum of step gradients) / m, per site
    as (layers, neurons); activations and gradient sums hold one (tokens, neurons) entry per query."""

    def attribution(layer: int, site: str) -> np.ndarray:
        product = activations[layer, site][query] * gradient_sums[layer, site][query] / steps
        return (product if keep is None else product[keep]).sum(0).double().cpu().numpy()

    return {site: np.stack([attribution(layer, site) for layer in range(layers)]) for site in SITES}


# --------------------------------------------------------------------------- batched attribution


def _plan(layers: int, steps: int, tokens: int, max_token_layers: int, queries: int = 1) -> list[list[_Group]]:
    """Every query's rows of alpha_1..alpha_(m-1) (alpha_m = 1 is the query's own row) split into passes within
    the budget; every pass also runs the queries' own rows."""
    inner = _alphas(steps)[1:-1]
    groups = []
    for query in range(queries):
        for layer in range(layers):
            rows_fitting = max(1, max_token_layers // (tokens * (layers - layer)))
            for site in SITES:
                for start in range(0, len(inner), rows_fitting):
                    groups.append(_Group(layer, site, inner[start : start + rows_fitting], query))
    own_rows = queries * tokens * layers
    passes, current, cost = [], [], own_rows
    for group in groups:
        group_cost = len(group.alphas) * tokens * (layers - group.layer)
        if current and cost + group_cost > max_token_layers:
            passes.append(current)
            current, cost = [], own_rows
        current.append(group)
        cost += group_cost
    passes.append(current)
    return passes


@model_work
def attribute_neurons(
    tower: Tower,
    batch: dict[str, torch.Tensor],
    target_embedding: np.ndarray,
    steps: int = DEFAULT_STEPS,
    max_token_layers: int | None = None,
) -> NeuronAttribution:
    """Attributions of every FFN neuron of every layer for s = pooled(batch) . target_embedding."""
    return attribute_neurons_batch(tower, _single_sequence(batch), target_embedding, steps, max_token_layers)[0]


def _scores(tower: Tower, batch: dict[str, torch.Tensor], targets: torch.Tensor, scaler: _RowScaler) -> torch.Tensor:
    source = scaler.source.to(targets.device)
    return (tower.forward(batch, rows=source) * targets[source]).sum(-1)


@model_work
def attribute_neurons_batch(
    tower: Tower,
    batch: dict[str, torch.Tensor],
    target_embeddings: np.ndarray,
    steps: int = DEFAULT_STEPS,
    max_token_layers: int | None = None,
) -> list[NeuronAttribution]:
    """`attribute_neurons` of every row of a padded batch (one query each, targets: one vector per row), their
    rows together in every pass. max_token_layers: the budget of a pass (default: MAX_TOKEN_LAYERS for the device).

    Every row's score depends on that row alone, so one backward of the summed scores of a pass
    gives every row its gradient, taken with respect to the scaled activations (never the weights).
    """
    queries, tokens = batch["input_ids"].shape
    sites, layers = ffn_sites(tower), transformer_layers(tower)
    targets = _targets(target_embeddings, tower.dim, tower.device)
    if len(targets) != queries:
        raise ValueError(f"{len(targets)} target embeddings for {queries} inputs")
    budget = scaled(MAX_TOKEN_LAYERS, tower.device) if max_token_layers is None else max_token_layers
    keys = [(layer, site) for layer in range(len(sites)) for site in SITES]
    gradient_sums: dict[tuple[int, str], torch.Tensor] = {}
    activations: dict[tuple[int, str], torch.Tensor] = {}
    for number, groups in enumerate(_plan(len(sites), steps, tokens, budget, queries)):
        scaler = _RowScaler(sites, groups, grow=True, queries=queries)
        with scaler.installed(layers), torch.enable_grad():
            scores = _scores(tower, batch, targets, scaler)
            grads = scaler.gradients(scores, keys if number == 0 else sorted({(g.layer, g.site) for g in groups}))
        if number == 0:
            activations = scaler.clean
            gradient_sums = {key: grads[key][:queries] for key in keys}
        for group in groups:
            rows = grads[group.layer, group.site][group.offset : group.offset + len(group.alphas)]
            gradient_sums[group.layer, group.site][group.query] += rows.sum(0)

    baseline_groups = [_Group(layer, site, torch.zeros(1), query) for query in range(queries) for layer, site in keys]
    scaler = _RowScaler(sites, baseline_groups, grow=True, queries=queries)
    with scaler.installed(layers), torch.no_grad():
        scores = _scores(tower, batch, targets, scaler).cpu()
    results = []
    for query in range(queries):
        baselines = {
            site: np.array([float(scores[g.offset]) for g in baseline_groups if g.query == query and g.site == site])
            for site in SITES
        }
        attributions = _stack_attributions(
            activations, gradient_sums, len(sites), steps, query, batch["attention_mask"][query].bool()
        )
        results.append(
            NeuronAttribution(attributions, float(scores[query]), baselines, steps, _tokens(tower, batch, query))
        )
    return results


@model_work
def attribute_neurons_per_layer(
    tower: Tower, batch: dict[str, torch.Tensor], target_embedding: np.ndarray, steps: int = DEFAULT_STEPS
) -> NeuronAttribution:
    """Reference (Dai et al.): per (layer, site), the m+1 scaled copies through the whole model."""
    batch = _single_sequence(batch)
    sites, layers = ffn_sites(tower), transformer_layers(tower)
    target = _targets(target_embedding, tower.dim, tower.device)[0]
    alphas = _alphas(steps)
    rows = {key: value.expand(len(alphas), -1) for key, value in batch.items()}
    gradient_sums, activations = {}, {}
    baselines = {site: np.zeros(len(sites)) for site in SITES}
    with torch.no_grad():
        score = float(tower.forward(batch)[0] @ target)
    for layer in range(len(sites)):
        for site in SITES:
            scaler = _RowScaler(sites, [_Group(layer, site, alphas)], grow=False)
            with scaler.installed(layers), torch.enable_grad():
                scores = tower.forward(rows) @ target
                grad = scaler.gradients(scores, [(layer, site)])[layer, site]
            activations[layer, site] = scaler.clean[layer, site]
            gradient_sums[layer, site] = grad[1:].sum(0, keepdim=True)
            baselines[site][layer] = float(scores[0].detach())
    return NeuronAttribution(
        _stack_attributions(activations, gradient_sums, len(sites), steps),
        score,
        baselines,
        steps,
        _tokens(tower, batch),
    )


def query_bundles(lengths: Sequence[int], layers: int, steps: int, max_token_layers: int) -> list[list[int]]:
    """Indices of queries (by token count) in bundles that run together, shortest first: of similar length
    (the shortest at least MIN_LENGTH_SHARE of the longest) and with rows, padded, for at most BUNDLE_PASSES
    passes of `max_token_layers`; a query alone may need more."""
    per_token = layers + (steps - 1) * layers * (layers + 1)  # its own row, then 2 sites x (m-1) rows per layer
    bundles: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        current = bundles[-1] if bundles else []
        if (
            not current
            or lengths[current[0]] < MIN_LENGTH_SHARE * lengths[i]
            or (len(current) + 1) * lengths[i] * per_token > BUNDLE_PASSES * max_token_layers
        ):
            bundles.append([i])
        else:
            current.append(i)
    return bundles


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


def _cached_attribution(
    encoder: Encoder,
    tower_name: str,
    batch: dict[str, torch.Tensor],
    inputs: list,
    target: np.ndarray,
    steps: int,
    cache: ResultCache | None,
) -> NeuronAttribution:
    tower = encoder.query if tower_name == "query" else encoder.context

    def compute() -> NeuronAttribution:
        return attribute_neurons(tower, batch, target, steps)

    return NEURON_ATTRIBUTION.get_or_compute(
        cache, compute, **_attribution_key(encoder, tower_name, batch, inputs, target, steps)
    )


def _attribution_key(
    encoder: Encoder, tower_name: str, batch: dict[str, torch.Tensor], inputs: list, target: np.ndarray, steps: int
) -> dict:
    return {
        "model": encoder.fingerprint,
        "tower": tower_name,
        "input": inputs,
        "input_ids": batch["input_ids"][0].tolist(),
        "target": _vector_digest(target),
        "steps": steps,
    }


def top1_passages(encoder: Encoder, index: DenseIndex, texts: Sequence[str]) -> list[int]:
    _, indices = search_queries(encoder, index, texts, 1)
    return [int(i) for i in indices[:, 0]]


def _top1(encoder: Encoder, index: DenseIndex, corpus: Corpus, text: str, cache: ResultCache | None) -> int:
    return retrieve(encoder, index, corpus, text, k=1, cache=cache).hits[0].index


def attribute_query(
    encoder: Encoder,
    index: DenseIndex,
    corpus: Corpus,
    text: str,
    passage: int | None = None,
    steps: int = DEFAULT_STEPS,
    cache: ResultCache | None = None,
) -> TargetedAttribution:
    """Query-tower neurons; target: the passage's indexed embedding (default: the model's own top-1)."""
    query = prepare_query(encoder, text)
    if passage is None:
        passage = _top1(encoder, index, corpus, query.text, cache)
    target = index.embeddings[passage]
    batch = encoder.query.tokenize([query.text])
    attribution = _cached_attribution(encoder, "query", batch, [query.text], target, steps, cache)
    return TargetedAttribution("query", query.text, passage, attribution)


def attribute_passage(
    encoder: Encoder,
    index: DenseIndex,
    corpus: Corpus,
    text: str,
    passage: int | None = None,
    steps: int = DEFAULT_STEPS,
    cache: ResultCache | None = None,
    max_length: int = PASSAGE_MAX_LENGTH,
) -> TargetedAttribution:
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


NEURON_AGGREGATE = Analysis(
    "neuron-aggregate", version=1, fields=("model", "index", "queries", "steps"), result_type=NeuronAggregate
)


def _aggregate_key(encoder: Encoder, index: DenseIndex, queries: Sequence[LabelledQuery], steps: int) -> dict:
    return {"model": encoder.fingerprint, "index": index.params, "queries": [q.text for q in queries], "steps": steps}


def lookup_aggregate(
    encoder: Encoder, index: DenseIndex, queries: Sequence[LabelledQuery], steps: int, cache: ResultCache
) -> NeuronAggregate | None:
    """The stored Figure-1 aggregate, or None (never computes)."""
    return NEURON_AGGREGATE.lookup(cache, **_aggregate_key(encoder, index, queries, steps))


def aggregate_neurons(
    encoder: Encoder,
    index: DenseIndex,
    corpus: Corpus,
    queries: Sequence[LabelledQuery],
    cache: ResultCache,
    steps: int = DEFAULT_STEPS,
    progress: Progress | None = None,
) -> NeuronAggregate:
    """Each query's attribution is cached on its own, so an interrupted run resumes where it stopped."""
    if not queries:
        raise ValueError("the aggregate needs at least one query")

    def compute() -> NeuronAggregate:
        texts = [prepare_query(encoder, q.text).text for q in queries]
        passages = top1_passages(encoder, index, texts)
        targets = np.stack([index.embeddings[passage] for passage in passages])
        return aggregate_chunk(encoder, texts, passages, targets, steps, cache, progress)

    return NEURON_AGGREGATE.get_or_compute(cache, compute, **_aggregate_key(encoder, index, queries, steps))


def aggregate_chunk(
    encoder: Encoder,
    texts: Sequence[str],
    passages: Sequence[int],
    targets: np.ndarray,
    steps: int = DEFAULT_STEPS,
    cache: ResultCache | None = None,
    progress: Progress | None = None,
) -> NeuronAggregate:
    """The aggregate of prepared query texts with their top-1 passages and those passages' embeddings (what
    `attribute_query` targets); a Ray worker (core.distributed) runs it with no index and no cache.

    The queries not yet cached run in bundles of similar length (`query_bundles`), each bundle's rows together
    (`attribute_neurons_batch`); each query's attribution is cached on its own, as `attribute_query` caches it.
    """
    tower = encoder.query
    keys = [
        _attribution_key(encoder, "query", tower.tokenize([text]), [text], target, steps)
        for text, target in zip(texts, targets)
    ]
    per_query: list[NeuronAttribution | None] = [NEURON_ATTRIBUTION.lookup(cache, **key) for key in keys]
    missing = [i for i, found in enumerate(per_query) if found is None]
    done = len(texts) - len(missing)
    budget = scaled(MAX_TOKEN_LAYERS, tower.device)
    lengths = [len(keys[i]["input_ids"]) for i in missing]
    for bundle in query_bundles(lengths, tower.layer_count, steps, budget):
        chosen = [missing[j] for j in bundle]
        batch = tower.tokenize([texts[i] for i in chosen])
        results = attribute_neurons_batch(tower, batch, np.stack([targets[i] for i in chosen]), steps, budget)
        for i, result in zip(chosen, results):
            per_query[i] = NEURON_ATTRIBUTION.get_or_compute(cache, lambda result=result: result, **keys[i])
        done += len(chosen)
        if progress:
            progress(done, len(texts))
    scores = {site: np.stack([a.scores[site] for a in per_query]).astype(np.float32) for site in SITES}
    return NeuronAggregate(list(texts), [int(p) for p in passages], scores, steps)
