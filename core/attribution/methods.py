"""A panel of token-attribution methods for one (query, passage) pair, and how far the methods agree.

Methods, each of s(q, p) = pooled(q) · pooled(p) with the other side's embedding fixed, per token:
- `ig_pad`: Integrated Gradients with the [PAD] baseline (the app's own method, adaptive quadrature);
- `ig_mask`: Integrated Gradients with every non-special token replaced by [MASK] as the baseline;
- `grad_input`: gradient × input on the word embeddings (captum's InputXGradient), i.e. a one-point path
  from the zero embedding;
- `occlusion`: s(x) − s(x with that token replaced by [PAD]), by explicit re-scoring.
Agreement between two methods is the rank correlation (Kendall τ-b, Spearman ρ) of their scores over the
non-special tokens of one side.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from captum.attr import InputXGradient
from scipy.stats import kendalltau, spearmanr

from ..cache import Analysis, ResultCache
from ..pair import Encoder, Tower
from ..runtime import model_work
from ..token_attribution import IGSettings, cached_pair
from . import AttributionError
from .integrated_gradients import (
    activation_grads_only,
    encode_inputs,
    integrated_gradients,
    model_inputs,
    pad_baseline,
    scores,
)
from .quadrature import Quadrature
from .results import Token, TokenAttribution, token_attribution

METHOD_LABELS = {
    "ig_pad": "IG, [PAD] baseline",
    "ig_mask": "IG, [MASK] baseline",
    "grad_input": "gradient × input",
    "occlusion": "occlusion ([PAD])",
}
METHOD_NAMES = tuple(METHOD_LABELS)
SIDES = ("query", "passage")
# The [MASK]-baseline IG uses the plain rule at the app's default step count (no adaptive pass).
MASK_RULE = Quadrature(20, "gausslegendre")


@dataclass(frozen=True)
class MethodAttribution:
    """One method's per-token scores of one input; `reference` is s(baseline) for path methods, else None."""

    method: str
    segments: tuple[str, ...]
    tokens: tuple[Token, ...]
    score: float
    truncated: bool
    reference: float | None = None

    def values(self) -> np.ndarray:
        """Scores of the non-special tokens, in input order."""
        return np.array([t.score for t in self.tokens if not t.special], dtype=np.float64)

    def order(self) -> list[int]:
        """Positions (in `tokens`) of the non-special tokens, most attributed first."""
        positions = [n for n, t in enumerate(self.tokens) if not t.special]
        return sorted(positions, key=lambda n: -self.tokens[n].score)

    @staticmethod
    def of(method: str, attribution: TokenAttribution, path: bool) -> MethodAttribution:
        return MethodAttribution(
            method,
            attribution.segments,
            attribution.tokens,
            attribution.score,
            attribution.truncated,
            attribution.baseline_score if path else None,
        )


@dataclass(frozen=True)
class MethodPanel:
    """Every method on both sides of one pair: side -> method -> attribution."""

    query: dict[str, MethodAttribution]
    passage: dict[str, MethodAttribution]

    def side(self, side: str) -> dict[str, MethodAttribution]:
        if side not in SIDES:
            raise AttributionError(f"side must be 'query' or 'passage', not {side!r}")
        return self.query if side == "query" else self.passage

    def agreement(self, side: str) -> pd.DataFrame:
        """One row per pair of methods: Kendall τ-b and Spearman ρ of their scores on this side."""
        methods = self.side(side)
        rows = [
            {
                "method 1": first,
                "method 2": second,
                **rank_correlations(methods[first].values(), methods[second].values()),
            }
            for first, second in itertools.combinations(methods, 2)
        ]
        return pd.DataFrame(rows, columns=["method 1", "method 2", "kendall", "spearman"])


def rank_correlations(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Kendall τ-b and Spearman ρ; NaN where either is undefined (fewer than 2 tokens, or a constant side)."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"kendall": math.nan, "spearman": math.nan}
    return {"kendall": float(kendalltau(x, y).statistic), "spearman": float(spearmanr(x, y).statistic)}


def _with_scores(
    batch, segments: tuple[str, ...], values: np.ndarray, score: float, method: str, reference: float | None = None
) -> MethodAttribution:
    # token_attribution records a rule and a baseline; a non-path method has neither, so only its tokens are kept.
    tokens = token_attribution(batch, 0, segments, values.reshape(1, -1), score, score, MASK_RULE)
    return MethodAttribution(method, segments, tokens.tokens, float(score), tokens.truncated, reference)


@model_work
def grad_times_input(tower: Tower, inputs: dict[str, torch.Tensor], other: torch.Tensor) -> np.ndarray:
    """Per-token Σ_d e_d · ∂s/∂e_d at the word embeddings e of the input (captum's InputXGradient)."""
    with torch.no_grad():
        embeds = tower.word_embeddings(inputs["input_ids"])
    embeds.requires_grad_()

    def score(points: torch.Tensor) -> torch.Tensor:
        return (tower.forward(inputs, inputs_embeds=points) * other).sum(-1)

    with activation_grads_only(tower), torch.enable_grad():
        attributions = InputXGradient(score).attribute(embeds)
    return attributions.sum(-1).detach().numpy()


@model_work
def occlusion(
    tower: Tower, inputs: dict[str, torch.Tensor], special: Sequence[bool], other: torch.Tensor
) -> tuple[np.ndarray, float]:
    """s(x) − s(x with token i replaced by [PAD]) for every non-special token i (0 for special ones); and s(x)."""
    ids = inputs["input_ids"][0]
    positions = [i for i, is_special in enumerate(special) if not is_special]
    variants = [ids]
    for position in positions:
        edited = ids.clone()
        edited[position] = tower.pad_token_id
        variants.append(edited)
    repeated = {name: value.expand(len(variants), -1) for name, value in inputs.items()}
    repeated["input_ids"] = torch.stack(variants)
    rescored = scores(tower, repeated, other.reshape(1, -1).expand(len(variants), -1)).numpy()
    values = np.zeros(len(ids))
    values[positions] = rescored[0] - rescored[1:]
    return values, float(rescored[0])


def _side_panel(
    tower: Tower, batch, segments: tuple[str, ...], other: np.ndarray, ig_pad: TokenAttribution
) -> dict[str, MethodAttribution]:
    """pad_baseline(batch, id) replaces every non-special token by id: [MASK] here."""
    if tower.mask_token_id is None:
        raise AttributionError("This model's tokenizer has no [MASK] token, which the [MASK]-baseline IG needs.")
    inputs = model_inputs(batch)
    vector = torch.as_tensor(np.asarray(other, dtype=np.float32)).reshape(1, -1)
    special = (batch["special_tokens_mask"][0].bool() | ~batch["attention_mask"][0].bool()).tolist()
    masked, score, reference = integrated_gradients(
        tower, inputs, pad_baseline(batch, tower.mask_token_id), vector, MASK_RULE.rule()
    )
    occluded, _ = occlusion(tower, inputs, special, vector[0])
    return {
        "ig_pad": MethodAttribution.of("ig_pad", ig_pad, path=True),
        "ig_mask": _with_scores(batch, segments, masked[0], float(score[0]), "ig_mask", float(reference[0])),
        "grad_input": _with_scores(
            batch, segments, grad_times_input(tower, inputs, vector)[0], float(score[0]), "grad_input"
        ),
        "occlusion": _with_scores(batch, segments, occluded, float(score[0]), "occlusion"),
    }


@model_work
def attribute_methods(
    encoder: Encoder,
    query: str,
    title: str,
    text: str,
    ig_pad_query: TokenAttribution,
    ig_pad_passage: TokenAttribution,
    passage_max_length: int,
) -> MethodPanel:
    """The panel of one pair; the [PAD]-baseline IG comes in (it is cached on its own, see token_attribution)."""
    query_vector = encoder.encode_queries([query])[0]
    passage_vector = encoder.encode_passages([title], [text], max_length=passage_max_length)[0]
    query_batch = encode_inputs(encoder.query, [query], None, None)
    passage_batch = encode_inputs(encoder.context, [title], [text], passage_max_length)
    return MethodPanel(
        _side_panel(encoder.query, query_batch, (query,), passage_vector, ig_pad_query),
        _side_panel(encoder.context, passage_batch, (title, text), query_vector, ig_pad_passage),
    )


PANEL = Analysis("attribution_methods", 1, ("model", "query", "title", "text", "settings"), MethodPanel)


def cached_panel(
    cache: ResultCache | None, encoder: Encoder, query: str, title: str, text: str, settings: IGSettings = IGSettings()
) -> MethodPanel:
    """The panel, its [PAD]-baseline IG read from (or stored in) the token-IG pair cache."""

    def compute() -> MethodPanel:
        pair = cached_pair(cache, encoder, query, title, text, settings)
        return attribute_methods(encoder, query, title, text, pair.query, pair.passage, settings.passage_max_length)

    return PANEL.get_or_compute(
        cache, compute, model=encoder.fingerprint, query=query, title=title, text=text, settings=settings.params()
    )


def agreement_summary(panels: dict[str, list[MethodPanel]]) -> pd.DataFrame:
    """model -> panels of many pairs: the mean Kendall τ and Spearman ρ per (model, side, pair of methods),
    over the pairs where they are defined."""
    rows = []
    for model, model_panels in panels.items():
        for side in SIDES:
            tables = pd.concat([panel.agreement(side) for panel in model_panels], ignore_index=True)
            means = tables.groupby(["method 1", "method 2"], sort=False)[["kendall", "spearman"]].mean()
            rows += [
                {"model": model, "side": side, "method 1": first, "method 2": second, **values}
                for (first, second), values in means.to_dict("index").items()
            ]
    return pd.DataFrame(rows, columns=["model", "side", "method 1", "method 2", "kendall", "spearman"])
