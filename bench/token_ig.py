"""Token IG: our IG vs captum's defaults, the top-25 analysis of both offline models with the adaptive
quadrature vs fixed DEFAULT_STEPS, the cached repeat, and (--sweep) the completeness-delta sweep behind
DEFAULT_STEPS, DEFAULT_METHOD and the adaptive first pass (START_STEPS, sinh substitution).

    python -m bench.token_ig            # speed rows; writes bench/results_token_ig.md
    python -m bench.token_ig --flops    # FLOPs of the top-25 analysis, adaptive vs fixed (exact on a busy CPU)
    python -m bench.token_ig --sweep    # delta vs n_steps and method: 20 description queries, top-25 passages
    python -m bench.token_ig --quick    # (with any of the above) top-2 passages, model A only (speed), 2 queries
                                        # and fewer rules (sweep): checks
                                        # that it runs; the numbers are not results
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from captum.attr import LayerIntegratedGradients
from torch.utils.flop_counter import FlopCounterMode

from bench.harness import Results, Row, format_number, measure, parse_args, side_by_side, sized
from core.cache import ResultCache
from core.corpus import description_queries, load_wiki, split_indices
from core.figures import word_cloud_png
from core.index import load_index
from core.pair import Encoder, ModelSpec, load_encoder, load_pair
from core.retrieval import retrieve
from core.runtime import model_work
from core.token_attribution import (
    DEFAULT_METHOD,
    DEFAULT_STEPS,
    DELTA_TOLERANCE,
    TOP_K,
    IGSettings,
    Quadrature,
    SinhSubstitution,
    TokenAttribution,
    attribute_pair,
    attribute_passages,
    attribute_queries,
    attribute_ranking,
    cached_deletion_curve,
    cached_ranking,
    cloud_weights,
    pad_baseline,
    passage_embeddings,
    word_sums,
)

NAME, TITLE = "token_ig", "Token IG benchmark (last results)"
FULL_SWEEP = {"gausslegendre": (4, 6, 8, 12, 16, 20, 24, 32), "riemann_middle": (16, 32), "riemann_trapezoid": (16, 32)}
QUICK_SWEEP = {"gausslegendre": (4, 8), "riemann_middle": (16,), "riemann_trapezoid": (16,)}
SUBSTITUTED_SWEEP = (6, 8, 10, 12, 16)  # Gauss-Legendre steps with the first pass's sinh substitution
SWEEP_HEADING = "Completeness sweep (relative delta |Σattr - (s(x) - s(b))| / |s(x) - s(b)|)"
QUERY = "country in Western Europe"
FIXED = IGSettings(start_steps=None)  # every input at DEFAULT_STEPS: the reference for the adaptive default


def typical_pairs(count: int = 20) -> list[tuple[str, str, str]]:
    """The first `count` held-out description queries with their own article."""
    corpus = load_wiki()
    _, held_out = split_indices(corpus)
    return [
        (q.text, corpus.titles[q.source_index], corpus.texts[q.source_index])
        for q in description_queries(corpus, held_out)[:count]
    ]


def top_k() -> int:
    """The passages of the top-k analysis: TOP_K (2 in quick mode)."""
    return sized(TOP_K, 2)


def top_passages(encoder: Encoder, index_cache: ResultCache, query: str = QUERY) -> list[int]:
    corpus = load_wiki()
    return list(retrieve(encoder, load_index(encoder, corpus, index_cache), corpus, query, top_k()).indices)


def _token_error(result: TokenAttribution, reference: TokenAttribution) -> float:
    """Σ_t |a_t − a_t(reference)| / Σ_t |a_t(reference)|: per-token error, which completeness alone cannot see."""
    ours, ref = (np.array([t.score for t in r.tokens]) for r in (result, reference))
    return float(np.abs(ours - ref).sum() / max(np.abs(ref).sum(), 1e-12))


def _sweep_row(
    name: str, side: str, rule: str, results: list[TokenAttribution], reference: list[TokenAttribution]
) -> Row:
    """value: the median relative delta in %; the other statistics as columns."""
    relative = np.array([r.relative_delta for r in results])
    errors = np.array([_token_error(r, ref) for r, ref in zip(results, reference)])
    row = Row(
        f"model {name}, {side}, {rule}",
        float(np.median(relative)) * 100,
        "% (median delta)",
        columns={
            "p90 (%)": format_number(float(np.quantile(relative, 0.9)) * 100),
            "max (%)": format_number(float(relative.max()) * 100),
            f"within {DELTA_TOLERANCE:.0%}": f"{int((relative <= DELTA_TOLERANCE).sum())}/{len(relative)}",
            "mean steps": format_number(float(np.mean([r.n_steps for r in results]))),
            "token error max": format_number(float(errors.max())),
        },
    )
    print(row, flush=True)
    return row


def sweep(encoders: dict[str, Encoder], index_cache: ResultCache, count: int = 20) -> list[Row]:
    """Relative completeness delta by rule (plain step counts, sinh-substituted Gauss-Legendre step counts, then
    the adaptive default) for three input sets: the query and the passage side of `count` (description query,
    own article) pairs, and the passage side of the top-25 passages of QUERY (the workload of the top-25
    analysis). token_err_max compares each input's token attributions with those of plain Gauss-Legendre at
    its largest count; mean_steps is the mean step count of the rule(s) the inputs ended with."""
    corpus = load_wiki()
    pairs = typical_pairs(sized(count, 2))
    plain = sized(FULL_SWEEP, QUICK_SWEEP)
    substituted = sized(SUBSTITUTED_SWEEP, SUBSTITUTED_SWEEP[1:2])
    queries, titles, texts = (list(column) for column in zip(*pairs))
    rows = []
    for name, encoder in encoders.items():
        query_vectors = encoder.encode_queries(queries)
        embeddings = passage_embeddings(encoder, titles, texts, FIXED)
        hits = top_passages(encoder, index_cache)
        top_titles, top_texts = [corpus.titles[i] for i in hits], [corpus.texts[i] for i in hits]
        top_vector = encoder.encode_queries([QUERY])[0]
        # passes: one rule for every input, or None for the default adaptive passes.
        runs = {
            "query": lambda passes: attribute_queries(encoder, queries, embeddings, passes=passes),
            "passage": lambda passes: [
                attribute_passages(encoder, [t], [x], v, passes=passes)[0]
                for t, x, v in zip(titles, texts, query_vectors)
            ],
            f"passage, top-{len(hits)} of '{QUERY}'": lambda passes: attribute_passages(
                encoder, top_titles, top_texts, top_vector, passes=passes
            ),
        }
        for side, run_side in runs.items():
            reference = run_side([Quadrature(max(plain[DEFAULT_METHOD]), DEFAULT_METHOD)])
            methods = plain if side in ("query", "passage") else {DEFAULT_METHOD: plain[DEFAULT_METHOD]}
            rules = [Quadrature(n_steps, method) for method, step_counts in methods.items() for n_steps in step_counts]
            rules += [Quadrature(n_steps, DEFAULT_METHOD, SinhSubstitution()) for n_steps in substituted]
            for rule in rules:
                rows.append(_sweep_row(name, side, f"{rule.method}, {rule.describe()}", run_side([rule]), reference))
            rows.append(_sweep_row(name, side, f"adaptive default: {_adaptive_label()}", run_side(None), reference))
    return rows


def captum_defaults_pair(encoder: Encoder, query: str, title: str, text: str) -> None:
    """Both sides with captum's defaults (50 steps, Gauss-Legendre, internal_batch_size=1, weights trainable)."""
    passage_vector = torch.as_tensor(passage_embeddings(encoder, [title], [text], IGSettings()))
    query_vector = torch.as_tensor(encoder.encode_queries([query]))
    for tower, batch, other in (
        (encoder.query, encoder.query.tokenize([query], return_special_tokens_mask=True), passage_vector),
        (
            encoder.context,
            encoder.context.tokenize([title], [text], 256, return_special_tokens_mask=True),
            query_vector,
        ),
    ):
        names = [k for k in ("attention_mask", "token_type_ids") if k in batch]

        def score(input_ids, *rest, tower=tower, names=names):
            *extra, vector = rest
            return (tower.forward({"input_ids": input_ids, **dict(zip(names, extra))}) * vector).sum(-1)

        LayerIntegratedGradients(score, tower.word_embeddings).attribute(
            batch["input_ids"],
            baselines=pad_baseline(batch, tower.tokenizer.pad_token_id),
            additional_forward_args=(*(batch[k] for k in names), other),
            internal_batch_size=1,
        )


def _word_tables(ranking) -> dict[str, dict[str, float]]:
    """The core part of what the page builds on every rerun: the word table and both clouds' weights. (The
    token HTML and the deletion chart spec are built by ui/, which bench/ does not import.)"""
    table = word_sums([p.passage for p in ranking.pairs], drop_stopwords=True)
    return {sign: cloud_weights(table, sign) for sign in ("positive", "negative")}


def _render_clouds(ranking) -> None:
    """What the page does for one model's clouds when they are not in its cache: weights, then both PNGs."""
    for sign, weights in _word_tables(ranking).items():
        if weights:
            word_cloud_png(weights, "Blues" if sign == "positive" else "Reds")


def _adaptive_label() -> str:
    return " then ".join(rule.describe() for rule in IGSettings().passes)


def _refinement_note(ranking) -> str:
    worst = max(pair.passage.relative_delta for pair in ranking.pairs)
    rules = ", ".join(f"{count} with {rule.describe()}" for rule, count in ranking.passage_rules().items())
    return f"passages: {rules}; largest passage relative delta {worst:.2%}"


def run(index_cache: ResultCache | None = None) -> list[Row]:
    """index_cache holds the corpus embeddings (default: the app's cache); attributions go to fresh caches.

    The top-25 rows time the default (adaptive steps) against FIXED (every input at DEFAULT_STEPS), one after
    the other for the same query and passages.
    """
    pair = load_pair("offline")
    corpus = load_wiki()
    index_cache = index_cache or ResultCache()
    query, title, text = typical_pairs(1)[0]
    models = dict(list(pair.models.items())[: sized(2, 1)])  # quick mode: model A only
    rows = []
    for name, encoder in models.items():
        timings = side_by_side(
            {
                "ours": lambda: attribute_pair(encoder, query, title, text),
                "captum": lambda: captum_defaults_pair(encoder, query, title, text),
            }
        )
        rows.append(
            Row(
                f"one pair IG, both sides, model {name}",
                timings["ours"].min,
                "s",
                timings["captum"].min,
                f"ours: {DEFAULT_METHOD}, adaptive ({_adaptive_label()}), steps batched, "
                "no weight grads; captum defaults: 50 steps, internal_batch_size=1",
            )
        )
    k = top_k()
    with tempfile.TemporaryDirectory() as directory:
        cache = ResultCache(Path(directory) / "adaptive")
        fixed_cache = ResultCache(Path(directory) / "fixed")
        first, fixed, repeat = {}, {}, {}
        for name, encoder in models.items():
            hits = top_passages(encoder, index_cache)
            tokens = sum(
                len(encoder.context.tokenize([corpus.titles[i]], [corpus.texts[i]], 256)["input_ids"][0]) for i in hits
            )
            fixed[name] = measure(cached_ranking, fixed_cache, encoder, corpus, QUERY, hits, FIXED)
            first[name] = measure(cached_ranking, cache, encoder, corpus, QUERY, hits)
            ranking = first[name].value
            deletion = measure(
                lambda: {
                    side: cached_deletion_curve(cache, encoder, ranking.pairs[0], side) for side in ("query", "passage")
                }
            )
            rows.append(
                Row(
                    f"top-{k} analysis, model {name}",
                    first[name].min,
                    "s",
                    fixed[name].min,
                    f"ours: adaptive ({_adaptive_label()}), {_refinement_note(ranking)}; baseline: fixed "
                    f"{DEFAULT_STEPS} steps, {_refinement_note(fixed[name].value)}; query total + {k} x "
                    f"(query, passage), {tokens} passage tokens; deletion curves of the top passage (both "
                    f"sides): {deletion.min:.2f} s more",
                )
            )

            def cached_repeat(encoder=encoder, hits=hits):
                ranking = cached_ranking(cache, encoder, corpus, QUERY, hits)
                for side in ("query", "passage"):
                    cached_deletion_curve(cache, encoder, ranking.pairs[0], side)
                _word_tables(ranking)

            repeat[name] = measure(cached_repeat)
        ours_total, fixed_total = sum(t.min for t in first.values()), sum(t.min for t in fixed.values())
        which = "both models" if len(models) > 1 else f"model {next(iter(models))}"
        rows.append(
            Row(
                f"top-{k} analysis, {which}",
                ours_total,
                "s",
                fixed_total,
                f"goal <= 60 s; query '{QUERY}'; baseline: fixed {DEFAULT_STEPS} steps",
            )
        )
        rows.append(
            Row(
                f"cached repeat, {which}",
                sum(t.min for t in repeat.values()),
                "s",
                note="rankings and deletion curves from the disk cache + the word table and cloud weights "
                "(core only: the page's token HTML and chart spec are built in ui/, not timed here); "
                "goal <= 1 s",
            )
        )
        clouds = measure(_render_clouds, first[next(iter(models))].value, repeats=3)
        rows.append(
            Row(
                "word clouds of one model, uncached",
                clouds.min,
                "s",
                note=f"word table + positive and negative 480 x 300 PNGs (core.figures.word_cloud_png) of model "
                f"{next(iter(models))}'s top-{k}; best of 3; the page caches the PNGs per weights",
            )
        )
        cache.close()
        fixed_cache.close()
    return rows


@model_work  # the counter sees its own thread only: run it on the model worker, where the work runs
def _counted_ranking(encoder: Encoder, titles, texts, hits, settings: IGSettings) -> tuple[float, str]:
    """(GFLOP, refinement note) of one top-k analysis."""
    with FlopCounterMode(display=False) as counter:
        ranking = attribute_ranking(encoder, QUERY, titles, texts, hits, settings)
    return counter.get_total_flops() / 1e9, _refinement_note(ranking)


def flops(index_cache: ResultCache | None = None) -> list[Row]:
    """FLOPs (torch.utils.flop_counter; it agrees with torch.profiler(with_flops=True)) of the top-25 analysis,
    adaptive vs fixed steps: exact on a shared CPU where wall time is not."""
    pair = load_pair("offline")
    corpus = load_wiki()
    index_cache = index_cache or ResultCache()
    rows = []
    for name, encoder in pair.models.items():
        hits = top_passages(encoder, index_cache)
        counted = {}
        for label, settings in (("adaptive", IGSettings()), ("fixed", FIXED)):
            counted[label] = _counted_ranking(
                encoder, [corpus.titles[i] for i in hits], [corpus.texts[i] for i in hits], hits, settings
            )
        rows.append(
            Row(
                f"top-{len(hits)} analysis, model {name}",
                counted["adaptive"][0],
                "GFLOP",
                counted["fixed"][0],
                f"ours: adaptive, {counted['adaptive'][1]}; baseline: fixed "
                f"{DEFAULT_STEPS} steps, {counted['fixed'][1]}",
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="completeness delta vs n_steps and method")
    parser.add_argument("--flops", action="store_true", help="FLOPs of the top-25 analysis, adaptive vs fixed")
    parser.add_argument("--models", default="AB", help="for --sweep: A, B or AB (B needs the trained twin)")
    parser.add_argument(
        "--cache",
        help="cache holding the corpus embeddings (default: $DPR_LENS_CACHE or "
        "~/.cache/dpr-lens); attributions are timed in a fresh cache",
    )
    args = parse_args(parser)
    results = Results(NAME, TITLE)
    index_cache = ResultCache(args.cache)
    if args.sweep:
        specs = {"A": ModelSpec("A", "minilm:")}
        if "B" in args.models:
            specs["B"] = load_pair("offline").spec.b
        rows = sweep({name: load_encoder(spec) for name, spec in specs.items() if name in args.models}, index_cache)
        heading = SWEEP_HEADING
    elif args.flops:
        rows = flops(index_cache)
        heading = "FLOPs"
    else:
        rows = run(index_cache)
        heading = "Speed"
    results.report(heading, rows)


if __name__ == "__main__":
    main()
