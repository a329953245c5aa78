"""Activation patching between twins on tiny random BERTs: the sanity identities (nothing patched = A, the last
residual stream = B, A's own activations = A), batched rows = single passes, the recovered fraction, and
non-twins refused in one sentence. Also the adapters' new hook point (layer outputs) for every family."""

import json

import numpy as np
import pytest
import torch

from core.adapters import layer_hidden, with_layer_hidden
from core.cache import ResultCache
from core.cli import main
from core.index import load_index
from core.neuron_attribution import aggregate_sample
from core.pair import custom_pair, load_pair
from core.patching import (
    DIRECTIONS,
    PATCH_SITES,
    PATCHING,
    DirectionPatching,
    QueryPatching,
    TwinError,
    aggregate_patching,
    near_tie_note,
    patch_query,
    patch_sites,
    patched_embeddings,
    ranks_in_index,
    site_activations,
    summarise_cells,
)
from core.runtime import model_work
from tests.conftest import FAMILIES, make_tiny_bert
from tests.conftest import FAMILY_QUERY as QUERY

POOLINGS = {"mean": True, "cls": False}  # pooling: normalise


@pytest.fixture(scope="module")
def twins(tmp_path_factory, wiki_slice):
    """Per pooling, a pair of two tiny BERTs with the same architecture and different weights."""
    root = tmp_path_factory.mktemp("twins")
    pairs = {}
    for pooling, normalize in POOLINGS.items():
        dirs = [make_tiny_bert(root / f"{pooling}-{seed}", wiki_slice, pooling, seed, normalize) for seed in (0, 1)]
        pairs[pooling] = load_pair(custom_pair(str(dirs[0]), str(dirs[1])))
    return pairs


@model_work
def _run(pair, activations_from: str, patches):
    batch = pair.a.query.tokenize([QUERY])
    donor = pair.models[activations_from].query
    return patched_embeddings(pair.a.query, batch, site_activations(donor, batch), patches)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_nothing_patched_is_a_and_the_last_residual_stream_is_b(twins, pooling):
    pair = twins[pooling]
    last = pair.a.query.layer_count - 1
    vectors = _run(pair, "B", [None, (last, "layer")])
    a, b = pair.a.encode_queries([QUERY])[0], pair.b.encode_queries([QUERY])[0]
    assert not np.allclose(a, b, atol=1e-3)  # the twins differ, so the identities below say something
    np.testing.assert_array_equal(vectors[0], a)
    np.testing.assert_array_equal(vectors[1], b)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_patching_a_with_its_own_activations_changes_nothing(twins, pooling):
    pair = twins[pooling]
    sites = patch_sites(pair.a.query.layer_count)
    vectors = _run(pair, "A", sites)
    np.testing.assert_allclose(vectors, np.repeat(pair.a.encode_queries([QUERY]), len(sites), 0), atol=1e-6)


def test_batched_rows_equal_one_pass_per_patch(twins):
    pair = twins["mean"]
    patches = [None, *patch_sites(pair.a.query.layer_count)]
    batched = _run(pair, "B", patches)
    single = np.concatenate([_run(pair, "B", [site]) for site in patches])
    np.testing.assert_allclose(batched, single, atol=1e-6)
    assert len({tuple(np.round(row, 5)) for row in batched}) == len(patches)  # every patch changes something


def test_ranks_count_passages_scoring_higher():
    embeddings = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert ranks_in_index(embeddings, vectors, 2).tolist() == [2, 2, 1]


@pytest.fixture(scope="module")
def index_b(twins, wiki_slice, tmp_path_factory):
    return load_index(twins["mean"].b, wiki_slice, ResultCache(tmp_path_factory.mktemp("index-cache")))


def test_patch_query_recovers_all_of_the_donor_at_the_last_layer(twins, wiki_slice, index_b, cache):
    pair = twins["mean"]
    result = patch_query(pair, index_b, wiki_slice, QUERY, cache=cache)
    last = pair.a.query.layer_count - 1
    target = index_b.embeddings[result.passage]
    for direction, (recipient, donor) in DIRECTIONS.items():
        patched = result.directions[direction]
        assert (patched.recipient, patched.donor) == (recipient, donor)
        clean = pair.models[recipient].encode_queries([QUERY])[0]
        assert patched.recipient_score == pytest.approx(float(clean @ target), abs=1e-5)
        assert patched.scores.shape == patched.ranks.shape == (pair.a.query.layer_count, len(PATCH_SITES))
        assert patched.recovered[last, PATCH_SITES.index("layer")] == pytest.approx(1.0, abs=1e-4)
        assert patched.ranks[last, PATCH_SITES.index("layer")] == patched.donor_rank
    assert result.directions["A←B"].donor_rank == 1  # the default target is B's own top-1
    stored = PATCHING.lookup(
        cache, A=pair.a.fingerprint, B=pair.b.fingerprint, index=index_b.params, query=QUERY, passage=result.passage
    )
    np.testing.assert_array_equal(stored.directions["B←A"].scores, result.directions["B←A"].scores)


def test_aggregate_summarises_every_query(twins, wiki_slice, index_b, cache):
    queries = aggregate_sample(wiki_slice, 3)
    aggregate = aggregate_patching(twins["mean"], index_b, wiki_slice, queries, cache)
    directions = [result.directions["A←B"] for result in aggregate.results]
    assert len(directions) == len(queries)
    gaps = np.array([d.donor_score - d.recipient_score for d in directions])
    fractions = np.stack([d.recovered for d in directions])
    summary = aggregate.summary("A←B")
    np.testing.assert_allclose(summary.pooled, np.average(fractions, axis=0, weights=np.abs(gaps)), rtol=1e-5)
    np.testing.assert_allclose(summary.median, np.median(fractions, 0), rtol=1e-5)


def test_pooling_weighs_each_query_by_its_gap_so_a_near_tie_cannot_dominate():
    # Query 3's clean scores nearly tie: its own fraction is 0.03 / 0.01 = 3, which a mean of fractions would show.
    gains = np.array([[[0.5, 0.0]], [[1.0, 0.2]], [[0.03, 0.0]]])
    gaps = np.array([1.0, 1.0, 0.01])
    summary = summarise_cells(gains, gaps, samples=300)
    np.testing.assert_allclose(summary.pooled, [[1.53 / 2.01, 0.2 / 2.01]])
    np.testing.assert_allclose(summary.median, [[1.0, 0.0]])
    assert summary.defined.tolist() == [[3, 3]]
    assert (summary.low <= summary.pooled).all() and (summary.pooled <= summary.high).all()


def test_pooling_turns_a_query_whose_gap_runs_the_other_way():
    # Fractions 1 and 0; the second query's gap is negative. A plain ratio of sums gives 1 / 0.1 = 10.
    summary = summarise_cells(np.array([[[1.0]], [[0.0]]]), np.array([1.0, -0.9]), samples=300)
    np.testing.assert_allclose(summary.pooled, [[1 / 1.9]])
    assert 0.0 <= summary.low[0, 0] <= summary.high[0, 0] <= 1.0
    # Gains along a negative gap are a positive fraction: 0.45 of the way from s_R down to s_D.
    turned = summarise_cells(np.array([[[-0.45]]]), np.array([-0.9]), samples=50)
    np.testing.assert_allclose(turned.pooled, [[0.5]])


def test_a_query_whose_clean_scores_tie_counts_nowhere():
    tie = summarise_cells(np.array([[[0.4]], [[0.2]]]), np.array([1.0, 0.0]), samples=50)
    assert tie.defined.tolist() == [[1]] and tie.median.tolist() == [[0.4]]
    np.testing.assert_allclose(tie.pooled, [[0.4]])
    assert np.isnan(tie.low).all() and np.isnan(tie.high).all()  # one query that counts has no interval
    nothing = summarise_cells(np.array([[[0.4]]]), np.array([0.0]), samples=50)
    assert np.isnan(nothing.pooled).all() and np.isnan(nothing.median).all() and nothing.defined.tolist() == [[0]]


def test_pairs_that_are_not_twins_are_refused_in_one_sentence(tmp_path, wiki_slice, index_b):
    small = make_tiny_bert(tmp_path / "one-layer", wiki_slice, "mean", 0, True, num_hidden_layers=1)
    pair = load_pair(custom_pair(str(small), str(make_tiny_bert(tmp_path / "two", wiki_slice, "mean", 1, True))))
    with pytest.raises(TwinError, match=r"^Patching needs twins .*A's layer count is 1 and B's is 2\.$"):
        patch_query(pair, index_b, wiki_slice, QUERY)


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_outputs_are_the_hidden_states(family, family_encoders):
    tower = family_encoders[family].query
    batch = tower.tokenize(["Danube", QUERY])
    blocks = tower.adapter.layer_outputs(tower.model)
    recorded = {}
    handles = [
        block.register_forward_hook(
            lambda module, args, output, layer=layer: recorded.__setitem__(layer, layer_hidden(output).clone())
        )
        for layer, block in enumerate(blocks)
    ]
    try:
        with torch.no_grad():
            hidden = tower.hidden_states(batch)
    finally:
        for handle in handles:
            handle.remove()
    assert len(blocks) == tower.layer_count and sorted(recorded) == list(range(tower.layer_count))
    for layer, value in recorded.items():
        torch.testing.assert_close(value, hidden[layer + 1])
    replaced = torch.zeros(2)
    assert with_layer_hidden((hidden[1], "extra"), replaced)[0] is replaced  # older transformers: a tuple
    assert with_layer_hidden(hidden[1], replaced) is replaced


def test_patch_command_prints_json_on_the_offline_pair(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DPR_LENS_CACHE", str(tmp_path / "cache"))
    main(["patch", "--pair", "offline", "--query", "city on the river Seine", "--passage", "Paris", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["passage"] == "Paris" and result["sites"] == list(PATCH_SITES)
    for direction in DIRECTIONS:
        recovered = np.array(result["directions"][direction]["recovered"], dtype=float)  # null: NaN
        assert recovered.shape == (6, 3) and recovered[-1, -1] == pytest.approx(1.0, abs=1e-4)

    main(["patch", "--pair", "offline", "--queries", "3", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert len(result["queries"]) == 3
    for direction in DIRECTIONS:
        summary = result["directions"][direction]
        pooled = np.array(summary["pooled"], dtype=float)
        assert pooled.shape == np.array(summary["median"], dtype=float).shape == (6, 3)
        assert pooled[-1, -1] == pytest.approx(1.0, abs=1e-4)  # the last residual stream is the donor's


def test_a_query_whose_clean_scores_nearly_tie_gets_a_note():
    def result(recipient_score: float, donor_score: float) -> QueryPatching:
        direction = DirectionPatching("A", "B", recipient_score, donor_score, 3, 1, np.zeros((1, 3)), np.ones((1, 3)))
        return QueryPatching("q", 0, {"A←B": direction})

    note = near_tie_note(result(0.7865, 0.8121))
    assert note is not None and "differ by 0.0256, 3.2% of the larger score." in note
    assert near_tie_note(result(0.60, 0.80)) is None
    assert near_tie_note(result(40.0, 80.0)) is None  # dot products: the gap is measured against the scores' size
    assert "differ by 0.0000. Every" in near_tie_note(result(0.0, 0.0))
