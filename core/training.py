"""DPR training of a twin: description -> article, in-batch negatives plus one BM25 hard negative.

The recipe follows Karpukhin et al. 2020 (in-batch negatives + a BM25 negative per query, NLL of
the positive); with normalised embeddings the similarity is scaled (cosine x scale).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .bm25 import rank_by_bm25
from .cli_args import cli_option
from .corpus import Corpus, description_queries, split_indices
from .pair import LENS_CONFIG, POOLINGS, Encoder, ModelSpec, load_encoder
from .train_loop import LoopSettings, run_training, seed_everything


@dataclass
class TrainConfig:
    base: str = cli_option("minilm:", "hub id, local directory, or minilm: (bundled MiniLM)")
    output: str = cli_option("assets/minilm-wiki-dpr", "directory for the trained twin")
    seed: int = cli_option(13, "seed of the batch order and of torch")
    epochs: int = cli_option(1, "passes over the training pairs")
    batch_size: int = cli_option(32, "queries per batch")
    learning_rate: float = cli_option(3e-5, "AdamW learning rate", flags=("--lr",))
    warmup_fraction: float = cli_option(0.1, "share of the steps spent warming the learning rate up")
    query_max_length: int = cli_option(32, "query length in tokens")
    passage_max_length: int = cli_option(128, "passage (title, extract) length in tokens")
    scale: float = cli_option(20.0, "factor on cosine similarities when the encoder normalises")
    max_steps: int | None = cli_option(None, "stop after this many steps")
    limit: int | None = cli_option(None, "use only the first N training articles")
    pooling: str | None = cli_option(
        None, "pooling of the base encoder (default: read from its directory)", choices=POOLINGS
    )
    save_fp16: bool = cli_option(True, "store the weights as float16")


@dataclass
class TrainReport:
    config: dict
    steps: int
    train_pairs: int
    held_out_articles: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    hardware: str = ""


@dataclass(frozen=True)
class TrainingExample:
    query: str
    positive: int
    hard_negative: int
    relevant: frozenset[int]


def bm25_hard_negatives(
    corpus: Corpus, train: Sequence[int], queries: Sequence[str], relevant: Sequence[frozenset[int]], depth: int = 20
) -> list[int]:
    """For each query, the best BM25 match among training articles that is not relevant to it."""
    rng = random.Random(0)
    negatives = []
    for row, gold in zip(rank_by_bm25(corpus, queries, depth, passages=train), relevant):
        candidates = [int(i) for i in row if int(i) not in gold]
        negatives.append(candidates[0] if candidates else rng.choice([i for i in train if i not in gold]))
    return negatives


def training_examples(corpus: Corpus, train: Sequence[int]) -> list[TrainingExample]:
    train_set = set(train)
    labelled = [q for q in description_queries(corpus, train)]
    relevant = [frozenset(i for i in q.relevant if i in train_set) for q in labelled]
    negatives = bm25_hard_negatives(corpus, list(train), [q.text for q in labelled], relevant)
    return [TrainingExample(q.text, q.source_index, n, r) for q, n, r in zip(labelled, negatives, relevant)]


def contrastive_loss(
    query_vectors: torch.Tensor,
    passage_vectors: torch.Tensor,
    batch: Sequence[TrainingExample],
    passage_indices: Sequence[int],
    scale: float,
) -> torch.Tensor:
    """NLL of each query's positive against all positives and hard negatives in the batch.

    Passages that are also relevant to a query (same description) are masked, not treated as negatives.
    """
    scores = query_vectors @ passage_vectors.T * scale
    mask = torch.tensor(
        [[p in example.relevant and p != example.positive for p in passage_indices] for example in batch]
    )
    scores = scores.masked_fill(mask, float("-inf"))
    return torch.nn.functional.cross_entropy(scores, torch.arange(len(batch)))


def train_step_vectors(
    encoder: Encoder, batch: Sequence[TrainingExample], corpus: Corpus, config: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    tower = encoder.query
    passage_indices = [e.positive for e in batch] + [e.hard_negative for e in batch]
    queries = tower.tokenize([e.query for e in batch], max_length=config.query_max_length)
    passages = tower.tokenize(
        [corpus.titles[i] for i in passage_indices],
        [corpus.texts[i] for i in passage_indices],
        max_length=config.passage_max_length,
    )
    return tower.forward(queries), tower.forward(passages), passage_indices


def batch_loss(encoder: Encoder, batch: Sequence[TrainingExample], corpus: Corpus, config: TrainConfig) -> torch.Tensor:
    query_vectors, passage_vectors, passage_indices = train_step_vectors(encoder, batch, corpus, config)
    scale = config.scale if encoder.query.normalize else 1.0
    return contrastive_loss(query_vectors, passage_vectors, batch, passage_indices, scale)


def shuffled_batches(
    examples: Sequence[TrainingExample], batch_size: int, generator: random.Random
) -> Iterator[list[TrainingExample]]:
    """Epoch after epoch: a fresh shuffle cut into full batches (the remainder of each epoch is left out)."""
    while True:
        order = list(range(len(examples)))
        generator.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield [examples[i] for i in order[start : start + batch_size]]


def train_dpr(config: TrainConfig, corpus: Corpus, progress: bool = True) -> tuple[Encoder, TrainReport]:
    seed_everything(config.seed)
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
    batches = shuffled_batches(examples, config.batch_size, random.Random(config.seed))
    result = run_training(
        encoder.query.model,
        batches,
        lambda batch: batch_loss(encoder, batch, corpus, config),
        LoopSettings(total, config.learning_rate, config.warmup_fraction, "DPR training"),
        progress=progress,
    )
    report = TrainReport(
        asdict(config), total, len(examples), len(held_out), result.seconds, result.losses, result.hardware
    )
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
    (output / LENS_CONFIG).write_text(
        json.dumps({"pooling": tower.pooling, "normalize": tower.normalize, "base": config.base}, indent=1) + "\n"
    )
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if tower.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (output / "modules.json").write_text(json.dumps(modules, indent=1) + "\n")
    (output / "1_Pooling").mkdir(exist_ok=True)
    (output / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": tower.dim,
                "pooling_mode_cls_token": tower.pooling in ("cls", "pooler"),
                "pooling_mode_mean_tokens": tower.pooling == "mean",
                "pooling_mode_max_tokens": False,
            },
            indent=1,
        )
        + "\n"
    )
    (output / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 256, "do_lower_case": False}) + "\n"
    )
    (output / "train_log.json").write_text(json.dumps(asdict(report)) + "\n")
    return output
