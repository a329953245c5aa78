"""The optimisation loop shared by DPR training and MLM pre-training: AdamW, linear warm-up and decay,
gradient clipping, a tqdm bar with the running loss, and optional periodic evaluation."""

from __future__ import annotations

import os
import platform
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

Batch = TypeVar("Batch")


@dataclass(frozen=True)
class LoopSettings:
    steps: int
    learning_rate: float
    warmup_fraction: float
    description: str
    loss_window: int = 20  # steps averaged into the loss shown on the progress bar
    evaluate_every: int | None = None  # steps between calls of `evaluate`, which also runs after the last step
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0


@dataclass
class LoopResult:
    losses: list[float]
    seconds: float
    hardware: str
    evaluations: list[dict] = field(default_factory=list)  # step, minutes, then what `evaluate` returned


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def hardware_description() -> str:
    """What a run had to work with, for model cards: the CPU cores this process may use, and torch's threads."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} CPU cores ({platform.machine()}, {torch.get_num_threads()} torch threads)"


def run_training(
    model: torch.nn.Module,
    batches: Iterator[Batch],
    loss_fn: Callable[[Batch], torch.Tensor],
    settings: LoopSettings,
    evaluate: Callable[[int], dict] | None = None,
    progress: bool = True,
) -> LoopResult:
    """`settings.steps` optimiser steps on `loss_fn(next(batches))`; leaves the model in eval mode.

    `evaluate(step)` must leave the model in training mode (as `core.pretraining.evaluate_mlm` does).
    """
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    schedule = get_linear_schedule_with_warmup(
        optimizer, int(settings.warmup_fraction * settings.steps), settings.steps
    )
    result = LoopResult([], 0.0, hardware_description())
    started = time.perf_counter()
    bar = tqdm(total=settings.steps, desc=settings.description, disable=not progress)
    for step in range(1, settings.steps + 1):
        loss = loss_fn(next(batches))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        optimizer.step()
        schedule.step()
        result.losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(result.losses[-settings.loss_window :]):.3f}")
        if evaluate and (step == settings.steps or (settings.evaluate_every and step % settings.evaluate_every == 0)):
            minutes = round((time.perf_counter() - started) / 60, 1)
            result.evaluations.append({"step": step, "minutes": minutes, **evaluate(step)})
    bar.close()
    model.eval()
    result.seconds = round(time.perf_counter() - started, 1)
    return result
