"""Views of the attribution-method panel, its faithfulness and the token-pair map, and the Token attributions
page's sections that show them."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from core.attribution.faithfulness import CANDIDATES, RANDOM, PairFaithfulness, cached_faithfulness
from core.attribution.methods import METHOD_LABELS, SIDES, MethodPanel
from core.attribution.pairs import TokenPairMap, cached_pair_map
from core.bundles import fingerprints
from core.cache import ResultCache
from core.corpus import Corpus
from core.index import DenseIndex
from core.pair import ModelPair
from core.palette import MODEL_COLOURS, dashed_lines_with_points, model_colour
from core.report import Bundle
from core.retrieval import retrieve
from core.token_attribution import IGSettings
from ui.jobs import activity
from ui.token_views import tokens_html

ORDER_LABELS = {**METHOD_LABELS, RANDOM: "random order (control)"}


def agreement_frame(panel: MethodPanel, side: str) -> pd.DataFrame:
    table = panel.agreement(side)
    for column in ("method 1", "method 2"):
        table[column] = table[column].map(METHOD_LABELS)
    return table


def faithfulness_frame(results: dict[str, PairFaithfulness]) -> pd.DataFrame:
    """One row per (model, side, measure, order, k): score drop and rank after the edit."""
    rows = []
    for model, result in results.items():
        for side in result.sides():
            for measure, curves in side.curves.items():
                for order, curve in curves.items():
                    rows += [
                        {
                            "model": model,
                            "side": side.side,
                            "measure": measure,
                            "order": ORDER_LABELS[order],
                            "k": k,
                            "score drop": drop,
                            "rank": rank,
                            "aopc": curve.aopc,
                        }
                        for k, drop, rank in zip(side.ks, curve.drop, curve.rank)
                    ]
    return pd.DataFrame(rows, columns=["model", "side", "measure", "order", "k", "score drop", "rank", "aopc"])


def aopc_chart(frame: pd.DataFrame, side: str) -> alt.Chart:
    """AOPC of the score drop per method, A and B side by side in their colours; one panel per measure."""
    table = frame[frame["side"] == side].drop_duplicates(["model", "measure", "order"])
    return (
        alt.Chart(table)
        .mark_bar()
        .encode(
            x=alt.X("model:N", title=None, axis=None),
            y=alt.Y("aopc:Q", title="AOPC (mean score drop over k)"),
            color=model_colour(),
            column=alt.Column("order:N", title=None, sort=list(ORDER_LABELS.values())),
            row=alt.Row("measure:N", title=None),
            tooltip=["model", "measure", "order", alt.Tooltip("aopc:Q", format=".4f")],
        )
        .properties(width=70, height=140)
    )


def rank_chart(frame: pd.DataFrame, side: str) -> alt.FacetChart:
    """The passage's rank among the top-100 after each edit, per method."""
    base = alt.Chart().encode(
        x=alt.X("k:Q", title="tokens removed (comprehensiveness) / kept (sufficiency)"),
        y=alt.Y("rank:Q", title="rank of the passage", scale=alt.Scale(reverse=True)),
        color=model_colour(),
        tooltip=["model", "order", "k", "rank", alt.Tooltip("score drop:Q", format=".4f")],
    )
    layers = dashed_lines_with_points(base, "order:N").properties(width=300, height=220)
    return layers.facet(column=alt.Column("measure:N", title=None), data=frame[frame["side"] == side])


def pair_frame(result: TokenPairMap, words: bool, limit: int) -> tuple[pd.DataFrame, int]:
    """Long-form map (query × passage), passage columns cut to the `limit` with the largest |column sum| (kept in
    passage order); also how many passage columns there were."""
    rows, columns, matrix = result.words() if words else result.tokens()
    kept = sorted(np.argsort(-np.abs(matrix.sum(0)))[:limit]) if len(columns) > limit else range(len(columns))
    labels = [f"{j + 1}·{columns[j]}" for j in kept]
    query_labels = [f"{i + 1}·{row}" for i, row in enumerate(rows)]
    records = [
        {"query": query_labels[i], "passage": label, "value": float(matrix[i, j])}
        for i in range(len(rows))
        for j, label in zip(kept, labels)
    ]
    return pd.DataFrame(records, columns=["query", "passage", "value"]), len(columns)


def pair_heatmaps(
    maps: dict[str, TokenPairMap],
    labels: dict[str, str],
    words: bool,
    limit: int,
) -> tuple[alt.HConcatChart, dict[str, int]]:
    """One heatmap per model, side by side, each with a symmetric diverging scale; and each model's column count."""
    charts, counts = [], {}
    for model, result in maps.items():
        frame, counts[model] = pair_frame(result, words, limit)
        scale = float(frame["value"].abs().max()) if len(frame) else 1.0
        charts.append(
            alt.Chart(frame)
            .mark_rect()
            .encode(
                x=alt.X("passage:N", sort=list(dict.fromkeys(frame["passage"])), title="passage"),
                y=alt.Y("query:N", sort=list(dict.fromkeys(frame["query"])), title="query"),
                color=alt.Color(
                    "value:Q",
                    scale=alt.Scale(scheme="redblue", domain=[-scale, scale]),
                    legend=alt.Legend(title=f"{model}: M[i, j]"),
                ),
                tooltip=["query", "passage", alt.Tooltip("value:Q", format="+.5f")],
            )
            .properties(title=alt.TitleParams(f"{model}: {labels[model]}", color=MODEL_COLOURS[model]), height=220)
        )
    return alt.hconcat(*charts).resolve_scale(color="independent"), counts


def pair_summary(result: TokenPairMap) -> str:
    return (
        f"Σ M = {result.total:+.4f}; s(x) − s(baselines) = {result.score - result.baseline_score:+.4f}; "
        f"deviation {result.deviation:+.4f} = quadrature error {result.quadrature_error:+.1e} − main effects "
        f"{result.main_effects:+.4f} (s(q0, p) − s0 + s(q, p0) − s0)"
    )


def chosen_passage(name: str) -> int:
    """The passage picked for model `name` in the page's per-model passage box."""
    return int(st.session_state[f"token_ig_passage_{name}"])


def methods_section(
    pair: ModelPair,
    corpus: Corpus,
    cache: ResultCache,
    indexes: dict[str, DenseIndex],
    query: str,
    settings: IGSettings,
    k_max: int,
) -> Bundle | None:
    """The methods side by side with their agreement, and their faithfulness; the section's report bundle."""
    st.header("Attribution methods side by side")
    if not st.toggle(
        "Compare four attribution methods and their faithfulness (a few occlusion and re-scoring runs per model)",
        key="methods_show",
    ):
        return None
    side = st.radio("Tokens of", SIDES, horizontal=True, key="methods_side")
    panels, results = {}, {}
    for name, encoder in pair.models.items():
        candidates = retrieve(encoder, indexes[name], corpus, query, CANDIDATES, cache=cache).indices
        with activity(f"Model {name}: attribution methods and their faithfulness"):
            panels[name], results[name] = cached_faithfulness(
                cache, encoder, corpus, indexes[name], query, candidates, chosen_passage(name), settings, k_max
            )
    st.caption(
        "Each method scores every token of the chosen passage's pair with the other side's embedding fixed; "
        "colours are scaled per text. Agreement: rank correlation of two methods' token scores "
        "([CLS]/[SEP] left out)."
    )
    for column, (name, encoder) in zip(st.columns(2), pair.models.items()):
        with column:
            st.subheader(f"{name}: {encoder.label}")
            for method, attribution in panels[name].side(side).items():
                st.markdown(f"**{METHOD_LABELS[method]}**")
                st.markdown(tokens_html(attribution), unsafe_allow_html=True)
            st.dataframe(
                agreement_frame(panels[name], side),
                hide_index=True,
                width="stretch",
                column_config={c: st.column_config.NumberColumn(format="%.3f") for c in ("kendall", "spearman")},
            )
    st.header("Faithfulness of each method (ERASER)")
    st.caption(
        f"Comprehensiveness: remove the top-k {side} tokens of a method (→ [PAD]); sufficiency: keep only "
        f"them. Measured as the score drop (AOPC = its mean over k = 1..{k_max}; high comprehensiveness and "
        f"low sufficiency mean faithful) and as the passage's rank among the model's top-{CANDIDATES} after "
        "the edit. Random orders are the control."
    )
    frame = faithfulness_frame(results)
    charts = {f"aopc-{side}": aopc_chart(frame, side), f"rank-{side}": rank_chart(frame, side)}
    for chart in charts.values():
        st.altair_chart(chart)
    tables = {
        "faithfulness": frame,
        **{f"agreement-{name}-{s}": agreement_frame(panels[name], s) for name in panels for s in SIDES},
    }
    return Bundle(
        f"Attribution methods and faithfulness: {query}",
        methods_summary(pair, corpus, query, panels, frame, k_max),
        {
            "query": query,
            "passages": {name: corpus.ids[chosen_passage(name)] for name in panels},
            "k_max": k_max,
            "candidates": CANDIDATES,
            "ig": settings.params(),
        },
        fingerprints(pair, corpus),
        {name: chart.to_dict() for name, chart in charts.items()},
        tables,
    )


def methods_summary(
    pair: ModelPair, corpus: Corpus, query: str, panels: dict[str, MethodPanel], frame: pd.DataFrame, k_max: int
) -> str:
    """Markdown: what was compared, and per model and side the most faithful method and the agreement."""
    lines = [
        f"# Attribution methods on one pair: {pair.spec.title}",
        "",
        f'Query: "{query}". Corpus: {corpus.name} ({len(corpus):,} passages).',
        "Methods: " + ", ".join(METHOD_LABELS.values()) + f"; random orders as the control. ERASER "
        f"comprehensiveness (top-k removed) and sufficiency (only the top-k kept), k = 1..{k_max}, as the "
        f"score drop s(x) − s(edited) (AOPC = its mean over k) and the passage's rank among the model's "
        f"top-{CANDIDATES}.",
        "",
    ]
    for name, encoder in pair.models.items():
        passage = chosen_passage(name)
        lines += [
            f"## Model {name}: {encoder.label}",
            "",
            f"Passage: {corpus.titles[passage]} ({corpus.ids[passage]}).",
            "",
        ]
        for side in SIDES:
            rows = frame[(frame["model"] == name) & (frame["side"] == side)].drop_duplicates(["measure", "order"])
            aopcs = {measure: dict(zip(group["order"], group["aopc"])) for measure, group in rows.groupby("measure")}
            best = max(aopcs["comprehensiveness"], key=aopcs["comprehensiveness"].get)
            agreement = panels[name].agreement(side)
            lines.append(
                f"- {side}: most comprehensive: {best} (AOPC {aopcs['comprehensiveness'][best]:.4f}); "
                "comprehensiveness / sufficiency AOPC: "
                + "; ".join(
                    f"{order} {aopcs['comprehensiveness'][order]:.4f} / {aopcs['sufficiency'][order]:.4f}"
                    for order in aopcs["comprehensiveness"]
                )
                + f"; mean Kendall τ between methods {agreement['kendall'].mean():.3f}."
            )
        lines.append("")
    return "\n".join(lines)


def pairs_section(pair: ModelPair, corpus: Corpus, cache: ResultCache, query: str, settings: IGSettings) -> None:
    st.header("Token pairs: which query token meets which passage token")
    if not st.toggle("Compute the token-pair maps (integrated Jacobians)", key="token_pairs_show"):
        return
    st.caption(
        "Integrated Jacobians with the [PAD] baselines on both sides: M[i, j] is the share of s(q, p) of query "
        "token i with passage token j; its rows sum to query-side and its columns to passage-side attributions "
        "(against g(p) − g(p0) and f(q) − f(q0))."
    )
    controls = st.columns(2)
    words = controls[0].checkbox("Merge sub-words into words", value=True, key="token_pairs_words")
    limit = int(controls[1].slider("Passage columns shown", 10, 80, 30, key="token_pairs_limit"))
    maps = {}
    for name, encoder in pair.models.items():
        passage = chosen_passage(name)
        with activity(f"Model {name}: token-pair map"):
            maps[name] = cached_pair_map(
                cache,
                encoder,
                query,
                corpus.titles[passage],
                corpus.texts[passage],
                passage_max_length=settings.passage_max_length,
            )
    chart, counts = pair_heatmaps(maps, {name: encoder.label for name, encoder in pair.models.items()}, words, limit)
    unit = "words" if words else "tokens"
    for name, count in counts.items():
        if count > limit:
            st.info(
                f"Model {name}: the passage has {count} {unit}; shown are the {limit} with the largest "
                f"|Σ_i M[i, j]|, in passage order."
            )
    st.altair_chart(chart)
    for name, result in maps.items():
        st.caption(f"{name}: {pair_summary(result)}")
