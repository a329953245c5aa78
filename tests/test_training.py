import itertools
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from core.corpus import split_indices
from core.pair import ModelSpec, load_encoder
from core.train_loop import LoopSettings, hardware_description, run_training
from core.training import (
    TrainingExample,
    batch_loss,
    batch_scores,
    defining_question,
    in_batch_scores,
    inverse_cloze_pairs,
    lead_sentences,
    positive_nll,
    question_queries,
    save_twin,
    score_divergence,
    train_dpr,
    training_examples,
)
from tests.conftest import tiny_run

# First and last losses of the tiny run below, recorded when the loss began masking every other copy of a query's
# relevant passage (a hard negative can repeat another query's positive): a change to the batch order, negatives,
# optimiser or schedule moves them; the tolerance covers torch thread-count noise.
TINY_RUN_FIRST_LOSSES = [3.64385, 3.43998, 3.43878]
TINY_RUN_LAST_LOSSES = [3.21896, 3.33848, 3.33311]


def test_hard_negatives_are_never_relevant_and_never_held_out(wiki_slice):
    train, held_out = split_indices(wiki_slice)
    examples = training_examples(wiki_slice, train)
    assert examples and all(e.hard_negative not in e.relevant for e in examples)
    assert not {e.positive for e in examples} & set(held_out)
    assert not {e.hard_negative for e in examples} & set(held_out)


def test_same_description_passages_are_masked_not_negatives():
    batch = [
        TrainingExample("bird family", 0, 5, frozenset({0, 1})),
        TrainingExample("bird family", 1, 6, frozenset({0, 1})),
    ]
    vectors = torch.eye(4)[:2]
    passages = torch.stack([torch.eye(4)[0], torch.eye(4)[1], torch.eye(4)[2], torch.eye(4)[3]])
    loss = positive_nll(in_batch_scores(vectors, passages, batch, [0, 1, 5, 6], scale=1.0))
    expected = -torch.log_softmax(torch.tensor([1.0, 0.0, 0.0]), 0)[0]
    assert torch.isclose(loss, expected)


def test_the_same_article_in_two_query_styles_is_masked_for_the_other_query():
    batch = [
        TrainingExample("bird family", 0, 5, frozenset({0})),
        TrainingExample("what is a family of birds?", 0, 6, frozenset({0})),
    ]
    vectors = torch.eye(4)[:2]
    passages = torch.eye(4)[[0, 0, 2, 3]]
    loss = positive_nll(in_batch_scores(vectors, passages, batch, [0, 0, 5, 6], scale=1.0))
    # Query 0 sees its positive (1), the other copy of article 0 masked, and two negatives (0); query 1 likewise.
    first = -torch.log_softmax(torch.tensor([1.0, 0.0, 0.0]), 0)[0]
    second = -torch.log_softmax(torch.tensor([0.0, 0.0, 0.0]), 0)[0]
    assert torch.isclose(loss, (first + second) / 2)


def test_score_divergence_is_kl_over_the_unmasked_columns():
    teacher = torch.tensor([[2.0, 0.5, float("-inf"), -1.0], [0.0, float("-inf"), 1.0, 3.0]])
    student = torch.tensor([[1.0, 1.5, float("-inf"), 0.0], [2.0, float("-inf"), -1.0, 0.5]])
    expected = []
    for t_row, s_row in zip(teacher, student):
        kept = ~torch.isinf(t_row)
        p, q = torch.softmax(t_row[kept], 0), torch.softmax(s_row[kept], 0)
        expected.append(float((p * (p / q).log()).sum()))
    assert float(score_divergence(teacher, student)) == pytest.approx(np.mean(expected), rel=1e-6)
    assert score_divergence(teacher, student) > 0.0


def test_defining_sentence_becomes_a_question_without_its_subject():
    hat = "A hat is a head covering (often of felt) which is worn for warmth. Hats come in many shapes."
    assert defining_question("Hat", hat) == "what is a head covering which is worn for warmth?"
    curie = "Marie Curie (born 1867) was a Polish physicist and chemist. She won two Nobel Prizes."
    assert defining_question("Marie Curie", curie) == "who was a Polish physicist and chemist?"
    field = "In mathematics, a number field is an extension of the rational numbers. It has finite degree."
    assert defining_question("Algebraic number field", field) == "what is an extension of the rational numbers?"
    # No "<subject> is": no question; a subject that is not the article's: no question either.
    assert defining_question("Hat", "Hats were worn by many people in history.") is None
    assert defining_question("Hat", "The cap is a small hat without a brim. Caps are common.") is None


def test_question_queries_come_from_training_articles_and_never_name_the_title(wiki_slice):
    train, held_out = split_indices(wiki_slice)
    queries = question_queries(wiki_slice, train)
    assert len(queries) > len(train) / 2
    assert all(q.relevant == {q.source_index} and q.source_index not in held_out for q in queries)
    assert all(q.text.endswith("?") and q.text.split()[0] in ("what", "who") for q in queries)
    assert not [q for q in queries if wiki_slice.titles[q.source_index].casefold() in q.text.casefold()]


def test_inverse_cloze_takes_the_query_sentence_out_of_its_positive(wiki_slice):
    train, held_out = split_indices(wiki_slice)
    pairs = inverse_cloze_pairs(wiki_slice, train, seed=5)
    assert len(pairs) > len(train) / 2 and not {q.source_index for q, _ in pairs} & set(held_out)
    for query, rest in pairs:
        sentences = lead_sentences(wiki_slice.texts[query.source_index])
        assert query.text in sentences and query.text not in rest
        assert len(rest.split()) == sum(len(s.split()) for s in sentences) - len(query.text.split())
    assert pairs == inverse_cloze_pairs(wiki_slice, train, seed=5)
    assert pairs != inverse_cloze_pairs(wiki_slice, train, seed=6)


def test_training_examples_of_every_style_use_training_articles_only(wiki_slice):
    train, held_out = split_indices(wiki_slice)
    examples = training_examples(wiki_slice, train, ("description", "question", "ict"), seed=5)
    ict = [e for e in examples if e.positive_text is not None]
    assert ict and len(ict) < len(examples)
    used = {e.positive for e in examples} | {e.hard_negative for e in examples}
    assert used <= set(train) and all(e.hard_negative not in e.relevant for e in examples)
    assert [e.query for e in ict] == [q.text for q, _ in inverse_cloze_pairs(wiki_slice, train, seed=5)]
    assert {e.style for e in ict} == {"ict"} and [e.query for e in examples if e.style == "question"] == [
        q.text for q in question_queries(wiki_slice, train)
    ]
    with pytest.raises(ValueError, match="Unknown query style"):
        training_examples(wiki_slice, train, ("quiz",))


def test_leads_are_split_at_sentence_ends_and_fragments_are_dropped():
    lead = "Paris is the capital of France. It has 2.1 million\nresidents. Is it big? It is the seat of government."
    assert lead_sentences(lead) == [
        "Paris is the capital of France.",
        "It has 2.1 million residents.",
        "It is the seat of government.",
    ]


def test_training_on_a_tiny_slice_lowers_the_loss_and_saves_a_loadable_twin(tmp_path, wiki_slice):
    base, config = tiny_run(tmp_path, wiki_slice, epochs=15, limit=40, query_styles=("description",))
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


def test_distilling_from_the_base_keeps_the_twin_closer_to_it(tmp_path, wiki_slice):
    base, config = tiny_run(tmp_path, wiki_slice, epochs=4, limit=32, distill_styles=("description",))
    train, _ = split_indices(wiki_slice)
    batch = training_examples(wiki_slice, train[:32])[:16]
    teacher, student = load_encoder(ModelSpec("base", str(base))), load_encoder(ModelSpec("twin", str(base)))
    with torch.no_grad():
        teacher_scores = batch_scores(teacher, batch, wiki_slice, config)
    # A student with the base's weights (no dropout) adds nothing; its loss sends gradients to it, none to the teacher.
    loss = batch_loss(student, batch, wiki_slice, replace(config, distill_weight=5.0), teacher)
    assert torch.isclose(loss, positive_nll(teacher_scores))
    loss.backward()
    assert all(p.grad is None for p in teacher.query.model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.query.model.parameters())
    with pytest.raises(ValueError, match="--distill-weight must be 0 or more"):
        train_dpr(replace(config, distill_weight=-1.0), wiki_slice, progress=False)

    def divergence_after_training(weight: float) -> float:
        encoder, _ = train_dpr(replace(config, distill_weight=weight), wiki_slice, progress=False)
        with torch.no_grad():
            return float(score_divergence(teacher_scores, batch_scores(encoder, batch, wiki_slice, config)))

    free, distilled = divergence_after_training(0.0), divergence_after_training(5.0)
    assert distilled < 0.5 * free, (distilled, free)

    # Queries of other styles than --distill-styles get the plain loss, whatever the teacher says.
    trained, _ = train_dpr(config, wiki_slice, progress=False)
    other_styles = replace(config, distill_weight=5.0, distill_styles=("question", "ict"))
    with torch.no_grad():
        assert batch_loss(trained, batch, wiki_slice, other_styles, teacher) == batch_loss(
            trained, batch, wiki_slice, config
        )
        assert batch_loss(
            trained, batch, wiki_slice, replace(other_styles, distill_styles=("description",)), teacher
        ) > (batch_loss(trained, batch, wiki_slice, config))
