"""The command line: options generated from the config dataclasses, and the model cards it writes."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from pathlib import Path

import pytest

from core.cards import dpr_twin_card, mlm_card, soup_card
from core.cli import AggregateOptions, build_parser, ig_settings, main, probe_config
from core.cli_args import add_config_arguments, cli_option, config_command, config_from_args
from core.evaluation import Evaluation
from core.pretraining import PretrainConfig, PretrainReport
from core.probing import ProbeConfig
from core.soup import Ingredient
from core.token_attribution import IGSettings
from core.training import TrainConfig, TrainReport


def parsed(*argv: str):
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize(
    "argv, build, defaults",
    [
        (["train"], lambda args: config_from_args(TrainConfig, args), TrainConfig()),
        (["pretrain"], lambda args: config_from_args(PretrainConfig, args), PretrainConfig()),
        (["probe"], probe_config, ProbeConfig()),
        (["neurons-aggregate"], lambda args: config_from_args(AggregateOptions, args), AggregateOptions()),
        (["token-ig", "a query"], ig_settings, IGSettings()),
    ],
    ids=["train", "pretrain", "probe", "neurons-aggregate", "token-ig"],
)
def test_no_options_give_the_dataclass_defaults(argv, build, defaults):
    assert build(parsed(*argv)) == defaults


def test_readme_and_makefile_commands_set_their_fields():
    train = config_from_args(
        TrainConfig,
        parsed(
            "train",
            "--base",
            "assets/mini-bert-wiki",
            "--output",
            "out",
            "--epochs",
            "2",
            "--lr",
            "1e-4",
            "--seed",
            "7",
            "--max-steps",
            "200",
            "--no-save-fp16",
        ),
    )
    assert train == TrainConfig(
        base="assets/mini-bert-wiki", output="out", epochs=2, learning_rate=1e-4, seed=7, max_steps=200, save_fp16=False
    )
    pretrain = config_from_args(PretrainConfig, parsed("pretrain", "--output", "mini", "--hidden", "128"))
    assert (pretrain.output, pretrain.hidden, pretrain.intermediate) == ("mini", 128, 512)
    assert probe_config(parsed("probe", "--n", "5", "2", "2", "--negatives", "A")).ns == (2, 5)
    aggregate = config_from_args(AggregateOptions, parsed("neurons-aggregate", "--queries", "10", "--steps", "5"))
    assert aggregate == AggregateOptions(queries=10, steps=5)
    settings = ig_settings(parsed("token-ig", "q", "--steps", "30", "--start-steps", "0"))
    assert (settings.n_steps, settings.start_steps) == (30, None)  # 0 turns the adaptive first pass off
    build = parsed("build-index", "--pair", "offline", "--prebuilt")
    assert (build.pair, build.prebuilt) == ("offline", True)


@pytest.mark.parametrize(
    "argv, shown",
    [
        (
            ["train", "--help"],
            [
                "--lr LR",
                f"AdamW learning rate (default: {TrainConfig.learning_rate})",
                "--max-steps MAX_STEPS",
                "--no-eval",
            ],
        ),
        (["probe", "--help"], ["--n N [N ...]", "(default: (2, 3, 4, 5))", "--negatives {bm25,A,B}"]),
        (
            ["neurons-aggregate", "--help"],
            ["--queries QUERIES", f"Riemann steps m (default: {AggregateOptions.steps})"],
        ),
    ],
)
def test_help_lists_the_options_with_their_defaults(argv, shown, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(" ".join(part.split()) in text for part in shown), text


@dataclasses.dataclass(frozen=True)
class Example:
    count: int = cli_option(3, "how many")
    rate: float = cli_option(0.5, "how fast", flags=("--r",))
    name: str | None = cli_option(None, "what", choices=("x", "y"))
    sizes: tuple[int, ...] = cli_option((1, 2), "which sizes")
    enabled: bool = cli_option(True, "whether")


def example_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Example)
    return parser


def test_every_field_type_round_trips_through_the_command_line():
    parser = example_parser()
    assert config_from_args(Example, parser.parse_args([])) == Example()
    args = parser.parse_args(["--count", "4", "--r", "0.25", "--name", "y", "--sizes", "5", "6", "--no-enabled"])
    assert config_from_args(Example, args) == Example(4, 0.25, "y", (5, 6), False)
    assert config_from_args(Example, args, count=9).count == 9
    with pytest.raises(SystemExit):
        parser.parse_args(["--name", "z"])


def test_a_field_without_a_default_cannot_be_an_option():
    @dataclasses.dataclass
    class Required:
        path: str

    with pytest.raises(TypeError, match="Required.path needs a default"):
        add_config_arguments(argparse.ArgumentParser(), Required)


def evaluation(value: float, hits: tuple[float, ...] = (0.0, 1.0, 1.0, 1.0)) -> Evaluation:
    names = ("R@1", "R@10", "MRR@10", "nDCG@10")
    means, intervals = dict.fromkeys(names, value), dict.fromkeys(names, (value - 0.01, value + 0.01))
    return Evaluation("m", 99, means, intervals, {name: list(hits) for name in names}, [])


def test_cards_are_filled_with_the_measured_run(tmp_path: Path):
    hardware = "3 CPU cores (arm64, 3 torch threads)"
    (tmp_path / "dpr_lens.json").write_text('{"pooling": "cls", "normalize": false}')
    report = TrainReport({}, 40, 320, 30, 150.0, [2.0] * 20 + [1.0] * 20, hardware)
    models = ("before: minilm:", "previous twin: old", "after: this model")
    card = dpr_twin_card(
        tmp_path,
        "python -m core train",
        TrainConfig(save_fp16=False, query_styles=("description", "question")),
        report,
        dict(zip(models, map(evaluation, (0.2, 0.3, 0.4)))),
        350,
        [
            ("69 hand-written questions", dict(zip(models, map(evaluation, (0.5, 0.6, 0.7))))),
            (
                "59 other questions",
                {models[0]: evaluation(0.5, (0, 0, 1, 1)), models[2]: evaluation(1.0, (1, 1, 1, 1))},
            ),
        ],
    )
    assert "40 steps in 2.5 min on 3 CPU cores (arm64, 3 torch threads);" in card
    assert "loss 2.000 (first 20 steps) -> 1.000 (last 20 steps)" in card
    assert "Stored as float32 safetensors" in card and "dot products (no normalisation" in card
    assert "styles `description`, `question`," in card and "| model | R@1 | R@10 | MRR@10 | nDCG@10 |" in card
    assert "| previous twin: old | 0.300 [0.290, 0.310] | 0.300 [0.290, 0.310] |" in card
    questions = card[card.index("### Natural questions, set 1\n\n69 hand-written questions") :]
    assert "| after: this model | 0.700 [0.690, 0.710] |" in questions and "$" not in card
    assert "- after minus previous twin (paired): R@1 +0.000 [+0.000, +0.000]" in questions
    other = card[card.index("### Natural questions, set 2\n\n59 other questions") :]
    assert "- after minus before (paired): R@1 +0.500 [" in other and "previous twin" not in other
    assert "KL(" not in card
    distilled = dpr_twin_card(
        tmp_path, "", TrainConfig(distill_weight=0.5), report, dict(zip(models, map(evaluation, (0.2, 0.3, 0.4)))), 350
    )
    assert "dot products (no normalisation, as in DPR), plus 0.5 x KL(base || twin)" in distilled
    assert "total loss (NLL + 0.5 x KL) 2.000 (first 20 steps)" in distilled

    ingredients = [
        Ingredient(path, 0.5, TrainConfig(output=path, distill_weight=weight), report)
        for path, weight in (("build/twin-free", 0.0), ("build/twin-distilled", 1.0))
    ]
    soup = soup_card(
        tmp_path, "python -m core soup", ingredients, dict(zip(models, map(evaluation, (0.2, 0.3, 0.4)))), 350
    )
    assert soup.startswith("# " + tmp_path.name + " (DPR twin of all-MiniLM-L6-v2 (bundled, `minilm:`): a model soup)")
    assert "```\npython -m core soup\n```" in soup and "weights\n  0.5 and 0.5; nothing was trained" in soup
    free, distilled = soup.split("## Ingredient 1: `build/twin-free`, weight 0.5")[1].split(
        "## Ingredient 2: `build/twin-distilled`, weight 0.5"
    )
    assert "python -m core train --output build/twin-free\n" in free and "KL(" not in free
    assert "python -m core train --output build/twin-distilled --distill-weight 1.0\n" in distilled
    assert "plus 1.0 x KL(base || twin)" in distilled and "40 steps in 2.5 min" in distilled
    assert "| after: this model | 0.400 [0.390, 0.410] |" in distilled.split("## Retrieval quality")[1]
    assert "$" not in soup

    pretrain = PretrainReport(
        {},
        10,
        90,
        5,
        200,
        60.0,
        [],
        [{"step": 10, "minutes": 1.0, "loss": 5.5, "accuracy": 0.125, "masked_tokens": 77}],
        hardware,
    )
    card = mlm_card(
        "python -m core pretrain",
        PretrainConfig(hidden=64, mask_probability=0.2),
        pretrain,
        {"cls": evaluation(0.1)},
        95,
    )
    assert "1.0 min on 3 CPU cores (arm64, 3 torch threads)" in card and "FFN 256" in card
    assert "20% of the tokens" in card and "| 10 | 1.0 | 5.500 | 0.125 |" in card and "$" not in card


def test_a_config_becomes_the_command_that_gives_it_back():
    config = TrainConfig(
        base="minilm:",
        output="out dir",
        learning_rate=1e-5,
        max_steps=360,
        save_fp16=False,
        query_styles=("ict", "question"),
    )
    command = config_command(TrainConfig, config, "python -m core train")
    assert command == (
        "python -m core train --output 'out dir' --lr 1e-05 --max-steps 360 --no-save-fp16 --query-styles ict question"
    )
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TrainConfig)
    assert config_from_args(TrainConfig, parser.parse_args(shlex.split(command)[4:])) == config
