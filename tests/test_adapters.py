"""Every model family's adapter on a tiny random model of its class: the layer stack and FFN sites follow
the config, hidden states end in the tower's own embedding, knowledge-neuron and token IG attributions are
complete, zeroing neurons equals zeroing weights, and the MLM head fills in a blank as plain transformers
does. BERT (also inside the DPR towers), DistilBERT, RoBERTa and XLM-R."""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForMaskedLM,
    GPT2Config,
    GPT2Model,
)

import core.neuron_attribution as na
from core.adapters import BertAdapter, DistilBertAdapter, RobertaAdapter, UnsupportedModelError, adapter_for
from core.cloze import fill_in_blank, load_cloze_model
from core.neuron_attribution import attribute_neurons, attribute_neurons_per_layer, site_sizes
from core.pair import ModelLoadError, ModelSpec, load_encoder
from core.probing import layer_features
from core.runtime import model_work
from core.suppression import Neuron, suppressing
from core.token_attribution import DELTA_TOLERANCE, IGSettings, attribute_pair
from tests.conftest import FAMILIES
from tests.conftest import FAMILY_QUERY as QUERY
from tests.conftest import FAMILY_TEXT as TEXT
from tests.conftest import FAMILY_TITLE as TITLE


def _towers(family_encoders, tiny_dpr, family: str):
    """(tower, batch) pairs: the family's query tower on a query and its context tower on (title, text)."""
    encoder = tiny_dpr if family == "dpr" else family_encoders[family]
    return [
        (encoder.query, encoder.query.tokenize([QUERY])),
        (encoder.context, encoder.context.tokenize([TITLE], [TEXT])),
    ]


def _expected_sizes(config) -> tuple[int, int, int]:
    """(layers, intermediate neurons, output neurons) from the config."""
    if config.model_type == "distilbert":
        return config.n_layers, config.hidden_dim, config.dim
    return config.num_hidden_layers, config.intermediate_size, config.hidden_size


# --------------------------------------------------------------------------- families


def test_the_adapter_follows_the_model_type(family_encoders, tiny_dpr, tmp_path):
    assert type(family_encoders["bert"].query.adapter) is BertAdapter
    assert type(family_encoders["distilbert"].query.adapter) is DistilBertAdapter
    assert (
        type(family_encoders["roberta"].query.adapter)
        is type(family_encoders["xlm-roberta"].query.adapter)
        is RobertaAdapter
    )
    for tower in (tiny_dpr.query, tiny_dpr.context):  # DPR wrappers: the BERT inside
        assert type(tower.adapter) is BertAdapter
        assert tower.backbone is tower.model.base_model.bert_model
    unknown = GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=16))
    with pytest.raises(UnsupportedModelError):
        adapter_for(unknown)
    unknown.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ModelLoadError, match=r"GPT2Model.*'gpt2'.*supported families: BERT.*DistilBERT.*RoBERTa"):
        load_encoder(ModelSpec("gpt2", str(tmp_path / "gpt2")))


@pytest.mark.parametrize("family", FAMILIES + ("dpr",))
def test_layers_and_ffn_sites_follow_the_config(family, family_encoders, tiny_dpr):
    for tower, _ in _towers(family_encoders, tiny_dpr, family):
        layers, intermediate, output = _expected_sizes(tower.backbone.config)
        assert tower.layer_count == len(tower.layers) == len(tower.ffn_sites) == layers
        assert site_sizes(tower) == {"intermediate": intermediate, "output": output}
        for layer, site in zip(tower.layers, tower.ffn_sites):
            assert isinstance(site.down, nn.Linear) and any(m is site.down for m in layer.modules())
            assert any(m is site.join for m in layer.modules())
        assert tower.word_embeddings is tower.backbone.get_input_embeddings()


@pytest.mark.parametrize("family", FAMILIES + ("dpr",))
def test_hidden_states_end_in_the_towers_embedding(family, family_encoders, tiny_dpr):
    encoder = tiny_dpr if family == "dpr" else family_encoders[family]
    titles, texts = ["Danube", "Paris"], [TEXT, "Paris is the capital of France."]
    for tower, pairs in ((encoder.query, None), (encoder.context, texts)):
        batch = tower.tokenize(titles, pairs)  # two rows of different lengths: padding
        with torch.no_grad():
            hidden = tower.hidden_states(batch)
            pooled = tower.forward(batch)
        assert len(hidden) == tower.layer_count + 1
        assert all(h.shape == (*batch["input_ids"].shape, tower.dim) for h in hidden)
        np.testing.assert_allclose(
            tower.pool_hidden(hidden[-1], batch["attention_mask"]).numpy(), pooled.numpy(), rtol=1e-5, atol=1e-6
        )
        features = layer_features(tower, titles, pairs)
        assert features.shape == (tower.layer_count + 1, 2, tower.dim)
        np.testing.assert_allclose(features[-1], tower.encode(titles, pairs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["roberta", "xlm-roberta"])
def test_roberta_positions_are_its_own_and_ignore_the_token_ids(family, family_encoders):
    tower = family_encoders[family].query
    batch = tower.tokenize(["a river", QUERY])
    assert "token_type_ids" not in tower.adapter.forward_kwargs(tower.model, batch)
    assert tower.adapter.max_positions(tower.model) == tower.max_length == 126  # 128 positions from padding_idx + 1
    with torch.no_grad():
        own = tower.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        ours = tower.hidden_states(batch)[-1]
        attended = batch["attention_mask"].bool()
        np.testing.assert_allclose(ours[attended].numpy(), own[attended].numpy(), rtol=1e-5, atol=1e-6)
        # A [PAD] baseline keeps every position (the model would number only the tokens that are not <pad>).
        pads = dict(batch, input_ids=torch.where(attended, tower.pad_token_id, batch["input_ids"]))
        positions = tower.adapter.forward_kwargs(tower.model, batch)["position_ids"]
        assert torch.equal(tower.adapter.forward_kwargs(tower.model, pads)["position_ids"], positions)
        assert positions[1].tolist() == list(range(2, 2 + positions.shape[1]))  # the longer row: no padding


# --------------------------------------------------------------------------- analyses


@pytest.mark.parametrize("family", FAMILIES + ("dpr",))
def test_knowledge_neuron_attributions_are_complete(family, family_encoders, tiny_dpr):
    rng = np.random.default_rng(0)
    for tower, batch in _towers(family_encoders, tiny_dpr, family):
        target = rng.normal(size=tower.dim).astype(np.float32)
        result = attribute_neurons(tower, batch, target, steps=200)
        layers, intermediate, output = _expected_sizes(tower.backbone.config)
        assert result.scores["intermediate"].shape == (layers, intermediate)
        assert result.scores["output"].shape == (layers, output)
        with torch.no_grad():
            score = float(tower.forward(batch)[0] @ torch.from_numpy(target))
        assert result.score == pytest.approx(score, rel=1e-5, abs=1e-5)
        for site in na.SITES:
            expected = result.expected_sums()[site]
            np.testing.assert_allclose(result.attribution_sums()[site], expected, atol=0.02 * np.abs(expected).max())


@pytest.mark.parametrize("family", ["distilbert", "roberta"])
def test_batched_neuron_attribution_equals_the_per_layer_loop(family, family_encoders):
    tower = family_encoders[family].query
    batch = tower.tokenize([QUERY])
    target = np.random.default_rng(1).normal(size=tower.dim).astype(np.float32)
    batched = attribute_neurons(tower, batch, target, steps=5, max_token_layers=40)
    reference = attribute_neurons_per_layer(tower, batch, target, steps=5)
    for site in na.SITES:
        theirs = reference.scores[site]
        np.testing.assert_allclose(batched.scores[site], theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
        np.testing.assert_allclose(batched.baseline_scores[site], reference.baseline_scores[site], rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_token_ig_is_complete(family, family_encoders):
    encoder = family_encoders[family]
    # The plain rule: its path starts at the [PAD] baseline's own forward (RoBERTa: the same positions).
    pair = attribute_pair(encoder, QUERY, TITLE, TEXT, IGSettings(32, start_steps=None))
    expected = float(encoder.encode_queries([QUERY])[0] @ encoder.encode_passages([TITLE], [TEXT])[0])
    for side in (pair.query, pair.passage):
        assert side.score == pytest.approx(expected, abs=1e-5)
        assert side.relative_delta < DELTA_TOLERANCE
        assert all(t.score == 0.0 for t in side.tokens if t.special)
    assert "".join(w.text for w in pair.query.words()) == "".join(QUERY.split())


@pytest.mark.parametrize("family", FAMILIES)
def test_zeroing_neurons_equals_zeroing_their_weights(family, family_encoders):
    tower = family_encoders[family].query
    batch = tower.tokenize([QUERY])
    rows = {key: value.expand(2, -1) for key, value in batch.items()}
    last = tower.layer_count - 1
    neurons = [Neuron("intermediate", 0, 5, 1.0), Neuron("intermediate", last, 17, 0.9), Neuron("output", last, 3, 0.8)]

    @model_work
    def suppressed():
        with suppressing(tower, [[], neurons]), torch.no_grad():
            return tower.forward(rows)

    hooked = suppressed()
    assert sum(len(s.down._forward_hooks) + len(s.down._forward_pre_hooks) for s in tower.ffn_sites) == 0
    edited = tower.with_model(copy.deepcopy(tower.model), tower.pooling, tower.normalize)
    with torch.no_grad():
        sites = edited.ffn_sites
        sites[0].down.weight[:, 5] = 0  # an intermediate neuron feeds one column of the down projection
        sites[last].down.weight[:, 17] = 0
        sites[last].down.weight[3] = 0  # an output neuron is one row and one bias
        sites[last].down.bias[3] = 0
        plain, expected = tower.forward(batch), edited.forward(batch)
    np.testing.assert_allclose(hooked[0].numpy(), plain[0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hooked[1].numpy(), expected[0].numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(hooked[0].numpy(), hooked[1].numpy())


@pytest.mark.parametrize("family", FAMILIES)
def test_the_masked_lm_head_fills_in_the_blank(family, family_encoders, family_dirs):
    cloze = load_cloze_model(family_encoders[family])
    assert type(cloze.tower.adapter) is type(family_encoders[family].query.adapter)
    prompt = "The Danube flows into the ___ Sea."
    predictions = fill_in_blank(cloze, prompt, top_k=5)
    plain = AutoModelForMaskedLM.from_pretrained(family_dirs[family], dtype=torch.float32).eval()
    text = prompt.replace("___", cloze.blank)
    batch = cloze.tower.tokenize([text])
    position = int((batch["input_ids"][0] == cloze.tower.mask_token_id).nonzero()[0])
    with torch.no_grad():
        top = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0, position]
    top = top.softmax(-1).topk(5)
    assert [p.word for p in predictions] == cloze.tower.convert_ids_to_tokens(top.indices.tolist())
    np.testing.assert_allclose([p.probability for p in predictions], top.values.numpy(), rtol=1e-5)
    every = [Neuron("intermediate", layer, i, 1.0) for layer in range(cloze.tower.layer_count) for i in range(16)]
    assert [p.probability for p in fill_in_blank(cloze, prompt, top_k=5, zeroed=every)] != [
        p.probability for p in predictions
    ]
