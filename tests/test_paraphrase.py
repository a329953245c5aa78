"""Paraphrase agreement: the built-in set (every gold title in the bundled corpus), pairwise Jaccard on
hand-made sets, a user's phrasings, and the report on tiny models (a model against itself agrees exactly as much)."""

import numpy as np
import pytest

from core.cache import ResultCache
from core.corpus import load_wiki
from core.index import load_index
from core.pair import custom_pair, load_pair
from core.paraphrase import (
    Need,
    ParaphraseError,
    load_needs,
    lookup_paraphrase_agreement,
    mean_pairwise_jaccard,
    paraphrase_agreement,
    parse_phrasings,
)
from tests.conftest import make_tiny_bert


def test_the_built_in_set_has_thirty_needs_with_gold_articles_in_the_corpus():
    needs = load_needs()
    titles = set(load_wiki().titles)
    assert len(needs) >= 30
    assert all(3 <= len(need.phrasings) <= 4 and len(set(need.phrasings)) == len(need.phrasings) for need in needs)
    assert [need.gold for need in needs if need.gold not in titles] == []


def test_mean_pairwise_jaccard_of_hand_made_sets():
    first, second, third = (np.array(row, bool) for row in ([1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 0]))
    # pairs: 1/3, 1, 1/3
    assert mean_pairwise_jaccard([first, second, third]) == pytest.approx(5 / 9)
    per_layer = mean_pairwise_jaccard([np.array([[1, 0], [0, 0]], bool), np.array([[1, 1], [0, 0]], bool)])
    np.testing.assert_array_equal(per_layer, [0.5, np.nan])  # an empty layer in both has no Jaccard


def test_user_phrasings_one_per_line():
    assert parse_phrasings(" tallest mountain \n\n highest peak\ntallest mountain\n").phrasings == (
        "tallest mountain",
        "highest peak",
    )
    with pytest.raises(ParaphraseError, match="at least two phrasings"):
        parse_phrasings("only one\n  \n")


def test_report_on_tiny_models(tmp_path, wiki_slice):
    directory = make_tiny_bert(tmp_path / "a", wiki_slice, "mean", 0, True)
    pair = load_pair(custom_pair(str(directory), str(directory)))
    cache = ResultCache(tmp_path / "cache")
    indexes = {name: load_index(encoder, wiki_slice, cache) for name, encoder in pair.models.items()}
    needs = [
        Need(("a river in europe", "european river", "river flowing through europe"), wiki_slice.titles[3]),
        Need(("famous painter", "painter of portraits")),
    ]
    report = paraphrase_agreement(pair, indexes, wiki_slice, needs, cache, k=5, steps=4)
    assert [n.gold for n in report.needs] == [3, None]
    assert report.needs[0].models["A"].target == 3  # the gold passage is every phrasing's target
    assert report.needs[1].models["A"].target == report.needs[1].models["A"].retrieved[0][0]
    assert report.needs[0].models["A"].gold_found is not None and report.needs[1].models["A"].gold_found is None
    assert report.neuron_jaccard("A", "intermediate").shape == (2, pair.a.query.layer_count)
    assert 0 <= report.retrieval_jaccard("A").min() <= report.retrieval_jaccard("A").max() <= 1
    mean, low, high, count = report.difference("intermediate")
    assert (mean, low, high, count) == (0.0, 0.0, 0.0, 2)  # the same model on both sides
    assert lookup_paraphrase_agreement(pair, indexes, needs, cache, k=5, steps=4) is not None
