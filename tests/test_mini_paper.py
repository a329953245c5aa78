"""The shipped mini-paper pair (MLM pre-trained mini-BERT vs its DPR twin) on every page."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest
from transformers import AutoModelForMaskedLM, AutoTokenizer

from core.cloze import fill_in_blank, has_mlm_head, load_cloze_model
from core.pair import load_pair
from core.suppression import Neuron

APP = Path(__file__).resolve().parent.parent / "app.py"
PAGES = (
    "pages/retrieval.py",
    "pages/token_attributions.py",
    "pages/knowledge_neurons.py",
    "pages/probing_evaluation.py",
)


@pytest.fixture(scope="module")
def mini_pair():
    return load_pair("mini-paper")


def test_the_pair_is_a_pretrained_mlm_and_its_dpr_twin(mini_pair):
    a, b = mini_pair.a, mini_pair.b
    assert (a.query.pooling, a.query.normalize) == ("cls", False)
    assert (b.query.pooling, b.query.normalize) == ("cls", False)
    assert a.query.backbone.config.num_hidden_layers == b.query.backbone.config.num_hidden_layers == 4
    assert a.fingerprint != b.fingerprint
    assert has_mlm_head(a) and not has_mlm_head(b)


def plain_top_words(model, tokenizer, prompt: str, k: int = 5) -> tuple[list[str], np.ndarray]:
    """The blank's top-k words and probabilities straight from transformers, for `fill_in_blank` to match."""
    batch = tokenizer(prompt, return_tensors="pt")
    position = batch["input_ids"][0].tolist().index(tokenizer.mask_token_id)
    with torch.no_grad():
        top = model(**batch).logits[0, position].softmax(-1).topk(k)
    return tokenizer.convert_ids_to_tokens(top.indices.tolist()), top.values.numpy()


def test_fill_in_blank_matches_plain_transformers_with_and_without_zeroed_neurons(mini_pair):
    source = mini_pair.a.source
    # The weights are stored in float16 and computed in float32, as the app does.
    plain = AutoModelForMaskedLM.from_pretrained(source, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    # Zeroing an intermediate neuron = zeroing its column of the down projection; an output neuron = its row and bias.
    intermediate = list(range(0, plain.config.intermediate_size, 3))
    zeroed = [Neuron("intermediate", 1, i, 1.0) for i in intermediate] + [Neuron("output", 3, 7, 1.0)]
    edited = copy.deepcopy(plain)
    with torch.no_grad():
        edited.bert.encoder.layer[1].output.dense.weight[:, intermediate] = 0
        edited.bert.encoder.layer[3].output.dense.weight[7] = 0
        edited.bert.encoder.layer[3].output.dense.bias[7] = 0
    cloze = load_cloze_model(mini_pair.a)
    prompt = "The capital of France is [MASK]."
    shown = {}
    for name, neurons, model in (("clean", (), plain), ("zeroed", zeroed, edited)):
        predictions = fill_in_blank(cloze, prompt, zeroed=neurons)
        words, probabilities = plain_top_words(model, tokenizer, prompt)
        assert [p.word for p in predictions] == words
        np.testing.assert_allclose([p.probability for p in predictions], probabilities, rtol=1e-5)
        shown[name] = probabilities
    assert not np.allclose(shown["clean"], shown["zeroed"], rtol=1e-3)  # the zeroing is big enough to be seen


def test_every_page_runs_on_the_mini_paper_preset(monkeypatch, tmp_path):
    monkeypatch.setenv("DPR_LENS_CORPUS_LIMIT", "150")
    monkeypatch.setenv("DPR_LENS_CACHE", str(tmp_path / "cache"))
    at = AppTest.from_file(str(APP), default_timeout=300)
    at.session_state["pair_key"] = "mini-paper"
    at.session_state["query"] = "city on the river Seine"
    at.run()
    for page in PAGES:
        at.switch_page(page).run()
        assert not at.exception, page
        assert not at.error, (page, [e.value for e in at.error])
        assert any("Mini paper" in caption.value for caption in at.caption), page
    at.switch_page("pages/knowledge_neurons.py").run()
    cloze_tables = [frame.value for frame in at.dataframe if "word, neurons zeroed" in frame.value.columns]
    assert len(cloze_tables) == 1  # model A keeps its MLM head, model B does not
