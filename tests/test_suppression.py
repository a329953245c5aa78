import copy

import numpy as np
import pytest
import torch

from core.index import load_index
from core.neuron_attribution import NeuronAttribution, TargetedAttribution, attribute_query, ffn_sites
from core.pair import ModelSpec, load_encoder
from core.retrieval import retrieve
from core.runtime import model_work
from core.suppression import Neuron, curve_ks, ranked_neurons, suppressing, suppression_curve


@pytest.fixture(scope="module")
def tiny_bert(tiny_bert_dir):
    return load_encoder(ModelSpec("tiny", str(tiny_bert_dir), pooling="mean", normalize=True))


@pytest.fixture
def index(tiny_bert, wiki_slice, cache, tmp_path):
    return load_index(tiny_bert, wiki_slice, cache, prebuilt_dir=tmp_path)


def _hook_count(tower) -> int:
    return sum(len(site.down._forward_hooks) + len(site.down._forward_pre_hooks) for site in ffn_sites(tower))


def test_neurons_are_ranked_relative_to_their_sites_maximum():
    attribution = NeuronAttribution(
        {"intermediate": np.array([[4.0, 1.0], [3.0, -1.0]]), "output": np.array([[0.1, 0.09], [0.0, 0.2]])},
        1.0,
        {"intermediate": np.zeros(2), "output": np.zeros(2)},
        steps=1,
    )
    ranked = ranked_neurons(attribution, 4)
    assert [(n.site, n.layer, n.index) for n in ranked] == [
        ("intermediate", 0, 0),
        ("output", 1, 1),
        ("intermediate", 1, 0),
        ("output", 0, 0),
    ]
    assert [n.relative_score for n in ranked] == pytest.approx([1.0, 1.0, 0.75, 0.5])


def test_curve_ks():
    assert curve_ks(50) == [0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50]
    assert curve_ks(3) == [0, 1, 2, 3]
    assert curve_ks(0) == [0]
    with pytest.raises(ValueError):
        curve_ks(-1)


def test_zeroing_by_hooks_equals_zeroing_the_weights(tiny_bert):
    tower = tiny_bert.query
    batch = tower.tokenize(["a large city on a river"])
    neurons = [Neuron("intermediate", 0, 5, 1.0), Neuron("intermediate", 1, 17, 0.9), Neuron("output", 1, 3, 0.8)]
    rows = {key: value.expand(2, -1) for key, value in batch.items()}

    @model_work  # hooks on a shared model are only allowed inside a model job
    def forward_suppressed():
        with suppressing(tower, [[], neurons]), torch.no_grad():
            return tower.forward(rows)

    hooked = forward_suppressed()
    assert _hook_count(tower) == 0
    edited = copy.deepcopy(tower.model)
    with torch.no_grad():
        edited.encoder.layer[0].output.dense.weight[:, 5] = 0  # intermediate neuron 5 feeds only column 5
        edited.encoder.layer[1].output.dense.weight[:, 17] = 0
        edited.encoder.layer[1].output.dense.weight[3] = 0  # output neuron 3 is row 3 and bias 3
        edited.encoder.layer[1].output.dense.bias[3] = 0
        plain = tower.forward(batch)
        tower.model, original = edited, tower.model
        try:
            expected = tower.forward(batch)
        finally:
            tower.model = original
    np.testing.assert_allclose(hooked[0].numpy(), plain[0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hooked[1].numpy(), expected[0].numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(hooked[0].numpy(), hooked[1].numpy())


def test_k0_keeps_the_ranking_and_hooks_are_removed(tiny_bert, index, wiki_slice, cache):
    analysed = attribute_query(tiny_bert, index, wiki_slice, "a river in northern europe", steps=3, cache=cache)
    curve = suppression_curve(tiny_bert, index, analysed, [0, 4, 64, 10_000])
    ranking = retrieve(tiny_bert, index, wiki_slice, "a river in northern europe", k=5)
    assert curve.ks[0] == 0 and curve.ranks[0] == 1 and curve.passage == analysed.passage
    assert list(curve.top[0]) == ranking.indices
    assert curve.scores[0] == pytest.approx(ranking.hits[0].score, rel=1e-5)
    assert curve.ks[-1] == len(curve.neurons) == 2 * (64 + 32)  # k is capped at the number of neurons
    assert curve.scores[-1] != pytest.approx(curve.scores[0], rel=1e-3)  # zeroing every FFN neuron matters
    assert _hook_count(tiny_bert.query) == 0


def test_a_gold_passage_is_followed(tiny_bert, index, wiki_slice, cache):
    analysed = attribute_query(
        tiny_bert, index, wiki_slice, "a river in northern europe", passage=11, steps=3, cache=cache
    )
    curve = suppression_curve(tiny_bert, index, analysed, [0, 8])
    scores, ranked = index.search(tiny_bert.encode_queries(["a river in northern europe"]), len(index))
    assert curve.passage == 11 and curve.ranks[0] == int(np.flatnonzero(ranked[0] == 11)[0]) + 1


def test_suppression_needs_a_query_tower_attribution(tiny_bert, index, wiki_slice, cache):
    analysed = attribute_query(tiny_bert, index, wiki_slice, "a river", steps=2, cache=cache)
    passage_side = TargetedAttribution("context", analysed.query, analysed.passage, analysed.attribution)
    with pytest.raises(ValueError, match="query-tower"):
        suppression_curve(tiny_bert, index, passage_side, [0, 1])
