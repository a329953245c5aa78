"""MLM pre-training of a mini-BERT and the fill-in-the-blank check on its MLM head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest
from transformers import AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertForPreTraining

from core.cloze import ClozeError, fill_in_blank, has_mlm_head, load_cloze_model
from core.pair import ModelSpec, load_encoder
from core.pretraining import PretrainConfig, evaluate_mlm, is_mlm_validation, pretrain_mlm, save_pretrained_model
from core.suppression import Neuron
from tests.test_mini_paper import plain_top_words

APP = Path(__file__).resolve().parent.parent / "app.py"
TINY = dict(
    vocab_size=800,
    layers=2,
    hidden=32,
    heads=2,
    intermediate=64,
    max_length=64,
    batch_size=8,
    learning_rate=3e-3,
    eval_every=15,
    validation_percent=20,
)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, wiki_slice):
    config = PretrainConfig(output=str(tmp_path_factory.mktemp("mini") / "mini-bert"), max_steps=30, **TINY)
    model, tokenizer, report = pretrain_mlm(config, wiki_slice, progress=False)
    return save_pretrained_model(model, tokenizer, config, report), report


def test_validation_slice_is_fixed_and_disjoint_from_training(wiki_slice, pretrained):
    _, report = pretrained
    validation = [t for t in wiki_slice.titles if is_mlm_validation(t, 20)]
    assert 0 < len(validation) < len(wiki_slice)
    assert report.validation_articles == len(validation)
    assert report.train_articles == len(wiki_slice) - len(validation)


def test_pretraining_lowers_the_held_out_mlm_loss(pretrained):
    _, report = pretrained
    first, last = report.evaluations[0], report.evaluations[-1]
    assert [e["step"] for e in report.evaluations] == [15, 30]
    assert np.mean(report.losses[-5:]) < np.mean(report.losses[:5])
    assert last["loss"] < np.log(TINY["vocab_size"])  # better than a uniform guess over the vocabulary
    assert first["masked_tokens"] == last["masked_tokens"] > 0  # the same fixed masked positions every time


def test_held_out_loss_and_accuracy_weigh_every_masked_token_alike():
    torch.manual_seed(0)
    model = BertForPreTraining(
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).eval()
    batches, logits, labels = [], [], []
    for rows, masked in ((2, 3), (3, 7)):  # unequal batches: a mean of batch means would be wrong
        ids = torch.randint(5, 50, (rows, 8))
        attention = torch.ones_like(ids)
        attention[0, 6:] = 0
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=attention).prediction_logits
        chosen = torch.randperm(rows * 6)[:masked]
        row, column = chosen // 6, chosen % 6
        batch_labels = torch.full_like(ids, -100)
        batch_labels[row, column] = torch.randint(5, 50, (masked,))
        batch_labels[row[:2], column[:2]] = full[row[:2], column[:2]].argmax(-1)  # at least two hits per batch
        batches.append({"input_ids": ids, "attention_mask": attention, "labels": batch_labels})
        logits.append(full[row, column])
        labels.append(batch_labels[row, column])
    logits, labels = torch.cat(logits), torch.cat(labels)
    result = evaluate_mlm(model, batches)
    assert result["masked_tokens"] == 10
    assert result["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-5)
    assert result["accuracy"] == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))
    assert result["accuracy"] >= 0.4


def test_saved_model_loads_as_an_encoder_and_as_a_masked_lm(pretrained):
    directory, _ = pretrained
    encoder = load_encoder(ModelSpec("mini", str(directory)))
    assert (encoder.query.pooling, encoder.query.normalize) == ("cls", False)
    again = load_encoder(ModelSpec("mini", str(directory)))
    assert encoder.fingerprint == again.fingerprint  # no randomly initialised weights on load
    vectors = encoder.encode_queries(["capital of france", "an opera"])
    assert vectors.shape == (2, 32) and np.isfinite(vectors).all()
    mlm = AutoModelForMaskedLM.from_pretrained(directory)
    encoder_embeddings = encoder.query.backbone.embeddings.word_embeddings.weight
    assert torch.equal(mlm.bert.embeddings.word_embeddings.weight, encoder_embeddings)


def test_fill_in_blank_ranks_words_and_changes_when_neurons_are_zeroed(pretrained):
    directory, _ = pretrained
    encoder = load_encoder(ModelSpec("mini", str(directory)))
    assert has_mlm_head(encoder)
    cloze = load_cloze_model(encoder)
    predictions = fill_in_blank(cloze, "paris is the capital of ___ .", top_k=5)
    probabilities = [p.probability for p in predictions]
    assert len(predictions) == 5 and probabilities == sorted(probabilities, reverse=True)
    plain = AutoModelForMaskedLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    words, expected = plain_top_words(plain, tokenizer, "paris is the capital of [MASK] .")
    assert [p.word for p in predictions] == words
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5)
    every_neuron = [Neuron("intermediate", layer, index, 1.0) for layer in range(2) for index in range(64)]
    zeroed = fill_in_blank(cloze, "paris is the capital of [MASK] .", top_k=5, zeroed=every_neuron)
    assert [p.probability for p in zeroed] != probabilities
    assert fill_in_blank(cloze, "paris is the capital of [MASK] .", top_k=5) == predictions  # hooks removed


@pytest.mark.parametrize("prompt", ["no blank here", "[MASK] and [MASK]", "   ", "___ ___"])
def test_fill_in_blank_needs_exactly_one_blank(pretrained, prompt):
    cloze = load_cloze_model(load_encoder(ModelSpec("mini", str(pretrained[0]))))
    with pytest.raises(ClozeError, match="exactly one blank"):
        fill_in_blank(cloze, prompt)


def test_a_model_without_mlm_head_has_no_cloze(tiny_bert_dir):
    encoder = load_encoder(ModelSpec("tiny", str(tiny_bert_dir)))
    assert not has_mlm_head(encoder)
    with pytest.raises(ClozeError, match="masked-LM head"):
        load_cloze_model(encoder)


def test_neuron_page_fills_in_the_blank_for_a_model_with_an_mlm_head(pretrained, tiny_bert_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DPR_LENS_CORPUS_LIMIT", "120")
    monkeypatch.setenv("DPR_LENS_CACHE", str(tmp_path / "cache"))
    at = AppTest.from_file(str(APP), default_timeout=240)
    at.session_state["pair_key"] = "custom"
    at.session_state["custom_a"] = str(pretrained[0])
    at.session_state["custom_b"] = str(tiny_bert_dir)
    at.switch_page("pages/knowledge_neurons.py").run()
    at.text_input(key="query_input").input("capital of france").run()
    assert not at.exception and not at.error
    assert any("Fill in the blank" in header.value for header in at.header)
    tables = [frame.value for frame in at.dataframe if "word, neurons zeroed" in frame.value.columns]
    assert len(tables) == 1 and len(tables[0]) == 5  # model A has a head; model B (plain BertModel) has none
    assert any("has no masked-LM head" in caption.value for caption in at.caption)

    at.text_input(key="kn_cloze").input("<b>no blank</b>").run()
    assert not at.exception
    assert any("exactly one blank" in info.value for info in at.info)
