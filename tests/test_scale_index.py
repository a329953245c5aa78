"""The IVF index (recall against flat), the app's retrieval from a sharded index, the Figure-1 aggregate on Ray."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from core.corpus import load_jsonl, load_wiki
from core.corpus_stream import scan_corpus
from core.distributed import aggregate_neurons_chunked, build_sharded
from core.index import DenseIndex, load_index
from core.ivf import CARD_MD, INDEX_DIR_ENV_VAR, IVFIndex, IVFSettings, exact_top_k, open_index, recall_at_k
from core.neuron_attribution import NEURON_AGGREGATE, _aggregate_key, aggregate_neurons, aggregate_sample
from core.retrieval import retrieve
from core.shards import ShardRange, finish_shards, write_shard


def clustered(rows: int, dim: int, seed: int) -> np.ndarray:
    mixture = np.random.default_rng(7)
    centres = mixture.standard_normal((1000, dim)).astype(np.float32)
    draws = np.random.default_rng(seed)
    vectors = centres[draws.integers(0, 1000, rows)] + 0.4 * draws.standard_normal((rows, dim), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["sq8", "pq"])
def test_ivf_recall_at_the_default_nprobe(tmp_path, kind):
    base, queries = clustered(200_000, 64, 0), clustered(300, 64, 1)
    params = {
        "model": "synthetic",
        "corpus": "synthetic",
        "rows": len(base),
        "pooling": "-",
        "normalize": True,
        "max_length": 0,
    }
    shards = [ShardRange(i, 4, start, start + 50_000) for i, start in enumerate(range(0, 200_000, 50_000))]
    for shard in shards:
        write_shard(tmp_path, shard, params, base[shard.start : shard.stop], [str(i) for i in range(50_000)])
    finish_shards(tmp_path, shards, params)
    from core.ivf import build_ivf
    from core.shards import ShardSet

    # 16 PQ bytes for 64-d vectors: 4 dimensions a code byte, as PQ64 gives 768-d ones 12
    card = build_ivf(ShardSet.open(tmp_path), IVFSettings(kind=kind, pq_bytes=16, card_queries=100))
    index = open_index(tmp_path)
    assert isinstance(index, IVFIndex) and len(index) == 200_000 and index.nprobe == IVFSettings.nprobe
    _, found = index.search(queries, 10)
    exact = exact_top_k(base, queries, 10)
    assert recall_at_k(found, exact) >= 0.9
    assert card["recall_at_10"] >= 0.9 and card["factory"] == f"IVF512,{'SQ8' if kind == 'sq8' else 'PQ16'}"
    assert index.params["index"] != open_index(tmp_path, nprobe=4).params["index"]  # no shared cache entries
    np.testing.assert_array_equal(index.embeddings[123_456], base[123_456])


def test_app_retrieves_from_the_sharded_ivf_index(tmp_path, monkeypatch, tiny, tiny_spec, cache):
    corpus = load_wiki(limit=400)
    path = tmp_path / "corpus.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": i, "title": t, "text": x}) + "\n"
            for i, t, x in zip(corpus.ids, corpus.titles, corpus.texts)
        )
    )
    settings = IVFSettings(threshold=100, nlist=8, nprobe=8, card_queries=50)
    directory, card = build_sharded(tiny, tiny_spec, scan_corpus(path), tmp_path / "indexes", 3, settings)
    assert (directory / CARD_MD).is_file() and card["rows"] == 400
    served_corpus = load_jsonl(path)
    monkeypatch.setenv(INDEX_DIR_ENV_VAR, str(tmp_path / "indexes"))
    index = load_index(tiny, served_corpus, cache)
    assert isinstance(index, IVFIndex) and index.source == "ivf"
    monkeypatch.delenv(INDEX_DIR_ENV_VAR)
    flat = load_index(tiny, served_corpus, cache)
    assert isinstance(flat, DenseIndex)
    query = corpus.descriptions[3]
    approximate, exact = retrieve(tiny, index, served_corpus, query, 10), retrieve(tiny, flat, served_corpus, query, 10)
    assert approximate.indices == exact.indices  # all 8 lists probed, then exact re-ranking: same ranking
    np.testing.assert_allclose([h.score for h in approximate.hits], [h.score for h in exact.hits], rtol=1e-4)


def test_figure1_aggregate_on_ray_equals_the_serial_one(tmp_path, tiny, tiny_spec, cache):
    ray = pytest.importorskip("ray")
    from core.cache import ResultCache

    corpus = load_wiki(limit=400)
    queries = aggregate_sample(corpus, 20, seed=0)
    assert len(queries) == 20
    index = DenseIndex(tiny.encode_passages(corpus.titles, corpus.texts, max_length=64), {"toy": 1}, "built")
    serial = aggregate_neurons(tiny, index, corpus, queries, cache, steps=4)
    ray_cache = ResultCache(tmp_path / "ray-cache")
    ray.init(num_cpus=2, log_to_driver=False)
    try:
        distributed = aggregate_neurons_chunked(
            tiny, index, corpus, queries, ray_cache, steps=4, chunk_size=6, spec=tiny_spec, workers=2
        )
    finally:
        ray.shutdown()
    assert distributed.queries == serial.queries and distributed.passages == serial.passages
    for site, scores in serial.scores.items():
        np.testing.assert_allclose(distributed.scores[site], scores, rtol=1e-4, atol=1e-6)
    assert NEURON_AGGREGATE.lookup(ray_cache, **_aggregate_key(tiny, index, queries[:6], 4)) is not None
    assert NEURON_AGGREGATE.lookup(ray_cache, **_aggregate_key(tiny, index, queries, 4)) is not None
    ray_cache.close()


def test_a_built_ivf_index_is_kept_unless_a_setting_that_made_it_changes(
    tmp_path, monkeypatch, tiny, tiny_spec, tsv_path
):
    scan = scan_corpus(tsv_path)
    settings = IVFSettings(threshold=100, kind="sq8", nlist=8, nprobe=8, card_queries=20)
    build_sharded(tiny, tiny_spec, scan, tmp_path, 2, settings)
    monkeypatch.setattr("core.distributed.build_ivf", lambda *a, **k: pytest.fail("rebuilt"))
    build_sharded(tiny, tiny_spec, scan, tmp_path, 2, dataclasses.replace(settings, pq_bytes=32))  # SQ8: no PQ bytes
    monkeypatch.undo()
    _, card = build_sharded(tiny, tiny_spec, scan, tmp_path, 2, dataclasses.replace(settings, kind="pq"))
    assert card["factory"].startswith("IVF8,PQ")
