"""Shared fixtures: tiny random models of the real classes (no download) and small corpus slices."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast, DPRConfig, DPRContextEncoder, DPRQuestionEncoder

from core.cache import ResultCache
from core.corpus import Corpus, load_wiki
from core.pair import ModelSpec, load_encoder

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="session")
def wiki_slice() -> Corpus:
    return load_wiki(limit=120)


def _write_tokenizer(directory: Path, corpus: Corpus) -> BertTokenizerFast:
    words = sorted(
        {
            w
            for text in corpus.texts + corpus.titles + corpus.descriptions
            for w in re.findall(r"[a-z]+|\d|[^\sa-z\d]", text.lower())
        }
    )
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(SPECIALS + words[:3000]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True, model_max_length=128)
    tokenizer.save_pretrained(directory)
    return tokenizer


def tiny_bert_config(vocab_size: int, **overrides) -> BertConfig:
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    settings.update(overrides)
    return BertConfig(**settings)


def make_tiny_bert(
    directory: Path,
    corpus: Corpus,
    pooling: str | None = None,
    seed: int = 0,
    normalize: bool = False,
    **config_overrides,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _write_tokenizer(directory, corpus)
    torch.manual_seed(seed)
    BertModel(tiny_bert_config(len(tokenizer), **config_overrides)).save_pretrained(directory)
    if pooling:
        (directory / "dpr_lens.json").write_text(json.dumps({"pooling": pooling, "normalize": normalize}))
    return directory


def make_tiny_dpr(directory: Path, corpus: Corpus, seed: int = 0) -> tuple[Path, Path]:
    question, context = directory / "question", directory / "context"
    for path, model_class in ((question, DPRQuestionEncoder), (context, DPRContextEncoder)):
        path.mkdir(parents=True, exist_ok=True)
        tokenizer = _write_tokenizer(path, corpus)
        torch.manual_seed(seed + (path is context))
        config = DPRConfig(**tiny_bert_config(len(tokenizer)).to_dict())
        model_class(config).save_pretrained(path)
    return question, context


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, wiki_slice) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), wiki_slice)


@pytest.fixture(scope="session")
def tiny_dpr_dirs(tmp_path_factory, wiki_slice) -> tuple[Path, Path]:
    return make_tiny_dpr(tmp_path_factory.mktemp("tiny-dpr"), wiki_slice)


@pytest.fixture
def cache(tmp_path) -> ResultCache:
    result = ResultCache(tmp_path / "cache")
    yield result
    result.close()


@pytest.fixture(scope="module")
def tiny_dpr(tiny_dpr_dirs):
    """The tiny two-tower DPR encoder (separate question and context models)."""
    question, context = tiny_dpr_dirs
    return load_encoder(ModelSpec("dpr", str(question), str(context)))


@pytest.fixture(autouse=True)
def _not_public(monkeypatch):
    """The Docker image turns public mode on; tests that need it turn it on themselves."""
    monkeypatch.delenv("DPR_LENS_PUBLIC", raising=False)
