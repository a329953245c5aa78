"""Token IG: our IG vs captum's defaults, the top-25 analysis of both offline models, the cached repeat,
and (--sweep) the completeness-delta sweep behind DEFAULT_STEPS / DEFAULT_METHOD.

    python -m bench.token_ig            # speed rows; writes bench/results_token_ig.md
    python -m bench.token_ig --sweep    # delta vs n_steps and method on 20 description queries
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

from core.cache import ResultCache
from core.corpus import description_queries, load_wiki, split_indices
from core.index import load_index
from core.pair import Encoder, ModelSpec, load_encoder, load_pair
from core.retrieval import retrieve
from core.token_attribution import (DEFAULT_METHOD, DEFAULT_STEPS, DELTA_TOLERANCE, TOP_K, IGSettings,
                                    attribute_pair, attribute_passages, attribute_queries, cached_deletion_curve,
                                    cached_ranking, cloud_weights, pad_baseline, passage_embeddings, word_sums)
from ui.token_views import attribution_frame, attribution_json, deletion_chart, render_cloud_png, tokens_html

RESULTS = Path(__file__).with_name("results_token_ig.md")
SWEEP = {"gausslegendre": (8, 12, 16, 20, 24, 32), "riemann_middle": (16, 32), "riemann_trapezoid": (16, 32)}
QUERY = "country in Western Europe"


def typical_pairs(count: int = 20) -> list[tuple[str, str, str]]:
    """The first `count` held-out description queries with their own article."""
    corpus = load_wiki()
    _, held_out = split_indices(corpus)
    return [(q.text, corpus.titles[q.source_index], corpus.texts[q.source_index])
            for q in description_queries(corpus, held_out)[:count]]


def sweep(encoders: dict[str, Encoder], count: int = 20) -> list[dict]:
    pairs = typical_pairs(count)
    queries, titles, texts = (list(column) for column in zip(*pairs))
    rows = []
    for name, encoder in encoders.items():
        query_vectors = encoder.encode_queries(queries)
        for method, step_counts in SWEEP.items():
            for n_steps in step_counts:
                settings = IGSettings(n_steps, method)
                embeddings = passage_embeddings(encoder, titles, texts, settings)
                sides = {
                    "query": attribute_queries(encoder, queries, embeddings, settings),
                    "passage": [attribute_passages(encoder, [t], [x], v, settings)[0]
                                for t, x, v in zip(titles, texts, query_vectors)],
                }
                for side, results in sides.items():
                    relative = np.array([r.relative_delta for r in results])
                    rows.append({"model": name, "method": method, "n_steps": n_steps, "side": side,
                                 "median": float(np.median(relative)), "p90": float(np.quantile(relative, 0.9)),
                                 "max": float(relative.max()),
                                 "within": f"{int((relative < DELTA_TOLERANCE).sum())}/{len(relative)}"})
                    print(rows[-1], flush=True)
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


def _render_views(ranking, curves, corpus) -> None:
    """What the page builds from the results on every rerun (word clouds excepted: see cloud_s)."""
    for attribution in [ranking.query_total, ranking.pairs[0].query, ranking.pairs[0].passage]:
        tokens_html(attribution)
    table = word_sums([p.passage for p in ranking.pairs], drop_stopwords=True)
    cloud_weights(table, "positive"), cloud_weights(table, "negative")
    attribution_frame(ranking, corpus).to_csv(index=False)
    attribution_json(ranking, corpus, "model", IGSettings().params())
    deletion_chart(curves).to_dict()


def run(index_cache: ResultCache | None = None) -> list[dict]:
    """index_cache holds the corpus embeddings (default: the app's cache); attributions go to a fresh cache."""
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
                     "note": f"ours: {DEFAULT_STEPS} steps {DEFAULT_METHOD}, steps batched, no weight grads; "
                             "captum defaults: 50 steps, internal_batch_size=1"})
    with tempfile.TemporaryDirectory() as directory:
        cache = ResultCache(directory)
        first, repeat, tokens = {}, {}, {}
        for name, encoder in pair.models.items():
            index = load_index(encoder, corpus, index_cache)
            hits = retrieve(encoder, index, corpus, QUERY, TOP_K, cache=cache).indices
            tokens[name] = sum(len(encoder.context.tokenize([corpus.titles[i]], [corpus.texts[i]], 256)["input_ids"][0])
                               for i in hits)
            first[name], ranking = _timed(lambda: cached_ranking(cache, encoder, corpus, QUERY, hits))
            deletion_s, curves = _timed(lambda: {side: cached_deletion_curve(cache, encoder, ranking.pairs[0], side)
                                                 for side in ("query", "passage")})
            rows.append({"name": f"top-{TOP_K} analysis, model {name}", "ours_s": first[name], "baseline_s": None,
                         "ratio": None,
                         "note": f"query total + {TOP_K} x (query, passage), {tokens[name]} passage tokens; "
                                 f"deletion curves of the top passage (both sides): {deletion_s:.2f} s more"})

            def cached_repeat(encoder=encoder, hits=hits):
                ranking = cached_ranking(cache, encoder, corpus, QUERY, hits)
                curves = {side: cached_deletion_curve(cache, encoder, ranking.pairs[0], side)
                          for side in ("query", "passage")}
                _render_views(ranking, curves, corpus)

            repeat[name], _ = _timed(cached_repeat)
            cloud_s, _ = _timed(lambda: [render_cloud_png(cloud_weights(word_sums(
                [p.passage for p in ranking.pairs], drop_stopwords=True), sign), "Blues")
                for sign in ("positive", "negative")])
        rows.append({"name": f"top-{TOP_K} analysis, both models", "ours_s": sum(first.values()), "baseline_s": None,
                     "ratio": None, "note": f"goal <= 60 s; query '{QUERY}'"})
        rows.append({"name": "cached repeat, both models", "ours_s": sum(repeat.values()), "baseline_s": None,
                     "ratio": None, "note": "rankings and deletion curves from the disk cache + the page's HTML, "
                                            "tables, CSV/JSON and chart specs; goal <= 1 s"})
        rows.append({"name": "word clouds of one model, uncached", "ours_s": cloud_s, "baseline_s": None,
                     "ratio": None, "note": "two PNGs; the page keeps them in st.cache_data"})
        cache.close()
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
    parser.add_argument("--models", default="AB", help="for --sweep: A, B or AB (B needs the trained twin)")
    parser.add_argument("--cache", help="cache holding the corpus embeddings (default: $DPR_LENS_CACHE or "
                                        "~/.cache/dpr-lens); attributions are timed in a fresh cache")
    args = parser.parse_args()
    if args.sweep:
        specs = {"A": ModelSpec("A", "minilm:")}
        if "B" in args.models:
            specs["B"] = load_pair("offline").spec.b
        rows = sweep({name: load_encoder(spec) for name, spec in specs.items() if name in args.models})
        heading = "## Completeness sweep (relative delta |Σattr - (s(x) - s(b))| / |s(x) - s(b)|)"
    else:
        rows = run(ResultCache(args.cache) if args.cache else None)
        heading = "## Speed"
    text = f"{heading}\n\n{machine()}\n\n{table(rows)}\n"
    print(text)
    previous = RESULTS.read_text() if RESULTS.is_file() else "# Token IG benchmark (last results)\n"
    sections = [s for s in previous.split("\n## ") if s and not ("## " + s).startswith(heading.split(" (")[0])]
    RESULTS.write_text("\n## ".join(sections).rstrip() + "\n\n" + text)


if __name__ == "__main__":
    main()
