"""The retrieval page on the real offline pair over the full corpus (prebuilt embeddings)."""

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

TIMEOUT = 240
APP = Path(__file__).resolve().parent.parent / "app.py"


@pytest.fixture
def app(monkeypatch, tmp_path_factory):
    monkeypatch.delenv("DPR_LENS_CORPUS_LIMIT", raising=False)
    monkeypatch.setenv("DPR_LENS_CACHE", str(tmp_path_factory.getbasetemp() / "app-cache"))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception
    return at


def _markdown(at) -> str:
    return "\n".join(m.value for m in at.markdown)


def test_empty_query_prompts_for_one(app):
    assert any("Type a query" in info.value for info in app.info)
    app.text_input(key="query_input").set_value("   \t ").run()
    assert not app.exception and any("Type a query" in info.value for info in app.info)


def test_query_shows_two_ranked_lists_with_overlap(app):
    app.text_input(key="query_input").set_value("country in Western Europe").run()
    assert not app.exception
    headers = [h.value for h in app.subheader]
    assert any(h.startswith("A:") for h in headers) and any(h.startswith("B:") for h in headers)
    html = _markdown(app)
    assert html.count('class="lens-hit"') == 20
    assert "France" in html
    assert {m.label for m in app.metric} >= {"Shared in top-10", "Jaccard@10"}
    passages = app.selectbox(key="passage_choice")
    assert len(passages.options) >= 10


def test_script_query_is_text_and_long_query_is_truncated_visibly(app):
    app.text_input(key="query_input").set_value("<script>alert(1)</script> <img src=x onerror=alert(2)>").run()
    assert not app.exception
    html = _markdown(app)
    assert "<script>" not in html and "<img" not in html
    app.text_input(key="query_input").set_value("word " * 1000 + "\U0001f600 \u05e9\u05dc\u05d5\u05dd \x07").run()
    assert not app.exception
    assert any("truncated" in w.value for w in app.warning)


def test_top_k_changes_the_list_length(app):
    app.text_input(key="query_input").set_value("opera").run()
    app.number_input(key="top_k").set_value(3).run()
    assert not app.exception
    assert _markdown(app).count('class="lens-hit"') == 6


def test_unknown_custom_model_gives_one_clear_sentence(app, monkeypatch):
    monkeypatch.setattr("core.pair.hub_reachable", lambda timeout=3.0: False)
    app.selectbox(key="pair_key").set_value("custom").run()
    assert any("Enter model A and model B" in info.value for info in app.info)
    app.text_input(key="custom_a").set_value("no-such-org/no-such-model")
    app.text_input(key="custom_b").set_value("another/missing-model").run()
    assert not app.exception
    assert any("no model hub is reachable" in error.value for error in app.error)


def test_custom_corpus_with_hostile_text_and_a_bad_line(app, tmp_path):
    corpus = tmp_path / "hostile.jsonl"
    corpus.write_text(
        "\n".join(
            [
                json.dumps(
                    {
                        "id": "x",
                        "title": "<script>alert(1)</script>",
                        "text": "<img src=x onerror=alert(2)> a passage about opera",
                    }
                ),
                "{broken",
                json.dumps({"id": "y", "title": "Carmen", "text": "Carmen is an opera by Georges Bizet."}),
            ]
        )
        + "\n"
    )
    app.text_input(key="corpus_path").set_value(str(corpus))
    app.text_input(key="query_input").set_value("opera").run()
    assert not app.exception
    html = _markdown(app)
    assert html.count('class="lens-hit"') == 4  # top-10 of a 2-passage corpus, both models
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>" not in html
    assert "&lt;img src=x onerror=alert(2)&gt;" in html and "<img" not in html
    assert any("line 2" in text.value for text in app.text)


def test_switching_to_an_unreachable_hub_pair_shows_no_stale_results(app, monkeypatch):
    monkeypatch.setattr("core.pair.hub_reachable", lambda timeout=3.0: False)
    app.text_input(key="query_input").set_value("opera").run()
    assert _markdown(app).count('class="lens-hit"') == 20
    app.selectbox(key="pair_key").set_value("paper").run()
    assert not app.exception
    assert any("no model hub is reachable" in error.value for error in app.error)
    assert 'class="lens-hit"' not in _markdown(app)
    app.selectbox(key="pair_key").set_value("offline").run()
    assert _markdown(app).count('class="lens-hit"') == 20
