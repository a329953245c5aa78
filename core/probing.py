"""Layer-wise linear probing (arXiv 2402.11035, Table 1): can a linear probe on frozen layer-l features
pick a query's positive passage among N candidates (the positive and N-1 hard negatives)?

Features: each layer's hidden states (0 = embeddings) pooled the way the tower pools (CLS, or masked
mean; the DPR pooler reads the CLS position), L2-normalised when the tower normalises. Queries go
through the query tower, passages (title, text) through the context tower.

Probe: a linear score w . [p ; q*p] per candidate, softmax cross-entropy over the N candidates
(a [q ; p ; q*p] scorer is the same: q is shared by the candidates and cancels in the softmax).
The q*p block is a diagonal bilinear form, so w = (0, 1) reproduces the tower's own dot-product score:
the probe can read out at least what the layer's plain similarity gives, with only 2d parameters
(a full bilinear q^T W p would have d^2 and overfit a few hundred training queries). The objective is
convex; the L2 strength is chosen on a validation fifth of the training queries.

Controls: the same probe untrained (random weights; sits near 1/N), the probe on the passage block
only (what is solvable without the query), and the layer's plain dot product (no training).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial

import numpy as np
import torch

from .bm25 import rank_by_bm25
from .cache import Analysis, ResultCache
from .corpus import Corpus, CorpusError, LabelledQuery, description_queries, split_indices
from .device import scaled
from .errors import LensError
from .evaluation import bootstrap_interval
from .index import PASSAGE_MAX_LENGTH, DenseIndex
from .pair import ENCODE_BATCH_CAP, Encoder, ModelPair, Tower
from .retrieval import search_queries
from .runtime import model_work

Progress = Callable[[int, int], None]
NEGATIVE_SOURCES = ("bm25", "A", "B")
KINDS = ("probe", "passage only", "untrained", "dot product")
L2_GRID = (1e-2, 1e-1, 1.0, 10.0)
GRID_ITERATIONS = 40  # enough to rank the L2 strengths; the chosen one is then refitted to convergence
RETRIEVAL_DEPTH = 50


class ProbeError(LensError):
    """A probing run that cannot be made; the message is meant for the user."""


@dataclass(frozen=True)
class ProbeConfig:
    ns: tuple[int, ...] = (2, 3, 4, 5)
    train_queries: int = 600
    test_queries: int = 300
    seed: int = 0
    negatives: str = "bm25"  # "bm25", or "A"/"B": that model's dense retrievals (the same candidates for both)
    passage_max_length: int = PASSAGE_MAX_LENGTH
    control_probes: int = 20
    validation_fraction: float = 0.2

    def __post_init__(self):
        if not self.ns or any(n < 2 for n in self.ns):
            raise ProbeError("Every N (number of candidates) must be at least 2.")
        if self.negatives not in NEGATIVE_SOURCES:
            raise ProbeError(f"Hard negatives come from one of {', '.join(NEGATIVE_SOURCES)}.")
        if self.train_queries < 5 or self.test_queries < 2:
            raise ProbeError("Probing needs at least 5 training and 2 test queries.")

    @property
    def max_negatives(self) -> int:
        return max(self.ns) - 1


@dataclass(frozen=True)
class ProbeSample:
    """Queries with their positive and hard negatives (hardest first); training queries first."""

    queries: tuple[str, ...]
    positives: tuple[int, ...]
    negatives: tuple[tuple[int, ...], ...]
    train_count: int

    @property
    def passages(self) -> list[int]:
        """Every candidate passage once, in first-seen order."""
        seen = dict.fromkeys(self.positives)
        for row in self.negatives:
            seen.update(dict.fromkeys(row))
        return list(seen)


@dataclass(frozen=True)
class ProbeResult:
    config: dict
    corpus: str
    models: dict[str, str]
    towers: dict[str, str]
    layers: dict[str, int]
    train_queries: int
    test_queries: int
    rows: list[dict] = field(default_factory=list)  # model, n, layer, kind, accuracy, low, high, l2
    seconds: float = 0.0


PROBE_FEATURES = Analysis(
    "probe-features",
    version=1,
    fields=("model", "corpus", "queries", "passages", "passage_max_length"),
    result_type=dict,
)
PROBING = Analysis(
    "probing",
    version=1,
    fields=("A", "B", "corpus", "config", "kinds", "l2_grid", "grid_iterations", "retrieval_depth"),
    result_type=ProbeResult,
)


# ---- candidates -------------------------------------------------------------------------------


def _sample_queries(queries: list[LabelledQuery], count: int, rng: random.Random) -> list[LabelledQuery]:
    return queries if len(queries) <= count else rng.sample(queries, count)


def bm25_rankings(corpus: Corpus, texts: Sequence[str], depth: int = RETRIEVAL_DEPTH) -> np.ndarray:
    """(queries x depth) corpus indices ranked by BM25 over title + text."""
    return rank_by_bm25(corpus, texts, depth)


def dense_rankings(
    encoder: Encoder, index: DenseIndex, texts: Sequence[str], depth: int = RETRIEVAL_DEPTH
) -> np.ndarray:
    _, ranked = search_queries(encoder, index, texts, depth)
    return ranked


def hard_negatives(
    ranked: np.ndarray, queries: Sequence[LabelledQuery], pools: Sequence[set[int]], count: int, seed: int
) -> list[tuple[int, ...]]:
    """The best-ranked `count` passages of each query's pool that are not relevant to it (never the
    positive nor an article sharing its description); random pool members if the ranking runs short."""
    rng = random.Random(seed)
    result = []
    for row, query, pool in zip(ranked, queries, pools):
        chosen = [int(i) for i in row if int(i) in pool and int(i) not in query.relevant]
        chosen = list(dict.fromkeys(chosen))[:count]
        if len(chosen) < count:
            rest = sorted(pool - query.relevant - set(chosen))
            if len(rest) < count - len(chosen):
                raise ProbeError("The corpus is too small for this many hard negatives per query.")
            chosen += rng.sample(rest, count - len(chosen))
        result.append(tuple(chosen))
    return result


def build_sample(corpus: Corpus, config: ProbeConfig, rank: Callable[[Sequence[str]], np.ndarray]) -> ProbeSample:
    """Training queries from training articles, test queries from held-out ones (core.corpus split).

    Training queries draw negatives from training articles only, so no held-out passage is ever
    seen while fitting a probe; test queries draw them from the whole corpus.
    """
    try:
        train_idx, held_out_idx = split_indices(corpus)
        rng = random.Random(config.seed)
        train = _sample_queries(description_queries(corpus, train_idx), config.train_queries, rng)
        test = _sample_queries(description_queries(corpus, held_out_idx), config.test_queries, rng)
    except CorpusError as error:
        raise ProbeError(f"{error} Probing uses description -> article queries.") from error
    if len(train) < 5 or len(test) < 2:
        raise ProbeError(
            f"The corpus gives {len(train)} training and {len(test)} held-out description queries; "
            "probing needs at least 5 and 2."
        )
    queries = train + test
    train_pool, everything = set(train_idx), set(range(len(corpus)))
    pools = [train_pool] * len(train) + [everything] * len(test)
    ranked = rank([q.text for q in queries])
    negatives = hard_negatives(ranked, queries, pools, config.max_negatives, config.seed)
    return ProbeSample(
        tuple(q.text for q in queries), tuple(q.source_index for q in queries), tuple(negatives), len(train)
    )


# ---- features ---------------------------------------------------------------------------------


@model_work
@torch.inference_mode()
def layer_features(
    tower: Tower,
    texts: Sequence[str],
    pairs: Sequence[str] | None = None,
    max_length: int | None = None,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> np.ndarray:
    """(layers + 1, len(texts), dim) pooled hidden states; layer 0 is the embedding output.

    Batched and pooled as Tower.encode does, so the last layer's features are the tower's embeddings.
    """
    out = np.zeros((tower.layer_count + 1, len(texts), tower.dim), dtype=np.float32)
    batch_size = scaled(batch_size, tower.device, cap=ENCODE_BATCH_CAP)
    for done, chosen, batch in tower.length_batches(texts, pairs, batch_size, max_length):
        for layer, hidden in enumerate(tower.hidden_states(batch)):
            out[layer, chosen] = tower.pool_hidden(hidden, batch["attention_mask"]).float().cpu().numpy()
        if progress:
            progress(done, len(texts))
    return out


def sample_features(
    encoder: Encoder,
    corpus: Corpus,
    sample: ProbeSample,
    max_length: int,
    cache: ResultCache,
    progress: Progress | None = None,
) -> dict[str, np.ndarray]:
    """Layer features of the sample's queries (query tower) and candidate passages (context tower)."""
    passages = sample.passages
    total = len(sample.queries) + len(passages)

    def compute() -> dict[str, np.ndarray]:
        queries = layer_features(
            encoder.query, sample.queries, progress=(lambda d, t: progress(d, total)) if progress else None
        )
        texts = layer_features(
            encoder.context,
            [corpus.titles[i] for i in passages],
            [corpus.texts[i] for i in passages],
            max_length,
            progress=(lambda d, t: progress(len(sample.queries) + d, total)) if progress else None,
        )
        return {"queries": queries, "passages": texts, "passage_ids": np.asarray(passages)}

    features = PROBE_FEATURES.get_or_compute(
        cache,
        compute,
        check=lambda v: v["queries"].shape[1] == len(sample.queries) and v["passages"].shape[1] == len(passages),
        model=encoder.fingerprint,
        corpus=corpus.fingerprint,
        queries=list(sample.queries),
        passages=passages,
        passage_max_length=max_length,
    )
    if progress:
        progress(total, total)
    return features


def candidate_matrix(sample: ProbeSample, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(queries x n) passage indices in a shuffled order, and the positive's position per query."""
    rng = np.random.default_rng(seed + n)
    candidates, targets = [], []
    for positive, negatives in zip(sample.positives, sample.negatives):
        row = [positive, *negatives[: n - 1]]
        order = rng.permutation(n)
        candidates.append([row[j] for j in order])
        targets.append(int(np.flatnonzero(order == 0)[0]))
    return np.asarray(candidates), np.asarray(targets)


def pair_features(query: np.ndarray, passages: np.ndarray) -> np.ndarray:
    """[p ; q*p] per candidate: (..., queries, n, 2d) from (..., queries, d) and (..., queries, n, d)."""
    return np.concatenate([passages, query[..., None, :] * passages], axis=-1)


# ---- the probe --------------------------------------------------------------------------------


@dataclass
class LayerProbes:
    """One linear probe per layer: score_l(candidate) = w_l . standardise_l(features).

    A bias would be shared by all candidates of a query and cancel in the softmax, so there is none.
    """

    mean: np.ndarray  # (layers, f)
    scale: np.ndarray  # (layers, f)
    weight: np.ndarray  # (layers, f)
    l2: np.ndarray  # (layers,)

    @classmethod
    def standardiser(cls, features: np.ndarray) -> LayerProbes:
        """Per-layer feature means and deviations over the training candidates; weights zero."""
        flat = features.reshape(features.shape[0], -1, features.shape[-1])
        layers, dim = features.shape[0], features.shape[-1]
        return cls(flat.mean(1), np.maximum(flat.std(1), 1e-6), np.zeros((layers, dim), np.float32), np.zeros(layers))

    def standardise(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.mean[:, None, None]) / self.scale[:, None, None]).astype(np.float32)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """(layers, queries, n) scores from (layers, queries, n, f) features."""
        return np.einsum("lqnf,lf->lqn", self.standardise(features), self.weight)

    def correct(self, features: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """(layers, queries) 1.0 where the probe ranks the positive first."""
        return (self.scores(features).argmax(-1) == targets).astype(float)


def _fit_weights(
    x: torch.Tensor, targets: torch.Tensor, l2: torch.Tensor, start: torch.Tensor | None = None, max_iter: int = 100
) -> torch.Tensor:
    """Independent softmax-regression probes, one per (setting g, layer l), fitted jointly.

    x: (layers, queries, n, f) standardised features; l2: (settings, layers). The objective is the
    sum over (g, l) of mean cross-entropy + l2 * |w|^2: separable and strictly convex, so one L-BFGS
    run over all of them reaches every probe's own optimum, in a few large tensor ops instead of
    thousands of small ones.
    """
    settings, layers = l2.shape
    weight = (torch.zeros(settings, layers, x.shape[-1]) if start is None else start.clone()).requires_grad_(True)
    labels = targets.repeat(settings * layers)
    optimizer = torch.optim.LBFGS(
        [weight],
        lr=1.0,
        max_iter=max_iter,
        history_size=10,
        tolerance_grad=1e-6,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        scores = torch.einsum("lqnf,glf->glqn", x, weight).reshape(-1, x.shape[2])
        fit = torch.nn.functional.cross_entropy(scores, labels) * settings * layers
        loss = fit + (l2[..., None] * weight.pow(2)).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach()


def _mean_nll(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(settings, layers) mean cross-entropy of each probe."""
    scores = torch.einsum("lqnf,glf->glqn", x, weight)
    log_probs = torch.log_softmax(scores, -1)
    picked = log_probs.gather(-1, targets.view(1, 1, -1, 1).expand(*scores.shape[:3], 1))
    return -picked.mean((-1, -2))


def train_probes(
    features: np.ndarray,
    targets: np.ndarray,
    seed: int = 0,
    validation_fraction: float = 0.2,
    l2_grid: Sequence[float] = L2_GRID,
) -> LayerProbes:
    """Fits one probe per layer on (layers, queries, n, f) training features.

    Each layer's L2 strength is the grid value with the lowest cross-entropy on a held-out fifth of
    the training queries; the probe is then refitted on all of them, starting from that fit.
    """
    probes = LayerProbes.standardiser(features)
    x = torch.from_numpy(probes.standardise(features))
    labels = torch.from_numpy(np.asarray(targets)).long()
    layers = x.shape[0]
    order = torch.from_numpy(np.random.default_rng(seed).permutation(x.shape[1]))
    held = max(1, int(round(validation_fraction * x.shape[1])))
    val, fit = order[:held], order[held:]
    grid = torch.tensor(l2_grid, dtype=torch.float32)[:, None].expand(-1, layers).contiguous()
    candidates = _fit_weights(x[:, fit], labels[fit], grid, max_iter=GRID_ITERATIONS)
    best = _mean_nll(x[:, val], candidates, labels[val]).argmin(0)
    chosen = grid[best, torch.arange(layers)]
    warm = candidates[best, torch.arange(layers)][None]
    probes.weight = _fit_weights(x, labels, chosen[None], start=warm)[0].numpy()
    probes.l2 = chosen.numpy().astype(float)
    return probes


def untrained_accuracy(
    train_features: np.ndarray, test_features: np.ndarray, targets: np.ndarray, probes: int, seed: int
) -> np.ndarray:
    """(layers,) mean test accuracy of random-weight probes on the same standardised features."""
    untrained = LayerProbes.standardiser(train_features)
    rng = np.random.default_rng(seed)
    layers, dim = untrained.weight.shape
    accuracies = []
    for _ in range(probes):
        untrained.weight = rng.normal(0, 1 / np.sqrt(dim), (layers, dim)).astype(np.float32)
        accuracies.append(untrained.correct(test_features, targets).mean(1))
    return np.mean(accuracies, 0)


def probe_all_layers(
    query: np.ndarray, passages: np.ndarray, targets: np.ndarray, train_count: int, config: ProbeConfig
) -> list[dict]:
    """Every kind of accuracy for every layer at one N; query (layers, Q, d), passages (layers, Q, n, d)."""
    features = pair_features(query, passages)
    dim = query.shape[-1]
    train, test = slice(0, train_count), slice(train_count, None)
    outcomes = {}
    for kind, block in (("probe", features), ("passage only", features[..., :dim])):
        probes = train_probes(block[:, train], targets[train], config.seed, config.validation_fraction)
        outcomes[kind] = (probes.correct(block[:, test], targets[test]), probes.l2)
    similarity = features[..., dim:].sum(-1)
    outcomes["dot product"] = ((similarity[:, test].argmax(-1) == targets[test]).astype(float), None)
    untrained = untrained_accuracy(
        features[:, train], features[:, test], targets[test], config.control_probes, config.seed
    )
    rows = []
    for layer in range(features.shape[0]):
        for kind, (correct, l2) in outcomes.items():
            low, high = bootstrap_interval(correct[layer], seed=config.seed)
            rows.append(
                {
                    "layer": layer,
                    "kind": kind,
                    "accuracy": float(correct[layer].mean()),
                    "low": low,
                    "high": high,
                    "l2": None if l2 is None else float(l2[layer]),
                }
            )
        rows.append(
            {
                "layer": layer,
                "kind": "untrained",
                "accuracy": float(untrained[layer]),
                "low": None,
                "high": None,
                "l2": None,
            }
        )
    return rows


# ---- the run ----------------------------------------------------------------------------------


def _result_key(pair: ModelPair, corpus: Corpus, config: ProbeConfig) -> dict:
    return {
        "A": pair.a.fingerprint,
        "B": pair.b.fingerprint,
        "corpus": corpus.fingerprint,
        "config": asdict(config),
        "kinds": list(KINDS),
        "l2_grid": list(L2_GRID),
        "grid_iterations": GRID_ITERATIONS,
        "retrieval_depth": RETRIEVAL_DEPTH,
    }


def lookup_probing(pair: ModelPair, corpus: Corpus, config: ProbeConfig, cache: ResultCache) -> ProbeResult | None:
    """The stored Table 1 for these settings, or None (never computes)."""
    return PROBING.lookup(cache, **_result_key(pair, corpus, config))


def _towers(encoder: Encoder) -> str:
    return "shared query/passage tower" if encoder.shared_towers else "separate query and passage towers"


def run_probing(
    pair: ModelPair,
    corpus: Corpus,
    config: ProbeConfig,
    cache: ResultCache,
    indexes: dict[str, DenseIndex] | None = None,
    progress: Progress | None = None,
) -> ProbeResult:
    """Table 1 for both models of the pair: accuracy per (model, N, layer, kind). Cached."""

    def compute() -> ProbeResult:
        started = time.perf_counter()
        if config.negatives == "bm25":
            rank = partial(bm25_rankings, corpus)
        elif indexes and config.negatives in indexes:
            rank = partial(dense_rankings, pair.models[config.negatives], indexes[config.negatives])
        else:
            raise ProbeError(f"Hard negatives from model {config.negatives} need that model's index.")
        sample = build_sample(corpus, config, rank)
        layers = {name: encoder.query.layer_count for name, encoder in pair.models.items()}
        encode_units = len(sample.queries) + len(sample.passages)
        total = 2 * encode_units + 2 * len(config.ns)
        done = 0

        def report(stage_done: int, _stage_total: int = 0) -> None:
            if progress:
                progress(min(done + stage_done, total), total)

        rows = []
        for name, encoder in pair.models.items():
            features = sample_features(encoder, corpus, sample, config.passage_max_length, cache, report)
            done += encode_units
            position = {int(p): j for j, p in enumerate(features["passage_ids"])}
            for n in config.ns:
                candidates, targets = candidate_matrix(sample, n, config.seed)
                columns = np.vectorize(position.__getitem__)(candidates)
                for row in probe_all_layers(
                    features["queries"], features["passages"][:, columns], targets, sample.train_count, config
                ):
                    rows.append({"model": name, "n": n, **row})
                done += 1
                report(0)
        return ProbeResult(
            config=asdict(config),
            corpus=corpus.name,
            models={name: encoder.label for name, encoder in pair.models.items()},
            towers={name: _towers(encoder) for name, encoder in pair.models.items()},
            layers=layers,
            train_queries=sample.train_count,
            test_queries=len(sample.queries) - sample.train_count,
            rows=rows,
            seconds=round(time.perf_counter() - started, 1),
        )

    return PROBING.get_or_compute(cache, compute, **_result_key(pair, corpus, config))


def format_table(result: ProbeResult, kinds: Sequence[str] = KINDS) -> str:
    """Table 1 as plain text: one row per (model, N, kind), one column per layer (L0 = embeddings)."""
    depth = max(result.layers.values())
    header = f"{'model':<6}{'N':>3}  {'kind':<13}" + "".join(f"{'L' + str(layer):>7}" for layer in range(depth + 1))
    lines = [header, "-" * len(header)]
    lookup = {(r["model"], r["n"], r["layer"], r["kind"]): r["accuracy"] for r in result.rows}
    for model in result.models:
        for n in result.config["ns"]:
            for kind in kinds:
                cells = "".join(
                    f"{lookup[(model, n, layer, kind)]:>7.3f}" if (model, n, layer, kind) in lookup else f"{'':>7}"
                    for layer in range(depth + 1)
                )
                lines.append(f"{model:<6}{n:>3}  {kind:<13}{cells}")
    return "\n".join(lines)
