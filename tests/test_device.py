"""The device chooser, tensors on the model's device, the bf16 encoding tolerance and the batched Figure-1 rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core import device as dev
from core import neuron_attribution as na
from core.cli import build_parser, main
from core.device import DeviceError
from core.pair import ModelSpec, load_encoder

QUERIES = [
    "the opera composed by a french musician",
    "capital city of france",
    "a river",
    "which scientist discovered penicillin in a london laboratory",
    "the largest planet",
    "who painted the famous portrait of a smiling woman",
]


@pytest.fixture(autouse=True)
def _fresh_choice(monkeypatch):
    """Each test chooses the device itself; the process's own choice is restored afterwards."""
    monkeypatch.delenv(dev.DEVICE_ENV, raising=False)
    monkeypatch.delenv(dev.ENCODE_DTYPE_ENV, raising=False)
    saved = dict(dev._chosen)
    yield
    dev._chosen.clear()
    dev._chosen.update(saved)
    dev.memory_scale.cache_clear()


@pytest.fixture(scope="module")
def tiny_bert(tiny_bert_dir):
    return load_encoder(ModelSpec("tiny", str(tiny_bert_dir), pooling="mean", normalize=True))


def test_default_is_cuda_when_available_else_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dev.resolve_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dev.resolve_device() == torch.device("cuda", 0)
    assert dev.resolve_device("cuda:1") == torch.device("cuda", 1)


def test_env_and_argument_override_the_default(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv(dev.DEVICE_ENV, "cpu")
    assert dev.resolve_device() == torch.device("cpu")
    monkeypatch.setenv(dev.DEVICE_ENV, "cuda")
    assert dev.resolve_device("cpu") == torch.device("cpu")  # --device beats the environment
    assert dev.use_device() == torch.device("cuda", 0) == dev.model_device()


@pytest.mark.parametrize(
    "name, message",
    [
        ("cuda", "Device 'cuda' was requested but this machine has no CUDA GPU."),
        ("cuda:3", "Device 'cuda:3' was requested but this machine has no CUDA GPU."),
        ("gpu0", "Unknown device 'gpu0': use cpu, cuda or cuda:N."),
        ("meta", "Device 'meta' is not supported: use cpu, cuda or cuda:N."),
    ],
)
def test_an_unavailable_device_is_one_sentence(monkeypatch, name, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError) as error:
        dev.resolve_device(name)
    assert str(error.value) == message


def test_every_command_takes_device_and_refuses_a_missing_one(monkeypatch, capsys):
    commands = build_parser()._subparsers._group_actions[0].choices
    assert all(
        "--device" in parser.format_help() and "--encode-dtype" in parser.format_help() for parser in commands.values()
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        main(["evaluate", "--device", "cuda"])
    assert "error: Device 'cuda' was requested but this machine has no CUDA GPU." in capsys.readouterr().err
    with pytest.raises(DeviceError, match="Unknown encoding precision 'fp8'"):
        dev.resolve_encode_dtype("fp8")


def test_batch_sizes_keep_the_cpu_constants_and_grow_with_gpu_memory(monkeypatch):
    assert dev.scaled(4096, torch.device("cpu")) == 4096
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (100 * 1024**3, 141 * 1024**3))
    scale = dev.memory_scale(torch.device("cuda", 0))
    assert scale == pytest.approx(dev.SAFETY_FRACTION * 100 / 2)
    assert dev.scaled(20_000, torch.device("cuda", 0)) == int(20_000 * scale)
    assert dev.scaled(128, torch.device("cuda", 0), cap=1024) == 1024


def test_tokenize_returns_tensors_on_the_models_device(tiny_bert):
    tower = tiny_bert.query
    batch = tower.tokenize(QUERIES[:2], return_offsets_mapping=True)
    assert {value.device for value in batch.values()} == {tower.device} == {next(tower.model.parameters()).device}


def test_bf16_encoding_agrees_with_fp32_within_the_stated_tolerance(tiny_bert, wiki_slice):
    """bf16 autocast encoding vs fp32 on a small slice: cosine >= 0.99 per passage and per query, and top-10
    retrievals of the queries overlapping at least 80% on average."""
    titles, texts = wiki_slice.titles[:100], wiki_slice.texts[:100]
    queries = [text[:60] for text in wiki_slice.texts[100:120]]
    encoded = {}
    for dtype in ("fp32", "bf16"):
        dev.use_device("cpu", dtype)
        encoded[dtype] = (tiny_bert.encode_passages(titles, texts, max_length=64), tiny_bert.encode_queries(queries))
    for full, reduced in zip(encoded["fp32"], encoded["bf16"]):
        assert not np.array_equal(full, reduced)  # autocast did run in bf16
        cosine = (full * reduced).sum(1) / np.linalg.norm(full, axis=1) / np.linalg.norm(reduced, axis=1)
        assert cosine.min() >= 0.99
    top = {dtype: np.argsort(-(q @ p.T), axis=1)[:, :10] for dtype, (p, q) in encoded.items()}
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top["fp32"], top["bf16"])])
    assert overlap >= 0.8


def test_reduced_precision_is_part_of_the_fingerprint(tiny_bert_dir):
    spec = ModelSpec("tiny", str(tiny_bert_dir), pooling="mean", normalize=True)
    dev.use_device("cpu", "fp32")
    full = load_encoder(spec).fingerprint
    dev.use_device("cpu", "bf16")
    assert load_encoder(spec).fingerprint != full


def test_queries_batched_give_the_scores_of_one_at_a_time(tiny_bert):
    """Padded rows of several queries in one pass (masks respected) equal each query alone, also split over passes."""
    tower = tiny_bert.query
    targets = np.random.default_rng(5).normal(size=(len(QUERIES), tower.dim)).astype(np.float32)
    batch = tower.tokenize(QUERIES)
    assert batch["attention_mask"].float().mean() < 0.9  # real padding
    single = [
        na.attribute_neurons(tower, tower.tokenize([query]), target, steps=5) for query, target in zip(QUERIES, targets)
    ]
    for budget in (None, 300):
        batched = na.attribute_neurons_batch(tower, batch, targets, steps=5, max_token_layers=budget)
        for alone, together in zip(single, batched):
            assert together.tokens == alone.tokens
            assert together.score == pytest.approx(alone.score, rel=1e-5, abs=1e-6)
            for site in na.SITES:
                np.testing.assert_allclose(
                    together.scores[site], alone.scores[site], rtol=1e-5, atol=1e-5 * np.abs(alone.scores[site]).max()
                )
                np.testing.assert_allclose(
                    together.baseline_scores[site], alone.baseline_scores[site], rtol=1e-5, atol=1e-6
                )


def test_the_aggregate_bundles_queries_of_similar_length(tiny_bert, cache):
    bundles = na.query_bundles([10, 30, 11, 12, 29, 4], layers=2, steps=5, max_token_layers=2_000)
    assert sorted(i for bundle in bundles for i in bundle) == list(range(6))
    assert [5] in bundles and all(len(bundle) > 1 for bundle in bundles if 5 not in bundle)
    tower = tiny_bert.query
    targets = np.random.default_rng(6).normal(size=(len(QUERIES), tower.dim)).astype(np.float32)
    aggregate = na.aggregate_chunk(tiny_bert, QUERIES, list(range(len(QUERIES))), targets, steps=4, cache=cache)
    for number, (query, target) in enumerate(zip(QUERIES, targets)):
        alone = na.attribute_neurons(tower, tower.tokenize([query]), target, steps=4)
        stored = na.NEURON_ATTRIBUTION.lookup(
            cache, **na._attribution_key(tiny_bert, "query", tower.tokenize([query]), [query], target, 4)
        )
        assert stored is not None  # cached per query, as attribute_query finds it
        for site in na.SITES:
            np.testing.assert_allclose(
                aggregate.scores[site][number],
                alone.scores[site],
                rtol=1e-4,
                atol=1e-5 * np.abs(alone.scores[site]).max(),
            )
