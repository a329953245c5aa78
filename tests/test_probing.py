import re
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from core import probing
from core.corpus import description_queries, split_indices
from core.index import load_index
from core.pair import ModelSpec, custom_pair, load_encoder, load_pair
from core.probing import (
    KINDS,
    ProbeConfig,
    ProbeError,
    bm25_rankings,
    build_sample,
    candidate_matrix,
    dense_rankings,
    format_table,
    layer_features,
    lookup_probing,
    pair_features,
    run_probing,
    train_probes,
    untrained_accuracy,
)
from core.runtime import model_scheduler

APP = Path(__file__).resolve().parent.parent / "app.py"


def _synthetic(queries: int, n: int, dim: int, signal: float, seed: int):
    """(1, Q, d) queries and (1, Q, n, d) candidates; the positive (at `targets`) is q + noise / signal."""
    rng = np.random.default_rng(seed)
    query = rng.normal(size=(1, queries, dim)).astype(np.float32)
    passages = rng.normal(size=(1, queries, n, dim)).astype(np.float32)
    targets = rng.integers(0, n, queries)
    if signal:
        passages[0, np.arange(queries), targets] = query[0] + rng.normal(size=(queries, dim)) / signal
    return pair_features(query, passages), targets


def test_probe_reaches_high_accuracy_on_separable_features():
    features, targets = _synthetic(600, 5, 32, signal=0.5, seed=0)
    probes = train_probes(features[:, :400], targets[:400])
    assert probes.correct(features[:, 400:], targets[400:]).mean() > 0.9
    assert probes.weight.shape == (1, 64) and probes.l2[0] > 0


@pytest.mark.parametrize("n", [2, 3, 5])
def test_untrained_and_trained_probes_sit_at_chance_without_signal(n):
    features, targets = _synthetic(2400, n, 32, signal=0, seed=n)
    untrained = untrained_accuracy(features[:, :400], features[:, 400:], targets[400:], probes=20, seed=0)
    assert abs(untrained[0] - 1 / n) < 0.03
    trained = train_probes(features[:, :400], targets[:400]).correct(features[:, 400:], targets[400:]).mean()
    assert abs(trained - 1 / n) < 0.04  # nothing to learn, so nothing leaks from training to test


def test_candidate_order_is_shuffled_with_the_positive_recorded():
    from core.probing import ProbeSample

    sample = ProbeSample(("q",) * 400, tuple(range(400)), tuple((1000 + i, 2000 + i) for i in range(400)), 300)
    candidates, targets = candidate_matrix(sample, 3, seed=0)
    assert candidates.shape == (400, 3)
    assert (candidates[np.arange(400), targets] == np.arange(400)).all()
    assert np.bincount(targets, minlength=3).min() > 100  # every position holds the positive about 1/3 of the time


def test_layer_features_pool_each_layer_like_the_tower(tiny_bert_dir, tiny_dpr_dirs):
    texts = ["a capital city", "music of the twentieth century in europe"]
    for pooling, normalize in (("cls", False), ("mean", True)):
        encoder = load_encoder(ModelSpec("tiny", str(tiny_bert_dir), pooling=pooling, normalize=normalize))
        features = layer_features(encoder.query, texts)
        assert features.shape == (3, 2, 32)
        np.testing.assert_allclose(features[-1], encoder.encode_queries(texts), rtol=1e-4, atol=1e-5)
        if pooling == "cls":  # position 0 of the embedding output is the same [CLS] vector for every text
            np.testing.assert_allclose(features[0, 0], features[0, 1], atol=1e-6)
        else:
            assert np.allclose(np.linalg.norm(features, axis=-1), 1.0, atol=1e-5)
    question, context = tiny_dpr_dirs
    dpr = load_encoder(ModelSpec("dpr", str(question), str(context)))
    passages = layer_features(dpr.context, ["Carmen"], ["Carmen is an opera."])
    with torch.no_grad():
        hidden = dpr.context.model(
            **dpr.context.tokenize(["Carmen"], ["Carmen is an opera."]), output_hidden_states=True
        ).hidden_states
    np.testing.assert_allclose(passages[:, 0], torch.stack([h[0, 0] for h in hidden]).numpy(), atol=1e-5)


def test_real_minilm_last_layer_features_are_its_embeddings():
    encoder = load_encoder(ModelSpec("A", "minilm:"))
    texts = ["Latin epic poem by Virgil", "Double-reed woodwind instrument"]
    features = layer_features(encoder.query, texts)
    assert features.shape == (7, 2, 384)
    np.testing.assert_allclose(features[-1], encoder.encode_queries(texts), atol=1e-5)


@pytest.mark.parametrize("source", ["bm25", "dense"])
def test_hard_negatives_are_never_relevant_and_respect_the_split(source, wiki_slice, tiny_bert_dir, cache):
    config = ProbeConfig(ns=(2, 4), train_queries=40, test_queries=8, seed=3)
    if source == "bm25":
        rank = partial(bm25_rankings, wiki_slice)
    else:
        encoder = load_encoder(ModelSpec("tiny", str(tiny_bert_dir)))
        rank = partial(dense_rankings, encoder, load_index(encoder, wiki_slice, cache))
    sample = build_sample(wiki_slice, config, rank)
    train, held_out = split_indices(wiki_slice)
    relevant = {q.source_index: q.relevant for q in description_queries(wiki_slice, range(len(wiki_slice)))}
    assert sample.train_count == 40 and len(sample.queries) == 40 + min(
        8, len(description_queries(wiki_slice, held_out))
    )
    for position, (positive, negatives) in enumerate(zip(sample.positives, sample.negatives)):
        assert len(negatives) == 3 == len(set(negatives))
        assert not set(negatives) & relevant[positive]  # neither the positive nor a same-description article
        is_train = position < sample.train_count
        assert (positive in train) == is_train
        if is_train:
            assert set(negatives) <= set(train)
    assert build_sample(wiki_slice, config, rank) == sample


def test_probe_config_rejects_bad_settings():
    with pytest.raises(ProbeError, match="at least 2"):
        ProbeConfig(ns=(1, 2))
    with pytest.raises(ProbeError, match="Hard negatives"):
        ProbeConfig(negatives="random")
    with pytest.raises(ProbeError, match="at least 5 training"):
        ProbeConfig(train_queries=2)


def test_probing_runs_end_to_end_on_a_tiny_slice_and_is_cached(
    tiny_bert_dir, tiny_dpr_dirs, wiki_slice, cache, monkeypatch
):
    question, context = tiny_dpr_dirs
    pair = load_pair(custom_pair(str(tiny_bert_dir), str(question), str(context)))
    config = ProbeConfig(ns=(2, 3), train_queries=40, test_queries=10)
    assert lookup_probing(pair, wiki_slice, config, cache) is None
    steps = []
    result = run_probing(pair, wiki_slice, config, cache, progress=lambda done, total: steps.append((done, total)))
    assert steps[-1][0] == steps[-1][1] and all(d <= t for d, t in steps)
    assert result.layers == {"A": 2, "B": 2}
    assert result.towers["B"] == "separate query and passage towers" and result.train_queries == 40
    assert len(result.rows) == 2 * 2 * 3 * len(KINDS)  # models x N x layers x kinds
    assert result.test_queries == 10
    for row in result.rows:  # a share of the 10 test queries; the untrained control's, of its 20 probes x 10
        trials = 10 * (config.control_probes if row["kind"] == "untrained" else 1)
        assert row["accuracy"] * trials == pytest.approx(round(row["accuracy"] * trials), abs=1e-6)
    for row in result.rows:
        if row["low"] is not None:
            assert row["low"] <= row["accuracy"] <= row["high"]
    table = format_table(result)
    assert table.splitlines()[0].split()[-3:] == ["L0", "L1", "L2"] and len(table.splitlines()) == 2 + 2 * 2 * len(
        KINDS
    )

    monkeypatch.setattr("core.probing.layer_features", lambda *a, **k: pytest.fail("recomputed features"))
    assert run_probing(pair, wiki_slice, config, cache) == result
    assert lookup_probing(pair, wiki_slice, config, cache) == result
    with pytest.raises(ProbeError, match="need that model's index"):
        run_probing(pair, wiki_slice, ProbeConfig(ns=(2,), train_queries=40, test_queries=10, negatives="A"), cache)


def test_page_runs_probing_and_shows_table_one(monkeypatch, tmp_path, tiny_bert_dir, tiny_dpr_dirs):
    from tests.test_evaluation import open_page

    at = open_page(monkeypatch, tmp_path, tiny_bert_dir, *tiny_dpr_dirs)
    at.radio(key="pe_section").set_value("Layer-wise probing").run()
    assert not at.exception
    at.number_input(key="probe_train").set_value(30)
    at.number_input(key="probe_test").set_value(5)
    at.multiselect(key="probe_ns").set_value([2, 3]).run()
    assert any("Not computed yet" in info.value for info in at.info)
    at.button(key="probe_run").click().run()
    assert not at.exception
    table = at.dataframe[0].value
    assert list(table.columns) == ["model", "N", "kind", "L0", "L1", "L2"]
    assert len(table) == 2 * 2 * 2  # models x N x (probe, untrained)
    at.multiselect(key="probe_kinds").set_value(list(KINDS)).run()  # a rerun without the button: from the cache
    assert not at.exception and len(at.dataframe[0].value) == 2 * 2 * len(KINDS)


def test_no_serving_module_changes_the_process_thread_count():
    """torch.set_num_threads is process-wide: called while serving, it slows or races other sessions' work.
    Only code that runs in a process of its own may set it: the CLI and the Ray actors."""
    root = APP.parent
    modules = [path for folder in ("core", "ui", "pages") for path in (root / folder).rglob("*.py")] + [APP]
    assert root / "core" / "probing.py" in modules
    own_process = {root / "core" / "cli.py", root / "core" / "distributed.py"}
    offenders = [
        str(path.relative_to(root))
        for path in modules
        if path not in own_process and re.search(r"set_num_(interop_)?threads", path.read_text())
    ]
    assert offenders == []


def test_probing_leaves_the_thread_count_alone(tiny_bert_dir, tiny_dpr_dirs, wiki_slice, cache, monkeypatch):
    calls, seen_in_fits = [], []
    for name in ("set_num_threads", "set_num_interop_threads"):
        monkeypatch.setattr(torch, name, lambda count, name=name: calls.append((name, count)))
    fit = probing._fit_weights
    monkeypatch.setattr(
        probing,
        "_fit_weights",
        lambda *args, **kwargs: seen_in_fits.append(torch.get_num_threads()) or fit(*args, **kwargs),
    )
    # Probes are fitted on the model worker, whose OpenMP thread count is its own.
    worker_threads = model_scheduler().run(torch.get_num_threads)
    threads = torch.get_num_threads()
    question, context = tiny_dpr_dirs
    pair = load_pair(custom_pair(str(tiny_bert_dir), str(question), str(context)))
    run_probing(pair, wiki_slice, ProbeConfig(ns=(2,), train_queries=20, test_queries=5), cache)
    assert calls == []
    assert seen_in_fits and set(seen_in_fits) == {worker_threads}
    assert model_scheduler().run(torch.get_num_threads) == worker_threads and torch.get_num_threads() == threads
