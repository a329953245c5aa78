"""Token-level Integrated Gradients of the retrieval score s(q, p) = pooled(q) · pooled(p).

Method of Yuksel & Kamps 2025 (arXiv 2501.14459): the baseline keeps [CLS]/[SEP] and replaces every
other token by [PAD]; the other tower's embedding stays fixed. captum's LayerIntegratedGradients runs
over the word-embedding output and a token's attribution is the sum over the embedding dimension.
IG is linear in the target, so the query attribution summed over the top-k passages is one run on
pooled(q) · Σ_i e_i.

Step counts are chosen per input by the completeness delta (adaptive quadrature): every input is first
integrated with START_STEPS nodes placed by a sinh substitution of the path variable, and only inputs whose
delta is above DELTA_TOLERANCE are run again with the plain rule at n_steps. Each TokenAttribution records
the rule it was computed with.
"""
from __future__ import annotations

import contextlib
import math
import string
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Sequence

import numpy as np
import pandas as pd
import torch
from bm25s.stopwords import STOPWORDS_EN_PLUS
from captum.attr import LayerIntegratedGradients

from .cache import ResultCache
from .corpus import Corpus
from .index import PASSAGE_MAX_LENGTH
from .pair import Encoder, Tower
from .retrieval import clean_query

Progress = Callable[[int, int], None]
Side = Literal["query", "passage"]
METHODS: tuple[str, ...] = ("gausslegendre", "riemann_trapezoid", "riemann_middle", "riemann_left", "riemann_right")
# The smallest Gauss-Legendre step count with delta < DELTA_TOLERANCE on all 20 typical (description query,
# article) pairs, both sides, both offline models (python -m bench.token_ig --sweep; bench/results_token_ig.md).
DEFAULT_STEPS = 20
DEFAULT_METHOD = "gausslegendre"
DELTA_TOLERANCE = 0.01  # of |s(x) - s(baseline)|
# First pass of the adaptive quadrature (inputs above DELTA_TOLERANCE are re-run with the plain rule at n_steps).
# Plain Gauss-Legendre at 6-8 steps missed the tolerance on 23-25 of the top-25 passages; with the sinh
# substitution, 12 steps had smaller deltas and token errors than plain 20 on both offline models
# (python -m bench.token_ig --sweep; bench/results_token_ig.md).
START_STEPS = 12
START_CENTER = 0.4
START_WIDTH = 0.08
TOP_K = 25
# Tokens per forward pass: fwd+bwd throughput on the 2-core CPU was flat from 2048 to 8192 tokens and fell
# below that; smaller passes keep memory low (attention is O(L^2)).
TOKEN_BUDGET = 4096
FORMAT_VERSION = 2
STOPWORDS = frozenset(STOPWORDS_EN_PLUS)


class AttributionError(ValueError):
    """An input that cannot be attributed; the message is meant for the user."""


@dataclass(frozen=True)
class SinhSubstitution:
    """The path variable α = c + w·sinh(A·t − B), with A and B such that t = 0, 1 give α = 0, 1.

    IG integrates ds/dα over α ∈ [0, 1]; on both offline models that integrand is a narrow peak near
    α ≈ 0.3-0.5, which Gauss-Legendre in α resolves only with ~20 nodes. Integrating over t instead
    (dα = α'(t) dt) crowds the nodes around α = c: the sinh transformation of Johnston & Elliott (2005)
    for nearly singular integrands. The integral, and so every exact IG attribution, is unchanged.
    """

    center: float = START_CENTER
    width: float = START_WIDTH

    def __post_init__(self):
        if not (0 < self.center < 1 and self.width > 0):
            raise AttributionError("The sinh substitution needs a center strictly between 0 and 1 and a width > 0.")

    def alpha(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """α(t) and dα/dt."""
        shift = math.asinh(self.center / self.width)
        scale = math.asinh((1 - self.center) / self.width) + shift
        return (self.center + self.width * torch.sinh(scale * t - shift),
                self.width * scale * torch.cosh(scale * t - shift))


@dataclass(frozen=True)
class Quadrature:
    """One pass of the adaptive quadrature: `method` with n_steps nodes, in α or (substitution) in t."""

    n_steps: int
    method: str
    substitution: SinhSubstitution | None = None

    def describe(self) -> str:
        rule = f"{self.n_steps} steps"
        return f"{rule}, sinh-substituted" if self.substitution else rule


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

    @property
    def passes(self) -> tuple[Quadrature, ...]:
        """Each input stops at the first pass whose delta is within tolerance (or is flagged after the last)."""
        full = Quadrature(self.n_steps, self.method)
        if self.start_steps is None or self.start_steps >= self.n_steps:
            return (full,)
        return Quadrature(self.start_steps, self.method, self.start_substitution), full

    def params(self) -> dict:
        start = self.passes[0] if len(self.passes) > 1 else None
        return {"n_steps": self.n_steps, "method": self.method, "passage_max_length": self.passage_max_length,
                "start_steps": start.n_steps if start else None,
                "start_substitution": [start.substitution.center, start.substitution.width]
                if start and start.substitution else None,
                "format": FORMAT_VERSION}


@dataclass(frozen=True)
class Token:
    text: str      # the tokenizer's token, e.g. "##ing"
    segment: int   # 0 = query or passage title, 1 = passage text, -1 = special token
    start: int     # character span in segments[segment]
    end: int
    word: int      # word number within its segment (sub-words share it), -1 for special tokens
    score: float

    @property
    def special(self) -> bool:
        return self.segment < 0


@dataclass(frozen=True)
class Word:
    text: str
    segment: int
    score: float
    tokens: int


@dataclass(frozen=True)
class TokenAttribution:
    """IG attributions of one input; `score` and `baseline_score` are s(x) and s(baseline); the rule used."""

    segments: tuple[str, ...]
    tokens: tuple[Token, ...]
    score: float
    baseline_score: float
    truncated: bool
    quadrature: Quadrature

    @property
    def n_steps(self) -> int:
        return self.quadrature.n_steps

    @property
    def total(self) -> float:
        return float(sum(t.score for t in self.tokens))

    @property
    def delta(self) -> float:
        return abs(self.total - (self.score - self.baseline_score))

    @property
    def relative_delta(self) -> float:
        gap = abs(self.score - self.baseline_score)
        return self.delta / gap if gap > 0 else (0.0 if self.delta == 0 else math.inf)

    @property
    def within_tolerance(self) -> bool:
        return self.relative_delta <= DELTA_TOLERANCE

    def words(self) -> list[Word]:
        """Sub-word tokens merged into words (the word's text is its span in the original input)."""
        groups: dict[tuple[int, int], list[Token]] = {}
        for token in self.tokens:
            if not token.special:
                groups.setdefault((token.segment, token.word), []).append(token)
        words = []
        for (segment, _), members in groups.items():
            start, end = min(t.start for t in members), max(t.end for t in members)
            words.append(Word(self.segments[segment][start:end], segment, float(sum(t.score for t in members)),
                              len(members)))
        return words


@dataclass(frozen=True)
class PairAttribution:
    query: TokenAttribution    # the passage embedding fixed
    passage: TokenAttribution  # the query embedding fixed


@dataclass(frozen=True)
class RankingAttribution:
    """Attributions for a query and its top-k passages (in rank order)."""

    passage_indices: tuple[int, ...]
    query_total: TokenAttribution  # target pooled(q) · Σ_i e_i, one IG run
    pairs: tuple[PairAttribution, ...]

    def pair_for(self, passage_index: int) -> PairAttribution | None:
        if passage_index in self.passage_indices:
            return self.pairs[self.passage_indices.index(passage_index)]
        return None

    def passage_rules(self) -> dict[Quadrature, int]:
        """Quadrature rule -> how many passages were attributed with it."""
        counts: dict[Quadrature, int] = {}
        for pair in self.pairs:
            counts[pair.passage.quadrature] = counts.get(pair.passage.quadrature, 0) + 1
        return counts


@dataclass(frozen=True)
class DeletionCurve:
    """Score after replacing the k most attributed tokens by [PAD] (k = 0..K), and a random-order control."""

    side: str
    ks: tuple[int, ...]
    attribution_order: tuple[float, ...]
    random_order: tuple[float, ...]  # mean over the random orders
    random_orders: int


@contextlib.contextmanager
def activation_grads_only(*models: torch.nn.Module):
    """No weight gradients during IG (saves their FLOPs and memory); restores the flags afterwards."""
    saved = [(p, p.requires_grad) for model in models for p in model.parameters()]
    for parameter, _ in saved:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in saved:
            parameter.requires_grad_(flag)


def _encode_inputs(tower: Tower, texts: Sequence[str], pairs: Sequence[str] | None, max_length: int | None):
    if not tower.tokenizer.is_fast:
        raise AttributionError("Token attributions need a fast (Rust) tokenizer to map tokens back to words.")
    if tower.tokenizer.pad_token_id is None:
        raise AttributionError("This model's tokenizer has no [PAD] token, which the IG baseline needs.")
    return tower.tokenize(texts, pairs, max_length, return_offsets_mapping=True,
                          return_special_tokens_mask=True)


def _require_queries(queries: Sequence[str]) -> None:
    if not all(clean_query(query) for query in queries):
        raise AttributionError("Type a query to attribute: this one is empty once control characters are dropped.")


def _model_inputs(batch) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


def pad_baseline(batch, pad_id: int) -> torch.Tensor:
    """Every attended token except the special ones ([CLS], [SEP]) becomes [PAD]."""
    keep = batch["special_tokens_mask"].bool() | ~batch["attention_mask"].bool()
    return torch.where(keep, batch["input_ids"], torch.full_like(batch["input_ids"], pad_id))


def _scores(tower: Tower, inputs: dict[str, torch.Tensor], others: torch.Tensor) -> torch.Tensor:
    """s = pooled(x) · other, row by row, without gradients, in chunks of TOKEN_BUDGET tokens."""
    rows = max(1, TOKEN_BUDGET // inputs["input_ids"].shape[1])
    out = []
    with torch.inference_mode():
        for start in range(0, len(others), rows):
            chunk = {k: v[start:start + rows] for k, v in inputs.items()}
            out.append((tower.forward(chunk) * others[start:start + rows]).sum(-1))
    return torch.cat(out)


def _substituted(point: torch.Tensor, inputs: torch.Tensor, baselines: torch.Tensor,
                 substitution: SinhSubstitution) -> torch.Tensor:
    """The word embeddings at α(t) for captum's path point b + t (x − b), with d/d(point) = dα/dt.

    The forward value is b + α(t) (x − b); the gradient reaching captum is scaled by α'(t) through a term
    that is zero in value, so captum's sum over nodes in t is the substituted integral ∫ f'(α(t)) α'(t) dt.
    """
    direction = inputs - baselines
    t = ((point - baselines) * direction).sum((1, 2)) / (direction * direction).sum((1, 2)).clamp_min(1e-30)
    alpha, slope = substitution.alpha(t.detach().clamp(0, 1))
    return (baselines + alpha[:, None, None] * direction
            + slope[:, None, None] * (point - point.detach()))


def _integrated_gradients(tower: Tower, batch, others: torch.Tensor, quadrature: Quadrature,
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-token IG of pooled(x_n) · others[n] for every row n; returns (attributions, s(x), s(baseline))."""
    inputs = _model_inputs(batch)
    names = [k for k in inputs if k != "input_ids"]
    baseline = pad_baseline(batch, tower.tokenizer.pad_token_id)
    ends = ()
    if quadrature.substitution is not None:
        with torch.no_grad():
            ends = (tower.word_embeddings(inputs["input_ids"]), tower.word_embeddings(baseline))
    # LayerIntegratedGradients first runs the whole model, without gradients, on the inputs and on the baselines
    # to read the layer's endpoints; their scores are s(x) and s(baseline), so they are kept, not recomputed.
    gradient_free: list[tuple[torch.Tensor, torch.Tensor]] = []

    def score(input_ids, *rest):
        extra, path_ends, other = rest[:len(names)], rest[len(names):-1], rest[-1]
        model_inputs = {"input_ids": input_ids, **dict(zip(names, extra))}
        if quadrature.substitution is None:
            pooled = tower.forward(model_inputs)
        else:
            # captum's hook replaces this output by the point on the path.
            point = tower.word_embeddings(input_ids)
            pooled = tower.forward(model_inputs, inputs_embeds=_substituted(point, *path_ends,
                                                                            quadrature.substitution))
        value = (pooled * other).sum(-1)
        if not torch.is_grad_enabled():
            gradient_free.append((input_ids, value))
        return value

    def endpoint(ids: torch.Tensor) -> np.ndarray:
        return next(value for seen, value in gradient_free if torch.equal(seen, ids)).numpy()

    rows, length = inputs["input_ids"].shape
    steps_per_chunk = max(1, TOKEN_BUDGET // (rows * length))
    with activation_grads_only(tower.model):
        attributions = LayerIntegratedGradients(score, tower.word_embeddings).attribute(
            inputs["input_ids"], baselines=baseline,
            additional_forward_args=(*(inputs[k] for k in names), *ends, others),
            n_steps=quadrature.n_steps, method=quadrature.method,
            internal_batch_size=rows * min(steps_per_chunk, quadrature.n_steps),
        )
    per_token = attributions.sum(-1).detach().numpy()
    return per_token, endpoint(inputs["input_ids"]), endpoint(baseline)


def _token_attribution(batch, row: int, segments: tuple[str, ...], scores: np.ndarray, score: float,
                       baseline_score: float, quadrature: Quadrature) -> TokenAttribution:
    encoding = batch.encodings[row]
    special = batch["special_tokens_mask"][row].tolist()
    tokens = []
    for position, text in enumerate(encoding.tokens):
        if not encoding.attention_mask[position]:
            continue
        sequence, word = encoding.sequence_ids[position], encoding.word_ids[position]
        start, end = encoding.offsets[position]
        is_special = bool(special[position]) or sequence is None or word is None
        tokens.append(Token(
            text=text, segment=-1 if is_special else sequence,
            start=0 if is_special else start, end=0 if is_special else end,
            word=-1 if is_special else word, score=float(scores[row, position]),
        ))
    return TokenAttribution(segments, tuple(tokens), float(score), float(baseline_score),
                            truncated=bool(encoding.overflowing), quadrature=quadrature)


def _length_groups(lengths: Sequence[int], n_steps: int) -> list[list[int]]:
    """Rows sorted by length, grouped so one group's IG (all steps) fits about one TOKEN_BUDGET forward pass.

    Small groups also give the progress callback something to report.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[i] * n_steps > TOKEN_BUDGET:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def _attribute_adaptively(tower: Tower, encode: Callable[[Sequence[int]], object],
                          segments: Sequence[tuple[str, ...]], others: torch.Tensor, passes: Sequence[Quadrature],
                          progress: Progress | None = None) -> list[TokenAttribution]:
    """IG of pooled(row n) · others[n] for every row, batched by length, with the first of the passes;
    rows whose relative delta is above DELTA_TOLERANCE are run again with the next.

    encode(rows) tokenizes those rows. progress(done, total) counts row runs; total grows by the re-runs.
    """
    lengths = encode(range(len(segments)))["attention_mask"].sum(1).tolist()
    results: list[TokenAttribution | None] = [None] * len(segments)
    pending = list(range(len(segments)))
    done, total = 0, len(pending)
    for level, quadrature in enumerate(passes):
        if level:
            pending = [i for i in pending if not results[i].within_tolerance]
            total += len(pending)
        for group in _length_groups([lengths[i] for i in pending], quadrature.n_steps):
            rows = [pending[g] for g in group]
            batch = encode(rows)
            attributions, scores, baselines = _integrated_gradients(tower, batch, others[rows], quadrature)
            for row, i in enumerate(rows):
                results[i] = _token_attribution(batch, row, segments[i], attributions, scores[row], baselines[row],
                                                quadrature)
            done += len(rows)
            if progress:
                progress(done, total)
    return results


def attribute_queries(encoder: Encoder, queries: Sequence[str], others: np.ndarray,
                      settings: IGSettings = IGSettings(), passes: Sequence[Quadrature] | None = None,
                      ) -> list[TokenAttribution]:
    """Query-side IG of pooled(q_n) · others[n] (others: fixed passage embeddings or their sum).

    passes replaces settings.passes (one pass: every input with that rule, as the completeness sweeps need).
    """
    _require_queries(queries)
    tower = encoder.query
    return _attribute_adaptively(
        tower, lambda rows: _encode_inputs(tower, [queries[i] for i in rows], None, None),
        [(query,) for query in queries], torch.as_tensor(np.asarray(others, dtype=np.float32)),
        passes or settings.passes)


def attribute_passages(encoder: Encoder, titles: Sequence[str], texts: Sequence[str], query_vector: np.ndarray,
                       settings: IGSettings = IGSettings(), progress: Progress | None = None,
                       passes: Sequence[Quadrature] | None = None) -> list[TokenAttribution]:
    """Passage-side IG of pooled(q) · pooled(title, text) for each passage, batched by length.

    passes replaces settings.passes (one pass: every input with that rule, as the completeness sweeps need).
    """
    tower = encoder.context
    vector = torch.as_tensor(np.asarray(query_vector, dtype=np.float32)).reshape(1, -1)
    return _attribute_adaptively(
        tower, lambda rows: _encode_inputs(tower, [titles[i] for i in rows], [texts[i] for i in rows],
                                           settings.passage_max_length),
        list(zip(titles, texts)), vector.expand(len(titles), -1), passes or settings.passes, progress)


def attribute_pair(encoder: Encoder, query: str, title: str, text: str,
                   settings: IGSettings = IGSettings()) -> PairAttribution:
    _require_queries([query])
    query_vector = encoder.encode_queries([query])[0]
    passage_vector = passage_embeddings(encoder, [title], [text], settings)
    return PairAttribution(attribute_queries(encoder, [query], passage_vector, settings)[0],
                           attribute_passages(encoder, [title], [text], query_vector, settings)[0])


def attribute_ranking(encoder: Encoder, query: str, titles: Sequence[str], texts: Sequence[str],
                      passage_indices: Sequence[int], settings: IGSettings = IGSettings(),
                      progress: Progress | None = None) -> RankingAttribution:
    """Query attribution summed over the passages (one IG run), per-passage query and passage attributions.

    progress(done, total) counts passage runs (re-runs at more steps add to the total); the query runs count as
    one step each.
    """
    _require_queries([query])
    if not titles:
        raise AttributionError("There are no passages to attribute.")
    total = len(titles) + 2
    query_vector = encoder.encode_queries([query])[0]
    embeddings = passage_embeddings(encoder, titles, texts, settings)
    query_total = attribute_queries(encoder, [query], embeddings.sum(0, keepdims=True), settings)[0]
    if progress:
        progress(1, total)
    per_passage_query = attribute_queries(encoder, [query] * len(titles), embeddings, settings)
    if progress:
        progress(2, total)
    passages = attribute_passages(encoder, titles, texts, query_vector, settings,
                                  progress=(lambda done, runs: progress(done + 2, runs + 2)) if progress else None)
    return RankingAttribution(tuple(int(i) for i in passage_indices), query_total,
                              tuple(PairAttribution(q, p) for q, p in zip(per_passage_query, passages)))


def passage_embeddings(encoder: Encoder, titles: Sequence[str], texts: Sequence[str],
                       settings: IGSettings) -> np.ndarray:
    """The fixed other-tower embeddings, computed once per analysis (never per IG step)."""
    # Length-sorted batches of 8: one batch of the top 25 was ~40% padding (every passage padded to the longest).
    return encoder.encode_passages(titles, texts, max_length=settings.passage_max_length, batch_size=8)


def cached_pair(cache: ResultCache, encoder: Encoder, query: str, title: str, text: str,
                settings: IGSettings = IGSettings()) -> PairAttribution:
    params = {"model": encoder.fingerprint, "query": query, "title": title, "text": text, **settings.params()}
    return cache.get_or_compute("token_ig_pair", params, lambda: attribute_pair(encoder, query, title, text, settings),
                                is_valid=lambda value: isinstance(value, PairAttribution))


def ranking_params(encoder: Encoder, corpus: Corpus, query: str, passage_indices: Sequence[int],
                   settings: IGSettings) -> dict:
    return {"model": encoder.fingerprint, "corpus": corpus.fingerprint, "query": query,
            "passages": [int(i) for i in passage_indices], **settings.params()}


def cached_ranking(cache: ResultCache, encoder: Encoder, corpus: Corpus, query: str, passage_indices: Sequence[int],
                   settings: IGSettings = IGSettings(), progress: Progress | None = None) -> RankingAttribution:
    indices = [int(i) for i in passage_indices]
    return cache.get_or_compute(
        "token_ig_ranking", ranking_params(encoder, corpus, query, indices, settings),
        lambda: attribute_ranking(encoder, query, [corpus.titles[i] for i in indices],
                                  [corpus.texts[i] for i in indices], indices, settings, progress),
        is_valid=lambda value: isinstance(value, RankingAttribution),
    )


def deletion_curve(encoder: Encoder, pair: PairAttribution, side: Side, k_max: int = 10, random_orders: int = 3,
                   seed: int = 0, settings: IGSettings = IGSettings()) -> DeletionCurve:
    """Replace the k most attributed tokens (or k random ones) of one side by [PAD], k = 0..K, and rescore.

    K = min(k_max, number of non-special tokens). The other side's embedding stays fixed.
    """
    query, title, text = pair.query.segments[0], *pair.passage.segments
    if side == "query":
        tower, attribution = encoder.query, pair.query
        batch = _encode_inputs(tower, [query], None, None)
        other = passage_embeddings(encoder, [title], [text], settings)[0]
    elif side == "passage":
        tower, attribution = encoder.context, pair.passage
        batch = _encode_inputs(tower, [title], [text], settings.passage_max_length)
        other = encoder.encode_queries([query])[0]
    else:
        raise AttributionError(f"side must be 'query' or 'passage', not {side!r}")
    inputs = _model_inputs(batch)
    # One unpadded row, so token n of the attribution sits at position n.
    positions = [n for n, token in enumerate(attribution.tokens) if not token.special]
    k = min(k_max, len(positions))
    rng = np.random.default_rng(seed)
    orders = [sorted(positions, key=lambda n: -attribution.tokens[n].score)]
    orders += [list(rng.permutation(positions)) for _ in range(random_orders)]
    variants = []
    for order in orders:
        for removed in range(k + 1):
            ids = inputs["input_ids"][0].clone()
            ids[order[:removed]] = tower.tokenizer.pad_token_id
            variants.append(ids)
    repeated = {name: value.expand(len(variants), -1) for name, value in inputs.items()}
    repeated["input_ids"] = torch.stack(variants)
    vector = torch.as_tensor(np.asarray(other, dtype=np.float32)).reshape(1, -1).expand(len(variants), -1)
    curves = _scores(tower, repeated, vector).numpy().reshape(len(orders), k + 1)
    random_mean = curves[1:].mean(0) if random_orders else np.full(k + 1, np.nan)
    return DeletionCurve(side, tuple(range(k + 1)), tuple(float(v) for v in curves[0]),
                         tuple(float(v) for v in random_mean), random_orders)


def cached_deletion_curve(cache: ResultCache, encoder: Encoder, pair: PairAttribution, side: Side, k_max: int = 10,
                          random_orders: int = 3, seed: int = 0, settings: IGSettings = IGSettings()) -> DeletionCurve:
    query, title, text = pair.query.segments[0], *pair.passage.segments
    params = {"model": encoder.fingerprint, "query": query, "title": title, "text": text, "side": side,
              "k_max": k_max, "random_orders": random_orders, "seed": seed, **settings.params()}
    return cache.get_or_compute(
        "token_ig_deletion", params,
        lambda: deletion_curve(encoder, pair, side, k_max, random_orders, seed, settings),
        is_valid=lambda value: isinstance(value, DeletionCurve))


def is_stopword(word: str) -> bool:
    """Stop words and words made only of punctuation."""
    folded = word.casefold()
    return folded in STOPWORDS or all(ch in string.punctuation or ch.isspace() for ch in folded)


def word_sums(attributions: Iterable[TokenAttribution], drop_stopwords: bool = False) -> pd.DataFrame:
    """Word-level attribution summed over inputs (case-folded words), most positive first.

    Columns: word, total (signed sum), positive and negative (sums of the positive / negative occurrences),
    occurrences, inputs (how many inputs contain the word).
    """
    rows: dict[str, dict] = {}
    for number, attribution in enumerate(attributions):
        for word in attribution.words():
            key = word.text.casefold()
            if drop_stopwords and is_stopword(key):
                continue
            row = rows.setdefault(key, {"word": key, "total": 0.0, "positive": 0.0, "negative": 0.0,
                                        "occurrences": 0, "inputs": set()})
            row["total"] += word.score
            row["positive" if word.score > 0 else "negative"] += word.score
            row["occurrences"] += 1
            row["inputs"].add(number)
    table = pd.DataFrame(
        [dict(row, inputs=len(row["inputs"])) for row in rows.values()],
        columns=["word", "total", "positive", "negative", "occurrences", "inputs"],
    )
    return table.sort_values("total", ascending=False, ignore_index=True)


def cloud_weights(table: pd.DataFrame, sign: Literal["positive", "negative"], limit: int = 150) -> dict[str, float]:
    """Word -> |total| for the words whose summed attribution has this sign (largest first)."""
    chosen = table[table["total"] > 0] if sign == "positive" else table[table["total"] < 0]
    chosen = chosen.reindex(chosen["total"].abs().sort_values(ascending=False).index).head(limit)
    return {word: float(abs(total)) for word, total in zip(chosen["word"], chosen["total"])}
