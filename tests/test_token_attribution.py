from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

import core.token_attribution as token_attribution
from core.corpus import description_queries, load_wiki, split_indices
from core.pair import ModelSpec, load_encoder
from core.token_attribution import (DELTA_TOLERANCE, AttributionError, IGSettings, Token, TokenAttribution,
                                    attribute_pair, attribute_queries, attribute_ranking, cached_deletion_curve,
                                    cached_ranking, cloud_weights, deletion_curve, word_sums)
from ui.token_views import tokens_html

APP = Path(__file__).resolve().parent.parent / "app.py"


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    """Tiny models' 32-wide matmuls gain nothing from threads, and thread sync dominates on a busy CPU."""
    if "minilm" in request.fixturenames:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def minilm():
    return load_encoder(ModelSpec("A", "minilm:"))


@pytest.fixture(scope="module")
def tiny(tiny_bert_dir):
    return load_encoder(ModelSpec("tiny", str(tiny_bert_dir), pooling="mean", normalize=True))


@pytest.fixture(scope="module")
def tiny_dpr(tiny_dpr_dirs):
    question, context = tiny_dpr_dirs
    return load_encoder(ModelSpec("dpr", str(question), str(context)))


def _score(encoder, query, title, text):
    return float(encoder.encode_queries([query])[0] @ encoder.encode_passages([title], [text], max_length=256)[0])


def test_completeness_on_the_real_offline_model(minilm):
    corpus = load_wiki()
    _, held_out = split_indices(corpus)
    labelled = description_queries(corpus, held_out)[0]
    title, text = corpus.titles[labelled.source_index], corpus.texts[labelled.source_index]
    pair = attribute_pair(minilm, labelled.text, title, text)
    expected = _score(minilm, labelled.text, title, text)
    for side in (pair.query, pair.passage):
        assert side.score == pytest.approx(expected, abs=1e-5)
        assert side.relative_delta < DELTA_TOLERANCE
        assert side.total == pytest.approx(side.score - side.baseline_score, rel=DELTA_TOLERANCE)
        assert all(t.score == 0.0 for t in side.tokens if t.special)
        words = [t for t in side.tokens if not t.special]
        assert sum(abs(t.score) > 1e-6 for t in words) > len(words) // 2
    assert "".join(w.text for w in pair.query.words()) == "".join(labelled.text.split())


def test_subwords_of_a_real_tokenizer_merge_into_words(minilm):
    passage = minilm.encode_passages(["Tokyo"], ["Tokyo is the capital of Japan."])
    result = attribute_queries(minilm, ["unaffable Tokyo"], passage)[0]
    assert len([t for t in result.tokens if not t.special]) > 2
    words = result.words()
    assert [w.text for w in words] == ["unaffable", "Tokyo"]
    assert words[0].tokens > 1
    assert words[0].score == pytest.approx(sum(t.score for t in result.tokens if t.word == 0 and not t.special))


def _hand_made(text: str, spans: list[tuple[str, int, int, int, float]]) -> TokenAttribution:
    tokens = [Token("[CLS]", -1, 0, 0, -1, 0.0)]
    tokens += [Token(token, 0, start, end, word, score) for token, start, end, word, score in spans]
    tokens.append(Token("[SEP]", -1, 0, 0, -1, 0.0))
    total = sum(s[-1] for s in spans)
    return TokenAttribution((text,), tuple(tokens), total, 0.0, False)


def test_word_merging_and_sums_drop_stopwords_and_punctuation():
    first = _hand_made("The unaffable cat, the", [("the", 0, 3, 0, 0.5), ("una", 4, 7, 1, 0.25),
                                                  ("##ff", 7, 9, 1, -0.05), ("##able", 9, 13, 1, 0.1),
                                                  ("cat", 14, 17, 2, -0.3), (",", 17, 18, 3, 0.2),
                                                  ("the", 19, 22, 4, 0.1)])
    second = _hand_made("Cat", [("cat", 0, 3, 0, 0.2)])
    assert [(w.text, round(w.score, 6), w.tokens) for w in first.words()] == [
        ("The", 0.5, 1), ("unaffable", 0.3, 3), ("cat", -0.3, 1), (",", 0.2, 1), ("the", 0.1, 1)]
    everything = word_sums([first, second]).set_index("word")
    assert everything.loc["the", "total"] == pytest.approx(0.6) and everything.loc["the", "occurrences"] == 2
    assert everything.loc["cat", "total"] == pytest.approx(-0.1)
    assert everything.loc["cat", "positive"] == pytest.approx(0.2)
    assert everything.loc["cat", "negative"] == pytest.approx(-0.3)
    assert everything.loc["cat", "inputs"] == 2
    filtered = word_sums([first, second], drop_stopwords=True)
    assert set(filtered["word"]) == {"unaffable", "cat"}
    assert cloud_weights(filtered, "positive") == {"unaffable": pytest.approx(0.3)}
    assert cloud_weights(filtered, "negative") == {"cat": pytest.approx(0.1)}


def test_linearity_sum_over_passages_is_one_run(tiny, wiki_slice):
    indices = [3, 7, 11, 19]
    query = wiki_slice.descriptions[3] or "a city"
    ranking = attribute_ranking(tiny, query, [wiki_slice.titles[i] for i in indices],
                                [wiki_slice.texts[i] for i in indices], indices, IGSettings(8))
    summed = np.sum([[t.score for t in p.query.tokens] for p in ranking.pairs], axis=0)
    total = np.array([t.score for t in ranking.query_total.tokens])
    assert np.abs(total).max() > 0
    np.testing.assert_allclose(total, summed, rtol=1e-4, atol=1e-6)
    assert ranking.query_total.score == pytest.approx(sum(p.query.score for p in ranking.pairs), abs=1e-5)
    for index, pair in zip(indices, ranking.pairs):
        assert pair.passage.segments == (wiki_slice.titles[index], wiki_slice.texts[index])
        assert pair.passage.score == pytest.approx(pair.query.score, abs=1e-5)


def test_batched_passages_match_one_at_a_time(tiny, wiki_slice):
    indices = [0, 5, 9]
    titles, texts = [wiki_slice.titles[i] for i in indices], [wiki_slice.texts[i] for i in indices]
    together = attribute_ranking(tiny, "a place", titles, texts, indices, IGSettings(8)).pairs
    for title, text, batched in zip(titles, texts, together):
        alone = attribute_pair(tiny, "a place", title, text, IGSettings(8)).passage
        np.testing.assert_allclose([t.score for t in batched.passage.tokens], [t.score for t in alone.tokens],
                                   rtol=1e-3, atol=1e-6)


def test_dpr_uses_the_question_and_the_context_tower(tiny_dpr, wiki_slice):
    title, text = wiki_slice.titles[2], wiki_slice.texts[2]
    pair = attribute_pair(tiny_dpr, "who wrote it", title, text, IGSettings(32))
    expected = _score(tiny_dpr, "who wrote it", title, text)
    for side in (pair.query, pair.passage):
        assert side.score == pytest.approx(expected, abs=1e-5)
        assert side.relative_delta < DELTA_TOLERANCE
    curve = deletion_curve(tiny_dpr, pair, "query", k_max=2, random_orders=2, settings=IGSettings(32))
    assert curve.attribution_order[0] == pytest.approx(expected, abs=1e-5)


def test_truncated_passages_are_flagged(tiny):
    short = attribute_pair(tiny, "a city", "Paris", "Paris is a city.", IGSettings(2))
    long = attribute_pair(tiny, "a city", "Paris", "Paris is a city. " * 60, IGSettings(2))
    assert not short.passage.truncated and long.passage.truncated
    assert len(long.passage.tokens) == tiny.context.max_length


def test_deletion_curve_shape_and_ends(tiny, wiki_slice):
    pair = attribute_pair(tiny, "music of the twentieth century", wiki_slice.titles[4], wiki_slice.texts[4],
                          IGSettings(8))
    curve = deletion_curve(tiny, pair, "passage", k_max=6, random_orders=3)
    assert curve.ks == tuple(range(7)) and len(curve.attribution_order) == len(curve.random_order) == 7
    assert curve.attribution_order[0] == pytest.approx(pair.passage.score, abs=1e-5)
    assert curve.random_order[0] == pytest.approx(pair.passage.score, abs=1e-5)
    assert curve.attribution_order != curve.random_order
    everything = deletion_curve(tiny, pair, "query", k_max=100, random_orders=2)
    words = len([t for t in pair.query.tokens if not t.special])
    assert len(everything.ks) == words + 1
    assert everything.attribution_order[-1] == pytest.approx(pair.query.baseline_score, abs=1e-5)
    assert everything.random_order[-1] == pytest.approx(pair.query.baseline_score, abs=1e-5)


def test_results_are_cached_with_every_parameter(tiny, wiki_slice, cache, monkeypatch):
    calls = []
    original = token_attribution.attribute_ranking

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(token_attribution, "attribute_ranking", counting)
    progress = []
    first = cached_ranking(cache, tiny, wiki_slice, "a city", [1, 2], IGSettings(4),
                           progress=lambda done, total: progress.append((done, total)))
    again = cached_ranking(cache, tiny, wiki_slice, "a city", [1, 2], IGSettings(4))
    assert len(calls) == 1 and again == first
    assert progress[-1] == (4, 4)
    cached_ranking(cache, tiny, wiki_slice, "a city", [1, 2], IGSettings(4, "riemann_trapezoid"))
    cached_ranking(cache, tiny, wiki_slice, "a city", [2, 1], IGSettings(4))
    assert len(calls) == 3
    curve = cached_deletion_curve(cache, tiny, first.pairs[0], "query", k_max=2)
    assert cached_deletion_curve(cache, tiny, first.pairs[0], "query", k_max=2) == curve


def test_bad_settings_are_refused():
    with pytest.raises(AttributionError, match="method"):
        IGSettings(method="simpson")
    with pytest.raises(AttributionError, match="steps"):
        IGSettings(n_steps=0)


def test_token_html_escapes_and_colors():
    attribution = _hand_made("<script>alert(1)</script>", [("<", 0, 1, 0, 0.4), ("script", 1, 7, 1, -0.2),
                                                           (">", 7, 8, 2, 0.1)])
    html = tokens_html(attribution)
    assert "<script>" not in html and "&lt;" in html and "script" in html
    assert "rgba(33,102,172,0.850)" in html and "rgba(178,24,43" in html
    assert 'title="&lt;: +0.4000"' in html and "&gt;</span>" in html


def test_page_shows_colored_tokens_and_escapes_the_query(tiny_bert_dir, tiny_dpr_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("DPR_LENS_CORPUS_LIMIT", "150")
    monkeypatch.setenv("DPR_LENS_CACHE", str(tmp_path / "cache"))
    at = AppTest.from_file(str(APP), default_timeout=240)
    at.run()
    at.selectbox(key="pair_key").set_value("custom").run()
    at.text_input(key="custom_a").input(str(tiny_bert_dir))
    at.text_input(key="custom_b").input(str(tiny_dpr_dirs[0]))
    at.text_input(key="custom_b_context").input(str(tiny_dpr_dirs[1])).run()
    at.switch_page("pages/token_attributions.py").run()
    assert not at.exception
    assert any("Type a query" in info.value for info in at.info)
    at.text_input(key="query_input").input("<script>alert(1)</script> city of music").run()
    assert not at.exception and not at.error
    html = "".join(m.value for m in at.markdown)
    assert html.count('class="lens-tok"') > 20
    assert "<script" not in html and ">&lt;</span>" in html and ">alert</span>" in html
    assert len(at.get("image")) >= 1 and len(at.dataframe) == 2
    assert len(at.get("vega_lite_chart")) == 1
    at.radio(key="token_ig_side").set_value("passage").run()
    assert not at.exception
