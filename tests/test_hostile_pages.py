"""Hostile and odd input (issue 6) on the token-attribution, knowledge-neuron and probing pages, through
AppTest and through the core API, on tiny random models. The retrieval page has its own tests."""

import html
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from streamlit.testing.v1 import AppTest

from core.cache import ResultCache
from core.corpus import load_jsonl
from core.evaluation import OUTCOMES, QueryFileError, evaluate_pair, parse_query_lines
from core.index import load_index
from core.neuron_attribution import attribute_passage, attribute_query
from core.pair import custom_pair, load_pair
from core.probing import ProbeConfig, ProbeError, run_probing
from core.retrieval import QueryError, clean_query
from core.suppression import curve_ks, suppression_curve
from core.token_attribution import (
    IGSettings,
    attribute_pair,
    attribute_queries,
    attribute_ranking,
    deletion_curve,
)
from tests.conftest import make_tiny_bert, quick_cloud
from ui.neuron_views import completeness_table
from ui.token_views import tokens_html

APP = Path(__file__).resolve().parent.parent / "app.py"
TIMEOUT = 240
LIMIT = 6
PAGES = {
    "token": "pages/token_attributions.py",
    "neurons": "pages/knowledge_neurons.py",
    "probing": "pages/probing_evaluation.py",
}
SCRIPT, IMG = "<script>alert(1)</script>", "<img src=x onerror=alert(1)>"
ODD = {
    "long": ("music " * 1000)[:5000],
    "emoji": "\U0001f600\U0001f389 music",
    "rtl": "\u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627 music",
    "control": "music\x00\x07\x1b[31m city\u200b",
    "tags": f"{SCRIPT} {IMG} city",
}
BLANK = {"empty": "", "whitespace": "  \t\n ", "control-only": "\x00\x07\x1b"}
MARKUP = ("title", "header", "subheader", "markdown", "caption", "info", "warning", "error", "success", "toast", "html")


@pytest.fixture(scope="module", autouse=True)
def app_env(tmp_path_factory):
    """A small corpus slice, a fresh cache, no model hub, and one thread for 32-wide tiny models."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DPR_LENS_CORPUS_LIMIT", str(LIMIT))
        patch.setenv("DPR_LENS_CACHE", str(tmp_path_factory.mktemp("hostile-cache")))
        patch.setattr("core.pair.hub_reachable", lambda timeout=3.0: False)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair_dirs(tiny_bert_dir, tiny_dpr_dirs) -> dict[str, str]:
    question, context = tiny_dpr_dirs
    return {"custom_a": str(tiny_bert_dir), "custom_b": str(question), "custom_b_context": str(context)}


@pytest.fixture(scope="module")
def tiny_pair(pair_dirs):
    return load_pair(custom_pair(pair_dirs["custom_a"], pair_dirs["custom_b"], pair_dirs["custom_b_context"]))


@pytest.fixture(scope="module")
def broken_model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("broken-model")
    (directory / "config.json").write_text("{not json")
    return directory


@pytest.fixture(scope="module")
def hostile_corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hostile-corpus") / "hostile.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"id": SCRIPT, "title": SCRIPT, "text": f"{IMG} an opera in three acts by a composer"}),
                "{broken",
                json.dumps({"id": IMG, "title": IMG, "text": f"{SCRIPT} the opera house of the city"}),
                json.dumps({"id": "plain", "title": "Carmen", "text": "Carmen is an opera by Georges Bizet."}),
            ]
        )
        + "\n"
    )
    return path


@pytest.fixture(scope="module")
def hostile_corpus(hostile_corpus_file):
    return load_jsonl(hostile_corpus_file)


def open_page(page: str, pair_dirs: dict[str, str], **state) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    for key, value in {"pair_key": "custom", **pair_dirs, **state}.items():
        at.session_state[key] = value
    at.switch_page(PAGES[page]).run()
    assert not at.exception
    return at


def _walk(node):
    yield node
    for child in getattr(node, "children", {}).values():
        yield from _walk(child)


def markup(at: AppTest) -> str:
    """Every string the page hands to Streamlit's Markdown/HTML rendering: text elements, widget labels,
    radio options (Markdown-capable), metric and expander labels."""
    parts = [str(element.value) for kind in MARKUP for element in at.get(kind)]
    for node in (node for root in (at.main, at.sidebar) for node in _walk(root)):
        parts.append(str(getattr(node, "label", "") or ""))
        if getattr(node, "type", None) == "radio":
            parts += [str(option) for option in node.options]
    return "\n".join(parts)


def assert_no_raw_tags(at: AppTest) -> None:
    text = markup(at).lower()
    assert "<script" not in text and "<img" not in text


def token_blocks(at: AppTest) -> list[str]:
    return [m.value for m in at.markdown if 'class="lens-tokens"' in m.value]


def visible_text(block: str) -> str:
    """What a browser shows for a token block: tags dropped, entities decoded, the truncation note left out."""
    block = re.sub(r'<div class="lens-tok-cut">.*?</div>', "", block)
    return html.unescape(re.sub(r"<[^>]+>", "", block))


def set_query(at: AppTest, text: str) -> AppTest:
    at.text_input(key="query_input").set_value(text).run()
    assert not at.exception
    return at


# ------------------------------------------------------------------------------------------------ core API


@pytest.fixture(scope="module")
def hostile_indexes(tiny_pair, hostile_corpus, tmp_path_factory):
    cache = ResultCache(tmp_path_factory.mktemp("core-cache"))
    yield cache, {name: load_index(encoder, hostile_corpus, cache) for name, encoder in tiny_pair.models.items()}
    cache.close()


@pytest.mark.parametrize("query", BLANK.values(), ids=BLANK.keys())
def test_core_refuses_blank_queries_with_a_message(query, tiny_pair, hostile_corpus, hostile_indexes):
    cache, indexes = hostile_indexes
    encoder, index = tiny_pair.a, indexes["A"]
    with pytest.raises(QueryError, match="Type a query"):
        attribute_pair(encoder, query, "Paris", "Paris is a city.", IGSettings(2))
    with pytest.raises(QueryError, match="Type a query"):
        attribute_ranking(encoder, query, ["Paris"], ["Paris is a city."], [0], IGSettings(2))
    with pytest.raises(QueryError, match="Type a query"):
        attribute_queries(encoder, ["a city", query], np.ones((2, encoder.query.dim), np.float32), IGSettings(2))
    for analyse in (attribute_query, attribute_passage):
        with pytest.raises(QueryError, match="Type a query"):
            analyse(encoder, index, hostile_corpus, query, steps=2, cache=cache)


@pytest.mark.parametrize("query", ODD.values(), ids=ODD.keys())
def test_core_analyses_odd_queries_and_hostile_passages(query, tiny_pair, hostile_corpus, hostile_indexes):
    cache, indexes = hostile_indexes
    for name, encoder in tiny_pair.models.items():
        pair = attribute_pair(encoder, query, SCRIPT, f"{IMG} an opera", IGSettings(4))
        assert pair.query.segments == (query,) and pair.passage.segments == (SCRIPT, f"{IMG} an opera")
        assert pair.query.truncated == (query == ODD["long"]) and not pair.passage.truncated
        for side in (pair.query, pair.passage):
            assert side.delta <= 0.05 * abs(side.score - side.baseline_score) + 1e-4
            assert "<script" not in tokens_html(side) and "<img" not in tokens_html(side)
        assert visible_text(tokens_html(pair.passage)) == f"{SCRIPT}{IMG} an opera"
        curve = deletion_curve(encoder, pair, "query", k_max=3, random_orders=1, settings=IGSettings(4))
        assert curve.attribution_order[0] == pytest.approx(pair.query.score, abs=1e-5)

        analysed = attribute_query(encoder, indexes[name], hostile_corpus, query, steps=2, cache=cache)
        assert analysed.query == clean_query(query)
        passage = attribute_passage(encoder, indexes[name], hostile_corpus, query, 0, steps=2, cache=cache)
        assert passage.passage == 0 and passage.attribution.layers == 2
        curve = suppression_curve(encoder, indexes[name], analysed, curve_ks(5))
        assert curve.ks[0] == 0 and curve.ranks[0] == 1
        assert all(1 <= rank <= len(hostile_corpus) for rank in curve.ranks)


def test_core_neuron_cache_never_serves_another_model_tower_or_setting(tiny_pair, hostile_corpus, hostile_indexes):
    cache, indexes = hostile_indexes
    seen = []
    for name, encoder in tiny_pair.models.items():
        for analyse in (attribute_query, attribute_passage):
            for steps in (2, 3):
                for passage in (0, 1):
                    cached = analyse(encoder, indexes[name], hostile_corpus, "opera", passage, steps, cache)
                    fresh = analyse(encoder, indexes[name], hostile_corpus, "opera", passage, steps)
                    for site, scores in fresh.attribution.scores.items():
                        assert (cached.attribution.scores[site] == scores).all()
                    seen.append(fresh.attribution.scores["intermediate"].tobytes())
    assert len(set(seen)) == len(seen)


def test_core_labelled_queries_keep_odd_text_and_name_bad_lines(tiny_pair, hostile_corpus, hostile_indexes):
    cache, indexes = hostile_indexes
    lines = [json.dumps({"query": query, "gold_ids": [SCRIPT]}) for query in ODD.values()]
    queries = parse_query_lines(lines, hostile_corpus)
    assert [q.text for q in queries] == [clean_query(query) for query in ODD.values()]
    assert all(q.relevant == frozenset({0}) for q in queries)
    for evaluation in evaluate_pair(tiny_pair, hostile_corpus, queries, cache, indexes).values():
        assert evaluation.queries == len(ODD) and all(set(row[:3]) == {0, 1, 2} for row in evaluation.ranked)
    bad = lines[:1] + [json.dumps({"query": query, "gold_id": "plain"}) for query in BLANK.values()]
    bad.append(json.dumps({"query": "opera", "gold_ids": [f"{IMG}?"]}))
    with pytest.raises(QueryFileError) as error:
        parse_query_lines(bad, hostile_corpus, "pasted queries")
    message = str(error.value)
    assert message.startswith("pasted queries: 4 bad line(s)") and "line 1:" not in message
    assert all(f"line {n}:" in message for n in (2, 3, 4, 5))


def test_core_probing_refuses_unusable_corpora_and_settings(tiny_pair, hostile_corpus, hostile_indexes, wiki_slice):
    cache, indexes = hostile_indexes
    with pytest.raises(ProbeError, match="no descriptions"):
        run_probing(tiny_pair, hostile_corpus, ProbeConfig(), cache, indexes)
    with pytest.raises(ProbeError, match="needs at least 5 and 2"):
        run_probing(tiny_pair, wiki_slice.head(LIMIT), ProbeConfig(train_queries=5, test_queries=2), cache)
    for bad in ({"ns": ()}, {"ns": (1, 3)}, {"negatives": SCRIPT}, {"train_queries": 0}, {"test_queries": 1}):
        with pytest.raises(ProbeError):
            ProbeConfig(**bad)


# ------------------------------------------------------------------------------------------------ pages


@pytest.fixture(scope="module", params=["token", "neurons"])
def query_page(request, pair_dirs):
    """One session per page, shared by the query tests in order: odd queries, then blank ones after a result."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("ui.token_views.cloud_png", quick_cloud)
        at = open_page(request.param, pair_dirs)
        assert any("Type a query" in info.value for info in at.info)
        if request.param == "token":
            at.number_input(key="token_ig_steps").set_value(2)
        else:
            at.select_slider(key="kn_steps").set_value(5)
        yield request.param, at


@pytest.mark.parametrize("query", ODD.values(), ids=ODD.keys())
def test_page_shows_odd_queries_as_text(query_page, query):
    page, at = query_page
    set_query(at, query)
    assert not at.error
    assert_no_raw_tags(at)
    cleaned = clean_query(query)
    if page == "token":
        blocks = token_blocks(at)
        assert len(blocks) == 6
        for block in (blocks[0], blocks[1], blocks[3], blocks[4]):  # the query's blocks, models A and B
            shown = visible_text(block)
            assert cleaned.startswith(shown) and shown
            if query == ODD["long"]:
                assert 'class="lens-tok-cut"' in block
            else:
                assert not cleaned[len(shown) :].strip("\u200b")
        assert any("reads at most" in w.value for w in at.warning) == (query == ODD["long"])
    else:
        assert f"Query: {html.escape(cleaned)}" in [caption.value for caption in at.caption]
        assert len(at.metric) == 4 and len(at.get("vega_lite_chart")) >= 3


@pytest.mark.parametrize("query", BLANK.values(), ids=BLANK.keys())
def test_page_asks_for_a_query_and_drops_the_last_result(query_page, query):
    page, at = query_page
    set_query(at, query)
    assert any("Type a query" in info.value for info in at.info)
    assert not at.error and not token_blocks(at) and not at.metric and not at.get("vega_lite_chart")


@pytest.mark.parametrize("page", ["token", "neurons"])
def test_hostile_corpus_passages_render_as_text(page, pair_dirs, hostile_corpus_file, hostile_corpus):
    at = open_page(
        page, pair_dirs, corpus_path=str(hostile_corpus_file), selected_passage=(hostile_corpus.fingerprint, 0)
    )
    assert any("line 2: not valid JSON" in text.value for text in at.text)
    if page == "token":
        at.number_input(key="token_ig_steps").set_value(2)
    else:
        at.select_slider(key="kn_steps").set_value(5)
        at.radio(key="kn_passage").set_value("selected")
    set_query(at, f"opera {IMG}")
    assert not at.error
    assert_no_raw_tags(at)
    if page == "token":
        blocks = token_blocks(at)
        passage = f"{SCRIPT}{IMG} an opera in three acts by a composer"  # title, then text
        assert [visible_text(block) for block in (blocks[2], blocks[5])] == [passage, passage]
        assert visible_text(blocks[0]) == f"opera {IMG}"
    else:
        captions = [caption.value for caption in at.caption]
        assert (
            sum(
                f"Analysed passage: {html.escape(SCRIPT)}" in c or f"Target passage: {html.escape(SCRIPT)}" in c
                for c in captions
            )
            == 2
        )
        assert f"Query: opera {html.escape(IMG)}" in captions
        at.radio(key="kn_tower").set_value("context").run()
        assert not at.exception and not at.error
        assert_no_raw_tags(at)
        assert sum(f"Analysed passage: {html.escape(SCRIPT)}" in c for c in (c.value for c in at.caption)) == 2


def test_probing_page_with_a_hostile_corpus_and_query_file(pair_dirs, hostile_corpus_file):
    at = open_page("probing", pair_dirs, corpus_path=str(hostile_corpus_file))
    assert any("no article descriptions" in info.value for info in at.info)
    at.radio(key="eval_queries").set_value("My labelled queries (JSONL)").run()
    at.text_area(key="eval_pasted").set_value(BLANK["whitespace"]).run()
    assert not at.exception and any("Upload or paste labelled queries" in info.value for info in at.info)
    lines = [json.dumps({"query": query, "gold_ids": [SCRIPT]}) for query in ODD.values()]
    at.text_area(key="eval_pasted").set_value("\n".join(lines)).run()
    at.multiselect(key="eval_outcomes").set_value(list(OUTCOMES)).run()
    assert not at.exception and not at.error
    assert_no_raw_tags(at)
    outcomes = at.dataframe[1].value
    assert list(outcomes["query"]) == [clean_query(query) for query in ODD.values()]
    assert set(outcomes["gold"]) == {SCRIPT}
    at.text_input(key="eval_contains").set_value("[(*").run()
    assert not at.exception and at.dataframe[1].value.empty
    assert f"0 of {len(ODD)} queries." in markup(at)

    lines += [json.dumps({"query": query, "gold_id": "plain"}) for query in BLANK.values()]
    lines.append(json.dumps({"query": "opera", "gold_ids": [f"{IMG}?"]}))
    at.text_area(key="eval_pasted").set_value("\n".join(lines)).run()
    assert not at.exception and not at.dataframe and len(at.error) == 1
    bad = range(len(ODD) + 1, len(lines) + 1)
    assert f"{len(bad)} bad line(s)" in at.error[0].value
    assert all(f"line {n}:" in at.error[0].value for n in bad) and f"line {len(lines)}: gold id" in at.error[0].value
    assert_no_raw_tags(at)
    at.radio(key="pe_section").set_value("Layer-wise probing").run()
    assert not at.exception and any("no descriptions" in info.value for info in at.info)


@pytest.mark.parametrize("page", PAGES)
def test_unloadable_pair_or_corpus_gives_one_clear_error(page, pair_dirs, broken_model_dir):
    at = open_page(page, pair_dirs, pair_key="paper")
    variants = [
        ({}, "no model hub is reachable"),
        ({"pair_key": "custom", "custom_a": f"no-such-org/{IMG}"}, "no model hub is reachable"),
        ({"custom_a": pair_dirs["custom_a"], "custom_b": str(broken_model_dir)}, "Could not load the model in"),
        ({"custom_b": pair_dirs["custom_b"], "corpus_path": f"/no/such/{IMG}.jsonl"}, "does not exist"),
    ]
    for state, message in variants:
        for key, value in state.items():
            at.session_state[key] = value
        at.run()
        assert not at.exception
        assert len(at.error) == 1 and message in at.error[0].value
        assert_no_raw_tags(at)
        assert not at.metric and not at.dataframe and not token_blocks(at)


def test_token_page_follows_steps_and_pair_changes(pair_dirs, tmp_path_factory, wiki_slice, monkeypatch):
    monkeypatch.setattr("ui.token_views.cloud_png", quick_cloud)
    at = open_page("token", pair_dirs)
    at.number_input(key="token_ig_steps").set_value(2)
    set_query(at, "music of the city")
    first = token_blocks(at)
    assert len(first) == 6
    at.number_input(key="token_ig_steps").set_value(3).run()
    assert all(new != old for new, old in zip(token_blocks(at), first, strict=True))
    at.number_input(key="token_ig_steps").set_value(2).run()
    assert token_blocks(at) == first

    other = make_tiny_bert(tmp_path_factory.mktemp("other-b"), wiki_slice, seed=1)
    at.text_input(key="custom_b").set_value(str(other))
    at.text_input(key="custom_b_context").set_value("").run()
    assert not at.exception and f"B: {other}" in [h.value for h in at.subheader]
    swapped = token_blocks(at)
    assert swapped[:3] == first[:3] and all(new != old for new, old in zip(swapped[3:], first[3:], strict=True))
    assert at.get("image") and at.dataframe and at.get("vega_lite_chart")

    at.selectbox(key="pair_key").set_value("paper").run()
    assert not at.exception and len(at.error) == 1
    assert not token_blocks(at) and not at.dataframe and not at.get("image") and not at.get("vega_lite_chart")


def test_neuron_page_follows_threshold_steps_tower_and_pair(pair_dirs, tiny_pair, wiki_slice, tmp_path):
    corpus, query = wiki_slice.head(LIMIT), "music of the city"
    cache = ResultCache(tmp_path / "cache")
    indexes = {name: load_index(encoder, corpus, cache) for name, encoder in tiny_pair.models.items()}

    def expected(tower: str, steps: int, threshold: float):
        analyse = attribute_query if tower == "query" else attribute_passage
        attributions = {
            name: analyse(encoder, indexes[name], corpus, query, None, steps, cache).attribution
            for name, encoder in tiny_pair.models.items()
        }
        counts = [str(value) for a in attributions.values() for value in a.strongly_activated(threshold).values()]
        return counts, completeness_table(attributions)

    def shown():
        table = next(d.value for d in at.dataframe if "Σ attributions" in d.value.columns)
        return [metric.value for metric in at.metric], table

    def assert_shows(tower, steps, threshold):
        counts, table = expected(tower, steps, threshold)
        shown_counts, shown_table = shown()
        assert shown_counts == counts
        pd.testing.assert_frame_equal(shown_table.reset_index(drop=True), table, check_dtype=False)
        return counts, table

    at = open_page("neurons", pair_dirs)
    at.select_slider(key="kn_steps").set_value(5)
    set_query(at, query)
    counts, table = assert_shows("query", 5, 0.1)
    at.slider(key="kn_threshold").set_value(0.02).run()
    assert assert_shows("query", 5, 0.02)[0] != counts
    at.select_slider(key="kn_steps").set_value(10).run()
    assert not assert_shows("query", 10, 0.02)[1].equals(table)
    at.radio(key="kn_tower").set_value("context").run()
    assert assert_shows("context", 10, 0.02)[0] != expected("query", 10, 0.02)[0]
    at.selectbox(key="pair_key").set_value("paper").run()
    assert not at.exception and len(at.error) == 1
    assert not at.metric and not at.dataframe and not at.get("vega_lite_chart")
    cache.close()


def test_probing_page_follows_the_queries_settings_and_pair(pair_dirs, tiny_pair, wiki_slice, tmp_path):
    corpus = wiki_slice.head(LIMIT)
    at = open_page("probing", pair_dirs)
    at.radio(key="pe_section").set_value("Layer-wise probing").run()
    at.multiselect(key="probe_ns").set_value([]).run()
    assert not at.exception and any("Choose at least one N" in info.value for info in at.info)
    at.multiselect(key="probe_ns").set_value([2, 3]).run()
    at.button(key="probe_run").click().run()
    assert not at.exception and len(at.error) == 1 and "needs at least 5 and 2" in at.error[0].value

    at.radio(key="pe_section").set_value("Retrieval evaluation").run()
    at.radio(key="eval_queries").set_value("My labelled queries (JSONL)").run()
    cache = ResultCache(tmp_path / "cache")
    indexes = {name: load_index(encoder, corpus, cache) for name, encoder in tiny_pair.models.items()}
    for chosen in (range(0, 2), range(2, LIMIT)):
        rows = [{"query": corpus.descriptions[i] or corpus.titles[i], "gold_ids": [corpus.ids[i]]} for i in chosen]
        at.text_area(key="eval_pasted").set_value("\n".join(json.dumps(row) for row in rows)).run()
        if chosen.start == 0:
            at.multiselect(key="eval_outcomes").set_value(list(OUTCOMES)).run()
        assert not at.exception and not at.error
        outcomes = at.dataframe[1].value
        assert list(outcomes["query"]) == [row["query"] for row in rows]
        assert list(outcomes["gold"]) == [corpus.titles[i] for i in chosen]
        queries = parse_query_lines([json.dumps(row) for row in rows], corpus)
        evaluations = evaluate_pair(tiny_pair, corpus, queries, cache, indexes)
        means = at.dataframe[0].value.set_index("metric")
        for name, evaluation in evaluations.items():
            assert means[name].to_dict() == pytest.approx(evaluation.means)

    at.selectbox(key="pair_key").set_value("paper").run()
    assert not at.exception and len(at.error) == 1 and not at.dataframe and not at.get("vega_lite_chart")
    cache.close()
