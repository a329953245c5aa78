import numpy as np
import pytest

from core.attribution.faithfulness import (
    MEASURES,
    RANDOM,
    EditCurve,
    aopc,
    cached_faithfulness,
    pair_faithfulness,
    ranks,
    summary,
)
from core.attribution.methods import METHOD_NAMES, cached_panel
from core.corpus import Corpus
from core.index import DenseIndex
from core.token_attribution import IGSettings

QUERY = "capital city of france"
SETTINGS = IGSettings(n_steps=12, start_steps=None)


@pytest.fixture(scope="module")
def candidates(tiny_encoder, wiki_slice):
    titles, texts = wiki_slice.titles[:12], [text[:160] for text in wiki_slice.texts[:12]]
    return titles, texts, tiny_encoder.encode_passages(titles, texts, max_length=256)


@pytest.fixture(scope="module")
def result(tiny_encoder, candidates):
    titles, texts, embeddings = candidates
    panel = cached_panel(None, tiny_encoder, QUERY, titles[5], texts[5], SETTINGS)
    return panel, pair_faithfulness(
        tiny_encoder, panel, QUERY, titles[5], texts[5], embeddings, 5, k_max=6, random_orders=4, seed=1
    )


def test_aopc_of_a_hand_made_curve():
    assert aopc([0.3, 0.5, 0.1]) == pytest.approx(0.3)
    assert EditCurve((0.2, 0.4, 0.6, 0.8), (1, 2, 3, 4)).aopc == pytest.approx(0.5)
    assert np.isnan(aopc([]))


def test_rank_counts_the_candidates_strictly_above():
    np.testing.assert_array_equal(ranks(np.array([1.0, 0.2]), np.array([[0.5, 2.0, 1.0], [0.1, 0.3, 0.25]])), [2, 3])


def test_curves_for_every_method_and_the_random_control(result):
    panel, faithfulness = result
    for side in faithfulness.sides():
        for measure in MEASURES:
            assert set(side.curves[measure]) == set(METHOD_NAMES) | {RANDOM}
            assert all(len(curve.drop) == len(side.ks) == len(curve.rank) for curve in side.curves[measure].values())
    assert faithfulness.query.ks == (1, 2, 3, 4)  # K = min(k_max, non-special query tokens)
    assert faithfulness.passage.ks == tuple(range(1, 7))


def test_edits_against_explicit_rescoring(result):
    panel, faithfulness = result
    query = faithfulness.query
    occlusion = panel.query["occlusion"]
    # Removing the top occluded token drops the score by exactly its occlusion score.
    top = max(t.score for t in occlusion.tokens if not t.special)
    assert query.curves["comprehensiveness"]["occlusion"].drop[0] == pytest.approx(top, abs=1e-5)
    # All tokens removed is the [PAD] baseline; all kept is the input itself.
    ig = panel.query["ig_pad"]
    for order in METHOD_NAMES + (RANDOM,):
        assert query.curves["comprehensiveness"][order].drop[-1] == pytest.approx(ig.score - ig.reference, abs=1e-5)
        assert query.curves["sufficiency"][order].drop[-1] == pytest.approx(0, abs=1e-5)
    assert query.score == pytest.approx(ig.score, abs=1e-5)


def test_rank_among_the_candidates(tiny_encoder, candidates, result):
    _, faithfulness = result
    titles, texts, embeddings = candidates
    scores = embeddings @ tiny_encoder.encode_queries([QUERY])[0]
    expected = 1 + int((np.delete(scores, 5) > scores[5]).sum())
    assert faithfulness.query.rank == faithfulness.passage.rank == expected
    for side in faithfulness.sides():
        for curves in side.curves.values():
            assert all(1 <= r <= len(titles) for curve in curves.values() for r in curve.rank)


def test_cached_with_the_passage_added_to_its_candidates(tiny_encoder, wiki_slice, candidates, cache, monkeypatch):
    titles, texts, embeddings = candidates
    corpus = Corpus("slice", wiki_slice.ids[:12], tuple(titles), tuple(texts))
    index = DenseIndex(embeddings, {}, "built")
    _, first = cached_faithfulness(
        cache, tiny_encoder, corpus, index, QUERY, [0, 1, 2], 5, SETTINGS, k_max=2, random_orders=1
    )
    assert first.passage.rank <= 4
    monkeypatch.setattr("core.attribution.faithfulness.pair_faithfulness", lambda *a, **k: pytest.fail("recomputed"))
    _, again = cached_faithfulness(
        cache, tiny_encoder, corpus, index, QUERY, [0, 1, 2], 5, SETTINGS, k_max=2, random_orders=1
    )
    assert again == first
    table = summary({"A": [first, again]})
    assert set(table["order"]) == set(METHOD_NAMES) | {RANDOM}
    assert len(table) == 2 * 2 * (len(METHOD_NAMES) + 1) and (table["pairs"] == 2).all()
