"""Neuron overlap: kept / dropped / recruited / Jaccard on hand-made sets, their means over queries, and the whole
analysis on tiny twins (a model and its exact copy keep every neuron)."""

import numpy as np
import pytest

from core.cache import ResultCache
from core.index import load_index
from core.neuron_attribution import aggregate_sample
from core.overlap import OverlapAggregate, neuron_overlap, set_overlap
from core.pair import custom_pair, load_pair
from core.patching import TwinError
from tests.conftest import make_tiny_bert


def test_counts_and_jaccard_of_hand_made_sets():
    a = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], bool)  # layers x neurons
    b = np.array([[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]], bool)
    overlap = set_overlap(a, b)
    assert overlap.kept.tolist() == [1, 0, 1]
    assert overlap.dropped.tolist() == [1, 0, 0]
    assert overlap.recruited.tolist() == [1, 0, 0]
    np.testing.assert_array_equal(overlap.jaccard, [1 / 3, np.nan, 1.0])  # no neuron in either: undefined


def test_means_over_queries_leave_undefined_jaccards_out():
    a = np.zeros((2, 1, 4), bool)  # queries x layers x neurons
    b = np.zeros((2, 1, 4), bool)
    a[0, 0, :2] = b[0, 0, 1:3] = True  # query 0: kept 1, dropped 1, recruited 1, Jaccard 1/3; query 1: nothing
    aggregate = OverlapAggregate(["q0", "q1"], {"A": [0, 0], "B": [0, 0]}, 0.1, {"intermediate": set_overlap(a, b)})
    means = aggregate.means("intermediate")
    assert means["kept"].tolist() == means["dropped"].tolist() == means["recruited"].tolist() == [0.5]
    assert means["jaccard"].tolist() == pytest.approx([1 / 3])
    assert aggregate.recruited_share("intermediate") == 0.5  # B has 2 neurons, one of them new


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, wiki_slice):
    root = tmp_path_factory.mktemp("overlap")
    a = make_tiny_bert(root / "a", wiki_slice, "mean", 0, True)
    b = make_tiny_bert(root / "b", wiki_slice, "mean", 1, True)
    cache = ResultCache(root / "cache")
    return a, b, cache


def _indexes(pair, corpus, cache):
    return {name: load_index(encoder, corpus, cache) for name, encoder in pair.models.items()}


def test_a_model_and_its_exact_copy_keep_every_neuron(tiny_setup, wiki_slice):
    a, _, cache = tiny_setup
    pair = load_pair(custom_pair(str(a), str(a)))
    queries = aggregate_sample(wiki_slice, 2)
    overlap = neuron_overlap(pair, _indexes(pair, wiki_slice, cache), wiki_slice, queries, cache, steps=4)
    for site, result in overlap.sites.items():
        assert result.kept.shape == (2, pair.a.query.layer_count)
        assert result.kept.sum() > 0 and result.dropped.sum() == result.recruited.sum() == 0, site
        assert np.nanmin(result.jaccard) == 1.0


def test_different_twins_and_non_twins(tiny_setup, wiki_slice, tmp_path):
    a, b, cache = tiny_setup
    pair = load_pair(custom_pair(str(a), str(b)))
    queries = aggregate_sample(wiki_slice, 2)
    overlap = neuron_overlap(pair, _indexes(pair, wiki_slice, cache), wiki_slice, queries, cache, steps=4)
    intermediate = overlap.sites["intermediate"]
    assert (intermediate.dropped.sum() + intermediate.recruited.sum()) > 0  # other weights, other neurons
    wide = make_tiny_bert(tmp_path / "wide", wiki_slice, "mean", 2, True, intermediate_size=96)
    other = load_pair(custom_pair(str(a), str(wide)))
    with pytest.raises(TwinError, match=r"^Neuron overlap needs twins .*A's FFN width is 64 and B's is 96\.$"):
        neuron_overlap(other, {}, wiki_slice, queries, cache)
