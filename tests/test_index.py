import numpy as np
import pytest

from core.index import PrebuiltIndexError, embedding_params, load_index, load_prebuilt, save_prebuilt
from core.pair import ModelSpec, load_encoder
from core.retrieval import retrieve


@pytest.fixture(scope="module")
def tiny_encoder(tiny_bert_dir):
    return load_encoder(ModelSpec("tiny", str(tiny_bert_dir), pooling="mean", normalize=True))


def test_index_search_matches_brute_force(tiny_encoder, wiki_slice, cache, tmp_path):
    index = load_index(tiny_encoder, wiki_slice, cache, prebuilt_dir=tmp_path)
    assert index.source == "built" and len(index) == len(wiki_slice)
    query = tiny_encoder.encode_queries(["the history of music"])
    scores, ids = index.search(query, 5)
    brute = index.embeddings @ query[0]
    np.testing.assert_array_equal(ids[0], np.argsort(-brute)[:5])
    np.testing.assert_allclose(scores[0], np.sort(brute)[::-1][:5], rtol=1e-5)


def test_embeddings_come_from_the_cache_the_second_time(tiny_encoder, wiki_slice, cache, tmp_path):
    first = load_index(tiny_encoder, wiki_slice, cache, prebuilt_dir=tmp_path)
    second = load_index(tiny_encoder, wiki_slice, cache, prebuilt_dir=tmp_path)
    assert (first.source, second.source) == ("built", "cache")
    np.testing.assert_array_equal(first.embeddings, second.embeddings)
    other_corpus = load_index(tiny_encoder, wiki_slice.head(50), cache, prebuilt_dir=tmp_path)
    assert other_corpus.source == "built" and len(other_corpus) == 50


def test_prebuilt_embeddings_are_verified(tiny_encoder, wiki_slice, cache, tmp_path):
    params = embedding_params(tiny_encoder, wiki_slice)
    embeddings = load_index(tiny_encoder, wiki_slice, cache, prebuilt_dir=tmp_path).embeddings
    path = save_prebuilt(embeddings, params, tmp_path)
    assert load_index(tiny_encoder, wiki_slice, cache, prebuilt_dir=tmp_path).source == "prebuilt"
    assert load_prebuilt({**params, "max_length": 128}, tmp_path) is None
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(PrebuiltIndexError, match="damaged"):
        load_prebuilt(params, tmp_path)
    rebuilt = load_index(tiny_encoder, wiki_slice, cache, prebuilt_dir=tmp_path)
    assert rebuilt.source == "cache"
    np.testing.assert_array_equal(rebuilt.embeddings, embeddings)


def test_retrieval_results_follow_the_model(tiny_bert_dir, wiki_slice, cache, tmp_path):
    """A changed pooling (a different fingerprint) never serves the other model's cached ranking."""
    mean = load_encoder(ModelSpec("tiny", str(tiny_bert_dir), pooling="mean", normalize=True))
    cls = load_encoder(ModelSpec("tiny", str(tiny_bert_dir), pooling="cls", normalize=True))
    rankings = []
    for encoder in (mean, cls):
        index = load_index(encoder, wiki_slice, cache, prebuilt_dir=tmp_path)
        rankings.append(retrieve(encoder, index, wiki_slice, "opera by Bizet", 10, cache=cache))
        fresh = retrieve(encoder, index, wiki_slice, "opera by Bizet", 10)
        assert rankings[-1] == fresh
    assert rankings[0].indices != rankings[1].indices
