"""Linear CKA: 1 for identical features, invariant to rotation and isotropic scaling, equal to the HSIC reference
formula (both of its computation routes), and the analysis on a pair of different widths and depths."""

import json

import numpy as np
import pytest

from core.cka import layer_similarity, linear_cka, pca_2d, undefined_note
from core.cli import main
from core.neuron_attribution import aggregate_sample
from core.pair import custom_pair, load_pair
from tests.conftest import make_tiny_bert


def reference_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. eq. 3 with linear kernels: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), H the centring matrix."""
    n = x.shape[0]
    centring = np.eye(n) - np.ones((n, n)) / n
    k, l_ = centring @ x @ x.T @ centring, centring @ y @ y.T @ centring
    return float(np.trace(k @ l_) / np.sqrt(np.trace(k @ k) * np.trace(l_ @ l_)))


@pytest.mark.parametrize("rows", [8, 80])  # fewer and more inputs than features: both routes
def test_cka_identities_and_reference(rows):
    rng = np.random.default_rng(rows)
    x = rng.normal(size=(rows, 20))
    rotation, _ = np.linalg.qr(rng.normal(size=(20, 20)))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.5 * x @ rotation + 2.0) == pytest.approx(1.0)  # rotation, scaling and a shift
    y = rng.normal(size=(rows, 12))
    assert linear_cka(x, y) == pytest.approx(reference_cka(x, y), rel=1e-9)
    assert linear_cka(x, y) < 0.9
    assert np.isnan(linear_cka(x, np.ones((rows, 3))))
    with pytest.raises(ValueError):
        linear_cka(x, y[:-1])


def test_pca_finds_the_direction_of_largest_variance():
    rng = np.random.default_rng(0)
    points = np.outer(rng.normal(size=50), [3.0, 0.0, 0.0]) + rng.normal(scale=0.01, size=(50, 3))
    coordinates, explained = pca_2d(points)
    assert coordinates.shape == (50, 2) and explained[0] > 0.99
    np.testing.assert_allclose(np.abs(coordinates[:, 0]), np.abs(points[:, 0] - points[:, 0].mean()), atol=0.05)


def test_layer_similarity_of_models_with_different_widths_and_depths(tmp_path, wiki_slice, cache):
    a = make_tiny_bert(tmp_path / "a", wiki_slice, "mean", 0, True)
    b = make_tiny_bert(tmp_path / "b", wiki_slice, "cls", 1, False, hidden_size=48, num_hidden_layers=3)
    queries = aggregate_sample(wiki_slice, 6)
    same = layer_similarity(load_pair(custom_pair(str(a), str(a))), wiki_slice, queries, cache)
    np.testing.assert_allclose(same.cka["queries"], 1.0, rtol=1e-6)
    result = layer_similarity(load_pair(custom_pair(str(a), str(b))), wiki_slice, queries, cache)
    assert {kind: len(values) for kind, values in result.cka.items()} == {"queries": 3, "passages": 3}
    assert np.isnan(result.cka["passages"][0])  # B pools CLS: its layer-0 features are the same for every input
    assert undefined_note(result.cka).startswith("CKA is undefined at layer(s) 0:") and undefined_note(same.cka) is None
    assert np.all((result.cka["passages"][1:] > 0) & (result.cka["passages"][1:] < 1))
    assert result.passages == [q.source_index for q in queries]
    assert {name: p.shape for name, p in result.projections.items()} == {"A": (12, 2), "B": (12, 2)}


def test_cka_command_prints_json_and_a_table_on_the_mini_paper_pair(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DPR_LENS_CACHE", str(tmp_path / "cache"))
    main(["cka", "--pair", "mini-paper", "--queries", "5", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["queries"] == 5 and len(result["cka"]["queries"]) == 5  # embeddings + 4 layers
    main(["cka", "--pair", "mini-paper", "--queries", "5"])
    out = capsys.readouterr().out
    assert "nan" in out.splitlines()[2] and "CKA is undefined at layer(s) 0:" in out  # mini-BERT pools CLS
    with pytest.raises(SystemExit):
        main(["cka", "--pair", "mini-paper", "--queries", "2"])
    assert "CKA needs at least three queries" in capsys.readouterr().err
