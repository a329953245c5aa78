import numpy as np
import pytest
import torch

from core.pair import PRESETS, ModelLoadError, ModelSpec, custom_pair, load_encoder, load_pair, weights_fingerprint


def test_bert_cls_encoder_scores_are_dot_products(tiny_bert_dir):
    encoder = load_encoder(ModelSpec("tiny", str(tiny_bert_dir), pooling="cls", normalize=False))
    assert encoder.shared_towers and encoder.query.pooling == "cls"
    queries = encoder.encode_queries(["a capital city", "music of the twentieth century"])
    passages = encoder.encode_passages(["Paris"], ["Paris is the capital of France."])
    assert queries.shape == (2, 32) and passages.shape == (1, 32)
    batch = encoder.query.tokenize(["a capital city"])
    with torch.no_grad():
        hidden = encoder.query.model(**batch).last_hidden_state[0, 0].numpy()
    np.testing.assert_allclose(queries[0], hidden, rtol=1e-5, atol=1e-6)


def test_mean_pooling_ignores_padding(tiny_bert_dir):
    encoder = load_encoder(ModelSpec("tiny", str(tiny_bert_dir), pooling="mean", normalize=True))
    alone = encoder.encode_queries(["city"])
    padded = encoder.encode_queries(["city", "a much longer query about the history of music"], batch_size=2)
    np.testing.assert_allclose(alone[0], padded[0], rtol=1e-4, atol=1e-5)
    assert np.allclose(np.linalg.norm(padded, axis=1), 1.0, atol=1e-5)


def test_dpr_towers_use_their_own_classes_and_pooler(tiny_dpr_dirs):
    question, context = tiny_dpr_dirs
    encoder = load_encoder(ModelSpec("dpr", str(question), str(context)))
    assert type(encoder.query.model).__name__ == "DPRQuestionEncoder"
    assert type(encoder.context.model).__name__ == "DPRContextEncoder"
    assert encoder.query.pooling == "pooler" and not encoder.shared_towers
    q = encoder.encode_queries(["who wrote the opera"])
    p = encoder.encode_passages(["Carmen"], ["Carmen is an opera by Georges Bizet."])
    with torch.no_grad():
        expected = encoder.context.model(
            **encoder.context.tokenize(["Carmen"], ["Carmen is an opera by Georges Bizet."])
        ).pooler_output
    np.testing.assert_allclose(p[0], expected[0].numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(q[0], p[0])


def test_fingerprint_changes_with_any_weight(tiny_bert_dir):
    encoder = load_encoder(ModelSpec("tiny", str(tiny_bert_dir)))
    before = weights_fingerprint([encoder.query.model])
    assert before == weights_fingerprint([encoder.query.model])
    with torch.no_grad():
        encoder.query.model.encoder.layer[1].output.dense.bias[3] += 1e-3
    assert weights_fingerprint([encoder.query.model]) != before


def test_fingerprint_includes_pooling(tiny_bert_dir):
    cls = load_encoder(ModelSpec("tiny", str(tiny_bert_dir), pooling="cls"))
    mean = load_encoder(ModelSpec("tiny", str(tiny_bert_dir), pooling="mean"))
    assert cls.fingerprint != mean.fingerprint


def test_hub_presets_fail_with_one_clear_sentence(monkeypatch):
    monkeypatch.setattr("core.pair.hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ModelLoadError, match="no model hub is reachable"):
        load_pair("paper")
    with pytest.raises(ModelLoadError, match="Unknown preset"):
        load_pair("no-such-preset")


def test_local_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="Could not load the model"):
        load_encoder(ModelSpec("x", str(tmp_path)))


def test_presets_cover_the_paper_and_gpl():
    assert PRESETS["paper"].b.context_source == "facebook/dpr-ctx_encoder-single-nq-base"
    assert PRESETS["paper"].a.pooling == "cls"
    assert not PRESETS["offline"].needs_hub
    assert custom_pair("a", "b").needs_hub
