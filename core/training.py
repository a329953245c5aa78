"""DPR training of a twin: queries -> article, in-batch negatives plus one BM25 hard negative.

The recipe follows Karpukhin et al. 2020 (in-batch negatives + a BM25 negative per query, NLL of
the positive); with normalised embeddings the similarity is scaled (cosine x scale).

Query styles (all from training articles only, all offline):
- description: the article's Wikipedia description ("Shaped head covering").
- question: the lead's defining sentence turned into a question with the subject taken out
  ("A hat is a head covering ..." -> "what is a head covering ...?"); positive = the whole lead.
- ict: inverse cloze (Lee et al. 2019, ORQA): a random sentence of the lead is the query and the lead
  without that sentence is the positive.
The sentence-shaped styles aim at natural questions, which description-only training does not teach. A twin
trained on all three for 360 steps beat the description-only twin on the development questions (R@1 0.594 ->
0.638) with no measurable change on the held-out descriptions, but neither it nor any earlier run beat the base's
R@10 there (62 of 69), and on the large test set it lost to the base at R@10 (202 against 208 of 219).

Distillation (`--distill-weight`) keeps the base's in-batch ranking for the sentence-shaped queries. The same
360 steps with weight 1.0 on the question and ict queries beat the base at R@10 on all three question sets
(63/69, 58/59, 215/219) but lose R@1 on the held-out descriptions against the undistilled twin (0.640 against
0.700, paired difference -0.060 [-0.086, -0.036]). The shipped twin is the equal-weight mean of the two
(`python -m core soup`, core/soup.py; its card, assets/minilm-wiki-dpr/README.md). It was shipped by a rule
fixed before the distilled run's results were seen: beat the base at R@1 and R@10 on the development questions
(R@1 0.623 against 0.464; R@10 63 against 62 of 69), and be not measurably worse than the undistilled twin on
the descriptions (R@1 -0.013 [-0.031, +0.005]). On the two test sets it also has higher R@1 and R@10 than the
base (58 and 211 against 57 and 208 at R@10, intervals that include 0).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .bm25 import rank_by_bm25
from .cli_args import cli_option, config_command
from .corpus import Corpus, LabelledQuery, description_queries, split_indices
from .errors import LensError
from .pair import LENS_CONFIG, POOLINGS, Encoder, ModelSpec, load_encoder
from .train_loop import LoopSettings, run_training, seed_everything

QUERY_STYLES = ("description", "question", "ict")


@dataclass
class TrainConfig:
    base: str = cli_option("minilm:", "hub id, local directory, or minilm: (bundled MiniLM)")
    output: str = cli_option("build/twin", "directory for the trained twin")
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
    query_styles: tuple[str, ...] = cli_option(
        ("description",),
        "kinds of training queries, pooled and shuffled together (see core/training.py)",
        choices=QUERY_STYLES,
    )
    distill_weight: float = cli_option(
        0.0,
        "weight of a term that keeps each query's in-batch score distribution close to the base's (learning "
        "without forgetting, Li and Hoiem 2016); 0 trains without it",
    )
    distill_styles: tuple[str, ...] = cli_option(
        ("question", "ict"),
        "query styles the distillation term applies to: the sentence-shaped ones, which the base already ranks "
        "well, leaving the descriptions free to move",
        choices=QUERY_STYLES,
    )


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
    positive_text: str | None = None  # the passage text of the positive when it is not the whole lead (ICT)
    style: str = "description"


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


SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
# "Paris is the capital ..." / "In mathematics, a field is ...": subject, then the first is/was/are/were.
DEFINITION = re.compile(r"^(?P<subject>[^.;:]{1,120}?)\s(?P<verb>is|was|are|were)\s(?P<rest>.+)$", re.DOTALL)
PERSON_WORDS = re.compile(r"\b(he|she|his|her|him)\b", re.IGNORECASE)
QUESTION_WORDS = 24


def lead_sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(" ".join(text.split())) if len(s.split()) >= 4]


def defining_question(title: str, text: str) -> str | None:
    """The lead's first sentence as a question about its subject, or None when it is not "<subject> is ...".

    The subject must mention the title (so the question is about the article) and is left out of the question.
    """
    sentences = lead_sentences(text)
    if not sentences:
        return None
    match = DEFINITION.match(sentences[0])
    title_words = {w for w in re.findall(r"\w+", title.casefold()) if len(w) > 2} or set(title.casefold().split())
    if not match or not title_words & set(re.findall(r"\w+", match["subject"].casefold())):
        return None
    rest = re.sub(r"\s*\([^)]*\)", "", match["rest"]).rstrip(" .")
    words = rest.split()[:QUESTION_WORDS]
    if len(words) < 3 or title.casefold() in " ".join(words).casefold():
        return None
    asker = "who" if PERSON_WORDS.search(" ".join(sentences[:3])) else "what"
    return f"{asker} {match['verb']} {' '.join(words).rstrip(',;:')}?"


def question_queries(corpus: Corpus, indices: Sequence[int]) -> list[LabelledQuery]:
    queries = []
    for i in indices:
        question = defining_question(corpus.titles[i], corpus.texts[i])
        if question:
            queries.append(LabelledQuery(question, i, frozenset({i})))
    return queries


def inverse_cloze_pairs(corpus: Corpus, indices: Sequence[int], seed: int) -> list[tuple[LabelledQuery, str]]:
    """One (sentence, rest of the lead) pair per article with at least two sentences; the sentence is seeded."""
    rng = random.Random(seed)
    pairs = []
    for i in indices:
        sentences = lead_sentences(corpus.texts[i])
        if len(sentences) < 2:
            continue
        pick = rng.randrange(len(sentences))
        rest = " ".join(sentences[:pick] + sentences[pick + 1 :])
        pairs.append((LabelledQuery(sentences[pick], i, frozenset({i})), rest))
    return pairs


def training_examples(
    corpus: Corpus, train: Sequence[int], styles: Sequence[str] = ("description",), seed: int = 0
) -> list[TrainingExample]:
    """Training pairs of the given query styles, from the `train` articles only, in style order."""
    if unknown := set(styles) - set(QUERY_STYLES):
        raise ValueError(f"Unknown query style(s) {sorted(unknown)}; choose from {QUERY_STYLES}.")
    train_set = set(train)
    labelled: list[LabelledQuery] = []
    positive_texts: list[str | None] = []
    example_styles: list[str] = []
    for style in styles:
        if style == "description":
            found = description_queries(corpus, train)
            texts = [None] * len(found)
        elif style == "question":
            found = question_queries(corpus, train)
            texts = [None] * len(found)
        else:
            pairs = inverse_cloze_pairs(corpus, train, seed)
            found, texts = [q for q, _ in pairs], [t for _, t in pairs]
        labelled += found
        positive_texts += texts
        example_styles += [style] * len(found)
    relevant = [frozenset(i for i in q.relevant if i in train_set) for q in labelled]
    negatives = bm25_hard_negatives(corpus, list(train), [q.text for q in labelled], relevant)
    return [
        TrainingExample(q.text, q.source_index, n, r, t, style)
        for q, n, r, t, style in zip(labelled, negatives, relevant, positive_texts, example_styles)
    ]


def in_batch_scores(
    query_vectors: torch.Tensor,
    passage_vectors: torch.Tensor,
    batch: Sequence[TrainingExample],
    passage_indices: Sequence[int],
    scale: float,
) -> torch.Tensor:
    """Each query against all positives and hard negatives in the batch; its positive is column `row`.

    Other columns showing a passage relevant to the query (the same article in another query style, or an
    article with the same description) are -inf: masked, not treated as negatives.
    """
    scores = query_vectors @ passage_vectors.T * scale
    mask = torch.tensor(
        [
            [p in example.relevant and column != row for column, p in enumerate(passage_indices)]
            for row, example in enumerate(batch)
        ]
    )
    return scores.masked_fill(mask, float("-inf"))


def positive_nll(scores: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of each row's positive, column `row`, over its in-batch scores."""
    return torch.nn.functional.cross_entropy(scores, torch.arange(len(scores)))


def score_divergence(teacher_scores: torch.Tensor, student_scores: torch.Tensor) -> torch.Tensor:
    """Mean over queries of KL(teacher || student) between the softmax of each row; -inf (masked) columns,
    which both rows share, add nothing."""
    teacher_log = torch.log_softmax(teacher_scores.detach(), dim=1)
    student_log = torch.log_softmax(student_scores, dim=1)
    terms = teacher_log.exp() * (teacher_log - student_log)
    return torch.where(torch.isinf(teacher_scores), 0.0, terms).sum(dim=1).mean()


def train_step_vectors(
    encoder: Encoder, batch: Sequence[TrainingExample], corpus: Corpus, config: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    tower = encoder.query
    passage_indices = [e.positive for e in batch] + [e.hard_negative for e in batch]
    queries = tower.tokenize([e.query for e in batch], max_length=config.query_max_length)
    texts = [e.positive_text or corpus.texts[e.positive] for e in batch]
    texts += [corpus.texts[e.hard_negative] for e in batch]
    passages = tower.tokenize([corpus.titles[i] for i in passage_indices], texts, max_length=config.passage_max_length)
    return tower.forward(queries), tower.forward(passages), passage_indices


def batch_scores(
    encoder: Encoder, batch: Sequence[TrainingExample], corpus: Corpus, config: TrainConfig
) -> torch.Tensor:
    query_vectors, passage_vectors, passage_indices = train_step_vectors(encoder, batch, corpus, config)
    scale = config.scale if encoder.query.normalize else 1.0
    return in_batch_scores(query_vectors, passage_vectors, batch, passage_indices, scale)


def batch_loss(
    encoder: Encoder,
    batch: Sequence[TrainingExample],
    corpus: Corpus,
    config: TrainConfig,
    teacher: Encoder | None = None,
) -> torch.Tensor:
    """The contrastive loss, plus `config.distill_weight` times the divergence from `teacher` (the frozen base)
    over the queries of `config.distill_styles`."""
    scores = batch_scores(encoder, batch, corpus, config)
    loss = positive_nll(scores)
    distilled = torch.tensor([example.style in config.distill_styles for example in batch])
    if teacher is None or not config.distill_weight or not distilled.any():
        return loss
    with torch.no_grad():
        teacher_scores = batch_scores(teacher, batch, corpus, config)
    return loss + config.distill_weight * score_divergence(teacher_scores[distilled], scores[distilled])


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
    if config.distill_weight < 0:
        raise ValueError(f"--distill-weight must be 0 or more, not {config.distill_weight}.")
    seed_everything(config.seed)
    encoder = load_encoder(ModelSpec("base", config.base, pooling=config.pooling))
    if not encoder.shared_towers:
        raise ValueError("DPR training here starts from one shared-weight encoder, not a two-tower model.")
    train, held_out = split_indices(corpus)
    if config.limit:
        train = train[: config.limit]
    examples = training_examples(corpus, train, config.query_styles, config.seed)
    teacher = None
    if config.distill_weight:
        teacher = load_encoder(ModelSpec("base", config.base, pooling=config.pooling))
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
        lambda batch: batch_loss(encoder, batch, corpus, config, teacher),
        LoopSettings(total, config.learning_rate, config.warmup_fraction, "DPR training"),
        progress=progress,
    )
    report = TrainReport(
        asdict(config), total, len(examples), len(held_out), result.seconds, result.losses, result.hardware
    )
    return encoder, report


TRAIN_LOG = "train_log.json"  # a twin made by `train`: its TrainReport
SOUP_LOG = "soup_log.json"  # a twin made by `soup` (core/soup.py): its ingredients


def save_encoder_directory(encoder: Encoder, output: Path, base: str, fp16: bool) -> None:
    """A standard transformers directory, loadable by sentence-transformers too; the caller adds the log that
    says how it was made. An earlier model's log and card in the same directory are removed: they describe other
    weights."""
    if output.exists() and not output.is_dir():
        raise LensError(f"{output} is a file, not a directory for the model.")
    output.mkdir(parents=True, exist_ok=True)
    for log in (TRAIN_LOG, SOUP_LOG, "README.md"):
        (output / log).unlink(missing_ok=True)
    model = encoder.query.model
    if fp16:
        model = model.to(torch.float16)
    model.save_pretrained(output, safe_serialization=True)
    encoder.query.model.to(torch.float32)
    encoder.query.tokenizer.save_pretrained(output)
    tower = encoder.query
    (output / LENS_CONFIG).write_text(
        json.dumps({"pooling": tower.pooling, "normalize": tower.normalize, "base": base}, indent=1) + "\n"
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


def logged_config(report: TrainReport, output: str) -> TrainConfig:
    """The config a logged run was trained with (JSON lists back to tuples), with `output` where it is now."""
    tuples = {name: tuple(value) for name, value in report.config.items() if isinstance(value, list)}
    return TrainConfig(**{**report.config, **tuples, "output": output})


def read_training_run(twin: str | Path) -> tuple[TrainConfig, TrainReport]:
    """The config and report in a twin's train log; the config's output is the directory it was read from."""
    twin = Path(twin)
    if not twin.is_dir():
        raise LensError(f"{twin} is not a directory.")
    log_path = twin / TRAIN_LOG
    if not log_path.is_file():
        raise LensError(f"{twin} has no {TRAIN_LOG}: it was not made by `python -m core train`.")
    try:
        report = TrainReport(**json.loads(log_path.read_text()))
        return logged_config(report, str(twin)), report
    except (ValueError, TypeError) as error:
        raise LensError(f"{log_path} is not a training log of this version ({error}).") from error


def training_command(config: TrainConfig) -> str:
    """The command line that trains with `config`."""
    return config_command(TrainConfig, config, "python -m core train")


def save_twin(encoder: Encoder, config: TrainConfig, report: TrainReport) -> Path:
    output = Path(config.output)
    save_encoder_directory(encoder, output, config.base, config.save_fp16)
    (output / TRAIN_LOG).write_text(json.dumps(asdict(report)) + "\n")
    return output
