"""Command line: python -m core {pretrain, train, soup, twin-card, build-index, evaluate, probe, neurons-aggregate,
token-ig, word-clouds, patch, neuron-overlap, paraphrase, cka, token-pairs, faithfulness, report}."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .attribution.faithfulness import CANDIDATES as FAITHFULNESS_CANDIDATES
from .attribution.faithfulness import cached_faithfulness
from .attribution.faithfulness import summary as faithfulness_summary
from .attribution.methods import agreement_summary
from .attribution.pairs import DEFAULT_PAIR_STEPS, cached_pair_map
from .bundles import retrieval_bundle, token_bundle
from .cache import ResultCache
from .cards import dpr_twin_card, mlm_card, soup_card
from .cka import INPUTS, layer_similarity, undefined_note
from .cli_args import HelpWithDefaults, add_config_arguments, cli_option, config_from_args
from .corpus import CorpusError, LabelledQuery, description_queries, is_held_out, load_corpus, split_indices
from .corpus_stream import load_scan
from .device import DEVICE_ENV, ENCODE_DTYPE_ENV, ENCODE_DTYPES, use_device
from .distributed import (
    EVALUATION_CHUNK_SIZE,
    aggregate_neurons_chunked,
    build_sharded,
    evaluate_encoder_chunked,
    ray_session,
    word_clouds_chunked,
)
from .errors import LensError
from .evaluation import (
    A_WINS,
    B_WINS,
    DEPTH,
    Evaluation,
    evaluate_encoder,
    evaluate_pair,
    load_query_file,
    outcome_counts,
    paired_difference,
    wins_losses,
)
from .index import load_index, save_prebuilt
from .ivf import CARD_MD, IVFSettings, index_dir_from_env
from .neuron_attribution import DEFAULT_STEPS, DEFAULT_THRESHOLD, SITES, aggregate_neurons, aggregate_sample
from .overlap import COUNTS, neuron_overlap
from .pair import DEFAULT_PRESET, PRESETS, ModelSpec, load_encoder, load_pair
from .paraphrase import DEFAULT_K, Need, load_needs, paraphrase_agreement
from .passage_store import store_directory
from .patching import DIRECTIONS, PATCH_SITES, aggregate_patching, near_tie_note, patch_query
from .pretraining import PretrainConfig, pretrain_mlm, save_pretrained_model
from .probing import NEGATIVE_SOURCES, ProbeConfig, format_table, run_probing
from .report import build_zip
from .retrieval import QUERY_BATCH, clean_query, retrieve
from .soup import Ingredient, make_soup, read_soup, read_training_run, soup_command
from .token_attribution import (
    METHODS,
    TOP_K,
    IGSettings,
    cached_deletion_curve,
    cached_pair,
    cached_ranking,
    word_sums,
)
from .training import SOUP_LOG, TrainConfig, TrainReport, save_twin, train_dpr, training_command

CORPUS_HELP = "JSONL corpus (default: bundled Wikipedia)"
# Hand-written questions about held-out bundled Wikipedia articles: the first set chose the twin's training
# recipe; the other two were written before any model was scored on them, and no shipping rule used them.
NATURAL_QUESTIONS = "assets/natural_questions.jsonl"
NATURAL_QUESTIONS_TEST = "assets/natural_questions_test.jsonl"
NATURAL_QUESTIONS_TEST_LARGE = "assets/natural_questions_test_large.jsonl"
QUESTION_SETS = (NATURAL_QUESTIONS, NATURAL_QUESTIONS_TEST, NATURAL_QUESTIONS_TEST_LARGE)
QUESTION_SET_ROLES = {
    NATURAL_QUESTIONS: "the development set: the training recipe was chosen on it",
    NATURAL_QUESTIONS_TEST: (
        "the test set: written before any model was scored on it; its scores were printed for every candidate twin, "
        "but no rule that chose a twin used them"
    ),
    NATURAL_QUESTIONS_TEST_LARGE: (
        "the large test set: written by a second author from the held-out leads, paraphrased rather than copied "
        "(apart from names), before any model was scored on it; its scores were printed for every candidate twin, "
        "but no rule that chose a twin used them"
    ),
}
DESCRIBED_CORPUS_HELP = "JSONL corpus with descriptions (default: bundled Wikipedia)"
# ProbeConfig and IGSettings carry no command-line metadata of their own.
PROBE_OPTIONS = {
    "ns": {"flags": ("--n",), "help": "numbers of candidates N"},
    "train_queries": {"help": "training queries the probes are fitted on"},
    "test_queries": {"help": "held-out queries the probes are scored on"},
    "seed": {"help": "seed of the query sample, the probes and the bootstrap"},
    "negatives": {
        "choices": NEGATIVE_SOURCES,
        "help": "hard negatives from BM25, or from model A's / B's dense retrievals",
    },
    "passage_max_length": {"help": "passage length in tokens"},
    "control_probes": {"help": "random-weight probes averaged for the untrained control"},
    "validation_fraction": {"help": "share of the training queries that chooses the L2 strength"},
}
IG_OPTIONS = {
    "n_steps": {"flags": ("--steps",), "help": "steps of the full integration rule"},
    "method": {"choices": METHODS, "help": "integration rule"},
    "passage_max_length": {"help": "passage length in tokens"},
    "start_steps": {
        "help": "adaptive first pass (sinh-substituted); inputs above the delta tolerance are re-run "
        "at --steps (0: every input at --steps)"
    },
}


@dataclass(frozen=True)
class AggregateOptions:
    """The Figure-1 aggregate of neurons-aggregate."""

    queries: int = cli_option(200, "size of the fixed sample of held-out queries")
    seed: int = cli_option(0, "seed of the sample")
    steps: int = cli_option(DEFAULT_STEPS, "Riemann steps m")
    threshold: float = cli_option(DEFAULT_THRESHOLD, "t, for the printed counts only")


@dataclass(frozen=True)
class TwinOptions:
    """The twin analyses (patch, neuron-overlap, paraphrase, cka): one query, or a sample of queries or needs."""

    query: str | None = cli_option(None, "one query (patch, neuron-overlap)")
    queries: int = cli_option(
        0,
        "a fixed sample of this many held-out description queries instead of --query "
        "(cka: 50 when 0; paraphrase: the first N built-in needs)",
    )
    seed: int = cli_option(0, "seed of the sample")
    steps: int = cli_option(DEFAULT_STEPS, "Riemann steps m of the neuron attributions")
    threshold: float = cli_option(DEFAULT_THRESHOLD, "t: neurons above t x max are in a set")
    json: bool = cli_option(False, "print the result as JSON")


def probe_config(args: argparse.Namespace) -> ProbeConfig:
    return config_from_args(ProbeConfig, args, ns=tuple(sorted(set(args.ns))))


def ig_settings(args: argparse.Namespace) -> IGSettings:
    return config_from_args(IGSettings, args, start_steps=args.start_steps or None)


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


def _bar_progress(bar: tqdm):
    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return update


def _command_line() -> str:
    return "python -m core " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _held_out_evaluations(
    corpus, cache_directory: str | None, specs: list[ModelSpec], extra: Sequence[list[LabelledQuery]] = ()
) -> tuple[list[Evaluation], list[list[Evaluation]]]:
    """Each model on the held-out description -> article queries, and on each `extra` query set (one list of
    evaluations, in model order, per set); printed as they finish."""
    cache = ResultCache(cache_directory)
    _, held_out = split_indices(corpus)
    queries = description_queries(corpus, held_out)
    evaluations, extra_evaluations = [], [[] for _ in extra]
    for spec in specs:
        encoder = load_encoder(spec)
        evaluations.append(
            evaluate_encoder(
                encoder, corpus, queries, cache, progress=_tqdm_progress(f"encoding corpus ({spec.label})")
            )
        )
        print(spec.label, {k: round(v, 4) for k, v in evaluations[-1].means.items()})
        for number, query_set in enumerate(extra):
            extra_evaluations[number].append(evaluate_encoder(encoder, corpus, query_set, cache))
            means = {k: round(v, 4) for k, v in extra_evaluations[number][-1].means.items()}
            print(f"{spec.label} (question set {number + 1})", means)
    return evaluations, extra_evaluations


def _questions_note(path: str, queries: list[LabelledQuery], corpus) -> str:
    held_out = sum(all(is_held_out(corpus.titles[i]) for i in q.relevant) for q in queries)
    role = f", {QUESTION_SET_ROLES[path]}" if path in QUESTION_SET_ROLES else ""
    return (
        f'{len(queries)} hand-written questions from `{path}`{role} (e.g. "{queries[0].text}"), each with its '
        f"gold article(s); {held_out} of them have only held-out gold articles."
    )


def cmd_pretrain(args) -> None:
    command = _command_line()
    config = config_from_args(PretrainConfig, args)
    corpus = load_corpus(args.corpus)
    model, tokenizer, report = pretrain_mlm(config, corpus)
    output = save_pretrained_model(model, tokenizer, config, report)
    print(f"saved {output} after {report.steps} steps in {report.seconds:.0f} s")
    if args.no_eval:
        return
    poolings = ("cls", "mean")
    evaluations, _ = _held_out_evaluations(
        corpus,
        args.cache,
        [ModelSpec(f"pre-trained, {pooling} pooling", str(output), pooling=pooling) for pooling in poolings],
    )
    (output / "README.md").write_text(mlm_card(command, config, report, dict(zip(poolings, evaluations)), len(corpus)))


def _question_sets(args, corpus) -> list[tuple[str, list[LabelledQuery]]]:
    paths = args.questions_jsonl or (() if args.corpus else QUESTION_SETS)
    return [(str(path), load_query_file(path, corpus)) for path in paths]


def cmd_train(args) -> None:
    command = _command_line()
    config = config_from_args(TrainConfig, args)
    corpus = load_corpus(args.corpus)
    question_sets = [] if args.no_eval else _question_sets(args, corpus)
    encoder, report = train_dpr(config, corpus)
    output = save_twin(encoder, config, report)
    print(f"saved {output} after {report.steps} steps in {report.seconds:.0f} s")
    if args.no_eval:
        return
    write_twin_card(output, command, config, report, corpus, args.cache, question_sets, args.compare)


def cmd_soup(args) -> None:
    corpus = None if args.no_eval else load_corpus(args.corpus)
    question_sets = None if args.no_eval else _question_sets(args, corpus)
    output = Path(args.output)
    ingredients = make_soup(args.twins, args.weights, output)
    print(f"saved {output}, the mean of {len(ingredients)} twins")
    if not args.no_eval:
        command = soup_command(ingredients, output)
        write_soup_card(output, command, ingredients, corpus, args.cache, question_sets, args.compare)


def cmd_twin_card(args) -> None:
    """The card of a twin made earlier (its train_log.json or soup_log.json), evaluated now; the command shown is
    the one that makes this directory."""
    twin = Path(args.twin)
    if (twin / SOUP_LOG).is_file():
        ingredients = read_soup(twin)
        write_card = partial(write_soup_card, twin, soup_command(ingredients, twin), ingredients)
    else:
        config, report = read_training_run(twin)
        write_card = partial(write_twin_card, twin, training_command(config), config, report)
    corpus = load_corpus(args.corpus)
    write_card(corpus, args.cache, _question_sets(args, corpus), args.compare)
    print(f"wrote {twin / 'README.md'}")


def _card_evaluations(
    output: Path,
    base: str,
    corpus,
    cache_directory: str | None,
    question_sets: Sequence[tuple[str, list[LabelledQuery]]],
    compare: Sequence[str] | None,
) -> tuple[dict[str, Evaluation], list[tuple[str, dict[str, Evaluation]]]]:
    """The rows of a twin's card: its base, the models to compare with (named by their directory), and the twin
    itself, on the held-out descriptions and on each question set (with the note that describes it)."""
    specs = [ModelSpec(f"before: {base}", base)]
    specs += [ModelSpec(Path(model).name, model) for model in compare or ()]
    specs.append(ModelSpec("after: this model", str(output)))
    descriptions, answers = _held_out_evaluations(corpus, cache_directory, specs, [q for _, q in question_sets])
    labels = [spec.label for spec in specs]
    return dict(zip(labels, descriptions)), [
        (_questions_note(path, queries, corpus), dict(zip(labels, evaluations)))
        for (path, queries), evaluations in zip(question_sets, answers)
    ]


def write_twin_card(
    output: Path,
    command: str,
    config: TrainConfig,
    report: TrainReport,
    corpus,
    cache_directory: str | None,
    question_sets: Sequence[tuple[str, list[LabelledQuery]]] = (),
    compare: Sequence[str] | None = None,
) -> None:
    """README.md of a trained twin."""
    descriptions, answers = _card_evaluations(output, config.base, corpus, cache_directory, question_sets, compare)
    card = dpr_twin_card(output, command, config, report, descriptions, len(corpus), answers)
    (output / "README.md").write_text(card)


def write_soup_card(
    output: Path,
    command: str,
    ingredients: Sequence[Ingredient],
    corpus,
    cache_directory: str | None,
    question_sets: Sequence[tuple[str, list[LabelledQuery]]],
    compare: Sequence[str] | None,
) -> None:
    """README.md of a soup."""
    base = ingredients[0].config.base
    descriptions, answers = _card_evaluations(output, base, corpus, cache_directory, question_sets, compare)
    (output / "README.md").write_text(soup_card(output, command, ingredients, descriptions, len(corpus), answers))


def cmd_build_index(args) -> None:
    if args.shards or args.ray:
        _build_sharded_index(args)
        return
    pair = load_pair(args.pair)
    corpus = load_corpus(args.corpus)
    cache = ResultCache(args.cache)
    for name, encoder in pair.models.items():
        started = time.perf_counter()
        index = load_index(encoder, corpus, cache, progress=_tqdm_progress(f"model {name}"))
        print(f"model {name}: {len(index)} passages ({index.source}) in {time.perf_counter() - started:.1f} s")
        if args.prebuilt:
            print("  wrote", save_prebuilt(index.embeddings, index.params))


def _shard_progress(bar: tqdm):
    def update(shard, seconds: float) -> None:
        bar.update(shard.stop - shard.start)

    return update


def _build_sharded_index(args) -> None:
    if not args.corpus:
        raise CorpusError("--shards and --ray need --corpus FILE: DPR's psgs_w100 .tsv, .jsonl or .parquet.")
    output = Path(args.output) if args.output else index_dir_from_env() or Path("indexes")
    settings = config_from_args(IVFSettings, args)
    scan_bar = tqdm(desc="scanning corpus", unit="passage")
    scan = load_scan(
        args.corpus, store_directory(output, args.corpus), progress=lambda rows: scan_bar.update(rows - scan_bar.n)
    )
    scan_bar.close()
    print(f"{Path(scan.path).name}: {scan.rows:,} passages, {scan.bad_rows} bad rows skipped")
    for warning in scan.warnings[:10]:
        print("  " + warning)
    pair = load_pair(args.pair)
    for (name, encoder), spec in zip(pair.models.items(), (pair.spec.a, pair.spec.b)):
        started = time.perf_counter()
        with tqdm(total=scan.rows, desc=f"model {name}: shards", unit="passage") as bar:
            directory, card = build_sharded(
                encoder,
                spec,
                scan,
                output,
                args.shards or 1,
                settings,
                args.ray,
                args.ray_workers,
                on_shard=_shard_progress(bar),
            )
        print(f"model {name}: {directory} in {time.perf_counter() - started:.1f} s")
        if card:
            print(
                f"  {card['factory']}: recall@10 {card['recall_at_10']:.3f}, {card['ms_per_query']:.2f} ms/query, "
                f"see {directory / CARD_MD}"
            )


def _rank(rank: int | None) -> str:
    return str(rank) if rank is not None else f">{DEPTH}"


def _evaluate_in_chunks(args, pair, corpus, queries: list[LabelledQuery], cache: ResultCache) -> dict[str, Evaluation]:
    """evaluate --chunk-size / --ray: each model's queries in cached chunks, encoded here or on Ray actors."""
    evaluations = {}
    for (name, encoder), spec in zip(pair.models.items(), (pair.spec.a, pair.spec.b)):
        index = load_index(encoder, corpus, cache, progress=_tqdm_progress(f"indexing for model {name}"))
        with tqdm(total=len(queries), desc=f"model {name}: queries (chunks cached)", unit="query") as bar:
            evaluations[name] = evaluate_encoder_chunked(
                encoder,
                index,
                queries,
                cache,
                args.chunk_size or EVALUATION_CHUNK_SIZE,
                spec=spec if args.ray else None,
                address=args.ray,
                workers=args.ray_workers,
                progress=_bar_progress(bar),
            )
    return evaluations


def cmd_evaluate(args) -> None:
    corpus = load_corpus(args.corpus)
    if args.queries_jsonl:
        queries, source = load_query_file(args.queries_jsonl, corpus), args.queries_jsonl
    else:
        _, held_out = split_indices(corpus)
        queries, source = description_queries(corpus, held_out), "held-out description -> article queries"
    pair = load_pair(args.pair)
    cache = ResultCache(args.cache)
    bars = {}
    started = time.perf_counter()
    if args.ray or args.chunk_size:
        evaluations = _evaluate_in_chunks(args, pair, corpus, queries, cache)
    else:
        evaluations = evaluate_pair(
            pair,
            corpus,
            queries,
            cache,
            progress=lambda name, done, total: bars.setdefault(name, _tqdm_progress(f"indexing for model {name}"))(
                done, total
            ),
        )
    print(
        f"{len(queries)} queries ({source}) over {len(corpus)} passages, "
        f"{time.perf_counter() - started:.1f} s. Mean [95% bootstrap interval]:"
    )
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
    config = probe_config(args)
    corpus = load_corpus(args.corpus)
    pair = load_pair(args.pair)
    cache = ResultCache(args.cache)
    indexes = None
    if config.negatives != "bm25":
        indexes = {
            config.negatives: load_index(
                pair.models[config.negatives],
                corpus,
                cache,
                progress=_tqdm_progress(f"indexing for model {config.negatives}"),
            )
        }
    bar = tqdm(desc="probing (encode + fit)", unit="step")
    started = time.perf_counter()
    result = run_probing(pair, corpus, config, cache, indexes, progress=_bar_progress(bar))
    bar.close()
    print(
        f"Linear probing (arXiv 2402.11035 Table 1) on {corpus.name}: accuracy of picking the positive among "
        f"N candidates, {result.test_queries} held-out queries (probes fit on {result.train_queries}), "
        f"hard negatives: {config.negatives}, seed {config.seed}; "
        f"{time.perf_counter() - started:.1f} s here ({result.seconds:.1f} s when computed)."
    )
    for name in result.models:
        print(f"  {name}: {result.models[name]} ({result.towers[name]}, {result.layers[name]} layers)")
    print(format_table(result))


def cmd_neurons_aggregate(args) -> None:
    options = config_from_args(AggregateOptions, args)
    pair = load_pair(args.pair)
    corpus = load_corpus(args.corpus)
    cache = ResultCache(args.cache)
    queries = aggregate_sample(corpus, options.queries, options.seed)
    if not queries:
        raise CorpusError(f"Corpus {corpus.name} has no held-out description queries.")
    specs = {"A": pair.spec.a, "B": pair.spec.b}
    aggregates = {}
    for name, encoder in pair.models.items():
        index = load_index(encoder, corpus, cache, progress=_tqdm_progress(f"indexing for model {name}"))
        bar = tqdm(total=len(queries), desc=f"model {name} (per-query results cached)", unit="query")
        started = time.perf_counter()
        if args.ray:
            aggregates[name] = aggregate_neurons_chunked(
                encoder,
                index,
                corpus,
                queries,
                cache,
                options.steps,
                args.chunk_size,
                spec=specs[name],
                address=args.ray,
                workers=args.ray_workers,
                progress=_bar_progress(bar),
            )
        else:
            aggregates[name] = aggregate_neurons(
                encoder, index, corpus, queries, cache, options.steps, _bar_progress(bar)
            )
        bar.close()
        print(f"model {name}: {len(queries)} queries in {time.perf_counter() - started:.1f} s")
    print(
        f"Figure 1 of arXiv 2402.11035 on {corpus.name}: {len(queries)} held-out description queries "
        f"(seed {options.seed}), query tower, target = each model's own top-1 passage, m = {options.steps}, "
        f"t = {options.threshold}.\nNeurons above threshold in at least one query:"
    )
    labels = {name: aggregate.layer_counts(options.threshold) for name, aggregate in aggregates.items()}
    print(f"{'site':<14}{'layer':>6}" + "".join(f"{name:>8}" for name in labels))
    for site in SITES:
        for layer in range(len(labels["A"][site])):
            print(f"{site:<14}{layer + 1:>6}" + "".join(f"{counts[site][layer]:>8}" for counts in labels.values()))
        print(f"{site:<14}{'total':>6}" + "".join(f"{counts[site].sum():>8}" for counts in labels.values()))
    for name, aggregate in aggregates.items():
        strong = aggregate.strongly_activated(options.threshold)
        print(
            f"{name}: strongly activated per query (Table 2), mean: "
            + ", ".join(f"{site} {strong[site].mean():.1f}" for site in SITES)
        )


def cmd_token_ig(args) -> None:
    pair = load_pair(args.pair)
    corpus = load_corpus(args.corpus)
    cache = ResultCache(args.cache)
    settings = ig_settings(args)
    for name, encoder in pair.models.items():
        index = load_index(encoder, corpus, cache, progress=_tqdm_progress(f"indexing for model {name}"))
        ranking = retrieve(encoder, index, corpus, args.query, TOP_K, cache=cache)
        started = time.perf_counter()
        result = cached_ranking(
            cache,
            encoder,
            corpus,
            ranking.query.text,
            ranking.indices,
            settings,
            progress=_tqdm_progress(f"model {name}: token IG (query runs + passages)"),
        )
        worst = max(
            [result.query_total] + [s for p in result.pairs for s in (p.query, p.passage)],
            key=lambda attribution: attribution.relative_delta,
        )
        print(
            f"model {name} ({encoder.label}): top-{len(result.pairs)} attributions in "
            f"{time.perf_counter() - started:.1f} s; largest completeness delta {worst.relative_delta:.2%}"
        )
        print("  query: " + "  ".join(f"{w.text} {w.score:+.4f}" for w in result.query_total.words()))
        _print_words(word_sums([p.passage for p in result.pairs], drop_stopwords=True), args.words, "passage")


def _print_words(table: pd.DataFrame, count: int, side: str) -> None:
    for label, rows in (
        ("positive", table[table.total > 0].head(count)),
        ("negative", table[table.total < 0].tail(count)[::-1]),
    ):
        print(f"  {label} {side} words: " + ", ".join(f"{w} {t:+.3f}" for w, t in zip(rows.word, rows.total)))


@dataclass(frozen=True)
class WordCloudOptions:
    """word-clouds: token IG of many queries' top passages, merged into corpus-level word tables."""

    queries: int = cli_option(200, "size of the fixed sample of held-out description queries")
    queries_file: str | None = cli_option(None, "a text file of queries, one per line, instead of the sample")
    seed: int = cli_option(0, "seed of the sample")
    drop_stopwords: bool = cli_option(True, "leave stop words and punctuation out of the word tables")
    words: int = cli_option(10, "words printed per sign, side and model")
    output: str | None = cli_option(None, "write the word tables to this file: CSV if it ends in .csv, else JSON")
    json: bool = cli_option(False, "print the word tables as JSON")


def _read_queries(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise LensError(f"Query file {file} does not exist.")
    queries = [clean_query(line) for line in file.read_text(encoding="utf-8", errors="replace").splitlines()]
    if not any(queries):
        raise LensError(f"Query file {file} has no queries (one per line).")
    return [query for query in queries if query]


def cmd_word_clouds(args) -> None:
    options = config_from_args(WordCloudOptions, args)
    pair, corpus, cache = load_pair(args.pair), load_corpus(args.corpus), ResultCache(args.cache)
    if options.queries_file:
        queries = _read_queries(options.queries_file)
    else:
        queries = [query.text for query in aggregate_sample(corpus, options.queries, options.seed)]
        if not queries:
            raise CorpusError(f"Corpus {corpus.name} has no held-out description queries.")
    settings = ig_settings(args)
    found, seconds = {}, {}
    for (name, encoder), spec in zip(pair.models.items(), (pair.spec.a, pair.spec.b)):
        index = load_index(encoder, corpus, cache, progress=_tqdm_progress(f"indexing for model {name}"))
        started = time.perf_counter()
        description = f"model {name}: token IG of the top-{TOP_K} (results cached)"
        with tqdm(total=len(queries), desc=description, unit="query") as bar:
            found[name] = word_clouds_chunked(
                encoder,
                index,
                corpus,
                queries,
                cache,
                settings,
                options.drop_stopwords,
                args.chunk_size,
                spec=spec if args.ray else None,
                address=args.ray,
                workers=args.ray_workers,
                progress=_bar_progress(bar),
            )
        seconds[name] = time.perf_counter() - started
    payload = {
        "queries": len(queries),
        "top_k": TOP_K,
        "settings": settings.params(),
        "drop_stopwords": options.drop_stopwords,
        "models": {
            name: {
                "label": encoder.label,
                "passage_words": found[name].passage.to_dict("records"),
                "query_words": found[name].query.to_dict("records"),
            }
            for name, encoder in pair.models.items()
        },
    }
    if options.output:
        output = Path(options.output)
        if output.suffix == ".csv":
            tables = {(name, "passage"): words.passage for name, words in found.items()}
            tables |= {(name, "query"): words.query for name, words in found.items()}
            pd.concat(tables, names=["model", "side"]).reset_index(["model", "side"]).to_csv(output, index=False)
        else:
            output.write_text(json.dumps(_plain(payload), indent=1))
    if options.json:
        print(json.dumps(_plain(payload), indent=1))
        return
    print(
        f"Token IG of {len(queries)} queries and each model's top-{TOP_K} passages, word attributions summed over "
        "all of them" + (f"; tables written to {options.output}" if options.output else "")
    )
    for name, encoder in pair.models.items():
        print(f"model {name} ({encoder.label}), {seconds[name]:.1f} s:")
        _print_words(found[name].passage, options.words, "passage")
        _print_words(found[name].query, options.words, "query")


def _twin_queries(options: TwinOptions, corpus) -> list[LabelledQuery]:
    """--queries N: the fixed held-out sample; else --query."""
    if options.queries:
        queries = aggregate_sample(corpus, options.queries, options.seed)
        if not queries:
            raise CorpusError(f"Corpus {corpus.name} has no held-out description queries.")
        return queries
    if not options.query:
        raise LensError("Give --query or --queries N.")
    return [LabelledQuery(options.query, -1, frozenset())]


def _plain(value):
    """JSON-ready: arrays as lists, undefined values (NaN) as null."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return None if np.isnan(value) else float(value)
    return value.item() if isinstance(value, np.generic) else value


def _print_result(options: TwinOptions, payload: dict, lines: list[str]) -> None:
    print(json.dumps(_plain(payload), indent=1) if options.json else "\n".join(lines))


def _grid(values, fmt: str = "{:8.3f}") -> list[str]:
    """A (layers, PATCH_SITES) table, one line per layer."""
    header = f"{'layer':>6}" + "".join(f"{site:>14}" for site in PATCH_SITES)
    return [header] + [
        f"{layer + 1:>6}" + "".join(f"{fmt.format(v):>14}" for v in row) for layer, row in enumerate(values)
    ]


def cmd_patch(args) -> None:
    options = config_from_args(TwinOptions, args)
    pair, corpus, cache = load_pair(args.pair), load_corpus(args.corpus), ResultCache(args.cache)
    index_b = load_index(pair.b, corpus, cache, progress=_tqdm_progress("indexing for model B"))
    if options.queries:
        queries = _twin_queries(options, corpus)
        bar = tqdm(total=len(queries), desc="patching (per-query results cached)", unit="query")
        aggregate = aggregate_patching(pair, index_b, corpus, queries, cache, _bar_progress(bar))
        bar.close()
        payload = {"queries": aggregate.queries, "sites": PATCH_SITES, "directions": {}}
        lines = [
            f"Activation patching over {len(queries)} held-out description queries, target = B's embedding of "
            "B's top-1; recovered fraction (s_patched - s_R) / (s_D - s_R), pooled: the per-query fractions "
            "weighted by |s_D - s_R| [95% bootstrap], and their median, per layer:"
        ]
        for direction in DIRECTIONS:
            summary = aggregate.summary(direction)
            payload["directions"][direction] = {
                "pooled": summary.pooled,
                "low": summary.low,
                "high": summary.high,
                "median": summary.median,
                "defined": summary.defined,
                "median_rank": np.median(aggregate.ranks(direction), 0),
            }
            lines += [f"{direction} pooled", *_grid(summary.pooled), f"{direction} median", *_grid(summary.median)]
            lines += [f"{direction} 95% interval"] + [
                f"{layer + 1:>6}" + "".join(f"{f'[{lo:.2f}, {hi:.2f}]':>14}" for lo, hi in zip(low, high))
                for layer, (low, high) in enumerate(zip(summary.low, summary.high))
            ]
        _print_result(options, payload, lines)
        return
    if not options.query:
        raise LensError("Give --query or --queries N.")
    passage = _passage_index(corpus, args.passage)
    result = patch_query(pair, index_b, corpus, options.query, passage, cache)
    payload = {
        "query": result.query,
        "passage": corpus.ids[result.passage],
        "sites": PATCH_SITES,
        "directions": {
            name: {
                "recipient_score": d.recipient_score,
                "donor_score": d.donor_score,
                "recipient_rank": d.recipient_rank,
                "donor_rank": d.donor_rank,
                "scores": d.scores,
                "recovered": d.recovered,
                "ranks": d.ranks,
            }
            for name, d in result.directions.items()
        },
    }
    lines = [f"target: B's embedding of {corpus.titles[result.passage]!r}; ranks in B's index"]
    for name, d in result.directions.items():
        lines += [
            f"{name}: s_{d.recipient} = {d.recipient_score:.4f} (rank {d.recipient_rank}), "
            f"s_{d.donor} = {d.donor_score:.4f} (rank {d.donor_rank}); recovered fraction:",
            *_grid(d.recovered),
            "rank of the target:",
            *_grid(d.ranks, "{:8.0f}"),
        ]
    if note := near_tie_note(result):
        lines.append(note)
    _print_result(options, payload, lines)


def cmd_neuron_overlap(args) -> None:
    options = config_from_args(TwinOptions, args)
    pair, corpus, cache = load_pair(args.pair), load_corpus(args.corpus), ResultCache(args.cache)
    queries = _twin_queries(options, corpus)
    indexes = {
        name: load_index(encoder, corpus, cache, progress=_tqdm_progress(f"indexing for model {name}"))
        for name, encoder in pair.models.items()
    }
    bars = {}

    def report(name: str, done: int, total: int) -> None:
        if name not in bars:
            bars[name] = tqdm(total=total, desc=f"model {name} attributions", unit="query")
        _bar_progress(bars[name])(done, total)

    overlap = neuron_overlap(pair, indexes, corpus, queries, cache, options.threshold, options.steps, report)
    for bar in bars.values():
        bar.close()
    payload = {
        "queries": overlap.queries,
        "threshold": overlap.threshold,
        "sites": {site: {**overlap.means(site), "recruited_share": overlap.recruited_share(site)} for site in SITES},
    }
    lines = [
        f"Neuron overlap, {len(queries)} queries, t = {options.threshold}, m = {options.steps}; "
        "per layer, means over queries:"
    ]
    for site in SITES:
        means = overlap.means(site)
        lines.append(f"{site}: share of B's neurons that A did not have: {overlap.recruited_share(site):.3f}")
        lines.append(f"{'layer':>6}" + "".join(f"{name:>11}" for name in (*COUNTS, "jaccard")))
        lines += [
            f"{layer + 1:>6}" + "".join(f"{means[name][layer]:>11.3f}" for name in (*COUNTS, "jaccard"))
            for layer in range(len(means["kept"]))
        ]
    _print_result(options, payload, lines)


def cmd_paraphrase(args) -> None:
    options = config_from_args(TwinOptions, args)
    pair, corpus, cache = load_pair(args.pair), load_corpus(args.corpus), ResultCache(args.cache)
    needs = [Need(tuple(args.phrasing))] if args.phrasing else load_needs()[: options.queries or None]
    indexes = {
        name: load_index(encoder, corpus, cache, progress=_tqdm_progress(f"indexing for model {name}"))
        for name, encoder in pair.models.items()
    }
    bar = tqdm(total=len(needs), desc="paraphrase agreement", unit="need")
    report = paraphrase_agreement(
        pair, indexes, corpus, needs, cache, args.k, options.threshold, options.steps, _bar_progress(bar)
    )
    bar.close()
    payload = {"needs": len(needs), "k": args.k, "models": {}, "b_minus_a": {}}
    lines = [
        f"Paraphrase agreement over {len(needs)} needs, top-{args.k}, t = {options.threshold}, m = {options.steps}:"
    ]
    for name in pair.models:
        neurons = {site: report.neuron_jaccard(name, site) for site in SITES}
        payload["models"][name] = {
            "retrieval_jaccard": float(report.retrieval_jaccard(name).mean()),
            "gold_found_by_all": report.found_by_all(name),
            "neuron_jaccard_per_layer": {site: np.nanmean(v, 0) for site, v in neurons.items()},
        }
        lines.append(
            f"{name}: top-{args.k} Jaccard {report.retrieval_jaccard(name).mean():.3f}, gold found by every "
            f"phrasing {report.found_by_all(name):.2f}; neuron Jaccard per layer: "
            + "; ".join(f"{site} " + " ".join(f"{v:.3f}" for v in np.nanmean(neurons[site], 0)) for site in SITES)
        )
    for label, site in (("retrieval", None), *((f"neurons {site}", site) for site in SITES)):
        mean, low, high, count = report.difference(site)
        payload["b_minus_a"][label] = {"mean": mean, "low": low, "high": high, "needs": count}
        lines.append(f"B - A {label} agreement (paired over {count} needs): {mean:+.3f} [{low:+.3f}, {high:+.3f}]")
    _print_result(options, payload, lines)


def cmd_cka(args) -> None:
    options = config_from_args(TwinOptions, args)
    pair, corpus, cache = load_pair(args.pair), load_corpus(args.corpus), ResultCache(args.cache)
    queries = aggregate_sample(corpus, options.queries or 50, options.seed)
    similarity = layer_similarity(pair, corpus, queries, cache)
    payload = {"queries": len(queries), "cka": similarity.cka, "pca_explained": similarity.explained}
    lines = [
        f"Linear CKA of A and B per layer (0 = embeddings), {len(queries)} held-out queries and their gold passages:",
        f"{'layer':>6}" + "".join(f"{kind:>10}" for kind in INPUTS),
    ]
    lines += [
        f"{layer:>6}" + "".join(f"{similarity.cka[kind][layer]:>10.3f}" for kind in INPUTS)
        for layer in range(len(similarity.cka["queries"]))
    ]
    if note := undefined_note(similarity.cka):
        lines.append(note)
    _print_result(options, payload, lines)


@dataclass(frozen=True)
class PairMapOptions:
    """token-pairs: one (query, passage) pair per model."""

    query: str | None = cli_option(None, "the query (required)")
    passage: str | None = cli_option(None, "id of the passage (default: each model's own top-1)")
    steps: int = cli_option(DEFAULT_PAIR_STEPS, "Gauss-Legendre steps of both IG paths")
    top: int = cli_option(10, "strongest token pairs printed per model")
    json: bool = cli_option(False, "print the result as JSON")


@dataclass(frozen=True)
class FaithfulnessOptions:
    """faithfulness: methods' ERASER comprehensiveness / sufficiency and agreement over held-out queries."""

    queries: int = cli_option(50, "size of the fixed sample of held-out description queries")
    seed: int = cli_option(0, "seed of the sample and of the random orders")
    k_max: int = cli_option(10, "K: tokens removed or kept, k = 1..K")
    random_orders: int = cli_option(3, "random token orders of the control")
    json: bool = cli_option(False, "print the result as JSON")


def _passage_index(corpus, passage_id: str | None) -> int | None:
    if passage_id is None:
        return None
    position = corpus.position(passage_id)
    if position is None:
        raise CorpusError(f"Corpus {corpus.name} has no passage with id {passage_id!r}.")
    return position


def cmd_token_pairs(args) -> None:
    options = config_from_args(PairMapOptions, args)
    if not options.query:
        raise LensError("Give the query with --query.")
    pair, corpus, cache = load_pair(args.pair), load_corpus(args.corpus), ResultCache(args.cache)
    chosen = _passage_index(corpus, options.passage)
    payload, lines = {"query": options.query, "steps": options.steps, "models": {}}, []
    for name, encoder in pair.models.items():
        passage = chosen
        if passage is None:
            index = load_index(encoder, corpus, cache, progress=_tqdm_progress(f"indexing for model {name}"))
            passage = retrieve(encoder, index, corpus, options.query, 1, cache=cache).indices[0]
        started = time.perf_counter()
        result = cached_pair_map(
            cache, encoder, options.query, corpus.titles[passage], corpus.texts[passage], options.steps
        )
        rows, columns, matrix = result.tokens()
        payload["models"][name] = {
            "label": encoder.label,
            "passage": corpus.ids[passage],
            "title": corpus.titles[passage],
            "query_tokens": rows,
            "passage_tokens": columns,
            "matrix": matrix,
            "total": result.total,
            "score": result.score,
            "baseline_score": result.baseline_score,
            "query_baseline_score": result.query_baseline_score,
            "passage_baseline_score": result.passage_baseline_score,
            "interaction": result.interaction,
            "main_effects": result.main_effects,
            "deviation": result.deviation,
            "quadrature_error": result.quadrature_error,
        }
        lines.append(
            f"model {name} ({encoder.label}), passage {corpus.ids[passage]} {corpus.titles[passage]!r}, "
            f"{time.perf_counter() - started:.1f} s: Σ M = {result.total:+.4f}, s(x) − s(baselines) = "
            f"{result.score - result.baseline_score:+.4f}, deviation {result.deviation:+.4f} = quadrature "
            f"error {result.quadrature_error:+.2e} − main effects {result.main_effects:+.4f}"
        )
        strongest = np.argsort(-np.abs(matrix), axis=None)[: options.top]
        lines += [
            f"  {rows[i]:>15} × {columns[j]:<15} {matrix[i, j]:+.4f}"
            for i, j in zip(*np.unravel_index(strongest, matrix.shape))
        ]
    print(json.dumps(_plain(payload), indent=1) if options.json else "\n".join(lines))


def cmd_faithfulness(args) -> None:
    options = config_from_args(FaithfulnessOptions, args)
    pair, corpus, cache = load_pair(args.pair), load_corpus(args.corpus), ResultCache(args.cache)
    queries = aggregate_sample(corpus, options.queries, options.seed)
    if not queries:
        raise CorpusError(f"Corpus {corpus.name} has no held-out description queries.")
    settings = IGSettings()
    indexes = {
        name: load_index(encoder, corpus, cache, progress=_tqdm_progress(f"indexing for model {name}"))
        for name, encoder in pair.models.items()
    }
    panels, results = {name: [] for name in indexes}, {name: [] for name in indexes}
    started = time.perf_counter()
    # Query by query, both models: an interrupted run has compared A and B on the same queries (and is cached).
    for query in tqdm(queries, desc="methods and faithfulness, both models", unit="query"):
        for name, encoder in pair.models.items():
            ranking = retrieve(encoder, indexes[name], corpus, query.text, FAITHFULNESS_CANDIDATES, cache=cache)
            panel, result = cached_faithfulness(
                cache,
                encoder,
                corpus,
                indexes[name],
                ranking.query.text,
                ranking.indices,
                ranking.indices[0],
                settings,
                options.k_max,
                options.random_orders,
                options.seed,
            )
            panels[name].append(panel)
            results[name].append(result)
    table, agreement = faithfulness_summary(results), agreement_summary(panels)
    payload = {
        "queries": len(queries),
        "seed": options.seed,
        "k_max": options.k_max,
        "random_orders": options.random_orders,
        "candidates": FAITHFULNESS_CANDIDATES,
        "seconds": time.perf_counter() - started,
        "models": {name: encoder.label for name, encoder in pair.models.items()},
        "faithfulness": table.to_dict("records"),
        "agreement": agreement.to_dict("records"),
    }
    if options.json:
        print(json.dumps(_plain(payload), indent=1))
        return
    print(
        f"{len(queries)} held-out description queries, each with the model's own top-1 passage, "
        f"ranked among its top-{FAITHFULNESS_CANDIDATES}; k = 1..{options.k_max}"
    )
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print("\nRank agreement between methods (mean over queries)")
    print(agreement.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


REPORT_VIEWS = ("retrieval", "token")


@dataclass(frozen=True)
class ReportOptions:
    """report: one page's main view as its report button writes it; the options are the page's widgets."""

    view: str = cli_option("retrieval", "the page: Retrieval or Token attributions", choices=REPORT_VIEWS)
    query: str | None = cli_option(None, "the query (required)")
    output: str | None = cli_option(None, "the zip file to write (required)")
    limit: int | None = cli_option(None, "only the first N passages of the corpus, as the app's $DPR_LENS_CORPUS_LIMIT")
    k: int = cli_option(10, "retrieval: top-k of each model")
    passage: str | None = cli_option(None, "token: id of the passage of both models (default: each model's top-1)")
    side: str = cli_option("query", "token: tokens removed by the deletion curves", choices=("query", "passage"))
    k_max: int = cli_option(10, "token: K, tokens removed by the deletion curves")
    drop_stopwords: bool = cli_option(True, "token: leave stop words and punctuation out of the word tables")


def _token_report(pair, corpus, cache, indexes, options: ReportOptions, settings: IGSettings):
    """The token page's main view: each model's top passages, chosen passage and deletion curve."""
    passage = _passage_index(corpus, options.passage)
    analyses, chosen, chosen_pairs, curves = {}, {}, {}, {}
    for name, encoder in pair.models.items():
        ranking = retrieve(encoder, indexes[name], corpus, options.query, TOP_K, cache=cache)
        query = ranking.query.text
        analyses[name] = cached_ranking(
            cache, encoder, corpus, query, ranking.indices, settings, _tqdm_progress(f"model {name}: token IG")
        )
        chosen[name] = ranking.indices[0] if passage is None else passage
        chosen_pairs[name] = analyses[name].pair_for(chosen[name]) or cached_pair(
            cache, encoder, query, corpus.titles[chosen[name]], corpus.texts[chosen[name]], settings
        )
        curves[name] = cached_deletion_curve(
            cache, encoder, chosen_pairs[name], options.side, k_max=options.k_max, settings=settings
        )
    return token_bundle(
        pair,
        corpus,
        settings,
        analyses,
        chosen,
        chosen_pairs,
        curves,
        options.side,
        options.k_max,
        options.drop_stopwords,
    )


def cmd_report(args) -> None:
    options = config_from_args(ReportOptions, args)
    if not options.query or not options.output:
        raise LensError("Give the query with --query and the zip file with --output.")
    pair, corpus, cache = load_pair(args.pair), load_corpus(args.corpus, options.limit), ResultCache(args.cache)
    indexes = {
        name: load_index(encoder, corpus, cache, progress=_tqdm_progress(f"indexing for model {name}"))
        for name, encoder in pair.models.items()
    }
    if options.view == "retrieval":
        rankings = {
            name: retrieve(encoder, indexes[name], corpus, options.query, options.k, cache=cache)
            for name, encoder in pair.models.items()
        }
        bundle = retrieval_bundle(pair, corpus, rankings, options.k)
    else:
        bundle = _token_report(pair, corpus, cache, indexes, options, ig_settings(args))
    Path(options.output).write_bytes(build_zip(bundle))
    print(f"wrote {options.output}: {bundle.title}")


def _command(commands, name: str, help: str, func) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help, description=help, formatter_class=HelpWithDefaults)
    parser.set_defaults(func=func)
    parser.add_argument(
        "--device", help=f"cpu, cuda or cuda:N (default: ${DEVICE_ENV}, else cuda when there is a GPU, else cpu)"
    )
    parser.add_argument(
        "--encode-dtype",
        choices=tuple(ENCODE_DTYPES),
        help=f"precision of corpus and query encoding (default: ${ENCODE_DTYPE_ENV}, else fp32); "
        "attributions always run in fp32",
    )
    return parser


def _add_card_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--questions-jsonl",
        nargs="+",
        help=f"labelled query sets also scored on the card (default: {NATURAL_QUESTIONS}, {NATURAL_QUESTIONS_TEST} "
        f"and {NATURAL_QUESTIONS_TEST_LARGE} on the bundled corpus)",
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="MODEL",
        help="other models to show on the card too (an earlier twin, ingredients)",
    )


def _add_pair_and_corpus(parser: argparse.ArgumentParser, corpus_help: str = CORPUS_HELP) -> None:
    parser.add_argument("--pair", default=DEFAULT_PRESET, choices=sorted(PRESETS), help="model pair preset")
    parser.add_argument("--corpus", help=corpus_help)


def _add_ray_options(
    parser: argparse.ArgumentParser, work: str, chunk_size: int | None, chunk_help: str, per: str = "CPU"
) -> None:
    parser.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help=f"{work} on Ray actors: a local Ray without ADDRESS, else the cluster at ADDRESS "
        "(each chunk cached: a killed job resumes)",
    )
    parser.add_argument("--chunk-size", type=int, default=chunk_size, help=chunk_help)
    parser.add_argument("--ray-workers", type=int, help=f"Ray actors (default: one per {per})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m core", description=__doc__)
    parser.add_argument("--cache", help="cache directory (default: $DPR_LENS_CACHE or ~/.cache/dpr-lens)")
    commands = parser.add_subparsers(dest="command", required=True)

    pretrain = _command(commands, "pretrain", "masked-LM pre-training of a small BERT on the corpus", cmd_pretrain)
    add_config_arguments(pretrain, PretrainConfig)
    pretrain.add_argument("--corpus", help=CORPUS_HELP)
    pretrain.add_argument("--no-eval", action="store_true", help="skip the retrieval evaluation and card")

    train = _command(commands, "train", "DPR-train a twin of a base encoder on the corpus", cmd_train)
    add_config_arguments(train, TrainConfig)
    train.add_argument("--corpus", help=CORPUS_HELP)
    train.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation and card")
    _add_card_arguments(train)

    soup = _command(
        commands, "soup", "average the weights of twins trained from one base (a model soup) and card it", cmd_soup
    )
    soup.add_argument("--twins", nargs="+", required=True, metavar="DIR", help="twin directories made by train")
    soup.add_argument("--weights", nargs="+", type=float, help="one weight per twin, summing to 1 (default: equal)")
    soup.add_argument("--output", required=True, help="directory for the soup")
    soup.add_argument("--corpus", help=CORPUS_HELP)
    soup.add_argument("--no-eval", action="store_true", help="skip the evaluation and card")
    _add_card_arguments(soup)

    card = _command(
        commands, "twin-card", "evaluate a trained twin or a soup again and rewrite its card", cmd_twin_card
    )
    card.add_argument("--twin", required=True, help="the twin's directory (with its train_log.json or soup_log.json)")
    card.add_argument("--corpus", help=CORPUS_HELP)
    _add_card_arguments(card)

    build = _command(commands, "build-index", "encode the corpus for both models of a pair", cmd_build_index)
    _add_pair_and_corpus(build)
    build.add_argument("--prebuilt", action="store_true", help="also write assets/embeddings/ files")
    build.add_argument(
        "--shards",
        type=int,
        help="encode --corpus FILE (.tsv, .jsonl, .parquet) in N resumable "
        "shards on disk, an IVF index from --ivf-threshold passages",
    )
    build.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="encode the shards on Ray: a local Ray without ADDRESS, else the cluster at ADDRESS",
    )
    build.add_argument("--ray-workers", type=int, help="Ray actors (default: one per GPU, else per CPU)")
    build.add_argument("--output", help="directory of the sharded indexes (default: $DPR_LENS_INDEX_DIR or indexes)")
    add_config_arguments(build, IVFSettings)

    evaluate = _command(
        commands, "evaluate", "R@k, MRR@10, nDCG@10 with bootstrap intervals, wins/losses of B vs A", cmd_evaluate
    )
    _add_pair_and_corpus(evaluate)
    evaluate.add_argument(
        "--queries-jsonl",
        help='labelled queries, one {"query": ..., "gold_ids": [...]} per line, e.g. '
        f"{NATURAL_QUESTIONS} (default: held-out description -> article queries)",
    )
    evaluate.add_argument(
        "--win-at", type=int, default=1, help="a query counts as right when a relevant passage is in the top k"
    )
    evaluate.add_argument("--show", type=int, default=10, help="queries listed per side of the wins/losses")
    _add_ray_options(
        evaluate,
        "encode chunks of queries",
        None,
        f"evaluate in cached chunks of N queries, rounded up to whole batches of {QUERY_BATCH} (a killed run "
        f"resumes; default with --ray: {EVALUATION_CHUNK_SIZE})",
    )

    probe = _command(commands, "probe", "layer-wise linear probing, like Table 1 of arXiv 2402.11035", cmd_probe)
    _add_pair_and_corpus(probe, DESCRIBED_CORPUS_HELP)
    add_config_arguments(probe, ProbeConfig, PROBE_OPTIONS)

    neurons = _command(
        commands,
        "neurons-aggregate",
        "knowledge-neuron counts over many queries, like Figure 1 of arXiv 2402.11035",
        cmd_neurons_aggregate,
    )
    _add_pair_and_corpus(neurons, DESCRIBED_CORPUS_HELP)
    add_config_arguments(neurons, AggregateOptions)
    _add_ray_options(neurons, "attribute chunks of queries", 50, "queries per Ray chunk")

    token_ig = _command(
        commands,
        "token-ig",
        "token Integrated Gradients for a query and both models' "
        f"top-{TOP_K} passages (fills the cache the page reads)",
        cmd_token_ig,
    )
    token_ig.add_argument("query")
    _add_pair_and_corpus(token_ig)
    add_config_arguments(token_ig, IGSettings, IG_OPTIONS, exclude=("start_substitution",))
    token_ig.add_argument("--words", type=int, default=10, help="words printed per sign")

    word_clouds = _command(
        commands,
        "word-clouds",
        f"token IG of many queries and both models' top-{TOP_K} passages (fills the cache the token page reads), "
        "word attributions summed over all queries",
        cmd_word_clouds,
    )
    _add_pair_and_corpus(word_clouds, DESCRIBED_CORPUS_HELP)
    add_config_arguments(word_clouds, WordCloudOptions)
    add_config_arguments(word_clouds, IGSettings, IG_OPTIONS, exclude=("start_substitution",))
    _add_ray_options(word_clouds, "attribute chunks of queries", 4, "queries per chunk", per="GPU, else per CPU")

    twin_commands = (
        ("patch", "activation patching between the twins, per layer and site", cmd_patch),
        ("neuron-overlap", "knowledge neurons kept, dropped and recruited from A to B", cmd_neuron_overlap),
        (
            "paraphrase",
            "agreement of retrievals and neuron sets across phrasings of one need "
            "(--queries N: the first N built-in needs)",
            cmd_paraphrase,
        ),
        ("cka", "linear CKA of A's and B's layers on held-out queries and their gold passages", cmd_cka),
    )
    for name, help, func in twin_commands:
        twin = _command(commands, name, help, func)
        _add_pair_and_corpus(twin, DESCRIBED_CORPUS_HELP)
        add_config_arguments(twin, TwinOptions)
        if name == "patch":
            twin.add_argument("--passage", help="id of the target passage (default: B's top-1)")
        if name == "paraphrase":
            twin.add_argument("--phrasing", action="append", help="your own phrasing of one need (repeat it)")
            twin.add_argument("--k", type=int, default=DEFAULT_K, help="top-k compared across phrasings")

    token_pairs = _command(
        commands,
        "token-pairs",
        "token-pair interaction map (integrated Jacobians) of s(q, p) for a query and a passage, both models",
        cmd_token_pairs,
    )
    _add_pair_and_corpus(token_pairs)
    add_config_arguments(token_pairs, PairMapOptions)
    faithfulness = _command(
        commands,
        "faithfulness",
        "ERASER comprehensiveness / sufficiency (score drop and rank "
        "among the top-100) and rank agreement of the attribution methods over held-out queries",
        cmd_faithfulness,
    )
    _add_pair_and_corpus(faithfulness, DESCRIBED_CORPUS_HELP)
    add_config_arguments(faithfulness, FaithfulnessOptions)
    report = _command(
        commands,
        "report",
        "a zip of one page's main view, as its report button writes it: figures (PNG, SVG), data (CSV, JSON), "
        "settings, fingerprints, package versions and a Markdown summary",
        cmd_report,
    )
    _add_pair_and_corpus(report)
    add_config_arguments(report, ReportOptions)
    add_config_arguments(report, IGSettings, IG_OPTIONS, exclude=("start_substitution",))
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        use_device(args.device, args.encode_dtype)
        # One Ray session for the whole command, opened before any model loads: a bad address fails at once.
        with ray_session(args.ray) if getattr(args, "ray", None) else nullcontext():
            args.func(args)
    except LensError as error:
        parser.exit(2, f"error: {error}\n")
