"""DPR training of a twin: description -> article, in-batch negatives plus one BM25 hard negative.

The recipe follows Karpukhin et al. 2020 (in-batch negatives + a BM25 negative per query, NLL of
the positive); with normalised embeddings the similarity is scaled (cosine x scale).
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from .corpus import Corpus, description_queries, split_indices
from .pair import LENS_CONFIG, Encoder, ModelSpec, load_encoder


@dataclass
class TrainConfig:
    base: str
    output: str
    seed: int = 13
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 3e-5
    warmup_fraction: float = 0.1
    query_max_length: int = 32
    passage_max_length: int = 128
    scale: float = 20.0
    max_steps: int | None = None
    limit: int | None = None
    pooling: str | None = None
    save_fp16: bool = True


@dataclass
class TrainReport:
    config: dict
    steps: int
    train_pairs: int
    held_out_articles: int
    seconds: float
    losses: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class TrainingExample:
    query: str
    positive: int
    hard_negative: int
    relevant: frozenset[int]


def bm25_hard_negatives(corpus: Corpus, train: Sequence[int], queries: Sequence[str],
                        relevant: Sequence[frozenset[int]], depth: int = 20) -> list[int]:
    """For each query, the best BM25 match among training articles that is not relevant to it."""
    import bm25s

    passages = [f"{corpus.titles[i]} {corpus.texts[i]}" for i in train]
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(passages, stopwords="en", show_progress=False), show_progress=False)
    tokens = bm25s.tokenize(list(queries), stopwords="en", show_progress=False)
    results, _ = retriever.retrieve(tokens, k=min(depth, len(train)), show_progress=False)
    rng = random.Random(0)
    negatives = []
    for row, gold in zip(results, relevant):
        candidates = [train[j] for j in row if train[j] not in gold]
        negatives.append(candidates[0] if candidates else rng.choice([i for i in train if i not in gold]))
    return negatives


def training_examples(corpus: Corpus, train: Sequence[int]) -> list[TrainingExample]:
    train_set = set(train)
    labelled = [q for q in description_queries(corpus, train)]
    relevant = [frozenset(i for i in q.relevant if i in train_set) for q in labelled]
    negatives = bm25_hard_negatives(corpus, list(train), [q.text for q in labelled], relevant)
    return [TrainingExample(q.text, q.source_index, n, r) for q, n, r in zip(labelled, negatives, relevant)]


def contrastive_loss(query_vectors: torch.Tensor, passage_vectors: torch.Tensor, batch: Sequence[TrainingExample],
                     passage_indices: Sequence[int], scale: float) -> torch.Tensor:
    """NLL of each query's positive against all positives and hard negatives in the batch.

    Passages that are also relevant to a query (same description) are masked, not treated as negatives.
    """
    scores = query_vectors @ passage_vectors.T * scale
    mask = torch.tensor([[p in example.relevant and p != example.positive for p in passage_indices]
                         for example in batch])
    scores = scores.masked_fill(mask, float("-inf"))
    return torch.nn.functional.cross_entropy(scores, torch.arange(len(batch)))


def train_step_vectors(encoder: Encoder, batch: Sequence[TrainingExample], corpus: Corpus,
                       config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    tower = encoder.query
    passage_indices = [e.positive for e in batch] + [e.hard_negative for e in batch]
    queries = tower.tokenize([e.query for e in batch], max_length=config.query_max_length)
    passages = tower.tokenize([corpus.titles[i] for i in passage_indices],
                              [corpus.texts[i] for i in passage_indices], max_length=config.passage_max_length)
    return tower.forward(queries), tower.forward(passages), passage_indices


def batch_loss(encoder: Encoder, batch: Sequence[TrainingExample], corpus: Corpus, config: TrainConfig) -> torch.Tensor:
    query_vectors, passage_vectors, passage_indices = train_step_vectors(encoder, batch, corpus, config)
    scale = config.scale if encoder.query.normalize else 1.0
    return contrastive_loss(query_vectors, passage_vectors, batch, passage_indices, scale)


def train_dpr(config: TrainConfig, corpus: Corpus, progress: bool = True) -> tuple[Encoder, TrainReport]:
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    encoder = load_encoder(ModelSpec("base", config.base, pooling=config.pooling))
    if not encoder.shared_towers:
        raise ValueError("DPR training here starts from one shared-weight encoder, not a two-tower model.")
    train, held_out = split_indices(corpus)
    if config.limit:
        train = train[: config.limit]
    examples = training_examples(corpus, train)
    steps_per_epoch = len(examples) // config.batch_size
    total = steps_per_epoch * config.epochs
    if config.max_steps:
        total = min(total, config.max_steps)
    if total < 1:
        raise ValueError(f"{len(examples)} training pairs are fewer than one batch of {config.batch_size}.")
    model = encoder.query.model
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, int(config.warmup_fraction * total), total)
    generator = random.Random(config.seed)
    losses: list[float] = []
    started = time.perf_counter()
    bar = tqdm(total=total, desc="DPR training", disable=not progress)
    step = 0
    while step < total:
        order = list(range(len(examples)))
        generator.shuffle(order)
        for start in range(0, steps_per_epoch * config.batch_size, config.batch_size):
            if step >= total:
                break
            batch = [examples[i] for i in order[start:start + config.batch_size]]
            loss = batch_loss(encoder, batch, corpus, config)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    bar.close()
    model.eval()
    report = TrainReport(asdict(config), step, len(examples), len(held_out),
                         round(time.perf_counter() - started, 1), losses)
    return encoder, report


def save_twin(encoder: Encoder, config: TrainConfig, report: TrainReport) -> Path:
    """A standard transformers directory, loadable by sentence-transformers too."""
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    model = encoder.query.model
    if config.save_fp16:
        model = model.to(torch.float16)
    model.save_pretrained(output, safe_serialization=True)
    encoder.query.model.to(torch.float32)
    encoder.query.tokenizer.save_pretrained(output)
    tower = encoder.query
    (output / LENS_CONFIG).write_text(json.dumps(
        {"pooling": tower.pooling, "normalize": tower.normalize, "base": config.base}, indent=1) + "\n")
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if tower.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (output / "modules.json").write_text(json.dumps(modules, indent=1) + "\n")
    (output / "1_Pooling").mkdir(exist_ok=True)
    (output / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": tower.dim,
        "pooling_mode_cls_token": tower.pooling in ("cls", "pooler"),
        "pooling_mode_mean_tokens": tower.pooling == "mean",
        "pooling_mode_max_tokens": False,
    }, indent=1) + "\n")
    (output / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": 256, "do_lower_case": False}) + "\n")
    (output / "train_log.json").write_text(json.dumps(asdict(report)) + "\n")
    return output
