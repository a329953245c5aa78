"""The charts that `python -m core report` draws as well as the pages: built from core results with Altair,
and word clouds with wordcloud."""

from __future__ import annotations

import io

import altair as alt
import pandas as pd

from .attribution.deletion import DeletionCurve
from .palette import dashed_lines_with_points, model_colour
from .retrieval import Overlap, Ranking


def shared_ranks_frame(rankings: dict[str, Ranking], overlap: Overlap) -> pd.DataFrame:
    """One row per (passage retrieved by both, model): its rank in that model's list, in A's order."""
    ranks = {name: {hit.index: hit for hit in ranking.hits} for name, ranking in rankings.items()}
    shared = sorted(overlap.shared, key=lambda index: ranks["A"][index].rank)
    return pd.DataFrame(
        [
            {
                "passage": ranks[name][index].title or ranks[name][index].id,
                "model": name,
                "rank": ranks[name][index].rank,
            }
            for index in shared
            for name in rankings
        ],
        columns=["passage", "model", "rank"],
    )


def rank_shift_chart(frame: pd.DataFrame) -> alt.Chart:
    """Each shared passage's rank in A and in B, joined by a line."""
    return (
        alt.Chart(frame)
        .mark_line(point=True)
        .encode(
            x=alt.X("model:N", title=None),
            y=alt.Y("rank:Q", scale=alt.Scale(reverse=True), title="rank"),
            color=alt.Color("passage:N", legend=None),
            tooltip=["passage:N", "model:N", "rank:Q"],
        )
        .properties(title="Rank of passages retrieved by both models", height=260)
    )


def deletion_frame(curves: dict[str, DeletionCurve]) -> pd.DataFrame:
    rows = []
    for model, curve in curves.items():
        for order, scores in (
            ("top attributed first", curve.attribution_order),
            (f"random (mean of {curve.random_orders})", curve.random_order),
        ):
            rows += [
                {"model": model, "tokens removed": k, "score": s, "order": order} for k, s in zip(curve.ks, scores)
            ]
    return pd.DataFrame(rows, columns=["model", "tokens removed", "score", "order"])


def deletion_chart(frame: pd.DataFrame) -> alt.LayerChart:
    base = alt.Chart(frame).encode(
        x=alt.X("tokens removed:Q", axis=alt.Axis(tickMinStep=1)),
        y=alt.Y("score:Q", title="s(q, p)", scale=alt.Scale(zero=False)),
        color=model_colour(legend=alt.Legend()),
        tooltip=["model:N", "order:N", "tokens removed:Q", alt.Tooltip("score:Q", format=".4f")],
    )
    return dashed_lines_with_points(base, "order:N").properties(height=300)


def word_cloud_png(weights: dict[str, float], colormap: str) -> bytes:
    """A 480 x 300 PNG word cloud, word size by weight (the same layout for the same weights: seeded)."""
    from wordcloud import WordCloud

    cloud = WordCloud(
        width=480,
        height=300,
        background_color="white",
        colormap=colormap,
        prefer_horizontal=0.95,
        random_state=0,
        collocations=False,
    )
    buffer = io.BytesIO()
    cloud.generate_from_frequencies(weights).to_image().save(buffer, format="PNG")
    return buffer.getvalue()
