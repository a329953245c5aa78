from pathlib import Path

import numpy as np
import pytest
import torch
from captum.attr import LayerIntegratedGradients
from streamlit.testing.v1 import AppTest

import core.token_attribution as token_attribution
from core.attribution import integrated_gradients
from core.attribution.integrated_gradients import encode_inputs, model_inputs, pad_baseline
from core.corpus import description_queries, load_wiki, split_indices
from core.pair import ModelSpec, load_encoder
from core.runtime import model_work
from core.token_attribution import (
    DEFAULT_STEPS,
    DELTA_TOLERANCE,
    METHODS,
    START_STEPS,
    AttributionError,
    IGSettings,
    Quadrature,
    SinhSubstitution,
    Token,
    TokenAttribution,
    attribute_pair,
    attribute_passages,
    attribute_queries,
    attribute_ranking,
    cached_deletion_curve,
    cached_pair,
    cached_ranking,
    cloud_weights,
    deletion_curve,
    word_sums,
)
from tests.conftest import tiny_pair_state
from ui.token_views import completeness_text, tokens_html

APP = Path(__file__).resolve().parent.parent / "app.py"


@pytest.fixture(scope="module")
def minilm():
    return load_encoder(ModelSpec("A", "minilm:"))


@pytest.fixture(scope="module")
def tiny(tiny_bert_dir):
    return load_encoder(ModelSpec("tiny", str(tiny_bert_dir), pooling="mean", normalize=True))


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
        assert side.n_steps in (START_STEPS, DEFAULT_STEPS)
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
    return TokenAttribution((text,), tuple(tokens), total, 0.0, False, Quadrature(20, "gausslegendre"))


def test_word_merging_and_sums_drop_stopwords_and_punctuation():
    first = _hand_made(
        "The unaffable cat, the",
        [
            ("the", 0, 3, 0, 0.5),
            ("una", 4, 7, 1, 0.25),
            ("##ff", 7, 9, 1, -0.05),
            ("##able", 9, 13, 1, 0.1),
            ("cat", 14, 17, 2, -0.3),
            (",", 17, 18, 3, 0.2),
            ("the", 19, 22, 4, 0.1),
        ],
    )
    second = _hand_made("Cat", [("cat", 0, 3, 0, 0.2)])
    assert [(w.text, round(w.score, 6), w.tokens) for w in first.words()] == [
        ("The", 0.5, 1),
        ("unaffable", 0.3, 3),
        ("cat", -0.3, 1),
        (",", 0.2, 1),
        ("the", 0.1, 1),
    ]
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
    ranking = attribute_ranking(
        tiny,
        query,
        [wiki_slice.titles[i] for i in indices],
        [wiki_slice.texts[i] for i in indices],
        indices,
        IGSettings(8, start_steps=None),
    )
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
    fixed = IGSettings(8, start_steps=None)
    together = attribute_ranking(tiny, "a place", titles, texts, indices, fixed).pairs
    for title, text, batched in zip(titles, texts, together):
        alone = attribute_pair(tiny, "a place", title, text, fixed).passage
        np.testing.assert_allclose(
            [t.score for t in batched.passage.tokens], [t.score for t in alone.tokens], rtol=1e-3, atol=1e-6
        )


def test_dpr_uses_the_question_and_the_context_tower(tiny_dpr, wiki_slice):
    title, text = wiki_slice.titles[2], wiki_slice.texts[2]
    pair = attribute_pair(tiny_dpr, "who wrote it", title, text, IGSettings(32))
    expected = _score(tiny_dpr, "who wrote it", title, text)
    for side in (pair.query, pair.passage):
        assert side.score == pytest.approx(expected, abs=1e-5)
        assert side.relative_delta < DELTA_TOLERANCE
    curve = deletion_curve(tiny_dpr, pair, "query", k_max=2, random_orders=2, settings=IGSettings(32))
    assert curve.attribution_order[0] == pytest.approx(expected, abs=1e-5)


def _scores_of(attribution: TokenAttribution) -> list[float]:
    return [t.score for t in attribution.tokens]


def test_adaptive_steps_refine_only_what_misses_the_tolerance(tiny, wiki_slice):
    indices = list(range(0, 40, 2))
    titles, texts = [wiki_slice.titles[i] for i in indices], [wiki_slice.texts[i] for i in indices]
    query_vector = tiny.encode_queries(["a city of music"])[0]
    progress = []
    adaptive = attribute_passages(
        tiny,
        titles,
        texts,
        query_vector,
        IGSettings(16, start_steps=2, start_substitution=None),
        progress=lambda done, total: progress.append((done, total)),
    )
    first_pass = attribute_passages(tiny, titles, texts, query_vector, IGSettings(2, start_steps=None))
    full = attribute_passages(tiny, titles, texts, query_vector, IGSettings(16, start_steps=None))
    refined = [n for n, result in enumerate(adaptive) if result.n_steps == 16]
    assert 0 < len(refined) < len(indices)
    assert {result.n_steps for result in adaptive} == {2, 16}
    assert progress[-1] == (len(indices) + len(refined),) * 2
    for n, result in enumerate(adaptive):
        assert result.within_tolerance
        if n in refined:
            assert not first_pass[n].within_tolerance
            np.testing.assert_allclose(_scores_of(result), _scores_of(full[n]), rtol=1e-4, atol=1e-7)
            assert (result.score, result.baseline_score) == pytest.approx((full[n].score, full[n].baseline_score))
        else:
            np.testing.assert_allclose(_scores_of(result), _scores_of(first_pass[n]), rtol=1e-4, atol=1e-7)


def test_adaptive_results_above_tolerance_at_full_steps_are_flagged(tiny, wiki_slice):
    indices = list(range(0, 40, 2))
    titles, texts = [wiki_slice.titles[i] for i in indices], [wiki_slice.texts[i] for i in indices]
    query_vector = tiny.encode_queries(["a city of music"])[0]
    results = attribute_passages(
        tiny, titles, texts, query_vector, IGSettings(2, start_steps=1, start_substitution=None)
    )
    flagged = [result for result in results if not result.within_tolerance]
    assert flagged and all(result.n_steps == 2 for result in flagged)
    assert all(result.within_tolerance or result.n_steps == 2 for result in results)
    assert "2 steps" in completeness_text(flagged[0])


def _token_error(result: TokenAttribution, reference: TokenAttribution) -> float:
    ours, ref = np.array(_scores_of(result)), np.array(_scores_of(reference))
    return float(np.abs(ours - ref).sum() / np.abs(ref).sum())


def test_sinh_substitution_integrates_the_same_path(tiny, wiki_slice):
    titles, texts = [wiki_slice.titles[i] for i in (1, 6)], [wiki_slice.texts[i] for i in (1, 6)]
    query_vector = tiny.encode_queries(["a river"])[0]
    rule = Quadrature(48, "gausslegendre", SinhSubstitution())
    substituted = attribute_passages(tiny, titles, texts, query_vector, passes=[rule])
    plain = attribute_passages(tiny, titles, texts, query_vector, IGSettings(48, start_steps=None))
    for ours, reference in zip(substituted, plain):
        assert ours.quadrature == rule
        assert reference.quadrature == Quadrature(48, "gausslegendre")
        assert (ours.score, ours.baseline_score) == pytest.approx((reference.score, reference.baseline_score), abs=1e-6)
        np.testing.assert_allclose(_scores_of(ours), _scores_of(reference), rtol=1e-3, atol=1e-6)


def test_sinh_substituted_first_pass_on_the_real_offline_model(minilm):
    corpus = load_wiki()
    _, held_out = split_indices(corpus)
    labelled = description_queries(corpus, held_out)[1]
    title, text = corpus.titles[labelled.source_index], corpus.texts[labelled.source_index]
    query_vector = minilm.encode_queries([labelled.text])[0]
    first = attribute_passages(minilm, [title], [text], query_vector)[0]
    fine = attribute_passages(minilm, [title], [text], query_vector, IGSettings(32, start_steps=None))[0]
    coarse = attribute_passages(minilm, [title], [text], query_vector, IGSettings(START_STEPS, start_steps=None))[0]
    assert first.quadrature == Quadrature(START_STEPS, "gausslegendre", SinhSubstitution())
    assert first.within_tolerance and fine.within_tolerance
    assert _token_error(first, fine) < 0.01 and first.relative_delta < coarse.relative_delta


def test_truncated_passages_are_flagged(tiny):
    short = attribute_pair(tiny, "a city", "Paris", "Paris is a city.", IGSettings(2))
    long = attribute_pair(tiny, "a city", "Paris", "Paris is a city. " * 60, IGSettings(2))
    assert not short.passage.truncated and long.passage.truncated
    assert len(long.passage.tokens) == tiny.context.max_length


def test_deletion_curve_shape_and_ends(tiny, wiki_slice):
    pair = attribute_pair(
        tiny, "music of the twentieth century", wiki_slice.titles[4], wiki_slice.texts[4], IGSettings(8)
    )
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
    original = token_attribution.attribute_passages

    def counting(encoder, titles, *args, **kwargs):
        calls.append(list(titles))
        return original(encoder, titles, *args, **kwargs)

    monkeypatch.setattr(token_attribution, "attribute_passages", counting)
    progress = []
    first = cached_ranking(
        cache,
        tiny,
        wiki_slice,
        "a city",
        [1, 2],
        IGSettings(4),
        progress=lambda done, total: progress.append((done, total)),
    )
    again = cached_ranking(cache, tiny, wiki_slice, "a city", [1, 2], IGSettings(4))
    assert len(calls) == 1 and again == first
    assert progress[-1] == (4, 4)
    cached_ranking(cache, tiny, wiki_slice, "a city", [1, 2], IGSettings(4, "riemann_trapezoid"))
    cached_ranking(cache, tiny, wiki_slice, "a city", [1, 2], IGSettings(4, start_steps=2))
    cached_ranking(cache, tiny, wiki_slice, "a city", [1, 2], IGSettings(4, start_steps=2, start_substitution=None))
    cached_ranking(
        cache,
        tiny,
        wiki_slice,
        "a city",
        [1, 2],
        IGSettings(4, start_steps=2, start_substitution=SinhSubstitution(0.5, 0.1)),
    )
    assert len(calls) == 5
    curve = cached_deletion_curve(cache, tiny, first.pairs[0], "query", k_max=2)
    assert cached_deletion_curve(cache, tiny, first.pairs[0], "query", k_max=2) == curve


def test_ranking_cache_is_per_passage(tiny, wiki_slice, cache, monkeypatch):
    runs = {"passages": [], "queries": []}
    originals = {name: getattr(token_attribution, name) for name in ("attribute_passages", "attribute_queries")}

    def counting(name):
        def run(encoder, texts, *args, **kwargs):
            runs["passages" if name == "attribute_passages" else "queries"].append(len(texts))
            return originals[name](encoder, texts, *args, **kwargs)

        return run

    for name in originals:
        monkeypatch.setattr(token_attribution, name, counting(name))
    settings = IGSettings(4, start_steps=None)
    first = cached_ranking(cache, tiny, wiki_slice, "a city", [1, 2, 3], settings)
    assert runs == {"passages": [3], "queries": [1, 3]}  # the query total, then the per-passage query runs

    reordered = cached_ranking(cache, tiny, wiki_slice, "a city", [3, 1, 2], settings)
    assert runs == {"passages": [3], "queries": [1, 3]}
    assert reordered.passage_indices == (3, 1, 2)
    assert reordered.pairs == (first.pairs[2], first.pairs[0], first.pairs[1])
    assert reordered.query_total == first.query_total

    grown = cached_ranking(cache, tiny, wiki_slice, "a city", [2, 4, 1], settings)
    assert runs == {"passages": [3, 1], "queries": [1, 3, 1, 1]}  # a new set: its total; one new pair
    assert grown.pair_for(2) == first.pair_for(2) and grown.pair_for(1) == first.pair_for(1)
    # The page's single-pair analysis finds the ranking's pairs too.
    assert cached_pair(cache, tiny, "a city", wiki_slice.titles[4], wiki_slice.texts[4], settings) == grown.pairs[1]
    assert len(runs["passages"]) == 2
    alone = attribute_ranking(
        tiny,
        "a city",
        [wiki_slice.titles[i] for i in (2, 4, 1)],
        [wiki_slice.texts[i] for i in (2, 4, 1)],
        [2, 4, 1],
        settings,
    )
    np.testing.assert_allclose(_scores_of(grown.query_total), _scores_of(alone.query_total), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(
        _scores_of(grown.pairs[1].passage), _scores_of(alone.pairs[1].passage), rtol=1e-4, atol=1e-7
    )


def test_bad_settings_are_refused():
    with pytest.raises(AttributionError, match="method"):
        IGSettings(method="simpson")
    with pytest.raises(AttributionError, match="steps"):
        IGSettings(n_steps=0)
    with pytest.raises(AttributionError, match="start step"):
        IGSettings(start_steps=0)
    with pytest.raises(AttributionError, match="sinh"):
        SinhSubstitution(center=1.2)
    assert (
        IGSettings(8, start_steps=8).passes
        == IGSettings(8, start_steps=None).passes
        == (Quadrature(8, "gausslegendre"),)
    )
    assert IGSettings(8, start_steps=8).params() == IGSettings(8, start_steps=None).params()


def test_token_html_escapes_and_colors():
    attribution = _hand_made(
        "<script>alert(1)</script>", [("<", 0, 1, 0, 0.4), ("script", 1, 7, 1, -0.2), (">", 7, 8, 2, 0.1)]
    )
    html = tokens_html(attribution)
    assert "<script>" not in html and "&lt;" in html and "script" in html
    assert "rgba(33,102,172,0.850)" in html and "rgba(178,24,43" in html
    assert 'title="&lt;: +0.4000"' in html and "&gt;</span>" in html


def test_page_shows_colored_tokens_and_escapes_the_query(tiny_bert_dir, tiny_dpr_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("DPR_LENS_CORPUS_LIMIT", "150")
    monkeypatch.setenv("DPR_LENS_CACHE", str(tmp_path / "cache"))
    at = AppTest.from_file(str(APP), default_timeout=240)
    for key, value in tiny_pair_state(tiny_bert_dir, tiny_dpr_dirs).items():
        at.session_state[key] = value
    at.switch_page("pages/token_attributions.py").run()
    assert not at.exception
    assert at.caption[0].value.startswith("**Custom:")
    assert any("Type a query" in info.value for info in at.info)
    at.text_input(key="query_input").input("<script>alert(1)</script> city of music").run()
    assert not at.exception and not at.error
    html = "".join(m.value for m in at.markdown)
    assert html.count('class="lens-tok"') > 20
    assert "<script" not in html and ">&lt;</span>" in html and ">alert</span>" in html
    assert len(at.get("image")) >= 1 and len(at.dataframe) == 2
    captions = [caption.value for caption in at.caption]
    assert sum("re-run with 20 steps when δ was above 1%" in caption for caption in captions) == 2
    assert any(" steps" in caption and "completeness δ" in caption for caption in captions)
    assert len(at.get("vega_lite_chart")) == 1
    at.radio(key="token_ig_side").set_value("passage").run()
    assert not at.exception


PLAIN_RULES = [Quadrature(n, method) for method in METHODS for n in (2, 5, 12)]
SUBSTITUTED_RULES = [Quadrature(n, "gausslegendre", SinhSubstitution()) for n in (8, 12, 20)]


@pytest.mark.parametrize("quadrature", PLAIN_RULES + SUBSTITUTED_RULES, ids=str)
def test_rules_are_nodes_and_weights_on_the_unit_interval(quadrature):
    rule = quadrature.rule()
    assert len(rule.nodes) == len(rule.weights) == quadrature.n_steps
    assert np.all((rule.nodes >= 0) & (rule.nodes <= 1)) and np.all(rule.weights > 0)
    assert rule.weights.sum() == pytest.approx(1, abs=1e-10)


# Degree integrated exactly, and the smallest degree that is not.
@pytest.mark.parametrize(
    ("method", "exact_degree"),
    [
        ("gausslegendre", None),
        ("riemann_trapezoid", 1),
        ("riemann_middle", 1),
        ("riemann_left", 0),
        ("riemann_right", 0),
    ],
)
@pytest.mark.parametrize("n", [2, 3, 6])
def test_each_rule_integrates_polynomials_as_its_order_promises(method, exact_degree, n):
    rule = Quadrature(n, method).rule()
    exact = 2 * n - 1 if exact_degree is None else exact_degree
    for degree in range(exact + 1):
        assert rule.integrate(lambda a, d=degree: (d + 1) * a**d) == pytest.approx(1, abs=1e-12)
    assert abs(rule.integrate(lambda a: (exact + 2) * a ** (exact + 1)) - 1) > 1e-6


def test_the_sinh_rule_resolves_a_peak_that_plain_gauss_legendre_misses():
    center, width = 0.4, 0.08  # a Lorentzian peak like IG's integrand on the offline models

    def peak(alpha):
        return 1 / (width**2 + (alpha - center) ** 2)

    exact = (np.arctan((1 - center) / width) + np.arctan(center / width)) / width
    substituted = Quadrature(START_STEPS, "gausslegendre", SinhSubstitution()).rule().integrate(peak)
    plain = Quadrature(START_STEPS, "gausslegendre").rule().integrate(peak)
    assert abs(substituted / exact - 1) < 1e-5 and abs(plain / exact - 1) > 1e-3


@model_work  # captum installs a hook on the shared model
def _captum_oracle(tower, inputs, baseline, others, quadrature):
    names = [name for name in inputs if name != "input_ids"]

    def score(input_ids, *rest):
        *extra, other = rest
        return (tower.forward({"input_ids": input_ids, **dict(zip(names, extra))}) * other).sum(-1)

    attributions, delta = LayerIntegratedGradients(score, tower.word_embeddings).attribute(
        inputs["input_ids"],
        baselines=baseline,
        additional_forward_args=(*(inputs[k] for k in names), others),
        n_steps=quadrature.n_steps,
        method=quadrature.method,
        return_convergence_delta=True,
    )
    return attributions.sum(-1).detach().numpy(), delta.detach().numpy()


@pytest.mark.parametrize(
    "quadrature",
    [Quadrature(12, "gausslegendre"), Quadrature(7, "riemann_middle"), Quadrature(9, "riemann_trapezoid")],
    ids=str,
)
def test_driver_matches_captum_as_the_oracle(tiny, wiki_slice, quadrature, monkeypatch):
    monkeypatch.setattr(integrated_gradients, "TOKEN_BUDGET", 64)  # several chunks, split across nodes and rows
    tower = tiny.context
    batch = encode_inputs(tower, list(wiki_slice.titles[:3]), list(wiki_slice.texts[:3]), 48)
    inputs, baseline = model_inputs(batch), pad_baseline(batch, tower.pad_token_id)
    others = torch.as_tensor(tiny.encode_queries(["a city", "music", "a river"]))
    ours, score, baseline_score = integrated_gradients.integrated_gradients(
        tower, inputs, baseline, others, quadrature.rule()
    )
    theirs, their_delta = _captum_oracle(tower, inputs, baseline, others, quadrature)
    # captum's trapezoid weights sum to (n - 1)/n (see quadrature.riemann); with the same nodes, ours are n/(n - 1)x.
    scale = (quadrature.n_steps - 1) / quadrature.n_steps if quadrature.method == "riemann_trapezoid" else 1.0
    assert np.abs(ours).max() > 1e-3
    np.testing.assert_allclose(ours * scale, theirs, rtol=1e-4, atol=1e-5)
    gap = score - baseline_score
    np.testing.assert_allclose(
        score,
        (
            tiny.encode_passages(list(wiki_slice.titles[:3]), list(wiki_slice.texts[:3]), max_length=48)
            * others.numpy()
        ).sum(-1),
        atol=1e-5,
    )
    np.testing.assert_allclose(ours.sum(1) * scale - gap, their_delta, atol=1e-5)
