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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import (BertConfig, BertForPreTraining, BertTokenizerFast, DataCollatorForLanguageModeling,
                          get_linear_schedule_with_warmup)

from .corpus import Corpus
from .pair import LENS_CONFIG

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass
class PretrainConfig:
    output: str
    seed: int = 13
    vocab_size: int = 16_000
    layers: int = 4
    hidden: int = 256
    heads: int = 4
    intermediate: int = 1024
    max_length: int = 128
    batch_size: int = 32
    learning_rate: float = 5e-4
    warmup_fraction: float = 0.05
    max_steps: int = 2400
    mask_probability: float = 0.15
    eval_every: int = 250
    validation_percent: int = 2
    save_fp16: bool = True


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


def is_mlm_validation(title: str, percent: int) -> bool:
    """A fixed slice for the held-out MLM numbers, independent of the retrieval split's hash."""
    return int(hashlib.sha1(f"mlm:{title}".encode()).hexdigest(), 16) % 100 < percent


def train_wordpiece(texts: Sequence[str], vocab_size: int, directory: Path) -> BertTokenizerFast:
    from tokenizers import BertWordPieceTokenizer

    trainer = BertWordPieceTokenizer(lowercase=True, strip_accents=True)
    trainer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                show_progress=False)
    directory.mkdir(parents=True, exist_ok=True)
    trainer.save_model(str(directory))
    return BertTokenizerFast.from_pretrained(str(directory), do_lower_case=True, strip_accents=True)


def article_windows(tokenizer: BertTokenizerFast, corpus: Corpus, indices: Sequence[int],
                    max_length: int) -> list[list[int]]:
    """Every article as [CLS] title [SEP] extract [SEP] windows (the passage format used for retrieval)."""
    encoded = tokenizer([corpus.titles[i] for i in indices], [corpus.texts[i] for i in indices],
                        truncation="only_second", max_length=max_length, return_overflowing_tokens=True)
    return list(encoded["input_ids"])


def _batches(windows: list[list[int]], batch_size: int, generator: random.Random, bucket_batches: int = 50):
    """Shuffled batches of similar length (sorted within chunks of 50 batches): a third less padding."""
    while True:
        order = list(range(len(windows)))
        generator.shuffle(order)
        batches = []
        chunk = batch_size * bucket_batches
        for start in range(0, len(order), chunk):
            block = sorted(order[start:start + chunk], key=lambda i: len(windows[i]))
            batches += [block[i:i + batch_size] for i in range(0, len(block) - batch_size + 1, batch_size)]
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
    batches = [collator([{"input_ids": w} for w in windows[start:start + batch_size]])
               for start in range(0, len(windows), batch_size)]
    torch.random.set_rng_state(state)
    return batches


def pretrain_mlm(config: PretrainConfig, corpus: Corpus, progress: bool = True) -> tuple[BertForPreTraining,
                                                                                          BertTokenizerFast,
                                                                                          PretrainReport]:
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    output = Path(config.output)
    validation = [i for i, t in enumerate(corpus.titles) if is_mlm_validation(t, config.validation_percent)]
    validation_set = set(validation)
    train = [i for i in range(len(corpus)) if i not in validation_set]
    tokenizer = train_wordpiece([f"{corpus.titles[i]} {corpus.texts[i]}" for i in train], config.vocab_size, output)
    train_windows = article_windows(tokenizer, corpus, train, config.max_length)
    validation_windows = article_windows(tokenizer, corpus, validation, config.max_length)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=config.mask_probability,
                                               return_tensors="pt")
    validation_batches = fixed_validation_batches(collator, validation_windows, config.batch_size, config.seed)

    model = BertForPreTraining(BertConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden, num_hidden_layers=config.layers,
        num_attention_heads=config.heads, intermediate_size=config.intermediate,
        max_position_embeddings=max(512, config.max_length), pad_token_id=tokenizer.pad_token_id))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, int(config.warmup_fraction * config.max_steps),
                                               config.max_steps)
    report = PretrainReport(asdict(config), 0, len(train), len(validation), len(train_windows), 0.0)
    batches = _batches(train_windows, config.batch_size, random.Random(config.seed))
    started = time.perf_counter()
    bar = tqdm(total=config.max_steps, desc="MLM pre-training", disable=not progress)
    for step in range(1, config.max_steps + 1):
        batch = collator([{"input_ids": w} for w in next(batches)])
        loss, _, _ = mlm_loss_and_hits(model, batch)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        report.losses.append(round(loss.item(), 4))
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(report.losses[-50:]):.3f}")
        if step % config.eval_every == 0 or step == config.max_steps:
            evaluation = {"step": step, "minutes": round((time.perf_counter() - started) / 60, 1),
                          **evaluate_mlm(model, validation_batches)}
            report.evaluations.append(evaluation)
            bar.write(f"step {step}: held-out MLM loss {evaluation['loss']:.3f}, accuracy {evaluation['accuracy']:.3f}")
    bar.close()
    model.eval()
    report.steps = config.max_steps
    report.seconds = round(time.perf_counter() - started, 1)
    return model, tokenizer, report


def save_pretrained_model(model: BertForPreTraining, tokenizer: BertTokenizerFast, config: PretrainConfig,
                          report: PretrainReport) -> Path:
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

