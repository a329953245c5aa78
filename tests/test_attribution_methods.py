import math
from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from core.attribution.integrated_gradients import encode_inputs, model_inputs, pad_baseline
from core.attribution.methods import (
    METHOD_LABELS,
    METHOD_NAMES,
    MethodAttribution,
    attribute_methods,
    cached_panel,
    rank_correlations,
)
from core.attribution.pairs import cached_pair_map, integrated_jacobian, token_pair_map
from core.attribution.quadrature import Quadrature
from core.attribution.results import Token
from core.retrieval import QueryError
from core.runtime import model_work
from core.token_attribution import IGSettings, attribute_pair
from tests.conftest import tiny_pair_state
from ui.method_views import pair_frame

APP = Path(__file__).resolve().parent.parent / "app.py"

QUERY = "capital city of france"
SETTINGS = IGSettings(n_steps=20, start_steps=None)


@pytest.fixture(scope="module")
def passage(wiki_slice):
    return wiki_slice.titles[3], wiki_slice.texts[3][:200]


@pytest.fixture(scope="module")
def panel(tiny_encoder, passage):
    pair = attribute_pair(tiny_encoder, QUERY, *passage, SETTINGS)
    return attribute_methods(tiny_encoder, QUERY, *passage, pair.query, pair.passage, 256)


def _score(encoder, query, title, text):
    return float(encoder.encode_queries([query])[0] @ encoder.encode_passages([title], [text], max_length=256)[0])


def test_every_method_on_both_sides(panel):
    for side in ("query", "passage"):
        methods = panel.side(side)
        assert tuple(methods) == METHOD_NAMES
        lengths = {len(m.tokens) for m in methods.values()}
        assert len(lengths) == 1
        for method in methods.values():
            assert np.isfinite(method.values()).all() and len(method.values()) > 2
        # [CLS]/[SEP] are kept in the [PAD]/[MASK] baselines and never occluded; gradient × input scores them.
        for method in ("ig_pad", "ig_mask", "occlusion"):
            assert all(t.score == 0 for t in methods[method].tokens if t.special)


def test_occlusion_is_explicit_rescoring(tiny_encoder, panel, passage):
    title, text = passage
    passage_vector = tiny_encoder.encode_passages([title], [text], max_length=256)[0]
    full = _score(tiny_encoder, QUERY, title, text)
    batch = encode_inputs(tiny_encoder.query, [QUERY], None, None)
    occluded = panel.query["occlusion"]
    for position, token in enumerate(occluded.tokens):
        if token.special:
            continue
        ids = batch["input_ids"].clone()
        ids[0, position] = tiny_encoder.query.pad_token_id
        with torch.inference_mode():
            edited = tiny_encoder.query.forward({**model_inputs(batch), "input_ids": ids})[0].numpy()
        assert token.score == pytest.approx(full - float(edited @ passage_vector), abs=1e-5)


@model_work
def _grad_input_by_hand(tower, batch, other):
    embeds = tower.word_embeddings(batch["input_ids"]).detach().requires_grad_()
    with torch.enable_grad():
        value = (tower.forward(model_inputs(batch), inputs_embeds=embeds)[0] * other).sum()
        value.backward()
    return (embeds.grad * embeds.detach()).sum(-1)[0].numpy()


def test_gradient_times_input_matches_autograd_by_hand(tiny_encoder, panel, passage):
    title, text = passage
    query_vector = torch.as_tensor(tiny_encoder.encode_queries([QUERY])[0])
    batch = encode_inputs(tiny_encoder.context, [title], [text], 256)
    expected = _grad_input_by_hand(tiny_encoder.context, batch, query_vector)
    got = np.array([t.score for t in panel.passage["grad_input"].tokens])
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_the_ig_methods_are_complete_against_their_baselines(panel):
    for side in ("query", "passage"):
        for method in ("ig_pad", "ig_mask"):
            attribution = panel.side(side)[method]
            total = sum(t.score for t in attribution.tokens)
            assert total == pytest.approx(attribution.score - attribution.reference, rel=0.02, abs=1e-4)
        assert panel.side(side)["ig_pad"].reference != panel.side(side)["ig_mask"].reference


def test_rank_correlations_on_known_rankings():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert rank_correlations(x, x * 10 + 3) == {"kendall": pytest.approx(1.0), "spearman": pytest.approx(1.0)}
    assert rank_correlations(x, -x) == {"kendall": pytest.approx(-1.0), "spearman": pytest.approx(-1.0)}
    # one swapped pair of 6: τ = (5 - 1) / 6; ρ = 1 - 6·2 / (4·15)
    swapped = rank_correlations(x, np.array([2.0, 1.0, 3.0, 4.0]))
    assert swapped["kendall"] == pytest.approx(4 / 6) and swapped["spearman"] == pytest.approx(0.8)
    assert all(math.isnan(v) for v in rank_correlations(x, np.ones(4)).values())


def test_agreement_table_and_order():
    tokens = (Token("[CLS]", -1, 0, 0, -1, 0.0),) + tuple(
        Token(w, 0, 0, 0, n, s) for n, (w, s) in enumerate([("a", 0.1), ("b", 0.5), ("c", -0.2)])
    )
    method = MethodAttribution("m", ("a b c",), tokens, 1.0, False)
    assert method.order() == [2, 1, 3]
    np.testing.assert_allclose(method.values(), [0.1, 0.5, -0.2])


def test_panel_agreement_has_every_pair_of_methods(panel):
    table = panel.agreement("passage")
    assert len(table) == 6 and table[["kendall", "spearman"]].abs().max().max() <= 1
    assert table.set_index(["method 1", "method 2"]).loc[("ig_pad", "ig_mask"), "kendall"] > 0


def test_panel_is_cached_and_reuses_the_pad_ig(tiny_encoder, passage, cache, monkeypatch):
    first = cached_panel(cache, tiny_encoder, QUERY, *passage, SETTINGS)
    monkeypatch.setattr("core.attribution.methods.attribute_methods", lambda *a, **k: pytest.fail("recomputed"))
    again = cached_panel(cache, tiny_encoder, QUERY, *passage, SETTINGS)
    assert again.passage["occlusion"].tokens == first.passage["occlusion"].tokens


# ---- token-pair map -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair_map(tiny_encoder, passage):
    return token_pair_map(tiny_encoder, QUERY, *passage, n_steps=24)


def test_pair_map_total_is_the_interaction_and_the_deviation_is_the_main_effects(tiny_encoder, pair_map, passage):
    assert pair_map.score == pytest.approx(_score(tiny_encoder, QUERY, *passage), abs=1e-5)
    assert pair_map.quadrature_error == pytest.approx(0, abs=0.01 * abs(pair_map.interaction) + 1e-5)
    assert pair_map.deviation == pytest.approx(pair_map.quadrature_error - pair_map.main_effects, abs=1e-6)
    # With non-zero baselines (a normalised mean-pooled tower) the main effects do not vanish.
    assert abs(pair_map.main_effects) > 10 * abs(pair_map.quadrature_error)
    assert pair_map.query.delta == pytest.approx(abs(pair_map.deviation), abs=1e-6)


@model_work
def _pooled_pair(tower, batch):
    inputs = model_inputs(batch)
    with torch.inference_mode():
        both = {k: torch.cat([v, v]) for k, v in inputs.items()}
        both["input_ids"] = torch.cat([inputs["input_ids"], pad_baseline(batch, tower.pad_token_id)])
        return tower.forward(both).numpy()


def test_integrated_jacobian_is_complete_per_dimension(tiny_encoder):
    batch = encode_inputs(tiny_encoder.query, [QUERY], None, None)
    jacobian = integrated_jacobian(
        tiny_encoder.query,
        model_inputs(batch),
        pad_baseline(batch, tiny_encoder.query.pad_token_id),
        Quadrature(24, "gausslegendre").rule(),
    )
    f, f0 = _pooled_pair(tiny_encoder.query, batch)
    assert jacobian.shape == (batch["input_ids"].shape[1], tiny_encoder.query.dim)
    np.testing.assert_allclose(jacobian.sum(0), f - f0, atol=2e-3 * np.abs(f - f0).max())
    assert not jacobian[batch["special_tokens_mask"][0].bool().numpy()].any()


def test_pair_map_rows_are_query_ig_against_the_passage_difference(tiny_encoder, pair_map, passage):
    """Σ_j M[i, j] = Q[i] · (g(p) − g(p0)): the query-side IG with that target, by the token-IG driver."""
    from core.attribution.integrated_gradients import integrated_gradients

    title, text = passage
    passage_batch = encode_inputs(tiny_encoder.context, [title], [text], 256)
    g, g0 = _pooled_pair(tiny_encoder.context, passage_batch)
    batch = encode_inputs(tiny_encoder.query, [QUERY], None, None)
    expected, _, _ = integrated_gradients(
        tiny_encoder.query,
        model_inputs(batch),
        pad_baseline(batch, tiny_encoder.query.pad_token_id),
        torch.as_tensor(g - g0)[None],
        Quadrature(24, "gausslegendre").rule(),
    )
    np.testing.assert_allclose(pair_map.matrix.sum(1), expected[0], atol=1e-4)


def test_pair_map_views_and_cache(tiny_encoder, pair_map, passage, cache, monkeypatch):
    rows, columns, matrix = pair_map.words()
    assert rows == QUERY.split() and matrix.shape == (len(rows), len(columns))
    assert matrix.sum() == pytest.approx(pair_map.total, abs=1e-6)
    token_rows, token_columns, token_matrix = pair_map.tokens()
    assert len(token_columns) >= len(columns) and token_matrix.sum() == pytest.approx(pair_map.total, abs=1e-6)
    first = cached_pair_map(cache, tiny_encoder, QUERY, *passage, n_steps=4)
    monkeypatch.setattr("core.attribution.pairs.token_pair_map", lambda *a, **k: pytest.fail("recomputed"))
    np.testing.assert_array_equal(cached_pair_map(cache, tiny_encoder, QUERY, *passage, n_steps=4).matrix, first.matrix)
    with pytest.raises(QueryError):
        token_pair_map(tiny_encoder, " \x00 ", *passage)


def test_pair_frame_cuts_long_passages_to_the_top_columns(pair_map):
    _, columns, matrix = pair_map.tokens()
    frame, count = pair_frame(pair_map, words=False, limit=5)
    assert count == len(columns) > 5 and frame["passage"].nunique() == 5
    kept = sorted(np.argsort(-np.abs(matrix.sum(0)))[:5])
    assert list(dict.fromkeys(frame["passage"])) == [f"{j + 1}·{columns[j]}" for j in kept]


def test_page_shows_methods_faithfulness_and_pair_maps(tiny_bert_dir, tiny_dpr_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("DPR_LENS_CORPUS_LIMIT", "150")
    monkeypatch.setenv("DPR_LENS_CACHE", str(tmp_path / "cache"))
    at = AppTest.from_file(str(APP), default_timeout=240)
    for key, value in tiny_pair_state(tiny_bert_dir, tiny_dpr_dirs).items():
        at.session_state[key] = value
    at.switch_page("pages/token_attributions.py").run()
    at.text_input(key="query_input").input("<b>city</b> of music").run()
    assert len(at.get("vega_lite_chart")) == 1  # the deletion curves; the slower sections wait for their toggles
    at.toggle(key="methods_show").set_value(True)
    at.toggle(key="token_pairs_show").set_value(True).run()
    assert not at.exception and not at.error
    assert not any("<b>" in m.value for m in at.markdown)
    assert any("&lt;" in m.value and 'class="lens-tok"' in m.value for m in at.markdown)
    assert sum(METHOD_LABELS["occlusion"] in m.value for m in at.markdown) == 2
    assert len(at.dataframe) == 4  # two word tables, two agreement tables
    assert len(at.get("vega_lite_chart")) == 4  # deletion, AOPC, rank, token pairs
    assert any("shown are the 30 with the largest |Σ_i M[i, j]|" in info.value for info in at.info)
    at.radio(key="methods_side").set_value("query").run()
    at.checkbox(key="token_pairs_words").uncheck().run()
    assert not at.exception and not at.error
