"""Batch analyses as chunked jobs (here and on a local Ray): evaluation and token-IG word clouds over many queries."""

from __future__ import annotations

import pandas as pd
import pytest

from core import distributed
from core.cache import ResultCache
from core.cli import main
from core.corpus import description_queries, load_wiki, split_indices
from core.distributed import EVALUATION_CHUNK, evaluate_encoder_chunked, word_clouds_chunked
from core.evaluation import DEPTH, EVALUATION, evaluate_pair, evaluation_key
from core.index import DenseIndex, load_index
from core.pair import ModelPair, custom_pair
from core.retrieval import RETRIEVAL, retrieve
from core.token_attribution import TOP_K, IGSettings, cached_ranking, word_sums


def test_ray_at_an_unreachable_address_is_a_clear_error(capsys):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # a running Ray is used whatever --ray says
        ray.shutdown()
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--ray", "127.0.0.1:1"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "error: No Ray cluster answers at 127.0.0.1:1" in error and "Traceback" not in error


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def many_queries(tiny):
    """403 queries (4 chunks of whole 128-query batches, the last one short) over 430 passages."""
    corpus = load_wiki(limit=430)
    queries = description_queries(corpus, range(len(corpus)))
    index = DenseIndex(tiny.encode_passages(corpus.titles, corpus.texts, max_length=64), {"toy": 1}, "built")
    return corpus, queries, index


@pytest.fixture(scope="module")
def serial_evaluation(tmp_path_factory, tiny, many_queries):
    corpus, queries, index = many_queries
    cache = ResultCache(tmp_path_factory.mktemp("serial-cache"))
    pair = ModelPair(custom_pair("tiny", "tiny"), tiny, tiny)
    yield evaluate_pair(pair, corpus, queries, cache, indexes={"A": index, "B": index})["A"]
    cache.close()


def test_a_killed_chunked_evaluation_resumes_at_its_missing_chunks_and_equals_the_serial_one(
    tiny, many_queries, serial_evaluation, cache, monkeypatch
):
    corpus, queries, index = many_queries
    assert len(queries) > 3 * 128

    def die_after_two_chunks(done, total):
        if done >= 256:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        evaluate_encoder_chunked(tiny, index, queries, cache, chunk_size=100, progress=die_after_two_chunks)
    encoded = []
    encode_queries = distributed._encode_queries

    def counted(encoder, texts):
        encoded.append(texts)
        return encode_queries(encoder, texts)

    monkeypatch.setattr(distributed, "_encode_queries", counted)
    resumed = evaluate_encoder_chunked(tiny, index, queries, cache, chunk_size=100)
    assert [len(texts) for texts in encoded] == [128, len(queries) - 3 * 128]
    assert resumed == serial_evaluation
    assert EVALUATION.lookup(cache, **evaluation_key(tiny, index, queries)) == serial_evaluation


def test_chunked_evaluation_on_ray_equals_the_serial_one(
    tiny, tiny_spec, many_queries, serial_evaluation, cache, local_ray
):
    corpus, queries, index = many_queries
    distributed_evaluation = evaluate_encoder_chunked(
        tiny, index, queries, cache, chunk_size=128, spec=tiny_spec, workers=2
    )
    assert distributed_evaluation == serial_evaluation
    first_chunk = sorted((q.text for q in queries), key=len, reverse=True)[:128]
    key = {"index": index.params, "query_model": tiny.fingerprint, "queries": first_chunk, "depth": DEPTH}
    assert EVALUATION_CHUNK.lookup(cache, **key) is not None


def _sorted_words(table: pd.DataFrame) -> pd.DataFrame:
    return table.sort_values("word", ignore_index=True)


def test_word_clouds_on_ray_fill_the_pages_cache_and_merge_as_the_serial_job(
    tmp_path, tiny, tiny_spec, wiki_slice, local_ray, monkeypatch
):
    queries = [q.text for q in description_queries(wiki_slice, split_indices(wiki_slice)[1])[:3]]
    ray_cache, serial_cache = ResultCache(tmp_path / "ray"), ResultCache(tmp_path / "serial")
    index = load_index(tiny, wiki_slice, ray_cache)  # what the page searches
    serial = word_clouds_chunked(tiny, index, wiki_slice, queries, serial_cache, chunk_size=2)
    progress = []
    words = word_clouds_chunked(
        tiny,
        index,
        wiki_slice,
        queries,
        ray_cache,
        chunk_size=2,
        spec=tiny_spec,
        workers=2,
        progress=lambda *done: progress.append(done),
    )
    assert progress[-1] == (3, 3) and words.queries == 3
    for side in ("passage", "query"):
        ray_table, serial_table = _sorted_words(getattr(words, side)), _sorted_words(getattr(serial, side))
        assert list(ray_table.word) == list(serial_table.word)
        pd.testing.assert_frame_equal(ray_table, serial_table, rtol=1e-4, atol=1e-6)

    def no_computing(*args, **kwargs):
        raise AssertionError("the page's lookup computed")

    monkeypatch.setattr("core.token_attribution.ranking_parts", no_computing)
    passages = []
    for text in queries:
        assert RETRIEVAL.lookup(ray_cache, query_model=tiny.fingerprint, index=index.params, query=text, k=TOP_K)
        ranking = retrieve(tiny, index, wiki_slice, text, TOP_K, cache=ray_cache)  # as the token page asks
        analysis = cached_ranking(ray_cache, tiny, wiki_slice, ranking.query.text, ranking.indices, IGSettings())
        passages += [pair.passage for pair in analysis.pairs]
    merged, direct = _sorted_words(words.passage), _sorted_words(word_sums(passages, drop_stopwords=True))
    pd.testing.assert_frame_equal(merged, direct, rtol=1e-9, atol=1e-12)
    ray_cache.close()
    serial_cache.close()
