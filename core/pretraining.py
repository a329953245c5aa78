"""Masked-language-model pre-training of a small BERT on the corpus: the offline stand-in for the
pre-trained BERT of the paper, so that "pre-trained LM vs the same LM after DPR training" runs offline.

A WordPiece vocabulary is trained on the corpus (tokenizers), then BERT's MLM objective (15% of the
tokens: 80% [MASK], 10% random, 10% kept; transformers' collator) on (title, extract) windows of every
article except a small fixed validation slice used for the held-out MLM loss and accuracy.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import BertConfig, BertForPreTraining, BertTokenizerFast, DataCollatorForLanguageModeling

from .cli_args import cli_option
from .corpus import Corpus
from .pair import LENS_CONFIG
from .train_loop import LoopSettings, run_training, seed_everything

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass
class PretrainConfig:
    output: str = cli_option("assets/mini-bert-wiki", "directory for the model and its WordPiece vocabulary")
    seed: int = cli_option(13, "seed of the initialisation, batch order and masking")
    vocab_size: int = cli_option(16_000, "WordPiece vocabulary size")
    layers: int = cli_option(4, "transformer layers")
    hidden: int = cli_option(256, "hidden size")
    heads: int = cli_option(4, "attention heads")
    intermediate: int | None = cli_option(None, "FFN size (default: 4 x hidden, as in BERT)")
    max_length: int = cli_option(128, "tokens per [CLS] title [SEP] extract [SEP] window")
    batch_size: int = cli_option(32, "windows per batch")
    learning_rate: float = cli_option(5e-4, "AdamW learning rate", flags=("--lr",))
    warmup_fraction: float = cli_option(0.05, "share of the steps spent warming the learning rate up")
    max_steps: int = cli_option(2400, "optimiser steps")
    mask_probability: float = cli_option(0.15, "share of the tokens to predict")
    eval_every: int = cli_option(250, "steps between held-out MLM evaluations")
    validation_percent: int = cli_option(2, "percent of the articles held out for the MLM evaluations")
    save_fp16: bool = cli_option(True, "store the weights as float16")

    def __post_init__(self):
        if self.intermediate is None:
            self.intermediate = 4 * self.hidden


@dataclass
class PretrainReport:
    config: dict
    steps: int
    train_articles: int
    validation_articles: int
    train_windows: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)
    hardware: str = ""


def is_mlm_validation(title: str, percent: int) -> bool:
    """A fixed slice for the held-out MLM numbers, independent of the retrieval split's hash."""
    return int(hashlib.sha1(f"mlm:{title}".encode()).hexdigest(), 16) % 100 < percent


def train_wordpiece(texts: Sequence[str], vocab_size: int, directory: Path) -> BertTokenizerFast:
    from tokenizers import BertWordPieceTokenizer

    trainer = BertWordPieceTokenizer(lowercase=True, strip_accents=True)
    trainer.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    directory.mkdir(parents=True, exist_ok=True)
    trainer.save_model(str(directory))
    return BertTokenizerFast.from_pretrained(str(directory), do_lower_case=True, strip_accents=True)


def article_windows(
    tokenizer: BertTokenizerFast, corpus: Corpus, indices: Sequence[int], max_length: int
) -> list[list[int]]:
    """Every article as [CLS] title [SEP] extract [SEP] windows (the passage format used for retrieval)."""
    encoded = tokenizer(
        [corpus.titles[i] for i in indices],
        [corpus.texts[i] for i in indices],
        truncation="only_second",
        max_length=max_length,
        return_overflowing_tokens=True,
    )
    return list(encoded["input_ids"])


def _batches(windows: list[list[int]], batch_size: int, generator: random.Random, bucket_batches: int = 50):
    """Shuffled batches of similar length (sorted within chunks of 50 batches): a third less padding."""
    while True:
        order = list(range(len(windows)))
        generator.shuffle(order)
        batches = []
        chunk = batch_size * bucket_batches
        for start in range(0, len(order), chunk):
            block = sorted(order[start : start + chunk], key=lambda i: len(windows[i]))
            batches += [block[i : i + batch_size] for i in range(0, len(block) - batch_size + 1, batch_size)]
        generator.shuffle(batches)
        for batch in batches:
            yield [windows[i] for i in batch]


def mlm_loss_and_hits(model: BertForPreTraining, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
    # The vocabulary projection only at the masked positions: over all positions it costs more than the encoder.
    hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    masked = batch["labels"] != -100
    logits = model.cls.predictions(hidden[masked])
    labels = batch["labels"][masked]
    loss = torch.nn.functional.cross_entropy(logits, labels)
    hits = int((logits.argmax(-1) == labels).sum())
    return loss, hits, int(masked.sum())


@torch.no_grad()
def evaluate_mlm(model: BertForPreTraining, batches: list[dict[str, torch.Tensor]]) -> dict:
    model.eval()
    total_loss, hits, masked = 0.0, 0, 0
    for batch in batches:
        loss, batch_hits, batch_masked = mlm_loss_and_hits(model, batch)
        total_loss += float(loss) * batch_masked
        hits += batch_hits
        masked += batch_masked
    model.train()
    return {"loss": total_loss / masked, "accuracy": hits / masked, "masked_tokens": masked}


def fixed_validation_batches(collator, windows: list[list[int]], batch_size: int, seed: int) -> list[dict]:
    """The same masked positions at every evaluation, so the curve compares like with like."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    batches = [
        collator([{"input_ids": w} for w in windows[start : start + batch_size]])
        for start in range(0, len(windows), batch_size)
    ]
    torch.random.set_rng_state(state)
    return batches


def pretrain_mlm(
    config: PretrainConfig, corpus: Corpus, progress: bool = True
) -> tuple[BertForPreTraining, BertTokenizerFast, PretrainReport]:
    seed_everything(config.seed)
    output = Path(config.output)
    validation = [i for i, t in enumerate(corpus.titles) if is_mlm_validation(t, config.validation_percent)]
    validation_set = set(validation)
    train = [i for i in range(len(corpus)) if i not in validation_set]
    tokenizer = train_wordpiece([f"{corpus.titles[i]} {corpus.texts[i]}" for i in train], config.vocab_size, output)
    train_windows = article_windows(tokenizer, corpus, train, config.max_length)
    validation_windows = article_windows(tokenizer, corpus, validation, config.max_length)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=config.mask_probability, return_tensors="pt")
    validation_batches = fixed_validation_batches(collator, validation_windows, config.batch_size, config.seed)

    model = BertForPreTraining(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.hidden,
            num_hidden_layers=config.layers,
            num_attention_heads=config.heads,
            intermediate_size=config.intermediate,
            max_position_embeddings=max(512, config.max_length),
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # Collated one step at a time: masking and dropout draw on the same torch generator, so their order fixes the run.
    batches = (
        collator([{"input_ids": window} for window in windows])
        for windows in _batches(train_windows, config.batch_size, random.Random(config.seed))
    )

    def evaluate(step: int) -> dict:
        evaluation = evaluate_mlm(model, validation_batches)
        tqdm.write(f"step {step}: held-out MLM loss {evaluation['loss']:.3f}, accuracy {evaluation['accuracy']:.3f}")
        return evaluation

    settings = LoopSettings(
        config.max_steps,
        config.learning_rate,
        config.warmup_fraction,
        "MLM pre-training",
        loss_window=50,
        evaluate_every=config.eval_every,
    )
    result = run_training(
        model, batches, lambda batch: mlm_loss_and_hits(model, batch)[0], settings, evaluate, progress
    )
    report = PretrainReport(
        asdict(config),
        config.max_steps,
        len(train),
        len(validation),
        len(train_windows),
        result.seconds,
        [round(loss, 4) for loss in result.losses],
        result.evaluations,
        result.hardware,
    )
    return model, tokenizer, report


def save_pretrained_model(
    model: BertForPreTraining, tokenizer: BertTokenizerFast, config: PretrainConfig, report: PretrainReport
) -> Path:
    """A standard transformers directory: AutoModel gives the encoder, AutoModelForMaskedLM the MLM head."""
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    if config.save_fp16:
        model.to(torch.float16)
    model.save_pretrained(output, safe_serialization=True)
    model.to(torch.float32)
    tokenizer.save_pretrained(output)
    (output / LENS_CONFIG).write_text(json.dumps({"pooling": "cls", "normalize": False, "base": None}, indent=1) + "\n")
    (output / "pretrain_log.json").write_text(json.dumps(asdict(report)) + "\n")
    return output
