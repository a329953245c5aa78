"""The twin analyses page on the real offline and mini-paper pairs, every section with small samples."""

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tests.conftest import make_tiny_bert
from ui.render import escape

PAGE = Path(__file__).resolve().parent.parent / "pages" / "twins.py"


@pytest.mark.parametrize("pair_key", ["offline", "mini-paper"])
def test_every_section_runs(pair_key, monkeypatch, tmp_path):
    monkeypatch.setenv("DPR_LENS_CORPUS_LIMIT", "60")  # 6 held-out queries
    monkeypatch.setenv("DPR_LENS_CACHE", str(tmp_path / "cache"))
    at = AppTest.from_file(str(PAGE), default_timeout=300)
    at.session_state["pair_key"] = pair_key
    at.session_state["query"] = "city on the river Seine"
    at.run()
    at.select_slider(key="tw_steps").set_value(5)
    for key, size in (("tw_patch_n", 3), ("tw_overlap_n", 2), ("tw_para_n", 1), ("tw_cka_n", 5)):
        at.number_input(key=key).set_value(size)
    at.text_area(key="tw_phrasings").set_value("river through Paris\nthe Seine river")
    at.run()
    for button in ("tw_patch_compute", "tw_overlap_compute", "tw_para_compute"):
        at.button(key=button).click().run()
        assert not at.exception, button
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert not at.info, [i.value for i in at.info]  # twins: no section was refused
    charts = at.get("vega_lite_chart")
    assert len(charts) >= 8, len(charts)  # patching x2, overlap x2, paraphrases x2, CKA, PCA x2
    assert any("B − A" in caption.value for caption in at.caption)


def test_a_pair_that_is_not_twins_says_so_and_keeps_cka(monkeypatch, tmp_path, wiki_slice):
    monkeypatch.setenv("DPR_LENS_CORPUS_LIMIT", "120")
    monkeypatch.setenv("DPR_LENS_CACHE", str(tmp_path / "cache"))
    small = make_tiny_bert(tmp_path / "small", wiki_slice, "mean", 0, True, num_hidden_layers=1)
    large = make_tiny_bert(tmp_path / "large", wiki_slice, "cls", 1, False, hidden_size=48)
    at = AppTest.from_file(str(PAGE), default_timeout=120)
    at.session_state["pair_key"] = "custom"
    at.session_state["custom_a"], at.session_state["custom_b"] = str(small), str(large)
    at.session_state["query"] = "city on the river Seine"
    at.run()
    at.number_input(key="tw_para_n").set_value(1)
    at.number_input(key="tw_cka_n").set_value(5).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    refused = [i.value for i in at.info if "needs twins" in i.value]
    assert refused == [
        escape(f"{analysis} needs twins (same family, layer count and widths), but A's layer count is 1 and B's is 2.")
        for analysis in ("Patching", "Neuron overlap")
    ]
    assert len(at.get("vega_lite_chart")) == 3  # CKA and both PCA projections
