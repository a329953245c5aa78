from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from streamlit.testing.v1 import AppTest
from transformers import AutoTokenizer, BertModel, DistilBertModel

import core.neuron_attribution as na
from core.index import load_index
from core.neuron_attribution import (
    NeuronAggregate,
    NeuronAttribution,
    above_threshold,
    aggregate_neurons,
    aggregate_sample,
    attribute_neurons,
    attribute_neurons_per_layer,
    attribute_passage,
    attribute_query,
    ffn_sites,
    lookup_aggregate,
    site_sizes,
)
from core.pair import ModelSpec, load_encoder
from tests.conftest import make_family_model, tiny_pair_state
from ui.neuron_views import attribution_heatmaps, binned_frame, png_bytes

APP = Path(__file__).resolve().parent.parent / "app.py"


def assert_same_attributions(batched: NeuronAttribution, reference: NeuronAttribution) -> None:
    """Equal within 1e-4 relative to the largest attribution of the site (and the scores exactly so)."""
    for site in na.SITES:
        ours, theirs = batched.scores[site], reference.scores[site]
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
        np.testing.assert_allclose(batched.baseline_scores[site], reference.baseline_scores[site], rtol=1e-5)
    assert batched.score == pytest.approx(reference.score, rel=1e-5)


@pytest.fixture(scope="module")
def tiny_bert(tiny_bert_dir):
    return load_encoder(ModelSpec("tiny", str(tiny_bert_dir), pooling="mean", normalize=True))


@pytest.fixture(scope="module")
def tiny_distilbert(tmp_path_factory, wiki_slice, tiny_bert_dir):
    directory = make_family_model("distilbert", tmp_path_factory.mktemp("tiny-distilbert"), wiki_slice, tiny_bert_dir)
    return load_encoder(ModelSpec("distil", str(directory), pooling="cls", normalize=False))


def _target(encoder, seed=0):
    return np.random.default_rng(seed).normal(size=encoder.context.dim).astype(np.float32)


def test_sites_are_the_ffn_down_projections(tiny_bert, tiny_dpr, tiny_distilbert):
    bert_layers = tiny_bert.query.model.encoder.layer
    assert [s.down for s in ffn_sites(tiny_bert.query)] == [layer.output.dense for layer in bert_layers]
    dpr_layers = tiny_dpr.context.model.ctx_encoder.bert_model.encoder.layer
    assert [s.down for s in ffn_sites(tiny_dpr.context)] == [layer.output.dense for layer in dpr_layers]
    assert [s.down for s in ffn_sites(tiny_distilbert.query)] == [
        layer.ffn.lin2 for layer in tiny_distilbert.query.model.transformer.layer
    ]
    assert site_sizes(tiny_bert.query) == {"intermediate": 64, "output": 32}
    assert site_sizes(tiny_distilbert.query) == {"intermediate": 48, "output": 32}


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_distilbert"])
def test_batched_equals_the_per_layer_loop(model, request):
    encoder = request.getfixturevalue(model)
    batch = encoder.query.tokenize(["the opera composed by a french musician"])
    target = _target(encoder)
    reference = attribute_neurons_per_layer(encoder.query, batch, target, steps=7)
    assert_same_attributions(attribute_neurons(encoder.query, batch, target, steps=7), reference)
    # A budget of a few rows forces many passes; the result must not change.
    assert_same_attributions(attribute_neurons(encoder.query, batch, target, steps=7, max_token_layers=40), reference)


def test_batched_equals_the_per_layer_loop_on_both_dpr_towers(tiny_dpr):
    query = tiny_dpr.query.tokenize(["who wrote the opera"])
    passage = tiny_dpr.context.tokenize(["Carmen"], ["Carmen is an opera by Georges Bizet."])
    for tower, batch in ((tiny_dpr.query, query), (tiny_dpr.context, passage)):
        target = _target(tiny_dpr, seed=1)
        assert_same_attributions(
            attribute_neurons(tower, batch, target, steps=5), attribute_neurons_per_layer(tower, batch, target, steps=5)
        )


def _scale_output(module, args, output, alpha, captured):
    # Detached: the gradient wanted is d s / d(alpha a), which only needs the graph above the site.
    scaled = (output.detach() * alpha).requires_grad_()
    captured.append((output.detach(), scaled))
    return scaled


def naive_knowledge_neurons(model, ffn_modules, batch, target, pooling, normalize, steps):
    """Dai et al. by the definition, sharing no code with core: for each (layer, site, step k) one forward with
    that one site scaled by alpha = k/m through a hook written here, one backward, and
    Attr_i = sum over positions of a_i * mean over k=1..m of ds/d(alpha_k a_i); k = 0 gives the baseline score.

    `ffn_modules[layer][site]` is the module whose output is the site's activation.
    Returns (scores per site as (layers, neurons), baseline scores per site and layer, s(x)).
    """
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
    target = torch.as_tensor(target)

    def score():
        hidden = model(**inputs).last_hidden_state[0]  # one sequence, so no padding to leave out of the mean
        pooled = hidden[0] if pooling == "cls" else hidden.mean(0)
        return (pooled / pooled.norm() if normalize else pooled) @ target

    with torch.no_grad():
        clean_score = float(score())
    scores, baselines = {}, {}
    for modules in ffn_modules:
        for site, module in modules.items():
            gradient_sum = 0
            for step in range(steps + 1):
                captured = []
                handle = module.register_forward_hook(partial(_scale_output, alpha=step / steps, captured=captured))
                try:
                    value = score()
                finally:
                    handle.remove()
                assert len(captured) == 1
                activation, scaled = captured[0]
                if step == 0:
                    baselines.setdefault(site, []).append(float(value.detach()))
                else:
                    gradient_sum = gradient_sum + torch.autograd.grad(value, scaled)[0]
            scores.setdefault(site, []).append((activation * gradient_sum / steps)[0].sum(0).double().numpy())
    return (
        {site: np.stack(rows) for site, rows in scores.items()},
        {site: np.array(values) for site, values in baselines.items()},
        clean_score,
    )


@pytest.mark.parametrize(
    "model, pooling, normalize", [("bert", "cls", False), ("bert", "mean", True), ("distilbert", "cls", False)]
)
def test_batched_equals_a_naive_reference_sharing_no_code(model, pooling, normalize, request, tiny_bert_dir):
    """The per-layer loop shares `_RowScaler` with the batched code, so a hook bug would cancel out there."""
    if model == "bert":
        source = str(tiny_bert_dir)
        encoder = load_encoder(ModelSpec("tiny", source, pooling=pooling, normalize=normalize))
        plain = BertModel.from_pretrained(source).eval()
        # "intermediate" is BertIntermediate's output (after the activation), "output" the FFN's dense
        # before dropout, the residual add and LayerNorm.
        ffn_modules = [
            {"intermediate": layer.intermediate, "output": layer.output.dense} for layer in plain.encoder.layer
        ]
    else:
        encoder = request.getfixturevalue("tiny_distilbert")
        source = encoder.source
        plain = DistilBertModel.from_pretrained(source).eval()
        ffn_modules = [
            {"intermediate": layer.ffn.activation, "output": layer.ffn.lin2} for layer in plain.transformer.layer
        ]
        assert len({id(modules["intermediate"]) for modules in ffn_modules}) == len(ffn_modules)  # not shared
    assert (encoder.query.pooling, encoder.query.normalize) == (pooling, normalize)
    batch = dict(
        AutoTokenizer.from_pretrained(source)(["the opera composed by a french musician"], return_tensors="pt")
    )
    target = _target(encoder, seed=4)
    reference, baselines, score = naive_knowledge_neurons(
        plain, ffn_modules, batch, target, pooling, normalize, steps=7
    )
    # The default budget runs every row in one pass; a budget of a few rows splits them over many passes.
    for budget in (na.MAX_TOKEN_LAYERS, 40):
        result = attribute_neurons(encoder.query, batch, target, steps=7, max_token_layers=budget)
        assert set(result.scores) == set(reference)
        for site in na.SITES:
            assert result.scores[site].shape == reference[site].shape
            np.testing.assert_allclose(
                result.scores[site], reference[site], rtol=1e-4, atol=1e-6 * np.abs(reference[site]).max()
            )
            np.testing.assert_allclose(result.baseline_scores[site], baselines[site], rtol=1e-5, atol=1e-7)
        assert result.score == pytest.approx(score, rel=1e-5)


def test_score_is_the_towers_own_score(tiny_dpr):
    batch = tiny_dpr.query.tokenize(["who wrote the opera"])
    target = _target(tiny_dpr)
    result = attribute_neurons(tiny_dpr.query, batch, target, steps=3)
    assert result.score == pytest.approx(float(tiny_dpr.encode_queries(["who wrote the opera"])[0] @ target), rel=1e-5)
    assert result.tokens[0] == "[CLS]" and result.tokens[-1] == "[SEP]"


def test_completeness_is_reported_and_improves_with_steps(tiny_bert):
    batch = tiny_bert.query.tokenize(["a river in northern europe"])
    target = _target(tiny_bert, seed=2)
    coarse = attribute_neurons(tiny_bert.query, batch, target, steps=4)
    fine = attribute_neurons(tiny_bert.query, batch, target, steps=200)
    for site in na.SITES:
        expected = fine.expected_sums()[site]
        np.testing.assert_allclose(fine.attribution_sums()[site], expected, atol=0.02 * np.abs(expected).max())
        assert fine.completeness_deltas()[site].sum() < coarse.completeness_deltas()[site].sum()
        np.testing.assert_allclose(coarse.baseline_scores[site], fine.baseline_scores[site], rtol=1e-5)


def test_threshold_and_counts_on_a_hand_made_tensor():
    intermediate = np.array([[1.0, 0.5, 0.09, -2.0], [0.11, 0.0, 0.2, 0.1]])
    output = np.array([[-1.0, -0.5], [-0.1, -3.0]])
    result = NeuronAttribution(
        {"intermediate": intermediate, "output": output},
        1.0,
        {"intermediate": np.zeros(2), "output": np.zeros(2)},
        steps=1,
    )
    above = result.above(0.1)
    np.testing.assert_array_equal(above["intermediate"], [[True, True, False, False], [True, False, True, False]])
    assert not above["output"].any()  # no positive attribution, so nothing is strongly activated
    np.testing.assert_array_equal(result.layer_counts(0.1)["intermediate"], [2, 2])
    np.testing.assert_array_equal(result.layer_counts(0.3)["intermediate"], [2, 0])
    assert result.strongly_activated(0.1) == {"intermediate": 4, "output": 0}
    assert result.strongly_activated(0.005)["intermediate"] == 6


def test_aggregate_counts_queries_per_neuron():
    first = np.array([[1.0, 0.0, 0.5], [0.0, 0.05, 0.0]])
    second = np.array([[0.0, 10.0, 0.0], [6.0, 0.0, 0.0]])
    aggregate = NeuronAggregate(
        ["q1", "q2"], [0, 1], {"intermediate": np.stack([first, second]), "output": np.stack([first, -second])}, steps=1
    )
    np.testing.assert_array_equal(aggregate.query_counts(0.1)["intermediate"], [[1, 1, 1], [1, 0, 0]])
    np.testing.assert_array_equal(aggregate.layer_counts(0.1)["intermediate"], [3, 1])
    np.testing.assert_array_equal(aggregate.layer_counts(0.1)["output"], [2, 0])
    np.testing.assert_array_equal(aggregate.strongly_activated(0.1)["intermediate"], [2, 2])
    assert above_threshold(first, 0.04).sum() == 3


def test_heatmap_bins_keep_charts_small_and_sums_exact():
    values = np.random.default_rng(0).random((12, 3072))
    frame = binned_frame(values, layer_counts=np.arange(12))
    assert len(frame) == 12 * 64 and frame["neurons"].iloc[0] == "0–47"
    np.testing.assert_allclose(frame.groupby("order")["value"].sum().to_numpy(), values.sum(1))
    np.testing.assert_allclose(frame["peak"].iloc[0], values[0, :48].max())
    assert frame["layer"].iloc[-1] == "layer 12 (11)"
    assert len(binned_frame(values[:, :10], np.zeros(12))) == 12 * 10  # fewer neurons than bins: one per bin


def test_heatmaps_download_as_png():
    scores = {"intermediate": np.arange(24.0).reshape(2, 12), "output": -np.ones((2, 4))}
    attribution = NeuronAttribution(scores, 1.0, {"intermediate": np.zeros(2), "output": np.zeros(2)}, steps=1)
    assert png_bytes(attribution_heatmaps(attribution, 0.5, "Model A"))().startswith(b"\x89PNG")


def test_query_attribution_targets_the_top1_and_is_cached(tiny_bert, wiki_slice, cache, tmp_path, monkeypatch):
    index = load_index(tiny_bert, wiki_slice, cache, prebuilt_dir=tmp_path)
    first = attribute_query(tiny_bert, index, wiki_slice, "  a city in france ", steps=3, cache=cache)
    _, top = index.search(tiny_bert.encode_queries(["a city in france"]), 1)
    assert first.passage == top[0, 0] and first.query == "a city in france"
    assert first.attribution.score == pytest.approx(
        float(index.search(tiny_bert.encode_queries(["a city in france"]), 1)[0][0, 0]), rel=1e-5
    )
    monkeypatch.setattr(na, "attribute_neurons", lambda *a, **k: pytest.fail("recomputed a cached attribution"))
    again = attribute_query(tiny_bert, index, wiki_slice, "a city in france", steps=3, cache=cache)
    np.testing.assert_array_equal(again.attribution.scores["output"], first.attribution.scores["output"])


def test_passage_attribution_uses_the_context_tower_and_the_query_embedding(tiny_dpr, wiki_slice, cache, tmp_path):
    index = load_index(tiny_dpr, wiki_slice, cache, prebuilt_dir=tmp_path)
    result = attribute_passage(tiny_dpr, index, wiki_slice, "a city in france", passage=7, steps=3, cache=cache)
    assert result.tower == "context" and result.passage == 7
    query = tiny_dpr.encode_queries(["a city in france"])[0]
    passage = tiny_dpr.encode_passages([wiki_slice.titles[7]], [wiki_slice.texts[7]], max_length=256)[0]
    assert result.attribution.score == pytest.approx(float(query @ passage), rel=1e-4)


def test_aggregate_resumes_after_an_interruption(tiny_bert, wiki_slice, cache, tmp_path, monkeypatch):
    index = load_index(tiny_bert, wiki_slice, cache, prebuilt_dir=tmp_path)
    queries = aggregate_sample(wiki_slice, 4)
    assert [q.text for q in aggregate_sample(wiki_slice, 2)] == [q.text for q in queries[:2]]
    computed = []
    real = na.attribute_neurons_batch

    def counting(tower, batch, *args, **kwargs):
        computed.extend([1] * len(batch["input_ids"]))
        return real(tower, batch, *args, **kwargs)

    def interrupt(done, total):
        if done == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(na, "attribute_neurons_batch", counting)
    monkeypatch.setattr(na, "MIN_LENGTH_SHARE", 1.01)  # one query per bundle, so that the run stops after two
    with pytest.raises(KeyboardInterrupt):
        aggregate_neurons(tiny_bert, index, wiki_slice, queries, cache, steps=3, progress=interrupt)
    assert len(computed) == 2 and lookup_aggregate(tiny_bert, index, queries, 3, cache) is None
    aggregate = aggregate_neurons(tiny_bert, index, wiki_slice, queries, cache, steps=3)
    assert len(computed) == 4  # only the two missing queries were computed
    assert aggregate.scores["intermediate"].shape == (4, 2, 64)
    assert lookup_aggregate(tiny_bert, index, queries, 3, cache) is not None
    single = attribute_query(tiny_bert, index, wiki_slice, queries[1].text, steps=3, cache=cache).attribution
    np.testing.assert_allclose(aggregate.scores["output"][1], single.scores["output"], rtol=1e-6)


def test_real_minilm_batched_equals_reference():
    encoder = load_encoder(ModelSpec("A", "minilm:"))
    batch = encoder.query.tokenize(["composer of the opera carmen"])
    target = encoder.encode_passages(["Carmen"], ["Carmen is an opera in four acts by Georges Bizet."])[0]
    batched = attribute_neurons(encoder.query, batch, target, steps=4)
    assert_same_attributions(batched, attribute_neurons_per_layer(encoder.query, batch, target, steps=4))
    assert batched.scores["intermediate"].shape == (6, 1536) and batched.scores["output"].shape == (6, 384)
    assert batched.score == pytest.approx(
        float(encoder.encode_queries(["composer of the opera carmen"])[0] @ target), rel=1e-5
    )


def test_page_shows_heatmaps_escapes_the_query_and_computes_the_aggregate(
    tiny_bert_dir, tiny_dpr_dirs, tmp_path, monkeypatch
):
    monkeypatch.setenv("DPR_LENS_CORPUS_LIMIT", "150")
    monkeypatch.setenv("DPR_LENS_CACHE", str(tmp_path / "cache"))
    at = AppTest.from_file(str(APP), default_timeout=240)
    for key, value in tiny_pair_state(tiny_bert_dir, tiny_dpr_dirs).items():
        at.session_state[key] = value
    at.switch_page("pages/knowledge_neurons.py").run()
    assert not at.exception
    assert any("Type a query" in info.value for info in at.info)

    at.text_input(key="query_input").input("<script>alert(1)</script> city of music").run()
    assert not at.exception and not at.error
    text = " ".join(element.value for element in list(at.markdown) + list(at.caption))
    assert "&lt;script&gt;" in text and "<script>" not in text
    charts = at.get("vega_lite_chart")
    assert len(charts) == 4  # heatmaps of A and B, per-layer bars, suppression curve
    heatmap_rows = sorted(pa.ipc.open_stream(d.data.data).read_all().num_rows for d in charts[0].proto.datasets)
    assert heatmap_rows == [2 * 32, 2 * 64]  # (layers x bins) per site: output 32 neurons, intermediate 64
    assert len(at.metric) == 4

    at.number_input(key="kn_n").set_value(3).run()
    at.button(key="kn_compute").click().run()
    assert not at.exception and len(at.get("vega_lite_chart")) == 7
    at.slider(key="kn_threshold").set_value(0.3).run()
    at.radio(key="kn_tower").set_value("context").run()
    assert not at.exception and not at.error
    assert len(at.get("vega_lite_chart")) == 7  # the aggregate now comes from the cache
