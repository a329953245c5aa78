"""The report bundle (core.report) of each page's main view: a Markdown summary, the data as tables, the settings
and the fingerprints, built from core results, so that a page's button and `python -m core report` write the
same zip.

The retrieval and token-attribution views also draw their figures here (core.figures), as the report command
writes them too; the other views are reported from the app only and take the Vega-Lite specs and the tables
their page drew.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .cka import INPUTS, LayerSimilarity
from .corpus import Corpus
from .evaluation import A_WINS, B_WINS, BOTH, NEITHER, Evaluation, QueryOutcome, outcome_counts, paired_difference
from .figures import deletion_chart, deletion_frame, rank_shift_chart, shared_ranks_frame
from .neuron_attribution import SITES, NeuronAggregate, TargetedAttribution
from .overlap import OverlapAggregate
from .pair import ModelPair
from .paraphrase import ParaphraseReport
from .patching import DIRECTIONS, PATCH_SITES, SITE_TITLES, PatchingAggregate, QueryPatching, near_tie_note
from .probing import ProbeResult
from .report import Bundle
from .retrieval import Ranking, clean_query, compare_rankings
from .suppression import SuppressionCurve
from .token_attribution import (
    DELTA_TOLERANCE,
    TOP_K,
    DeletionCurve,
    IGSettings,
    PairAttribution,
    RankingAttribution,
    TokenAttribution,
    Word,
    token_rows,
    word_sums,
)

WORDS = 5  # words named per list in a summary


def fingerprints(pair: ModelPair, corpus: Corpus) -> dict[str, str]:
    return {
        **{f"model {name}": encoder.fingerprint for name, encoder in pair.models.items()},
        "corpus": corpus.fingerprint,
    }


def _settings(pair: ModelPair, corpus: Corpus, **values) -> dict:
    return {"pair": pair.spec.key, "corpus": corpus.name, **values}


def _text(text: str) -> str:
    """User or corpus text on one Markdown line: whitespace collapsed, table pipes and HTML escaped (Markdown
    viewers render raw HTML)."""
    return html.escape(" ".join(str(text).split())).replace("|", "\\|")


def _header(title: str, pair: ModelPair, corpus: Corpus, query: str | None = None) -> list[str]:
    lines = [f"# {title}", "", f"Pair: {_text(pair.spec.title)}.", ""]
    lines += [f"- Model {name}: {_text(encoder.label)}" for name, encoder in pair.models.items()]
    lines += ["", f"Corpus: {_text(corpus.name)} ({len(corpus):,} passages)."]
    if query is not None:
        lines.append(f'Query: "{_text(query)}".')
    return lines + [""]


def _bundle(title: str, lines: list[str], settings: dict, pair: ModelPair, corpus: Corpus, figures, tables) -> Bundle:
    return Bundle(title, "\n".join(lines).rstrip() + "\n", settings, fingerprints(pair, corpus), figures, tables)


def _passage(corpus: Corpus, index: int) -> str:
    return _text(corpus.titles[index] or corpus.ids[index])


def _interval(mean: float, low: float, high: float, sign: str = "") -> str:
    return f"{mean:{sign}.3f} [{low:{sign}.3f}, {high:{sign}.3f}]"


def _value(value: float) -> str:
    return "undefined" if math.isnan(value) else f"{value:.2f}"


def _count(number: int, one: str, many: str) -> str:
    return f"{number} {one if number == 1 else many}"


# ---- retrieval -------------------------------------------------------------------------------------------------


def _ranking_frame(rankings: Mapping[str, Ranking], name: str) -> pd.DataFrame:
    other = "B" if name == "A" else "A"
    other_ranks = {hit.index: hit.rank for hit in rankings[other].hits}
    return pd.DataFrame(
        [
            {
                "rank": hit.rank,
                "id": hit.id,
                "title": hit.title,
                "score": hit.score,
                f"rank in {other}": other_ranks.get(hit.index),
            }
            for hit in rankings[name].hits
        ],
        columns=["rank", "id", "title", "score", f"rank in {other}"],
    ).astype({f"rank in {other}": "Int64"})


def retrieval_bundle(pair: ModelPair, corpus: Corpus, rankings: Mapping[str, Ranking], k: int) -> Bundle:
    """Both models' top-k for one query, and how much they agree."""
    overlap = compare_rankings(rankings["A"], rankings["B"])
    query = rankings["A"].query.text
    tables = {f"ranking-{name}": _ranking_frame(rankings, name) for name in rankings}
    tables["agreement"] = pd.DataFrame(
        [
            {
                "k": overlap.k,
                "shared": len(overlap.shared),
                "jaccard": overlap.jaccard,
                "rank-biased overlap (p=0.9)": overlap.rbo,
                "mean |rank shift| of shared": overlap.mean_abs_shift,
            }
        ]
    )
    figures = {}
    if overlap.shared:
        tables["shared-ranks"] = shared_ranks_frame(rankings, overlap)
        figures["rank-shift"] = rank_shift_chart(tables["shared-ranks"]).to_dict()

    lines = _header(f'Retrieval: "{_text(query)}"', pair, corpus, query)
    lines += [f"Each model's top-{k} passages by s(q, p) = pooled(q) · pooled(p).", "", "## Result", ""]
    firsts = {name: ranking.hits[0] for name, ranking in rankings.items() if ranking.hits}
    sentence = (
        f"A and B share {len(overlap.shared)} of their top-{overlap.k} (Jaccard@{overlap.k} {overlap.jaccard:.2f}, "
        f"rank-biased overlap {overlap.rbo:.2f}, mean |rank shift| of the shared passages "
        f"{overlap.mean_abs_shift:.1f})."
    )
    if len(firsts) == 2 and firsts["A"].index == firsts["B"].index:
        sentence += (
            f" Both rank {_passage(corpus, firsts['A'].index)} first "
            f"(A s = {firsts['A'].score:.4f}, B s = {firsts['B'].score:.4f})."
        )
    elif firsts:
        sentence += (
            " "
            + ", ".join(
                f"{name} ranks {_passage(corpus, hit.index)} first (s = {hit.score:.4f})"
                for name, hit in firsts.items()
            )
            + "."
        )
    lines += [sentence, ""]
    for name, ranking in rankings.items():
        if ranking.query.truncated:
            lines += [f"Model {name} read only the first {ranking.query.max_length} tokens of the query.", ""]
    lines += ["| rank | A | s(q, p) | B | s(q, p) |", "|---:|---|---:|---|---:|"]
    depth = max(len(ranking.hits) for ranking in rankings.values())
    for rank in range(depth):
        cells = []
        for ranking in rankings.values():
            hit = ranking.hits[rank] if rank < len(ranking.hits) else None
            shared = " (both)" if hit and hit.index in overlap.shared else ""
            cells += [f"{_passage(corpus, hit.index)}{shared}", f"{hit.score:.4f}"] if hit else ["", ""]
        lines.append(f"| {rank + 1} | " + " | ".join(cells) + " |")
    lines += ["", "(both): retrieved by both models."]
    settings = _settings(pair, corpus, query=query, k=k)
    return _bundle(f"Retrieval: {query}", lines, settings, pair, corpus, figures, tables)


# ---- token attributions ----------------------------------------------------------------------------------------


def _words(words: Sequence[Word] | pd.DataFrame, count: int = WORDS, negative: bool = False) -> str:
    """The `count` words with the largest (or most negative) attribution, with their values."""
    if isinstance(words, pd.DataFrame):
        pairs = list(zip(words["word"], words["total"]))
    else:
        pairs = [(word.text, word.score) for word in words]
    pairs = sorted(pairs, key=lambda pair: pair[1], reverse=not negative)
    chosen = [(word, value) for word, value in pairs if (value < 0 if negative else value > 0)][:count]
    return ", ".join(f"{_text(word)} {value:+.3g}" for word, value in chosen) or "none"


def _completeness_rows(model: str, attribution: TokenAttribution, **labels) -> dict:
    relative = attribution.relative_delta
    return {
        "model": model,
        **labels,
        "s(x)": attribution.score,
        "s(baseline)": attribution.baseline_score,
        "sum of attributions": attribution.total,
        "delta": attribution.delta,
        "relative delta": relative if math.isfinite(relative) else None,
        "within tolerance": attribution.within_tolerance,
        "n_steps": attribution.n_steps,
        "quadrature": attribution.quadrature.describe(),
    }


def token_bundle(
    pair: ModelPair,
    corpus: Corpus,
    settings: IGSettings,
    analyses: Mapping[str, RankingAttribution],
    chosen: Mapping[str, int],
    chosen_pairs: Mapping[str, PairAttribution],
    curves: Mapping[str, DeletionCurve],
    side: str,
    k_max: int,
    drop_stopwords: bool,
) -> Bundle:
    """Token IG for one query: each model's top-k passages, its chosen passage and the deletion curves."""
    query = analyses["A"].query_total.segments[0]
    tables, completeness = {}, []
    for name, analysis in analyses.items():
        # The query total, each top passage's pair, then the chosen passage's pair if it is not among them.
        inputs = [(analysis.query_total, {"input": "query (sum over passages)", "rank": None, "passage_id": None})]
        ranked = [(rank, index, p) for rank, (index, p) in enumerate(zip(analysis.passage_indices, analysis.pairs), 1)]
        if analysis.pair_for(chosen[name]) is None:
            ranked.append((None, chosen[name], chosen_pairs[name]))
        for rank, index, attributed in ranked:
            inputs += [
                (attributed.query, {"input": "query", "rank": rank, "passage_id": corpus.ids[index]}),
                (attributed.passage, {"input": "passage", "rank": rank, "passage_id": corpus.ids[index]}),
            ]
        tables[f"tokens-{name}"] = pd.DataFrame([row for a, labels in inputs for row in token_rows(a, **labels)])
        completeness += [_completeness_rows(name, attribution, **labels) for attribution, labels in inputs]
        tables[f"words-{name}"] = word_sums([p.passage for p in analysis.pairs], drop_stopwords=drop_stopwords)
    tables["completeness"] = pd.DataFrame(completeness)
    tables["deletion"] = deletion_frame(dict(curves))
    figures = {"deletion-curves": deletion_chart(tables["deletion"]).to_dict()}

    params = settings.params()
    rule = f"{params['method']}, {params['n_steps']} steps" + (
        f", adaptive (a first pass of {params['start_steps']} steps, the full rule where the completeness δ is "
        f"above {DELTA_TOLERANCE:.0%})"
        if params["start_steps"]
        else ""
    )
    lines = _header(f'Token attributions: "{_text(query)}"', pair, corpus, query)
    lines += [
        f"Integrated Gradients of s(q, p) with the [PAD] baseline ({rule}), for the query and each model's "
        f"top-{TOP_K} passages; the other side's embedding fixed. Deletion curves: the chosen passage's {side} "
        "tokens replaced by [PAD] in attribution order, against random orders.",
        "",
        "## Result",
        "",
        "Query words, attribution summed over each model's top passages: "
        + "; ".join(f"{name}: {_words(analysis.query_total.words())}" for name, analysis in analyses.items())
        + ".",
        "",
    ]
    for name, analysis in analyses.items():
        passage, attributed, curve = chosen[name], chosen_pairs[name], curves[name]
        rank = analysis.passage_indices.index(passage) + 1 if passage in analysis.passage_indices else None
        where = f"rank {rank} of {name}'s top-{len(analysis.pairs)}" if rank else f"not in {name}'s top-{TOP_K}"
        every = [analysis.query_total, *(s for p in analysis.pairs for s in (p.query, p.passage))]
        finite = [a.relative_delta for a in every if math.isfinite(a.relative_delta)]
        above = sum(not a.within_tolerance for a in every)
        words = tables[f"words-{name}"]
        lines += [
            f"## Model {name}: {_text(pair.models[name].label)}",
            "",
            f"- Chosen passage: {_passage(corpus, passage)} ({where}), s(q, p) = {attributed.query.score:.4f}.",
            f"- Its query words: {_words(attributed.query.words())}.",
            f"- Its passage words: {_words(attributed.passage.words())}; most negative: "
            f"{_words(attributed.passage.words(), negative=True)}.",
            f"- Passage words over the top-{len(analysis.pairs)}, largest positive sums: {_words(words)}; "
            f"largest negative: {_words(words, negative=True)}.",
            f"- Completeness: largest relative δ {max(finite, default=0.0):.2%}; {above} of {len(every)} inputs "
            f"above the {DELTA_TOLERANCE:.0%} tolerance.",
            f"- Deletion ({side} tokens): s = {curve.attribution_order[0]:.4f}, after {curve.ks[-1]} removed "
            f"{curve.attribution_order[-1]:.4f} in attribution order, {curve.random_order[-1]:.4f} in random "
            f"order (mean of {curve.random_orders}).",
            "",
        ]
    values = _settings(
        pair,
        corpus,
        query=query,
        top_k=TOP_K,
        ig=params,
        passages={name: corpus.ids[index] for name, index in chosen.items()},
        deletion_side=side,
        deletion_k=k_max,
        drop_stopwords=drop_stopwords,
    )
    return _bundle(f"Token attributions: {query}", lines, values, pair, corpus, figures, tables)


# ---- knowledge neurons -----------------------------------------------------------------------------------------


def _per_layer(counts: np.ndarray) -> str:
    return ", ".join(str(int(count)) for count in counts)


def neurons_bundle(
    pair: ModelPair,
    corpus: Corpus,
    analysed: Mapping[str, TargetedAttribution],
    threshold: float,
    curves: Mapping[str, SuppressionCurve],
    aggregates: Mapping[str, NeuronAggregate] | None,
    settings: dict,
    figures: dict[str, dict],
    tables: dict[str, pd.DataFrame],
) -> Bundle:
    """Knowledge neurons of one query in both models, their suppression, and the Figure-1 aggregate if shown;
    figures and tables: what the page drew."""
    first = next(iter(analysed.values()))
    query, tower = first.query, first.tower
    steps = first.attribution.steps
    lines = _header(f'Knowledge neurons: "{_text(query)}"', pair, corpus, query)
    lines += [
        f"Attribution of s(q, p) to every FFN intermediate and FFN output neuron of the "
        f"{'query' if tower == 'query' else 'passage'} tower: activation × mean gradient while the site is "
        f"scaled from 0 to 1 (m = {steps} Riemann steps). A neuron counts when its attribution is above "
        f"t = {threshold:.3f} × its site's largest.",
        "",
        "## Result",
        "",
        "Strongly activated neurons (Table 2 of arXiv 2402.11035): "
        + "; ".join(
            f"{name}: "
            + ", ".join(f"{count} {site}" for site, count in result.attribution.strongly_activated(threshold).items())
            for name, result in analysed.items()
        )
        + ".",
        "",
    ]
    for name, result in analysed.items():
        counts = result.attribution.layer_counts(threshold)
        curve = curves[name]
        lines += [
            f"## Model {name}: {_text(pair.models[name].label)}",
            "",
            f"- {'Target' if tower == 'query' else 'Analysed'} passage: {_passage(corpus, result.passage)}; "
            f"s(q, p) = {result.attribution.score:.4f}.",
            *(
                f"- Neurons above t per layer ({site}, layers 1..{len(counts[site])}): {_per_layer(counts[site])}."
                for site in SITES
            ),
            f"- Suppression, the top {curve.ks[-1]} query-tower neurons zeroed: {_passage(corpus, curve.passage)} "
            f"rank {curve.ranks[0]} → {curve.ranks[-1]}, s = {curve.scores[0]:.4f} → {curve.scores[-1]:.4f}.",
            "",
        ]
    if aggregates:
        size = len(next(iter(aggregates.values())).queries)
        lines += [f"## Figure 1: {size} held-out description queries", ""]
        for name, aggregate in aggregates.items():
            labels, strong = aggregate.layer_counts(threshold), aggregate.strongly_activated(threshold)
            lines.append(
                f"- {name}: neurons above t in at least one query: "
                + "; ".join(
                    f"{site} {int(labels[site].sum())} (per layer {_per_layer(labels[site])})" for site in SITES
                )
                + "; strongly activated per query, mean: "
                + ", ".join(f"{site} {strong[site].mean():.1f}" for site in SITES)
                + "."
            )
        lines.append("")
    values = _settings(
        pair, corpus, query=query, passages={name: corpus.ids[r.passage] for name, r in analysed.items()}, **settings
    )
    return _bundle(f"Knowledge neurons: {query}", lines, values, pair, corpus, figures, tables)


# ---- probing & evaluation --------------------------------------------------------------------------------------


def evaluation_bundle(
    pair: ModelPair,
    corpus: Corpus,
    source: str,
    evaluations: Mapping[str, Evaluation],
    outcomes: Sequence[QueryOutcome],
    k: int,
    settings: dict,
    figures: dict[str, dict],
    tables: dict[str, pd.DataFrame],
) -> Bundle:
    """Retrieval quality of A and B on labelled queries, and the queries each gets right alone."""
    a, b = evaluations["A"], evaluations["B"]
    differences = {metric: paired_difference(a.per_query[metric], b.per_query[metric]) for metric in a.means}
    better = [metric for metric, (_, low, _) in differences.items() if low > 0]
    worse = [metric for metric, (_, _, high) in differences.items() if high < 0]
    counts = outcome_counts(outcomes)
    lines = _header("Retrieval evaluation", pair, corpus)
    lines += [
        f"{a.queries} labelled queries: {_text(source)}. Mean over queries with a 95% bootstrap interval; B − A "
        "is paired (both models resampled on the same queries).",
        "",
        "## Result",
        "",
        f"B is better than A on {len(better)} of {len(differences)} metrics ({', '.join(better) or 'none'}) and "
        f"worse on {len(worse)} ({', '.join(worse) or 'none'}), by the 95% interval of B − A.",
        f"With right = a relevant passage in the top {k}: B right and A wrong on {counts[B_WINS]} queries, A right "
        f"and B wrong on {counts[A_WINS]}, both right on {counts[BOTH]}, neither on {counts[NEITHER]}.",
        "",
        "| metric | A | B | B − A |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {metric} | {_interval(a.means[metric], *a.intervals[metric])} | "
        f"{_interval(b.means[metric], *b.intervals[metric])} | {_interval(*differences[metric], sign='+')} |"
        for metric in a.means
    ]
    values = _settings(pair, corpus, queries=a.queries, source=source, win_at=k, **settings)
    return _bundle("Retrieval evaluation", lines, values, pair, corpus, figures, tables)


def probing_bundle(
    pair: ModelPair,
    corpus: Corpus,
    result: ProbeResult,
    settings: dict,
    figures: dict[str, dict],
    tables: dict[str, pd.DataFrame],
) -> Bundle:
    """Layer-wise probing (Table 1 of arXiv 2402.11035): per N and model, the best layer of the linear probe."""
    rows = pd.DataFrame(result.rows)
    lines = _header("Layer-wise probing", pair, corpus)
    lines += [
        f"For each layer (0 = embeddings) a linear probe on frozen pooled features picks the positive among N "
        f"candidates (hard negatives: {result.config['negatives']}); fitted on {result.train_queries} queries of "
        f"training articles, scored on {result.test_queries} held-out ones, 95% bootstrap intervals.",
        "",
        "## Result",
        "",
    ]
    for n in result.config["ns"]:
        lines.append(f"N = {n} (chance {1 / n:.2f}):")
        for name in result.models:
            own = rows[(rows["model"] == name) & (rows["n"] == n)]
            probe = own[own["kind"] == "probe"].sort_values("layer")
            best = probe.loc[probe["accuracy"].idxmax()]
            last = probe.iloc[-1]
            control = own[own["kind"] == "untrained"]["accuracy"]
            lines.append(
                f"- {name}: best layer {int(best['layer'])} "
                f"{_interval(best['accuracy'], best['low'], best['high'])}; last layer {int(last['layer'])} "
                f"{_interval(last['accuracy'], last['low'], last['high'])}"
                + (f"; untrained probe at most {control.max():.3f}" if len(control) else "")
                + "."
            )
        lines.append("")
    values = _settings(pair, corpus, config=result.config, **settings)
    return _bundle("Layer-wise probing", lines, values, pair, corpus, figures, tables)


# ---- twin analyses ---------------------------------------------------------------------------------------------


@dataclass
class TwinResults:
    """What the twin page computed in this run; None: not computed."""

    patching: QueryPatching | None = None
    patching_aggregate: PatchingAggregate | None = None
    overlap: OverlapAggregate | None = None
    overlap_aggregate: OverlapAggregate | None = None
    phrasings: ParaphraseReport | None = None
    needs: ParaphraseReport | None = None
    similarity: LayerSimilarity | None = None

    def any(self) -> bool:
        return any(value is not None for value in vars(self).values())


def _best_cell(values: np.ndarray) -> str:
    """The (layer, site) with the largest value of a (layers, PATCH_SITES) array."""
    if np.isnan(values).all():
        return "undefined (the two clean scores tie)"
    layer, site = np.unravel_index(np.nanargmax(values), values.shape)
    return f"layer {layer + 1}, {SITE_TITLES[PATCH_SITES[site]]}: {values[layer, site]:.2f}"


def _overlap_lines(label: str, overlap: OverlapAggregate) -> list[str]:
    return [
        f"- {label} ({_count(len(overlap.queries), 'query', 'queries')}): "
        + "; ".join(
            f"{site}: share of B's neurons that A did not have {overlap.recruited_share(site):.2f}, mean Jaccard "
            f"over layers {_value(np.nanmean(overlap.means(site)['jaccard']))}"
            for site in overlap.sites
        )
        + "."
    ]


def _paraphrase_lines(label: str, report: ParaphraseReport) -> list[str]:
    mean, low, high, count = report.difference()
    line = (
        f"- {label} ({_count(len(report.needs), 'need', 'needs')}, top-{report.k}): mean top-{report.k} Jaccard "
        "across phrasings "
        + ", ".join(f"{name} {report.retrieval_jaccard(name).mean():.2f}" for name in ("A", "B"))
        + f"; B − A {_interval(mean, low, high, '+')} over {_count(count, 'need', 'needs')}"
    )
    if any(need.gold is not None for need in report.needs):
        line += "; every phrasing finds the gold passage: " + ", ".join(
            f"{name} {report.found_by_all(name):.2f}" for name in ("A", "B")
        )
    return [line + "."]


def twins_bundle(
    pair: ModelPair,
    corpus: Corpus,
    query: str,
    results: TwinResults,
    settings: dict,
    figures: dict[str, dict],
    tables: dict[str, pd.DataFrame],
) -> Bundle:
    """The twin analyses the page computed: patching, neuron overlap, paraphrase agreement, layer similarity."""
    query = clean_query(query)
    title = f"Twin analyses: {query}" if query else "Twin analyses"
    lines = _header(f'Twin analyses: "{_text(query)}"' if query else title, pair, corpus, query or None)
    lines += ["## Result", ""]
    if results.patching is not None:
        patching = results.patching
        scores = {d.recipient: d.recipient_score for d in patching.directions.values()}
        lines += [
            "Activation patching of this query, target = B's embedding of "
            f"{_passage(corpus, patching.passage)} (s_A = {scores['A']:.4f}, s_B = {scores['B']:.4f}); the "
            "(layer, site) that recovers most of the score gap: "
            + "; ".join(f"{name}: {_best_cell(d.recovered)}" for name, d in patching.directions.items())
            + ".",
            "",
        ]
        if note := near_tie_note(patching):
            lines += [note, ""]
    if results.patching_aggregate is not None:
        aggregate = results.patching_aggregate
        lines += [
            f"Activation patching, pooled over {len(aggregate.queries)} queries (the fractions weighted by their "
            "score gaps); the (layer, site) that recovers most: "
            + "; ".join(f"{name}: {_best_cell(aggregate.summary(name).pooled)}" for name in DIRECTIONS)
            + ".",
            "",
        ]
    if results.overlap is not None or results.overlap_aggregate is not None:
        lines.append("Neuron overlap (query tower, each model's own top-1):")
        if results.overlap is not None:
            lines += _overlap_lines("this query", results.overlap)
        if results.overlap_aggregate is not None:
            lines += _overlap_lines("held-out queries", results.overlap_aggregate)
        lines.append("")
    if results.phrasings is not None or results.needs is not None:
        lines.append("Paraphrase agreement:")
        if results.phrasings is not None:
            lines += _paraphrase_lines("your phrasings", results.phrasings)
        if results.needs is not None:
            lines += _paraphrase_lines("built-in needs", results.needs)
        lines.append("")
    if results.similarity is not None:
        similarity = results.similarity
        parts = []
        for kind in INPUTS:
            cka = similarity.cka[kind]
            lowest = int(np.nanargmin(cka)) if not np.isnan(cka).all() else 0
            parts.append(
                f"{kind}: {_value(cka[0])} at the embeddings, {_value(cka[-1])} at the last layer, lowest "
                f"{_value(cka[lowest])} at layer {lowest}"
            )
        lines += [
            f"Linear CKA of A and B on {len(similarity.queries)} held-out queries and their gold passages: "
            + "; ".join(parts)
            + ".",
            "",
        ]
    values = _settings(pair, corpus, query=query, **settings)
    return _bundle(title, lines, values, pair, corpus, figures, tables)
