"""Shared fixtures: tiny random models of the real classes (no download) and small corpus slices."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    BertTokenizerFast,
    DistilBertConfig,
    DistilBertForMaskedLM,
    DPRConfig,
    DPRContextEncoder,
    DPRQuestionEncoder,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaTokenizerFast,
    XLMRobertaConfig,
    XLMRobertaForMaskedLM,
)

from core.cache import ResultCache
from core.corpus import Corpus, load_wiki
from core.corpus_stream import write_tsv
from core.pair import ModelSpec, load_encoder
from core.training import TrainConfig

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


def tiny_run(tmp_path, wiki_slice, **settings) -> tuple[Path, TrainConfig]:
    """A tiny random base and the settings of a fast training run from it on the slice."""
    base = make_tiny_bert(tmp_path / "base", wiki_slice, pooling="mean", normalize=True, initializer_range=0.2)
    config = TrainConfig(
        base=str(base),
        output=str(tmp_path / "twin"),
        seed=3,
        batch_size=16,
        learning_rate=1e-3,
        warmup_fraction=0.0,
        passage_max_length=64,
        **settings,
    )
    return base, config


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
def wiki_2000() -> Corpus:
    return load_wiki(limit=2000)


@pytest.fixture(scope="session")
def tsv_path(tmp_path_factory, wiki_2000) -> Path:
    """The first 2,000 bundled passages in DPR's psgs_w100.tsv layout."""
    path = tmp_path_factory.mktemp("psgs") / "psgs_w100.tsv"
    write_tsv(path, wiki_2000)
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, wiki_slice) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), wiki_slice)


@pytest.fixture(scope="session")
def tiny_dpr_dirs(tmp_path_factory, wiki_slice) -> tuple[Path, Path]:
    return make_tiny_dpr(tmp_path_factory.mktemp("tiny-dpr"), wiki_slice)


def _blank_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), "white").save(buffer, format="PNG")
    return buffer.getvalue()


QUICK_PNG = _blank_png()


def quick_cloud(weights: dict[str, float], colormap: str) -> bytes:
    """Stands in for the word-cloud renderer (~0.4 s of CPU per cloud) where the cloud's pixels are not under test."""
    assert weights and min(weights.values()) > 0
    return QUICK_PNG


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real app (streamlit run) for one test module, on the bundled corpus, with a cache shared by the modules."""
    from bench.browser import AppServer

    app = AppServer(
        tmp_path_factory.mktemp("server") / "streamlit.log", cache_dir=tmp_path_factory.getbasetemp() / "browser-cache"
    )
    try:
        app.start(timeout=120)
    except RuntimeError as error:
        pytest.fail(str(error))
    yield app
    app.stop()


@pytest.fixture(scope="module")
def browser():
    """Debian chromium driven by Playwright for one test module; skipped where either is missing."""
    sync_api = pytest.importorskip("playwright.sync_api")
    from bench.browser import chromium_available, launch_chromium

    if not chromium_available():
        pytest.skip("chromium is not installed (make browser)")
    with sync_api.sync_playwright() as playwright:
        instance = launch_chromium(playwright)
        yield instance
        instance.close()


def tiny_pair_state(tiny_bert_dir: Path, tiny_dpr_dirs: tuple[Path, Path]) -> dict[str, str]:
    """Session state choosing the custom pair tiny BERT (A) vs tiny DPR (B) on a page under AppTest."""
    question, context = tiny_dpr_dirs
    return {
        "pair_key": "custom",
        "custom_a": str(tiny_bert_dir),
        "custom_b": str(question),
        "custom_b_context": str(context),
    }


@pytest.fixture(scope="session")
def tiny_spec(tiny_bert_dir) -> ModelSpec:
    """The tiny BERT as a custom model (pooling read from its directory), as Ray workers load it again."""
    return ModelSpec("tiny", str(tiny_bert_dir))


@pytest.fixture(scope="module")
def tiny(tiny_spec):
    return load_encoder(tiny_spec)


@pytest.fixture(scope="module")
def tiny_encoder(tiny_bert_dir):
    return load_encoder(ModelSpec("tiny", str(tiny_bert_dir), pooling="mean", normalize=True))


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


# ---- one tiny random masked-LM per model family (adapters, patching) ----

FAMILIES = ("bert", "distilbert", "roberta", "xlm-roberta")
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4: pad 1, as RoBERTa's padding_idx
FAMILY_POOLING = {
    "bert": ("mean", True),
    "distilbert": ("cls", False),
    "roberta": ("mean", True),
    "xlm-roberta": ("mean", False),
}
FAMILY_QUERY = "a river in northern europe"
FAMILY_TITLE, FAMILY_TEXT = "Danube", "The Danube is a river that flows through Vienna and Budapest into the Black Sea."


def _copy_bert_tokenizer(source: Path, directory: Path) -> int:
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, directory / name)
    return len((source / "vocab.txt").read_text().splitlines())


def _write_roberta_tokenizer(directory: Path, corpus) -> int:
    """A tiny byte-level BPE with RoBERTa's specials, as a RobertaTokenizerFast."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [*corpus.titles, *corpus.texts, *corpus.descriptions, FAMILY_QUERY, FAMILY_TEXT],
        vocab_size=600,
        special_tokens=ROBERTA_SPECIALS,
        show_progress=False,
    )
    bpe.save_model(str(directory))
    tokenizer = RobertaTokenizerFast(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=126)
    assert (tokenizer.pad_token_id, tokenizer.mask_token) == (1, "<mask>")
    tokenizer.save_pretrained(directory)
    return len(tokenizer)


def _roberta_settings(vocab: int, **overrides) -> dict:
    settings = dict(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=40,
        max_position_embeddings=128,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    settings.update(overrides)
    return settings


def make_family_model(family: str, directory: Path, corpus, tiny_bert_dir: Path) -> Path:
    """A tiny random masked-LM of the family (its encoder is what load_encoder reads) with a tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(FAMILIES.index(family))
    if family == "bert":
        vocab = _copy_bert_tokenizer(tiny_bert_dir, directory)
        model = BertForMaskedLM(tiny_bert_config(vocab))
    elif family == "distilbert":
        vocab = _copy_bert_tokenizer(tiny_bert_dir, directory)
        model = DistilBertForMaskedLM(
            DistilBertConfig(
                vocab_size=vocab,
                dim=32,
                n_layers=3,
                n_heads=2,
                hidden_dim=48,
                max_position_embeddings=128,
                dropout=0.0,
                attention_dropout=0.0,
            )
        )
    elif family == "roberta":
        model = RobertaForMaskedLM(RobertaConfig(**_roberta_settings(_write_roberta_tokenizer(directory, corpus))))
    else:
        model = XLMRobertaForMaskedLM(
            XLMRobertaConfig(
                **_roberta_settings(
                    _write_roberta_tokenizer(directory, corpus), num_hidden_layers=3, intermediate_size=56
                )
            )
        )
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, wiki_slice, tiny_bert_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: make_family_model(family, root / family, wiki_slice, tiny_bert_dir) for family in FAMILIES}


@pytest.fixture(scope="module")
def family_encoders(family_dirs):
    loaded = {}
    for family, directory in family_dirs.items():
        pooling, normalize = FAMILY_POOLING[family]
        loaded[family] = load_encoder(ModelSpec(family, str(directory), pooling=pooling, normalize=normalize))
    return loaded
