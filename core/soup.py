"""Model soup (Wortsman et al. 2022): one twin whose weights are the weighted mean of twins trained by
`python -m core train` from the same base.

Twins fine-tuned from one base stay close to it in weight space, so the mean of their weights is itself a
working encoder, which tends to keep what each ingredient learned. The shipped offline twin is such a mean, with
equal weights: a twin trained freely, best on the held-out descriptions, and a twin distilled toward the base
on its question and ict queries, best on natural questions (see core/training.py and the twin's card).
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import LensError
from .pair import ModelSpec, load_encoder
from .training import SOUP_LOG, TrainConfig, TrainReport, logged_config, read_training_run, save_encoder_directory


@dataclass(frozen=True)
class Ingredient:
    """One twin of a soup: where it was read from, its weight in the mean, and its training run."""

    path: str
    weight: float
    config: TrainConfig
    report: TrainReport


def soup_weights(count: int, weights: Sequence[float] | None) -> tuple[float, ...]:
    """Equal weights by default; given weights must be one per twin, none negative, summing to 1."""
    if count < 2:
        raise LensError(f"A soup needs at least two twins, not {count}.")
    if weights is None:
        return (1.0 / count,) * count
    if len(weights) != count:
        raise LensError(f"{len(weights)} weights for {count} twins: give one weight per twin.")
    if any(weight < 0 for weight in weights) or not math.isclose(sum(weights), 1.0, abs_tol=1e-6):
        raise LensError(f"Soup weights must be 0 or more and sum to 1, not {', '.join(map(str, weights))}.")
    return tuple(weights)


def mean_state(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """The weighted mean of floating-point tensors, in float32; other tensors (position ids) must agree."""
    names = list(states[0])
    for state in states[1:]:
        if list(state) != names or any(state[name].shape != states[0][name].shape for name in names):
            raise LensError("The twins differ in architecture; a soup needs twins of one base.")
    merged = {}
    for name in names:
        tensors = [state[name] for state in states]
        if tensors[0].is_floating_point():
            merged[name] = sum(weight * tensor.float() for weight, tensor in zip(weights, tensors))
        elif all(torch.equal(tensor, tensors[0]) for tensor in tensors[1:]):
            merged[name] = tensors[0]
        else:
            raise LensError(f"The twins' {name} differ and cannot be averaged.")
    return merged


def soup_command(ingredients: Sequence[Ingredient], output: str | Path) -> str:
    """The command line that makes this soup."""
    twins = [shlex.quote(ingredient.path) for ingredient in ingredients]
    weights = [str(ingredient.weight) for ingredient in ingredients]
    words = ["python -m core soup --twins", *twins, "--weights", *weights]
    return " ".join([*words, "--output", shlex.quote(str(output))])


def make_soup(twins: Sequence[str], weights: Sequence[float] | None, output: str | Path) -> list[Ingredient]:
    """Write the soup of `twins` to `output`, with its ingredients in soup_log.json; return the ingredients."""
    weights = soup_weights(len(twins), weights)
    output = Path(output)
    if any(Path(twin).resolve() == output.resolve() for twin in twins):
        raise LensError(f"The soup would overwrite its own ingredient {output}; write it to another directory.")
    ingredients = [Ingredient(str(twin), weight, *read_training_run(twin)) for twin, weight in zip(twins, weights)]
    bases = {ingredient.config.base for ingredient in ingredients}
    if len(bases) > 1:
        raise LensError(f"The twins were trained from different bases ({', '.join(sorted(bases))}).")
    encoders = [load_encoder(ModelSpec(f"ingredient {n}", str(twin))) for n, twin in enumerate(twins, start=1)]
    if len({(encoder.query.pooling, encoder.query.normalize) for encoder in encoders}) > 1:
        raise LensError("The twins pool or normalise differently; a soup needs one way of pooling.")
    soup = encoders[0]
    soup.query.model.load_state_dict(mean_state([e.query.model.state_dict() for e in encoders], weights))
    save_encoder_directory(soup, output, bases.pop(), stored_in_fp16(ingredients))
    log = [
        {"path": ingredient.path, "weight": ingredient.weight, "train_log": asdict(ingredient.report)}
        for ingredient in ingredients
    ]
    (output / SOUP_LOG).write_text(json.dumps({"ingredients": log}) + "\n")
    return ingredients


def stored_in_fp16(ingredients: Sequence[Ingredient]) -> bool:
    """A soup is stored as float16 when every ingredient was."""
    return all(ingredient.config.save_fp16 for ingredient in ingredients)


def read_soup(directory: str | Path) -> list[Ingredient]:
    """The ingredients recorded in a soup's log (their directories need not exist any more)."""
    log_path = Path(directory) / SOUP_LOG
    try:
        ingredients = []
        for entry in json.loads(log_path.read_text())["ingredients"]:
            report = TrainReport(**entry["train_log"])
            config = logged_config(report, entry["path"])
            ingredients.append(Ingredient(entry["path"], entry["weight"], config, report))
    except (ValueError, TypeError, KeyError) as error:
        raise LensError(f"{log_path} is not a soup log of this version ({error!r}).") from error
    return ingredients
