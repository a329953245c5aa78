"""Views of token attributions: colored token HTML (escaped), legend, word clouds, CSV/JSON downloads."""

from __future__ import annotations

import json
import math

import pandas as pd
import streamlit as st

from core.corpus import Corpus
from core.figures import word_cloud_png
from core.token_attribution import DELTA_TOLERANCE, IGSettings, RankingAttribution, TokenAttribution, token_rows
from ui.render import escape

POSITIVE_RGB = (33, 102, 172)  # blue end of ColorBrewer RdBu
NEGATIVE_RGB = (178, 24, 43)  # red end of ColorBrewer RdBu
STYLE = """
<style>
.lens-tokens {line-height: 1.9; font-size: 0.95rem;}
.lens-tok {border-radius: 0.2rem; padding: 0.05rem 0;}
.lens-tok-title {font-weight: 600; margin-bottom: 0.2rem;}
.lens-tok-cut {color: #888; font-style: italic;}
.lens-legend {display: flex; align-items: center; gap: 0.4rem; font-size: 0.8rem; color: #555;}
.lens-legend-bar {width: 12rem; height: 0.8rem; border-radius: 0.2rem;
  background: linear-gradient(to right, rgb(178,24,43), #fff, rgb(33,102,172));}
</style>
"""


def background(value: float, scale: float) -> str:
    """Diverging color: blue for positive, red for negative, opacity by |value| / scale."""
    if scale <= 0:
        return "transparent"
    red, green, blue = POSITIVE_RGB if value >= 0 else NEGATIVE_RGB
    return f"rgba({red},{green},{blue},{min(1.0, abs(value) / scale) * 0.85:.3f})"


def tokens_html(attribution: TokenAttribution) -> str:
    """The input's own text with every token's span colored by its attribution; hover shows the value.

    Colors are scaled to the largest |attribution| in this input. Text between tokens is kept as written.
    """
    scale = max((abs(t.score) for t in attribution.tokens), default=0.0)
    parts = []
    for segment, text in enumerate(attribution.segments):
        tokens = [t for t in attribution.tokens if t.segment == segment]
        pieces, cursor = [], 0
        for token in tokens:
            pieces.append(escape(text[cursor : token.start]))
            pieces.append(
                f'<span class="lens-tok" style="background:{background(token.score, scale)}" '
                f'title="{escape(token.text)}: {token.score:+.4f}">{escape(text[token.start : token.end])}</span>'
            )
            cursor = token.end
        is_title = len(attribution.segments) == 2 and segment == 0
        parts.append(f'<div class="{"lens-tok-title" if is_title else "lens-tok-text"}">{"".join(pieces)}</div>')
    if attribution.truncated:
        parts.append(
            '<div class="lens-tok-cut">… the rest is beyond the model\'s maximum length and was not read.</div>'
        )
    return f'<div class="lens-tokens">{"".join(parts)}</div>'


def legend_html() -> str:
    return (
        '<div class="lens-legend"><span>negative</span><span class="lens-legend-bar"></span>'
        "<span>positive</span><span>· colors scaled to each text's largest |attribution|; "
        "hover a token for its value</span></div>"
    )


def completeness_text(attribution: TokenAttribution) -> str:
    return (
        f"s(x) = {attribution.score:.4f}, s(baseline) = {attribution.baseline_score:.4f}, "
        f"Σ attributions = {attribution.total:.4f}, completeness δ = {attribution.delta:.2e} "
        f"({attribution.relative_delta:.2%} of |s(x) − s(baseline)|) with {attribution.quadrature.describe()}"
    )


def steps_text(ranking: RankingAttribution, settings: IGSettings) -> str:
    """Which rule the passages needed (adaptive quadrature) and their largest relative δ."""
    worst = max(pair.passage.relative_delta for pair in ranking.pairs)
    if len(settings.passes) == 1:
        return f"Passages: {settings.method}, {settings.passes[0].describe()}; largest relative δ {worst:.2%}."
    first, full = settings.passes
    return (
        f"Passages: {settings.method}, {first.describe()}, re-run with {full.describe()} when δ was above "
        f"{DELTA_TOLERANCE:.0%}: {ranking.passage_rules().get(full, 0)} of {len(ranking.pairs)} re-run; "
        f"largest relative δ {worst:.2%}."
    )


def show_completeness(attribution: TokenAttribution) -> None:
    if attribution.within_tolerance:
        st.caption(completeness_text(attribution))
    else:
        st.warning(
            f"{completeness_text(attribution)}: above the {DELTA_TOLERANCE:.0%} tolerance; "
            "raise the number of IG steps."
        )


def show_tokens(attribution: TokenAttribution) -> None:
    st.markdown(tokens_html(attribution), unsafe_allow_html=True)
    show_completeness(attribution)


cloud_png = st.cache_data(show_spinner=False, max_entries=64)(word_cloud_png)


def attribution_frame(ranking: RankingAttribution, corpus: Corpus) -> pd.DataFrame:
    """One row per token: the query total, then per passage its query-side and passage-side attributions."""
    rows = token_rows(ranking.query_total, input="query (sum over passages)", rank=None, passage_id=None)
    for rank, (index, pair) in enumerate(zip(ranking.passage_indices, ranking.pairs), start=1):
        rows += token_rows(pair.query, input="query", rank=rank, passage_id=corpus.ids[index])
        rows += token_rows(pair.passage, input="passage", rank=rank, passage_id=corpus.ids[index])
    return pd.DataFrame(rows)


def _summary(attribution: TokenAttribution) -> dict:
    relative = attribution.relative_delta
    return {
        "score": attribution.score,
        "baseline_score": attribution.baseline_score,
        "delta": attribution.delta,
        "relative_delta": relative if math.isfinite(relative) else None,
        "n_steps": attribution.n_steps,
        "quadrature": attribution.quadrature.describe(),
        "truncated": attribution.truncated,
        "tokens": [{"token": t.text, "attribution": t.score} for t in attribution.tokens],
    }


def attribution_json(ranking: RankingAttribution, corpus: Corpus, model: str, settings: dict) -> str:
    return json.dumps(
        {
            "model": model,
            "settings": settings,
            "query_total": _summary(ranking.query_total),
            "passages": [
                {
                    "rank": rank,
                    "id": corpus.ids[index],
                    "title": corpus.titles[index],
                    "query": _summary(pair.query),
                    "passage": _summary(pair.passage),
                }
                for rank, (index, pair) in enumerate(zip(ranking.passage_indices, ranking.pairs), start=1)
            ],
        },
        indent=1,
        ensure_ascii=False,
    )
