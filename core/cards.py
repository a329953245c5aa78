"""Model cards (README.md next to the weights) filled from core/templates/ with the run's measured values."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from string import Template

from .corpus import HELD_OUT_PERCENT
from .evaluation import Evaluation, paired_difference
from .index import PASSAGE_MAX_LENGTH
from .pair import LENS_CONFIG
from .pretraining import PretrainConfig, PretrainReport
from .soup import Ingredient, stored_in_fp16
from .training import TrainConfig, TrainReport, training_command

TEMPLATES = Path(__file__).resolve().parent / "templates"
LOSS_WINDOW = 20  # steps averaged for the loss at the start and at the end of training


def fill(template: str, **values: object) -> str:
    """The template with every ${name} replaced; a name without a value is an error, not a blank."""
    return Template((TEMPLATES / template).read_text()).substitute(values)


def metric_row(evaluation: Evaluation, names=("R@1", "R@10", "nDCG@10")) -> str:
    cells = []
    for name in names:
        low, high = evaluation.intervals[name]
        cells.append(f"{evaluation.means[name]:.3f} [{low:.3f}, {high:.3f}]")
    return " | ".join(cells)


TWIN_METRICS = ("R@1", "R@10", "MRR@10", "nDCG@10")


def results_table(evaluations: Mapping[str, Evaluation]) -> str:
    """One markdown row per model (label -> evaluation) on one query set."""
    lines = ["| model | " + " | ".join(TWIN_METRICS) + " |", "|---" * (len(TWIN_METRICS) + 1) + "|"]
    lines += [f"| {label} | {metric_row(e, TWIN_METRICS)} |" for label, e in evaluations.items()]
    return "\n".join(lines)


def _storage(save_fp16: bool) -> str:
    return "float16 safetensors" if save_fp16 else "float32 safetensors"


def difference_lines(evaluations: Mapping[str, Evaluation], names=("R@1", "R@10")) -> str:
    """The last row's model against each earlier row's, query by query: mean difference, 95% paired interval."""
    *earlier, (last_label, last) = evaluations.items()
    lines = []
    for label, evaluation in earlier:
        cells = []
        for name in names:
            mean, low, high = paired_difference(evaluation.per_query[name], last.per_query[name])
            cells.append(f"{name} {mean:+.3f} [{low:+.3f}, {high:+.3f}]")
        lines.append(f"- {last_label.split(':')[0]} minus {label.split(':')[0]} (paired): " + ", ".join(cells))
    return "\n".join(lines)


def _recipe(output: Path, command: str, config: TrainConfig, report: TrainReport, corpus_size: int) -> str:
    """How one twin was trained: its command, recipe, data and run."""
    lens = json.loads((output / LENS_CONFIG).read_text())
    similarity = (
        f"scaled cosine similarities (scale {config.scale})"
        if lens["normalize"]
        else "dot products (no normalisation, as in DPR)"
    )
    first, last = report.losses[:LOSS_WINDOW], report.losses[-LOSS_WINDOW:]
    return fill(
        "twin_recipe.md",
        base=_base(config.base),
        command=command,
        pooling=lens["pooling"],
        similarity=similarity,
        distillation=(
            f", plus {config.distill_weight} x KL(base || twin) of each query's softmax over the same in-batch "
            f"scores for the {', '.join(f'`{style}`' for style in config.distill_styles)} queries, with the frozen "
            "base as teacher (learning without forgetting, Li and Hoiem 2016)"
            if config.distill_weight
            else ""
        ),
        query_styles=", ".join(f"`{style}`" for style in config.query_styles),
        learning_rate=config.learning_rate,
        warmup=f"{config.warmup_fraction:.0%}",
        batch_size=config.batch_size,
        query_max_length=config.query_max_length,
        passage_max_length=config.passage_max_length,
        steps=report.steps,
        epochs=f"{report.steps * config.batch_size / report.train_pairs:.2f}",
        seed=config.seed,
        corpus_size=corpus_size,
        held_out_percent=HELD_OUT_PERCENT,
        train_pairs=report.train_pairs,
        held_out_articles=report.held_out_articles,
        minutes=f"{report.seconds / 60:.1f}",
        hardware=report.hardware,
        loss_window=LOSS_WINDOW,
        loss_name=f"total loss (NLL + {config.distill_weight} x KL)" if config.distill_weight else "loss",
        loss_start=f"{sum(first) / max(1, len(first)):.3f}",
        loss_end=f"{sum(last) / max(1, len(last)):.3f}",
        storage=_storage(config.save_fp16),
    )


def _quality(
    descriptions: Mapping[str, Evaluation],
    corpus_size: int,
    question_sets: Sequence[tuple[str, Mapping[str, Evaluation]]],
) -> str:
    """The retrieval tables: held-out descriptions, then each question set with the note that describes it."""
    question_section = "".join(
        f"\n\n### Natural questions, set {number}\n\n{note}\n\n{results_table(evaluations)}\n\n"
        f"{difference_lines(evaluations)}"
        for number, (note, evaluations) in enumerate(question_sets, start=1)
    )
    return fill(
        "twin_quality.md",
        corpus_size=corpus_size,
        queries=next(iter(descriptions.values())).queries,
        index_max_length=PASSAGE_MAX_LENGTH,
        description_table=results_table(descriptions) + "\n\n" + difference_lines(descriptions),
        question_section=question_section,
    )


def _base(base: str) -> str:
    return "all-MiniLM-L6-v2 (bundled, `minilm:`)" if base == "minilm:" else f"`{base}`"


def dpr_twin_card(
    output: Path,
    command: str,
    config: TrainConfig,
    report: TrainReport,
    descriptions: Mapping[str, Evaluation],
    corpus_size: int,
    question_sets: Sequence[tuple[str, Mapping[str, Evaluation]]] = (),
) -> str:
    """The card of a trained twin; `descriptions` and each question set's evaluations map row labels to
    evaluations, in row order (the twin last); a question set comes with the note that describes it."""
    return fill(
        "dpr_twin_card.md",
        name=output.name,
        base=_base(config.base),
        recipe=_recipe(output, command, config, report, corpus_size).rstrip("\n"),
        quality=_quality(descriptions, corpus_size, question_sets),
    )


def soup_card(
    output: Path,
    command: str,
    ingredients: Sequence[Ingredient],
    descriptions: Mapping[str, Evaluation],
    corpus_size: int,
    question_sets: Sequence[tuple[str, Mapping[str, Evaluation]]] = (),
) -> str:
    """The card of a soup: its command, each ingredient's training, and the soup's retrieval quality (the rows
    as for `dpr_twin_card`)."""
    sections = [
        f"## Ingredient {number}: `{ingredient.path}`, weight {ingredient.weight:g}\n\n"
        + _recipe(output, training_command(ingredient.config), ingredient.config, ingredient.report, corpus_size)
        for number, ingredient in enumerate(ingredients, start=1)
    ]
    return fill(
        "soup_card.md",
        name=output.name,
        base=_base(ingredients[0].config.base),
        count=len(ingredients),
        command=command,
        weights=" and ".join(f"{ingredient.weight:g}" for ingredient in ingredients),
        storage=_storage(stored_in_fp16(ingredients)),
        ingredients="\n\n".join(section.rstrip("\n") for section in sections),
        quality=_quality(descriptions, corpus_size, question_sets),
    )


def mlm_card(
    command: str, config: PretrainConfig, report: PretrainReport, evaluations: dict[str, Evaluation], corpus_size: int
) -> str:
    final = report.evaluations[-1]
    curve = "\n".join(
        f"| {e['step']} | {e['minutes']} | {e['loss']:.3f} | {e['accuracy']:.3f} |" for e in report.evaluations
    )
    rows = "\n".join(f"| {pooling} | {metric_row(evaluation)} |" for pooling, evaluation in evaluations.items())
    return fill(
        "mlm_card.md",
        layers=config.layers,
        hidden=config.hidden,
        heads=config.heads,
        intermediate=config.intermediate,
        vocab_size=config.vocab_size,
        command=command,
        corpus_size=corpus_size,
        max_length=config.max_length,
        train_windows=report.train_windows,
        train_articles=report.train_articles,
        validation_articles=report.validation_articles,
        validation_percent=config.validation_percent,
        mask_percent=f"{config.mask_probability:.0%}",
        learning_rate=config.learning_rate,
        warmup=f"{config.warmup_fraction:.0%}",
        batch_size=config.batch_size,
        steps=report.steps,
        epochs=f"{report.steps * config.batch_size / report.train_windows:.1f}",
        seed=config.seed,
        minutes=f"{report.seconds / 60:.1f}",
        hardware=report.hardware,
        storage=_storage(config.save_fp16),
        final_loss=f"{final['loss']:.3f}",
        final_accuracy=f"{final['accuracy']:.3f}",
        masked_tokens=final["masked_tokens"],
        curve=curve,
        rows=rows,
    )
