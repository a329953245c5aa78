"""ERASER comprehensiveness and sufficiency (DeYoung et al. 2020) of token attributions, in retrieval terms.

For one side of a (query, passage) pair and each method's token order, for k = 1..K: remove the top-k tokens
(→ [PAD]; comprehensiveness) or keep only them (every other non-special token → [PAD]; sufficiency),
re-encode the edited side and re-score it against the other side's fixed embedding. Two measures: the score
drop s(x) − s(edited), and the passage's rank among the candidates (the model's top-100 for the query) after
the edit: a query edit re-scores every candidate, a passage edit competes with the candidates' unchanged
scores. AOPC = the mean over k. Random token orders are the control.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..cache import Analysis, ResultCache
from ..corpus import Corpus
from ..index import DenseIndex
from ..pair import Encoder, Tower
from ..runtime import model_work
from ..token_attribution import IGSettings
from .integrated_gradients import TOKEN_BUDGET, encode_inputs, model_inputs
from .methods import SIDES, MethodAttribution, MethodPanel, cached_panel

RANDOM = "random"
MEASURES = ("comprehensiveness", "sufficiency")
CANDIDATES = 100


def aopc(values) -> float:
    """Area over the perturbation curve: the mean of the drops over k = 1..K."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()) if len(values) else float("nan")


@dataclass(frozen=True)
class EditCurve:
    """Per k = 1..K: the score drop s(x) − s(edited) and the passage's rank (1 = first) after the edit."""

    drop: tuple[float, ...]
    rank: tuple[float, ...]

    @property
    def aopc(self) -> float:
        return aopc(self.drop)


@dataclass(frozen=True)
class SideFaithfulness:
    """measure -> order (a method, or RANDOM: the mean over random orders) -> curve."""

    side: str
    ks: tuple[int, ...]
    score: float
    rank: int  # the passage's rank before any edit
    curves: dict[str, dict[str, EditCurve]]


@dataclass(frozen=True)
class PairFaithfulness:
    query: SideFaithfulness
    passage: SideFaithfulness

    def sides(self) -> tuple[SideFaithfulness, SideFaithfulness]:
        return self.query, self.passage


@model_work
def pooled_variants(tower: Tower, inputs: dict[str, torch.Tensor], variants: torch.Tensor) -> np.ndarray:
    """pooled(x) for every row of variants (input ids of the same length as the one-row `inputs`)."""
    rows = max(1, TOKEN_BUDGET // variants.shape[1])
    out = []
    with torch.inference_mode():
        for start in range(0, len(variants), rows):
            chunk = variants[start : start + rows]
            batch = {name: value.expand(len(chunk), -1) for name, value in inputs.items()}
            out.append(tower.forward({**batch, "input_ids": chunk}).float().numpy())
    return np.concatenate(out)


def ranks(target_scores: np.ndarray, other_scores: np.ndarray) -> np.ndarray:
    """1 + the number of other candidates scored strictly above the target, row by row."""
    return 1 + (np.asarray(other_scores) > np.asarray(target_scores)[:, None]).sum(1)


def side_faithfulness(
    tower: Tower,
    batch,
    methods: dict[str, MethodAttribution],
    side: str,
    fixed: np.ndarray,
    others: np.ndarray,
    k_max: int,
    random_orders: int,
    seed: int,
) -> SideFaithfulness:
    """One side: `fixed` is the other side's embedding; `others` are the other candidates' embeddings (query
    side) or their fixed scores (passage side)."""
    inputs = model_inputs(batch)
    ids = inputs["input_ids"][0]
    first = next(iter(methods.values()))
    positions = [n for n, token in enumerate(first.tokens) if not token.special]
    k = min(k_max, len(positions))
    rng = np.random.default_rng(seed)
    orders = {method: attribution.order() for method, attribution in methods.items()}
    randoms = [list(rng.permutation(positions)) for _ in range(random_orders)]
    variants = [ids]
    for order in list(orders.values()) + randoms:
        for kept in range(1, k + 1):
            removed = ids.clone()
            removed[order[:kept]] = tower.pad_token_id
            only = ids.clone()
            only[order[kept:]] = tower.pad_token_id
            variants += [removed, only]
    vectors = pooled_variants(tower, inputs, torch.stack(variants))
    target = vectors @ fixed
    other = vectors @ others.T if side == "query" else np.broadcast_to(others, (len(vectors), len(others)))
    every_rank = ranks(target, other)
    # variants[1:] are nested as (order, k, measure)
    drop = (target[0] - target[1:]).reshape(len(orders) + random_orders, k, 2)
    rank = every_rank[1:].reshape(len(orders) + random_orders, k, 2).astype(np.float64)
    curves: dict[str, dict[str, EditCurve]] = {measure: {} for measure in MEASURES}
    for m, measure in enumerate(MEASURES):
        for o, method in enumerate(orders):
            curves[measure][method] = EditCurve(tuple(drop[o, :, m].tolist()), tuple(rank[o, :, m].tolist()))
        if random_orders:
            curves[measure][RANDOM] = EditCurve(
                tuple(drop[len(orders) :, :, m].mean(0).tolist()), tuple(rank[len(orders) :, :, m].mean(0).tolist())
            )
    return SideFaithfulness(side, tuple(range(1, k + 1)), float(target[0]), int(every_rank[0]), curves)


@model_work
def pair_faithfulness(
    encoder: Encoder,
    panel: MethodPanel,
    query: str,
    title: str,
    text: str,
    candidates: np.ndarray,
    target: int,
    k_max: int = 10,
    random_orders: int = 3,
    seed: int = 0,
    passage_max_length: int = 256,
) -> PairFaithfulness:
    """Both sides of one pair. candidates: the embeddings of the query's candidate passages (rows), the
    passage itself at row `target`."""
    candidates = np.asarray(candidates, dtype=np.float32)
    others = np.delete(candidates, target, axis=0)
    query_vector = encoder.encode_queries([query])[0]
    passage_vector = encoder.encode_passages([title], [text], max_length=passage_max_length)[0]
    query_side = side_faithfulness(
        encoder.query,
        encode_inputs(encoder.query, [query], None, None),
        panel.query,
        "query",
        passage_vector,
        others,
        k_max,
        random_orders,
        seed,
    )
    passage_side = side_faithfulness(
        encoder.context,
        encode_inputs(encoder.context, [title], [text], passage_max_length),
        panel.passage,
        "passage",
        query_vector,
        others @ query_vector,
        k_max,
        random_orders,
        seed,
    )
    return PairFaithfulness(query_side, passage_side)


FAITHFULNESS = Analysis(
    "faithfulness",
    1,
    ("model", "corpus", "query", "passage", "candidates", "k_max", "random_orders", "seed", "settings"),
    PairFaithfulness,
)


def cached_faithfulness(
    cache: ResultCache | None,
    encoder: Encoder,
    corpus: Corpus,
    index: DenseIndex,
    query: str,
    candidates: list[int],
    passage: int,
    settings: IGSettings = IGSettings(),
    k_max: int = 10,
    random_orders: int = 3,
    seed: int = 0,
) -> tuple[MethodPanel, PairFaithfulness]:
    """The method panel of (query, passage) and its faithfulness; candidates: the query's top passages
    (the passage is added when it is not among them)."""
    candidates = [int(i) for i in candidates]
    if passage not in candidates:
        candidates.append(int(passage))
    title, text = corpus.titles[passage], corpus.texts[passage]
    panel = cached_panel(cache, encoder, query, title, text, settings)
    result = FAITHFULNESS.get_or_compute(
        cache,
        lambda: pair_faithfulness(
            encoder,
            panel,
            query,
            title,
            text,
            index.embeddings[candidates],
            candidates.index(passage),
            k_max,
            random_orders,
            seed,
            settings.passage_max_length,
        ),
        model=encoder.fingerprint,
        corpus=corpus.fingerprint,
        query=query,
        passage=int(passage),
        candidates=candidates,
        k_max=k_max,
        random_orders=random_orders,
        seed=seed,
        settings=settings.params(),
    )
    return panel, result


def summary(results: dict[str, list[PairFaithfulness]]) -> pd.DataFrame:
    """model -> per-pair results: one row per (model, side, measure, order) with the means over pairs of the AOPC
    of the score drop, the mean rank over k, and the rank at the largest k."""
    rows = []
    for model, pairs in results.items():
        for s, side in enumerate(SIDES):
            sides = [pair.sides()[s] for pair in pairs]
            for measure in MEASURES:
                for order in sides[0].curves[measure]:
                    curves = [result.curves[measure][order] for result in sides]
                    rows.append(
                        {
                            "model": model,
                            "side": side,
                            "measure": measure,
                            "order": order,
                            "aopc": float(np.mean([c.aopc for c in curves])),
                            "mean rank": float(np.mean([np.mean(c.rank) for c in curves])),
                            "rank at K": float(np.mean([c.rank[-1] for c in curves])),
                            "pairs": len(curves),
                        }
                    )
    return pd.DataFrame(rows, columns=["model", "side", "measure", "order", "aopc", "mean rank", "rank at K", "pairs"])
