import json

import numpy as np
import torch

from core.corpus import split_indices
from core.pair import ModelSpec, load_encoder
from core.training import (TrainConfig, batch_loss, contrastive_loss, save_twin, train_dpr,
                           training_examples)
from tests.conftest import make_tiny_bert


def test_hard_negatives_are_never_relevant_and_never_held_out(wiki_slice):
    train, held_out = split_indices(wiki_slice)
    examples = training_examples(wiki_slice, train)
    assert examples and all(e.hard_negative not in e.relevant for e in examples)
    assert not {e.positive for e in examples} & set(held_out)
    assert not {e.hard_negative for e in examples} & set(held_out)


def test_same_description_passages_are_masked_not_negatives():
    from core.training import TrainingExample

    batch = [TrainingExample("bird family", 0, 5, frozenset({0, 1})),
             TrainingExample("bird family", 1, 6, frozenset({0, 1}))]
    vectors = torch.eye(4)[:2]
    passages = torch.stack([torch.eye(4)[0], torch.eye(4)[1], torch.eye(4)[2], torch.eye(4)[3]])
    loss = contrastive_loss(vectors, passages, batch, [0, 1, 5, 6], scale=1.0)
    expected = -torch.log_softmax(torch.tensor([1.0, 0.0, 0.0]), 0)[0]
    assert torch.isclose(loss, expected)


def test_training_on_a_tiny_slice_lowers_the_loss_and_saves_a_loadable_twin(tmp_path, wiki_slice):
    base = make_tiny_bert(tmp_path / "base", wiki_slice, pooling="mean", normalize=True, initializer_range=0.2)
    config = TrainConfig(base=str(base), output=str(tmp_path / "twin"), seed=3, epochs=15, batch_size=16,
                         learning_rate=1e-3, warmup_fraction=0.0, passage_max_length=64, limit=40)
    train, _ = split_indices(wiki_slice)
    examples = training_examples(wiki_slice, train[:40])
    batches = [examples[:16], examples[16:32]]

    def mean_loss(encoder):
        with torch.no_grad():
            return float(np.mean([batch_loss(encoder, batch, wiki_slice, config).item() for batch in batches]))

    before = mean_loss(load_encoder(ModelSpec("base", str(base))))
    encoder, report = train_dpr(config, wiki_slice, progress=False)
    assert report.steps == 15 * (report.train_pairs // 16) and len(report.losses) == report.steps
    after = mean_loss(encoder)
    assert after < before - 0.1, (before, after)

    output = save_twin(encoder, config, report)
    assert json.loads((output / "dpr_lens.json").read_text()) | {"base": None} == {
        "pooling": "mean", "normalize": True, "base": None}
    twin = load_encoder(ModelSpec("twin", str(output)))
    assert twin.query.pooling == "mean" and twin.query.normalize
    assert next(twin.query.model.parameters()).dtype == torch.float32
    queries = ["a test query", "another one"]
    np.testing.assert_allclose(twin.encode_queries(queries), encoder.encode_queries(queries), atol=5e-3)
