"""The shipped mini-paper pair (MLM pre-trained mini-BERT vs its DPR twin) on every page."""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.cloze import fill_in_blank, has_mlm_head, load_cloze_model
from core.pair import load_pair

APP = Path(__file__).resolve().parent.parent / "app.py"
PAGES = ("pages/retrieval.py", "pages/token_attributions.py", "pages/knowledge_neurons.py",
         "pages/probing_evaluation.py")


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
    predictions = fill_in_blank(load_cloze_model(a), "The capital of France is [MASK].")
    assert len(predictions) == 5 and all(0 < p.probability < 1 for p in predictions)


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
