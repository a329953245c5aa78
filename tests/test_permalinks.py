"""Permalinks: the view (pair, query, passage, page, settings) in the URL, and the URL reproducing it in a fresh
browser. The parsers refuse what a widget could not take; the real-browser round trip uses tests/conftest.py's
server and browser fixtures."""

from __future__ import annotations

import urllib.parse
from types import SimpleNamespace

import pytest

from ui import state
from ui.state import PERMALINK_SETTINGS

QUERY = "country in Western Europe"


def test_the_parsers_refuse_what_a_widget_could_not_take():
    parse = {name: parser for name, (_, parser) in PERMALINK_SETTINGS.items()}
    assert parse["steps"]("20") == 20 and parse["steps"]("1") is None and parse["steps"]("2e3") is None
    assert parse["method"]("gausslegendre") == "gausslegendre" and parse["method"]("/etc/passwd") is None
    assert parse["adaptive"]("0") is False and parse["adaptive"]("yes") is None
    assert parse["k"]("100") == 100 and parse["k"]("101") is None
    assert not any("corpus" in name or "corpus" in key for name, (key, _) in PERMALINK_SETTINGS.items())


class FakeParams(dict):
    """st.query_params as the functions use it: a str -> str mapping with to_dict / from_dict."""

    def to_dict(self) -> dict:
        return dict(self)

    def from_dict(self, params: dict) -> None:
        self.clear()
        self.update(params)


@pytest.fixture
def fake_streamlit(monkeypatch):
    fake = SimpleNamespace(session_state={}, query_params=FakeParams())
    monkeypatch.setattr(state, "st", fake)
    return fake


def test_a_url_restores_the_session_once_and_refuses_what_is_not_allowed(fake_streamlit):
    fake_streamlit.query_params.update(
        {
            "pair": "no-such-pair",
            "q": "opera in Paris",
            "steps": "12",
            "method": "bogus",
            "corpus": "/etc/passwd",
            "passage": "Q90",
        }
    )
    state.restore_permalink()
    session = fake_streamlit.session_state
    assert session["query"] == "opera in Paris" and session["token_ig_steps"] == 12
    assert "token_ig_method" not in session and "kept_pair_key" not in session
    assert session[state.LINKED_PASSAGE] == "Q90" and "corpus_path" not in session
    session["query"] = "changed"
    state.restore_permalink()  # only at session start
    assert session["query"] == "changed"


def test_the_view_is_written_back_without_a_corpus(fake_streamlit):
    session = fake_streamlit.session_state
    session.update(
        {
            "pair_key": "mini-paper",
            "query_input": "opera in Paris",
            "token_ig_adaptive": False,
            "token_ig_steps": 24,
            "corpus_path": "/srv/private.jsonl",
            state.PASSAGE_ID: "Q90",
        }
    )
    state.write_permalink()
    assert fake_streamlit.query_params == {
        "pair": "mini-paper",
        "q": "opera in Paris",
        "adaptive": "0",
        "steps": "24",
        "passage": "Q90",
    }
    session["pair_key"] = "custom"
    state.write_permalink()
    assert "pair" not in fake_streamlit.query_params


def test_a_permalink_reproduces_the_view_in_a_fresh_browser(server, browser):
    expect = pytest.importorskip("playwright.sync_api").expect
    url = server.url
    first = browser.new_context()
    tab = first.new_page()
    tab.goto(url)
    tab.get_by_label("Query").wait_for(timeout=180_000)
    tab.get_by_label("Query").fill(QUERY)
    tab.get_by_label("Query").press("Enter")
    tab.wait_for_function("document.querySelectorAll('.lens-hit').length >= 20", timeout=240_000)
    tab.get_by_label("top-k").fill("15")
    tab.get_by_label("top-k").press("Enter")
    tab.wait_for_function("document.querySelectorAll('.lens-hit').length === 30", timeout=240_000)
    tab.wait_for_function("location.search.includes('k=15') && location.search.includes('passage=')", timeout=120_000)
    link = tab.url
    params = urllib.parse.parse_qs(urllib.parse.urlparse(link).query)
    assert params["q"] == [QUERY] and params["pair"] == ["offline"] and "corpus" not in params
    hits = tab.locator(".lens-hit").all_inner_texts()
    chosen = (
        tab.get_by_label("Passage to analyse on the other pages").input_value()
        if tab.get_by_label("Passage to analyse on the other pages").count()
        else None
    )
    first.close()

    fresh = browser.new_context()  # no cookies, no session: only the URL carries the view
    again = fresh.new_page()
    again.goto(link)
    again.wait_for_function("document.querySelectorAll('.lens-hit').length === 30", timeout=240_000)
    # Streamlit draws the hits' HTML before its input widgets mount: wait for the value rather than read it once.
    expect(again.get_by_label("Query")).to_have_value(QUERY, timeout=30_000)
    assert again.locator(".lens-hit").all_inner_texts() == hits
    if chosen is not None:
        expect(again.get_by_label("Passage to analyse on the other pages")).to_have_value(chosen, timeout=30_000)
    assert again.locator('[data-testid="stException"]').count() == 0

    # The page is the URL's path: the same parameters open the token-attribution page with the same query.
    again.goto(
        link.replace(url + "/", url + "/token_attributions", 1)
        if "/?" in link
        else f"{url}/token_attributions?{urllib.parse.urlparse(link).query}"
    )
    again.locator("h1", has_text="Token attributions").wait_for(timeout=120_000)
    expect(again.get_by_label("Query")).to_have_value(QUERY, timeout=30_000)
    fresh.close()
