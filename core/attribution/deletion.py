"""Deletion curves: the score as the most attributed tokens (or random ones) are replaced by [PAD]."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..pair import Tower
from .integrated_gradients import model_inputs, scores
from .results import TokenAttribution


@dataclass(frozen=True)
class DeletionCurve:
    """Score after replacing the k most attributed tokens by [PAD] (k = 0..K), and a random-order control."""

    side: str
    ks: tuple[int, ...]
    attribution_order: tuple[float, ...]
    random_order: tuple[float, ...]  # mean over the random orders
    random_orders: int


def deletion_curve(
    tower: Tower,
    batch,
    attribution: TokenAttribution,
    other: np.ndarray,
    side: str,
    k_max: int,
    random_orders: int,
    seed: int,
) -> DeletionCurve:
    """Rescore `batch` (the one tokenized input of `attribution`) against the fixed `other` embedding with its
    k most attributed tokens, or k random ones, replaced by [PAD], k = 0..K, K = min(k_max, non-special tokens)."""
    inputs = model_inputs(batch)
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
            ids[order[:removed]] = tower.pad_token_id
            variants.append(ids)
    repeated = {name: value.expand(len(variants), -1) for name, value in inputs.items()}
    repeated["input_ids"] = torch.stack(variants)
    vector = torch.as_tensor(np.asarray(other, dtype=np.float32)).reshape(1, -1).expand(len(variants), -1)
    curves = scores(tower, repeated, vector).numpy().reshape(len(orders), k + 1)
    random_mean = curves[1:].mean(0) if random_orders else np.full(k + 1, np.nan)
    return DeletionCurve(
        side,
        tuple(range(k + 1)),
        tuple(float(v) for v in curves[0]),
        tuple(float(v) for v in random_mean),
        random_orders,
    )
