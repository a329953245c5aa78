"""The IG driver: per-token Integrated Gradients of pooled(x_n) · others[n] over the word-embedding output.

The rules are data (nodes and weights), so the driver is a small batched loop of our own rather than captum:
any rule, the sinh-substituted one included, runs the same way, and s(x) and s(baseline) come from explicit
forward passes instead of captum's internal calls. tests/test_token_attribution.py checks it against captum's
LayerIntegratedGradients as the oracle.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..device import scaled
from ..pair import Tower
from ..retrieval import QueryError, clean_query
from ..runtime import model_work, require_model_job
from . import AttributionError
from .quadrature import Quadrature, Rule
from .results import TokenAttribution, token_attribution

Progress = Callable[[int, int], None]
# Tokens per forward pass: fwd+bwd throughput on the 2-core CPU was flat from 2048 to 8192 tokens and fell
# below that; smaller passes keep memory low (attention is O(L^2)). Scaled to the device's memory (core.device).
TOKEN_BUDGET = 4096


def token_budget(tower: Tower) -> int:
    return scaled(TOKEN_BUDGET, tower.device)


@contextlib.contextmanager
def activation_grads_only(*models: torch.nn.Module | Tower):
    """No weight gradients during IG (saves their FLOPs and memory); restores the flags afterwards."""
    require_model_job("Switching off weight gradients")
    saved = [(p, p.requires_grad) for model in models for p in model.parameters()]
    for parameter, _ in saved:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in saved:
            parameter.requires_grad_(flag)


def require_queries(queries: Sequence[str]) -> None:
    if not all(clean_query(query) for query in queries):
        raise QueryError("Type a query to attribute: this one is empty once control characters are dropped.")


def encode_inputs(tower: Tower, texts: Sequence[str], pairs: Sequence[str] | None, max_length: int | None):
    """Tokenized with the offsets and special-tokens mask that map attributions back to words."""
    if not tower.is_fast_tokenizer:
        raise AttributionError("Token attributions need a fast (Rust) tokenizer to map tokens back to words.")
    if tower.pad_token_id is None:
        raise AttributionError("This model's tokenizer has no [PAD] token, which the IG baseline needs.")
    return tower.tokenize(texts, pairs, max_length, return_offsets_mapping=True, return_special_tokens_mask=True)


def model_inputs(batch) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


def pad_baseline(batch, pad_id: int) -> torch.Tensor:
    """Every attended token except the special ones ([CLS], [SEP]) becomes [PAD]."""
    keep = batch["special_tokens_mask"].bool() | ~batch["attention_mask"].bool()
    return torch.where(keep, batch["input_ids"], torch.full_like(batch["input_ids"], pad_id))


@model_work
def scores(tower: Tower, inputs: dict[str, torch.Tensor], others: torch.Tensor) -> torch.Tensor:
    """s = pooled(x) · other, row by row, without gradients, in chunks of the token budget; on the CPU."""
    rows = max(1, token_budget(tower) // inputs["input_ids"].shape[1])
    others = others.to(tower.device)
    out = []
    with torch.inference_mode():
        for start in range(0, len(others), rows):
            chunk = {k: v[start : start + rows] for k, v in inputs.items()}
            out.append((tower.forward(chunk) * others[start : start + rows]).sum(-1))
    return torch.cat(out).cpu()


@model_work
def integrated_gradients(
    tower: Tower, inputs: dict[str, torch.Tensor], baseline_ids: torch.Tensor, others: torch.Tensor, rule: Rule
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-token IG of pooled(x_n) · others[n] for every row n; returns (attributions, s(x), s(baseline)).

    With e = word embeddings of x and b of the baseline: attribution = (e − b) · Σ_k w_k ∂s/∂e(b + α_k (e − b)),
    summed over the embedding dimension; the (row, node) path points run in chunks of TOKEN_BUDGET tokens.
    """
    rows, length = inputs["input_ids"].shape
    device = tower.device
    others = others.to(device)
    ends = scores(
        tower,
        {
            **{k: torch.cat([v, v]) for k, v in inputs.items()},
            "input_ids": torch.cat([inputs["input_ids"], baseline_ids]),
        },
        torch.cat([others, others]),
    )
    nodes = torch.as_tensor(rule.nodes, dtype=torch.float32, device=device)
    weights = torch.as_tensor(rule.weights, dtype=torch.float32, device=device)
    with torch.no_grad():
        start, end = tower.word_embeddings(baseline_ids), tower.word_embeddings(inputs["input_ids"])
    direction = end - start
    # Node-major, as captum orders them: a chunk holds whole nodes for all rows where it can.
    row_of = torch.arange(rows, device=device).repeat(len(nodes))
    node_of = torch.arange(len(nodes), device=device).repeat_interleave(rows)
    chunk = max(1, token_budget(tower) // length)
    summed = torch.zeros_like(end)
    with activation_grads_only(tower), torch.enable_grad():
        for first in range(0, len(row_of), chunk):
            row, node = row_of[first : first + chunk], node_of[first : first + chunk]
            points = (start[row] + nodes[node, None, None] * direction[row]).requires_grad_()
            value = (tower.forward({k: v[row] for k, v in inputs.items()}, inputs_embeds=points) * others[row]).sum()
            (gradient,) = torch.autograd.grad(value, points)
            summed.index_add_(0, row, gradient * weights[node, None, None])
    attributions = (direction * summed).sum(-1)
    return attributions.cpu().numpy(), ends[:rows].numpy(), ends[rows:].numpy()


def length_groups(lengths: Sequence[int], n_steps: int, budget: int = TOKEN_BUDGET) -> list[list[int]]:
    """Rows sorted by length, grouped so one group's IG (all steps) fits about one forward pass of `budget` tokens.

    Small groups also give the progress callback something to report.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[i] * n_steps > budget:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def attribute_adaptively(
    tower: Tower,
    encode: Callable[[Sequence[int]], object],
    segments: Sequence[tuple[str, ...]],
    others: torch.Tensor,
    passes: Sequence[Quadrature],
    progress: Progress | None = None,
) -> list[TokenAttribution]:
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
        rule = quadrature.rule()
        for group in length_groups([lengths[i] for i in pending], quadrature.n_steps, token_budget(tower)):
            rows = [pending[g] for g in group]
            batch = encode(rows)
            attributions, score, baseline = integrated_gradients(
                tower, model_inputs(batch), pad_baseline(batch, tower.pad_token_id), others[rows], rule
            )
            for row, i in enumerate(rows):
                results[i] = token_attribution(
                    batch, row, segments[i], attributions, score[row], baseline[row], quadrature
                )
            done += len(rows)
            if progress:
                progress(done, total)
    return results
