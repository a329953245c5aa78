"""Token IG: our IG vs captum's defaults, the top-25 analysis of both offline models with the adaptive
quadrature vs fixed DEFAULT_STEPS, the cached repeat, and (--sweep) the completeness-delta sweep behind
DEFAULT_STEPS, DEFAULT_METHOD and the adaptive first pass (START_STEPS, sinh substitution).

    python -m bench.token_ig            # speed rows; writes bench/results_token_ig.md
    python -m bench.token_ig --flops    # FLOPs of the top-25 analysis, adaptive vs fixed (exact on a busy CPU)
    python -m bench.token_ig --sweep    # delta vs n_steps and method: 20 description queries, top-25 passages
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from captum.attr import LayerIntegratedGradients
from torch.utils.flop_counter import FlopCounterMode

from core.cache import ResultCache
from core.corpus import description_queries, load_wiki, split_indices
from core.index import load_index
from core.pair import Encoder, ModelSpec, load_encoder, load_pair
from core.retrieval import retrieve
from core.token_attribution import (DEFAULT_METHOD, DEFAULT_STEPS, DELTA_TOLERANCE, TOP_K, IGSettings, Quadrature,
                                    SinhSubstitution, TokenAttribution, attribute_pair, attribute_passages,
                                    attribute_queries, attribute_ranking, cached_deletion_curve, cached_ranking,
                                    cloud_weights, pad_baseline, passage_embeddings, word_sums)
from ui.token_views import deletion_chart, render_cloud_png, tokens_html

RESULTS = Path(__file__).with_name("results_token_ig.md")
SWEEP = {"gausslegendre": (4, 6, 8, 12, 16, 20, 24, 32), "riemann_middle": (16, 32), "riemann_trapezoid": (16, 32)}
SUBSTITUTED_SWEEP = (6, 8, 10, 12, 16)  # Gauss-Legendre steps with the first pass's sinh substitution
QUERY = "country in Western Europe"
FIXED = IGSettings(start_steps=None)  # every input at DEFAULT_STEPS: the reference for the adaptive default


def typical_pairs(count: int = 20) -> list[tuple[str, str, str]]:
    """The first `count` held-out description queries with their own article."""
    corpus = load_wiki()
    _, held_out = split_indices(corpus)
    return [(q.text, corpus.titles[q.source_index], corpus.texts[q.source_index])
            for q in description_queries(corpus, held_out)[:count]]


def top_passages(encoder: Encoder, index_cache: ResultCache, query: str = QUERY) -> list[int]:
    corpus = load_wiki()
    return list(retrieve(encoder, load_index(encoder, corpus, index_cache), corpus, query, TOP_K).indices)


def _token_error(result: TokenAttribution, reference: TokenAttribution) -> float:
    """Σ_t |a_t − a_t(reference)| / Σ_t |a_t(reference)|: per-token error, which completeness alone cannot see."""
    ours, ref = (np.array([t.score for t in r.tokens]) for r in (result, reference))
    return float(np.abs(ours - ref).sum() / max(np.abs(ref).sum(), 1e-12))


def _sweep_row(name: str, side: str, rule: str, results: list[TokenAttribution],
               reference: list[TokenAttribution]) -> dict:
    relative = np.array([r.relative_delta for r in results])
    errors = np.array([_token_error(r, ref) for r, ref in zip(results, reference)])
    row = {"model": name, "side": side, "rule": rule,
           "median": float(np.median(relative)), "p90": float(np.quantile(relative, 0.9)),
           "max": float(relative.max()), "within": f"{int((relative <= DELTA_TOLERANCE).sum())}/{len(relative)}",
           "mean_steps": float(np.mean([r.n_steps for r in results])),
           "token_err_max": float(errors.max())}
    print(row, flush=True)
    return row


def sweep(encoders: dict[str, Encoder], index_cache: ResultCache, count: int = 20) -> list[dict]:
    """Relative completeness delta by rule (plain step counts, sinh-substituted Gauss-Legendre step counts, then
    the adaptive default) for three input sets: the query and the passage side of `count` (description query,
    own article) pairs, and the passage side of the top-25 passages of QUERY (the workload of the top-25
    analysis). token_err_max compares each input's token attributions with those of plain Gauss-Legendre at
    its largest count; mean_steps is the mean step count of the rule(s) the inputs ended with."""
    corpus = load_wiki()
    pairs = typical_pairs(count)
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
            "passage": lambda passes: [attribute_passages(encoder, [t], [x], v, passes=passes)[0]
                                       for t, x, v in zip(titles, texts, query_vectors)],
            f"passage, top-{TOP_K} of '{QUERY}'": lambda passes: attribute_passages(
                encoder, top_titles, top_texts, top_vector, passes=passes),
        }
        for side, run_side in runs.items():
            reference = run_side([Quadrature(max(SWEEP[DEFAULT_METHOD]), DEFAULT_METHOD)])
            methods = SWEEP if side in ("query", "passage") else {DEFAULT_METHOD: SWEEP[DEFAULT_METHOD]}
            rules = [Quadrature(n_steps, method) for method, step_counts in methods.items() for n_steps in step_counts]
            rules += [Quadrature(n_steps, DEFAULT_METHOD, SinhSubstitution()) for n_steps in SUBSTITUTED_SWEEP]
            for rule in rules:
                rows.append(_sweep_row(name, side, f"{rule.method}, {rule.describe()}", run_side([rule]), reference))
            rows.append(_sweep_row(name, side, f"adaptive default: {_adaptive_label()}", run_side(None), reference))
    return rows


def captum_defaults_pair(encoder: Encoder, query: str, title: str, text: str) -> None:
    """Both sides with captum's defaults (50 steps, Gauss-Legendre, internal_batch_size=1, weights trainable)."""
    passage_vector = torch.as_tensor(passage_embeddings(encoder, [title], [text], IGSettings()))
    query_vector = torch.as_tensor(encoder.encode_queries([query]))
    for tower, batch, other in ((encoder.query, encoder.query.tokenize([query], return_special_tokens_mask=True),
                                 passage_vector),
                                (encoder.context, encoder.context.tokenize([title], [text], 256,
                                                                           return_special_tokens_mask=True),
                                 query_vector)):
        names = [k for k in ("attention_mask", "token_type_ids") if k in batch]

        def score(input_ids, *rest, tower=tower, names=names):
            *extra, vector = rest
            return (tower.forward({"input_ids": input_ids, **dict(zip(names, extra))}) * vector).sum(-1)

        LayerIntegratedGradients(score, tower.word_embeddings).attribute(
            batch["input_ids"], baselines=pad_baseline(batch, tower.tokenizer.pad_token_id),
            additional_forward_args=(*(batch[k] for k in names), other), internal_batch_size=1)


def _timed(function) -> tuple[float, object]:
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


def _render_views(ranking, curves) -> None:
    """What the page builds from the results on every rerun (word clouds: see cloud_s; downloads: on click)."""
    for attribution in [ranking.query_total, ranking.pairs[0].query, ranking.pairs[0].passage]:
        tokens_html(attribution)
    table = word_sums([p.passage for p in ranking.pairs], drop_stopwords=True)
    cloud_weights(table, "positive"), cloud_weights(table, "negative")
    deletion_chart(curves).to_dict()


def _adaptive_label() -> str:
    return " then ".join(rule.describe() for rule in IGSettings().passes)


def _refinement_note(ranking) -> str:
    worst = max(pair.passage.relative_delta for pair in ranking.pairs)
    rules = ", ".join(f"{count} with {rule.describe()}" for rule, count in ranking.passage_rules().items())
    return f"passages: {rules}; largest passage relative delta {worst:.2%}"


def run(index_cache: ResultCache | None = None) -> list[dict]:
    """index_cache holds the corpus embeddings (default: the app's cache); attributions go to fresh caches.

    The top-25 rows time the default (adaptive steps) against FIXED (every input at DEFAULT_STEPS), one after
    the other for the same query and passages.
    """
    pair = load_pair("offline")
    corpus = load_wiki()
    index_cache = index_cache or ResultCache()
    query, title, text = typical_pairs(1)[0]
    rows = []
    for name, encoder in pair.models.items():
        ours_s, _ = _timed(lambda: attribute_pair(encoder, query, title, text))
        baseline_s, _ = _timed(lambda: captum_defaults_pair(encoder, query, title, text))
        rows.append({"name": f"one pair IG, both sides, model {name}", "ours_s": ours_s, "baseline_s": baseline_s,
                     "ratio": baseline_s / ours_s,
                     "note": f"ours: {DEFAULT_METHOD}, adaptive ({_adaptive_label()}), steps batched, "
                             "no weight grads; captum defaults: 50 steps, internal_batch_size=1"})
    with tempfile.TemporaryDirectory() as directory:
        cache = ResultCache(Path(directory) / "adaptive")
        fixed_cache = ResultCache(Path(directory) / "fixed")
        first, fixed, repeat = {}, {}, {}
        for name, encoder in pair.models.items():
            hits = top_passages(encoder, index_cache)
            tokens = sum(len(encoder.context.tokenize([corpus.titles[i]], [corpus.texts[i]], 256)["input_ids"][0])
                         for i in hits)
            fixed[name], fixed_ranking = _timed(lambda: cached_ranking(fixed_cache, encoder, corpus, QUERY, hits,
                                                                       FIXED))
            first[name], ranking = _timed(lambda: cached_ranking(cache, encoder, corpus, QUERY, hits))
            deletion_s, curves = _timed(lambda: {side: cached_deletion_curve(cache, encoder, ranking.pairs[0], side)
                                                 for side in ("query", "passage")})
            rows.append({"name": f"top-{TOP_K} analysis, model {name}", "ours_s": first[name],
                         "baseline_s": fixed[name], "ratio": fixed[name] / first[name],
                         "note": f"ours: adaptive ({_adaptive_label()}), "
                                 f"{_refinement_note(ranking)}; baseline: fixed {DEFAULT_STEPS} steps, "
                                 f"{_refinement_note(fixed_ranking)}; query total + {TOP_K} x (query, passage), "
                                 f"{tokens} passage tokens; deletion curves of the top passage (both sides): "
                                 f"{deletion_s:.2f} s more"})

            def cached_repeat(encoder=encoder, hits=hits):
                ranking = cached_ranking(cache, encoder, corpus, QUERY, hits)
                curves = {side: cached_deletion_curve(cache, encoder, ranking.pairs[0], side)
                          for side in ("query", "passage")}
                _render_views(ranking, curves)

            repeat[name], _ = _timed(cached_repeat)
            cloud_s, _ = _timed(lambda: [render_cloud_png(cloud_weights(word_sums(
                [p.passage for p in ranking.pairs], drop_stopwords=True), sign), "Blues")
                for sign in ("positive", "negative")])
        rows.append({"name": f"top-{TOP_K} analysis, both models", "ours_s": sum(first.values()),
                     "baseline_s": sum(fixed.values()), "ratio": sum(fixed.values()) / sum(first.values()),
                     "note": f"goal <= 60 s; query '{QUERY}'; baseline: fixed {DEFAULT_STEPS} steps"})
        rows.append({"name": "cached repeat, both models", "ours_s": sum(repeat.values()), "baseline_s": None,
                     "ratio": None, "note": "rankings and deletion curves from the disk cache + the page's HTML, "
                                            "word tables and chart spec; goal <= 1 s"})
        rows.append({"name": "word clouds of one model, uncached", "ours_s": cloud_s, "baseline_s": None,
                     "ratio": None, "note": "two PNGs; the page keeps them in st.cache_data"})
        cache.close()
        fixed_cache.close()
    return rows


def flops(index_cache: ResultCache | None = None) -> list[dict]:
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
            with FlopCounterMode(display=False) as counter:
                ranking = attribute_ranking(encoder, QUERY, [corpus.titles[i] for i in hits],
                                            [corpus.texts[i] for i in hits], hits, settings)
            counted[label] = (counter.get_total_flops() / 1e9, _refinement_note(ranking))
        rows.append({"name": f"top-{TOP_K} analysis, model {name}", "ours_gflop": counted["adaptive"][0],
                     "baseline_gflop": counted["fixed"][0], "ratio": counted["fixed"][0] / counted["adaptive"][0],
                     "note": f"ours: adaptive, {counted['adaptive'][1]}; baseline: fixed {DEFAULT_STEPS} steps, "
                             f"{counted['fixed'][1]}"})
    return rows


def _format(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def table(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_format(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    load = os.getloadavg()
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), load average at the end {load[0]:.2f} / {load[1]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sweep", action="store_true", help="completeness delta vs n_steps and method")
    parser.add_argument("--flops", action="store_true", help="FLOPs of the top-25 analysis, adaptive vs fixed")
    parser.add_argument("--models", default="AB", help="for --sweep: A, B or AB (B needs the trained twin)")
    parser.add_argument("--cache", help="cache holding the corpus embeddings (default: $DPR_LENS_CACHE or "
                                        "~/.cache/dpr-lens); attributions are timed in a fresh cache")
    args = parser.parse_args()
    index_cache = ResultCache(args.cache)
    if args.sweep:
        specs = {"A": ModelSpec("A", "minilm:")}
        if "B" in args.models:
            specs["B"] = load_pair("offline").spec.b
        rows = sweep({name: load_encoder(spec) for name, spec in specs.items() if name in args.models},
                     index_cache)
        heading = "## Completeness sweep (relative delta |Σattr - (s(x) - s(b))| / |s(x) - s(b)|)"
    elif args.flops:
        rows = flops(index_cache)
        heading = "## FLOPs"
    else:
        rows = run(index_cache)
        heading = "## Speed"
    text = f"{heading}\n\n{machine()}\n\n{table(rows)}\n"
    print(text)
    previous = RESULTS.read_text() if RESULTS.is_file() else "# Token IG benchmark (last results)\n"
    sections = [s for s in previous.split("\n## ") if s and not ("## " + s).startswith(heading.split(" (")[0])]
    RESULTS.write_text("\n## ".join(sections).rstrip() + "\n\n" + text)


if __name__ == "__main__":
    main()
