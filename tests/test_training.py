import itertools
import json

import numpy as np
import torch

from core.corpus import split_indices
from core.pair import ModelSpec, load_encoder
from core.train_loop import LoopSettings, hardware_description, run_training
from core.training import TrainConfig, batch_loss, contrastive_loss, save_twin, train_dpr, training_examples
from tests.conftest import make_tiny_bert

# First and last losses of the tiny run below, recorded before DPR and MLM training shared core.train_loop: a change
# to the batch order, negatives, optimiser or schedule moves them; the tolerance covers torch thread-count noise.
TINY_RUN_FIRST_LOSSES = [3.64806, 3.45186, 3.45183]
TINY_RUN_LAST_LOSSES = [3.22355, 3.35351, 3.33379]


def test_hard_negatives_are_never_relevant_and_never_held_out(wiki_slice):
    train, held_out = split_indices(wiki_slice)
    examples = training_examples(wiki_slice, train)
    assert examples and all(e.hard_negative not in e.relevant for e in examples)
    assert not {e.positive for e in examples} & set(held_out)
    assert not {e.hard_negative for e in examples} & set(held_out)


def test_same_description_passages_are_masked_not_negatives():
    from core.training import TrainingExample

    batch = [
        TrainingExample("bird family", 0, 5, frozenset({0, 1})),
        TrainingExample("bird family", 1, 6, frozenset({0, 1})),
    ]
    vectors = torch.eye(4)[:2]
    passages = torch.stack([torch.eye(4)[0], torch.eye(4)[1], torch.eye(4)[2], torch.eye(4)[3]])
    loss = contrastive_loss(vectors, passages, batch, [0, 1, 5, 6], scale=1.0)
    expected = -torch.log_softmax(torch.tensor([1.0, 0.0, 0.0]), 0)[0]
    assert torch.isclose(loss, expected)


def test_training_on_a_tiny_slice_lowers_the_loss_and_saves_a_loadable_twin(tmp_path, wiki_slice):
    base = make_tiny_bert(tmp_path / "base", wiki_slice, pooling="mean", normalize=True, initializer_range=0.2)
    config = TrainConfig(
        base=str(base),
        output=str(tmp_path / "twin"),
        seed=3,
        epochs=15,
        batch_size=16,
        learning_rate=1e-3,
        warmup_fraction=0.0,
        passage_max_length=64,
        limit=40,
    )
    train, _ = split_indices(wiki_slice)
    examples = training_examples(wiki_slice, train[:40])
    batches = [examples[:16], examples[16:32]]

    def mean_loss(encoder):
        with torch.no_grad():
            return float(np.mean([batch_loss(encoder, batch, wiki_slice, config).item() for batch in batches]))

    before = mean_loss(load_encoder(ModelSpec("base", str(base))))
    encoder, report = train_dpr(config, wiki_slice, progress=False)
    assert report.steps == 15 * (report.train_pairs // 16) and len(report.losses) == report.steps
    np.testing.assert_allclose(
        report.losses[:3] + report.losses[-3:], TINY_RUN_FIRST_LOSSES + TINY_RUN_LAST_LOSSES, atol=1e-4
    )
    assert report.hardware == hardware_description()
    after = mean_loss(encoder)
    assert after < before - 0.1, (before, after)

    output = save_twin(encoder, config, report)
    assert json.loads((output / "dpr_lens.json").read_text()) | {"base": None} == {
        "pooling": "mean",
        "normalize": True,
        "base": None,
    }
    twin = load_encoder(ModelSpec("twin", str(output)))
    assert twin.query.pooling == "mean" and twin.query.normalize
    assert next(twin.query.model.parameters()).dtype == torch.float32
    queries = ["a test query", "another one"]
    np.testing.assert_allclose(twin.encode_queries(queries), encoder.encode_queries(queries), atol=5e-3)


def test_training_loop_warms_up_from_zero_evaluates_on_schedule_and_ends_in_eval_mode():
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    inputs = torch.linspace(-1, 1, 8)[:, None]
    settings = LoopSettings(steps=5, learning_rate=0.1, warmup_fraction=0.4, description="toy", evaluate_every=2)
    result = run_training(
        model,
        itertools.repeat((inputs, 3 * inputs)),
        lambda batch: torch.nn.functional.mse_loss(model(batch[0]), batch[1]),
        settings,
        evaluate=lambda step: {"weight": model.weight.item()},
        progress=False,
    )
    assert len(result.losses) == 5
    assert result.losses[1] == result.losses[0]  # the first step's learning rate is 0: warm-up starts from zero
    assert result.losses[-1] < result.losses[1]
    assert [(e["step"], sorted(e)) for e in result.evaluations] == [
        (step, ["minutes", "step", "weight"]) for step in (2, 4, 5)
    ]
    assert result.evaluations[-1]["weight"] == model.weight.item()
    assert not model.training
