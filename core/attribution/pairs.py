"""Token-pair interaction map: s(q, p) attributed to pairs (query token i, passage token j) by integrated Jacobians.

Derivation. s = f(q) · g(p) with f, g the pooled towers, q0, p0 the [PAD] baselines and straight paths
q(α) = q0 + α(q − q0), p(β) = p0 + β(p − p0). Per output dimension d, IG of f_d gives the integrated Jacobian
Q[i, d] = Σ_e (q − q0)_ie ∫ ∂f_d/∂q_ie(q(α)) dα with Σ_i Q[i, d] = f_d(q) − f_d(q0) (completeness); P[j, d] for
g likewise. s is bilinear in (f, g), so ∫∫ ∂²s/∂α∂β = (f(q) − f(q0)) · (g(p) − g(p0)) = Σ_ij M[i, j] with
M[i, j] = Σ_d Q[i, d] P[j, d]. That total is the interaction s(q,p) − s(q0,p) − s(q,p0) + s(q0,p0); it equals
s(q, p) − s(q0, p0) only when the main effects f(q0)·(g(p) − g(p0)) + (f(q) − f(q0))·g(p0) vanish (e.g. both
baselines pool to 0), so that deviation is reported, with the quadrature error, instead of hidden.

Q comes from one backward pass per (node, d) (rows of one batch); M[i, :] is then passage-side IG with target
g(p) · Q[i, :] (IG is linear in the target), one row per query token, by the token-IG driver.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..cache import Analysis, ResultCache
from ..index import PASSAGE_MAX_LENGTH
from ..pair import Encoder, Tower
from ..runtime import model_work
from .integrated_gradients import (
    TOKEN_BUDGET,
    activation_grads_only,
    encode_inputs,
    integrated_gradients,
    model_inputs,
    pad_baseline,
    require_queries,
)
from .quadrature import Quadrature, Rule
from .results import TokenAttribution, token_attribution

DEFAULT_PAIR_STEPS = 20


@dataclass(frozen=True)
class TokenPairMap:
    """M[i, j] over every token of the query (rows) and the passage (columns), special tokens included (0).

    `query` / `passage` hold the row / column sums as token scores, with score = s(q, p) and baseline_score =
    s(q0, p0), so their `delta` is |Σ M − (s(q, p) − s(q0, p0))|."""

    query: TokenAttribution
    passage: TokenAttribution
    matrix: np.ndarray
    score: float  # s(q, p)
    baseline_score: float  # s(q0, p0)
    query_baseline_score: float  # s(q0, p)
    passage_baseline_score: float  # s(q, p0)

    @property
    def total(self) -> float:
        return float(self.matrix.sum())

    @property
    def interaction(self) -> float:
        return self.score - self.query_baseline_score - self.passage_baseline_score + self.baseline_score

    @property
    def main_effects(self) -> float:
        return self.query_baseline_score + self.passage_baseline_score - 2 * self.baseline_score

    @property
    def deviation(self) -> float:
        """Σ M − (s(q, p) − s(q0, p0)) = quadrature error − main effects."""
        return self.total - (self.score - self.baseline_score)

    @property
    def quadrature_error(self) -> float:
        return self.total - self.interaction

    def words(self) -> tuple[list[str], list[str], np.ndarray]:
        """Sub-words merged into words on both axes (special tokens left out): row labels, column labels, matrix."""
        rows, row_groups = _word_groups(self.query)
        columns, column_groups = _word_groups(self.passage)
        merged = np.array([[self.matrix[np.ix_(r, c)].sum() for c in column_groups] for r in row_groups])
        return rows, columns, merged.reshape(len(rows), len(columns))

    def tokens(self) -> tuple[list[str], list[str], np.ndarray]:
        """Token labels (special tokens left out) and the matrix restricted to them."""
        rows = [n for n, t in enumerate(self.query.tokens) if not t.special]
        columns = [n for n, t in enumerate(self.passage.tokens) if not t.special]
        return (
            [self.query.tokens[n].text for n in rows],
            [self.passage.tokens[n].text for n in columns],
            self.matrix[np.ix_(rows, columns)],
        )


def _word_groups(attribution: TokenAttribution) -> tuple[list[str], list[list[int]]]:
    groups: dict[tuple[int, int], list[int]] = {}
    for n, token in enumerate(attribution.tokens):
        if not token.special:
            groups.setdefault((token.segment, token.word), []).append(n)
    labels = []
    for (segment, _), members in groups.items():
        tokens = [attribution.tokens[n] for n in members]
        labels.append(attribution.segments[segment][min(t.start for t in tokens) : max(t.end for t in tokens)])
    return labels, list(groups.values())


def _pooled(tower: Tower, inputs: dict[str, torch.Tensor], ids: torch.Tensor) -> np.ndarray:
    """pooled(x) for each row of ids, the one-row `inputs` repeated."""
    with torch.inference_mode():
        return tower.forward({**{k: v.expand(len(ids), -1) for k, v in inputs.items()}, "input_ids": ids}).numpy()


@model_work
def integrated_jacobian(
    tower: Tower, inputs: dict[str, torch.Tensor], baseline_ids: torch.Tensor, rule: Rule
) -> np.ndarray:
    """Q[i, d] = Σ_e (x − b)_ie Σ_k w_k ∂pooled_d/∂x_ie at b + α_k (x − b), for every token i of a one-row input.

    One batch row per (node k, dimension d): row r's backward pass reads only ∂pooled_{d_r}, since rows are
    independent."""
    with torch.no_grad():
        start, end = tower.word_embeddings(baseline_ids), tower.word_embeddings(inputs["input_ids"])
    direction = end - start
    nodes = torch.as_tensor(rule.nodes, dtype=torch.float32)
    weights = torch.as_tensor(rule.weights, dtype=torch.float32)
    node_of = torch.arange(len(nodes)).repeat_interleave(tower.dim)
    dim_of = torch.arange(tower.dim).repeat(len(nodes))
    length = inputs["input_ids"].shape[1]
    chunk = max(1, TOKEN_BUDGET // length)
    transposed = torch.zeros(tower.dim, length)
    with activation_grads_only(tower), torch.enable_grad():
        for first in range(0, len(node_of), chunk):
            node, dim = node_of[first : first + chunk], dim_of[first : first + chunk]
            points = (start + nodes[node, None, None] * direction).requires_grad_()
            pooled = tower.forward({k: v.expand(len(node), -1) for k, v in inputs.items()}, inputs_embeds=points)
            value = (pooled.gather(1, dim[:, None]).squeeze(1) * weights[node]).sum()
            (gradient,) = torch.autograd.grad(value, points)
            transposed.index_add_(0, dim, (gradient * direction).sum(-1))
    return transposed.T.numpy()


@model_work
def token_pair_map(
    encoder: Encoder,
    query: str,
    title: str,
    text: str,
    n_steps: int = DEFAULT_PAIR_STEPS,
    passage_max_length: int = PASSAGE_MAX_LENGTH,
) -> TokenPairMap:
    require_queries([query])
    quadrature = Quadrature(n_steps, "gausslegendre")
    rule = quadrature.rule()
    query_batch = encode_inputs(encoder.query, [query], None, None)
    passage_batch = encode_inputs(encoder.context, [title], [text], passage_max_length)
    query_inputs, passage_inputs = model_inputs(query_batch), model_inputs(passage_batch)
    query_baseline = pad_baseline(query_batch, encoder.query.pad_token_id)
    passage_baseline = pad_baseline(passage_batch, encoder.context.pad_token_id)
    jacobian = integrated_jacobian(encoder.query, query_inputs, query_baseline, rule)
    f, f0 = _pooled(encoder.query, query_inputs, torch.cat([query_inputs["input_ids"], query_baseline]))
    g, g0 = _pooled(encoder.context, passage_inputs, torch.cat([passage_inputs["input_ids"], passage_baseline]))
    rows = [i for i, special in enumerate(query_batch["special_tokens_mask"][0].tolist()) if not special]
    matrix = np.zeros((query_inputs["input_ids"].shape[1], passage_inputs["input_ids"].shape[1]))
    if rows:
        attributions, _, _ = integrated_gradients(
            encoder.context,
            {k: v.expand(len(rows), -1) for k, v in passage_inputs.items()},
            passage_baseline.expand(len(rows), -1),
            torch.as_tensor(jacobian[rows]),
            rule,
        )
        matrix[rows] = attributions
    score, baseline = float(f @ g), float(f0 @ g0)
    return TokenPairMap(
        token_attribution(query_batch, 0, (query,), matrix.sum(1)[None], score, baseline, quadrature),
        token_attribution(passage_batch, 0, (title, text), matrix.sum(0)[None], score, baseline, quadrature),
        matrix,
        score,
        baseline,
        float(f0 @ g),
        float(f @ g0),
    )


PAIR_MAP = Analysis(
    "token_pairs", 1, ("model", "query", "title", "text", "n_steps", "passage_max_length"), TokenPairMap
)


def cached_pair_map(
    cache: ResultCache | None,
    encoder: Encoder,
    query: str,
    title: str,
    text: str,
    n_steps: int = DEFAULT_PAIR_STEPS,
    passage_max_length: int = PASSAGE_MAX_LENGTH,
) -> TokenPairMap:
    return PAIR_MAP.get_or_compute(
        cache,
        lambda: token_pair_map(encoder, query, title, text, n_steps, passage_max_length),
        model=encoder.fingerprint,
        query=query,
        title=title,
        text=text,
        n_steps=n_steps,
        passage_max_length=passage_max_length,
    )
