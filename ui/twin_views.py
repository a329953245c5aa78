"""Altair charts and tables for the twin analyses page (patching, neuron overlap, paraphrases, CKA)."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from core.cka import INPUTS, LayerSimilarity
from core.overlap import OverlapAggregate
from core.palette import MODEL_COLOURS, NEUTRAL_LINE, dashed_lines_with_points, model_colour
from core.paraphrase import ParaphraseReport
from core.patching import (
    DIRECTIONS,
    PATCH_SITES,
    SITE_TITLES,
    CellSummary,
    DirectionPatching,
    PatchingAggregate,
)

OVERLAP_COLOURS = {"kept": "#9d7660", "dropped": MODEL_COLOURS["A"], "recruited": MODEL_COLOURS["B"]}


def patching_frame(
    direction: str, values: np.ndarray, ranks: np.ndarray | None = None, summary: CellSummary | None = None
) -> pd.DataFrame:
    """One row per (layer, site) of one direction: recovered fraction (and rank or interval)."""
    rows = []
    for layer, site in np.ndindex(*values.shape):
        row = {
            "direction": direction,
            "layer": layer + 1,
            "site": SITE_TITLES[PATCH_SITES[site]],
            "recovered": float(values[layer, site]),
        }
        if ranks is not None:
            row["rank of target"] = int(ranks[layer, site])
        if summary is not None:
            row |= {
                "low": float(summary.low[layer, site]),
                "high": float(summary.high[layer, site]),
                "median": float(summary.median[layer, site]),
                "queries": int(summary.defined[layer, site]),
            }
        rows.append(row)
    return pd.DataFrame(rows)


def query_patching_frame(directions: dict[str, DirectionPatching]) -> pd.DataFrame:
    return pd.concat([patching_frame(name, d.recovered, d.ranks) for name, d in directions.items()])


def aggregate_patching_frame(aggregate: PatchingAggregate) -> pd.DataFrame:
    frames = []
    for direction in DIRECTIONS:
        summary = aggregate.summary(direction)
        frames.append(patching_frame(direction, summary.pooled, summary=summary))
    return pd.concat(frames)


# One word per line: side by side, the site names are wider than their columns.
WORD_PER_LINE_LABELS = alt.Axis(labelAngle=0, labelExpr="split(datum.label, ' ')")


def patching_heatmaps(frame: pd.DataFrame, title: str) -> alt.HConcatChart:
    """Layer x site per direction; colour from white (the recipient's own score) to the donor's colour (1)."""
    tooltips = [
        c
        for c in ("layer", "site", "recovered", "median", "low", "high", "queries", "rank of target")
        if c in frame.columns
    ]
    charts = []
    for direction, (recipient, donor) in DIRECTIONS.items():
        part = frame[frame.direction == direction]
        base = alt.Chart(part, title=f"{title}: {direction} ({recipient} run with {donor}'s activation)").encode(
            x=alt.X("site:N", sort=[SITE_TITLES[s] for s in PATCH_SITES], title=None, axis=WORD_PER_LINE_LABELS),
            y=alt.Y("layer:O", sort="descending"),
        )
        cells = base.mark_rect().encode(
            color=alt.Color(
                "recovered:Q",
                title=f"recovered ({direction})",
                scale=alt.Scale(domain=[0, 1], range=["#ffffff", MODEL_COLOURS[donor]], clamp=True),
            ),
            tooltip=[
                alt.Tooltip(c, format=".3f") if c in ("recovered", "median", "low", "high") else c for c in tooltips
            ],
        )
        labels = base.mark_text(fontSize=11).encode(text=alt.Text("recovered:Q", format=".2f"))
        charts.append((cells + labels).properties(width=alt.Step(110), height=alt.Step(26)))
    return alt.hconcat(*charts).resolve_scale(color="independent")


def overlap_frame(overlap: OverlapAggregate) -> pd.DataFrame:
    rows = []
    for site in overlap.sites:
        means = overlap.means(site)
        for layer in range(len(means["kept"])):
            rows.append({"site": site, "layer": layer + 1, **{name: float(v[layer]) for name, v in means.items()}})
    return pd.DataFrame(rows)


def overlap_chart(frame: pd.DataFrame, title: str) -> alt.Chart:
    """Stacked bars per layer: kept (both), dropped (only A: A's colour), recruited (only B: B's colour)."""
    long = frame.melt(
        id_vars=["site", "layer"], value_vars=list(OVERLAP_COLOURS), var_name="neurons", value_name="count"
    )
    return (
        alt.Chart(long, title=title)
        .mark_bar()
        .encode(
            x=alt.X("layer:O"),
            y=alt.Y("count:Q", title="neurons above threshold (mean per query)"),
            color=alt.Color(
                "neurons:N",
                legend=alt.Legend(orient="bottom"),
                scale=alt.Scale(domain=list(OVERLAP_COLOURS), range=list(OVERLAP_COLOURS.values())),
            ),
            order=alt.Order("neurons:N", sort="ascending"),
            column=alt.Column("site:N", title=None),
            tooltip=["site", "layer", "neurons", alt.Tooltip("count:Q", format=".2f")],
        )
        .properties(width=240, height=200)
    )


def paraphrase_layer_frame(report: ParaphraseReport) -> pd.DataFrame:
    rows = []
    for name in ("A", "B"):
        for site in report.needs[0].models[name].neuron_jaccard:
            values = report.neuron_jaccard(name, site)
            for layer in range(values.shape[1]):
                column = values[:, layer]
                rows.append(
                    {
                        "model": name,
                        "site": site,
                        "layer": layer + 1,
                        "jaccard": float(np.nanmean(column)) if (~np.isnan(column)).any() else np.nan,
                    }
                )
    return pd.DataFrame(rows)


def paraphrase_chart(frame: pd.DataFrame, title: str) -> alt.Chart:
    return (
        alt.Chart(frame, title=title)
        .mark_line(point=True)
        .encode(
            x=alt.X("layer:O"),
            y=alt.Y("jaccard:Q", title="mean pairwise Jaccard of neuron sets", scale=alt.Scale(domain=[0, 1])),
            color=model_colour(),
            column=alt.Column("site:N", title=None),
            tooltip=["model", "site", "layer", alt.Tooltip("jaccard:Q", format=".3f")],
        )
        .properties(width=240, height=200)
    )


def paraphrase_need_frame(report: ParaphraseReport, titles: tuple[str, ...]) -> pd.DataFrame:
    rows = []
    for need in report.needs:
        row = {"need": need.need.phrasings[0], "gold": titles[need.gold] if need.gold is not None else "—"}
        for name, model in need.models.items():
            row[f"top-{report.k} Jaccard {name}"] = model.retrieval_jaccard
            row[f"gold found by all {name}"] = model.found_by_all
            row[f"neuron Jaccard {name} (intermediate)"] = float(np.nanmean(model.neuron_jaccard["intermediate"]))
        rows.append(row)
    return pd.DataFrame(rows)


def cka_frame(similarity: LayerSimilarity) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"layer": layer, "inputs": kind, "CKA": float(similarity.cka[kind][layer])}
            for kind in INPUTS
            for layer in range(len(similarity.cka[kind]))
        ]
    )


def cka_chart(frame: pd.DataFrame, title: str) -> alt.LayerChart:
    base = alt.Chart(frame, title=title).encode(
        x=alt.X("layer:O", title="layer (0 = embeddings)", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("CKA:Q", title="linear CKA", scale=alt.Scale(zero=False)),
        color=alt.value(NEUTRAL_LINE),
        tooltip=["layer", "inputs", alt.Tooltip("CKA:Q", format=".3f")],
    )
    return dashed_lines_with_points(base, "inputs:N").properties(width=420, height=240)


def pca_frames(similarity: LayerSimilarity, titles: tuple[str, ...]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Points (one per query and gold passage, per model) and links (query -> its gold passage)."""
    points, links = [], []
    count = len(similarity.queries)
    for name, coordinates in similarity.projections.items():
        for number in range(count):
            query, passage = coordinates[number], coordinates[count + number]
            label = titles[similarity.passages[number]]
            points.append(
                {
                    "model": name,
                    "kind": "query",
                    "x": query[0],
                    "y": query[1],
                    "text": similarity.queries[number],
                    "pair": number,
                }
            )
            points.append(
                {"model": name, "kind": "gold passage", "x": passage[0], "y": passage[1], "text": label, "pair": number}
            )
            links.append(
                {"model": name, "pair": number, "x": query[0], "y": query[1], "x2": passage[0], "y2": passage[1]}
            )
    return pd.DataFrame(points), pd.DataFrame(links)


def pca_chart(points: pd.DataFrame, links: pd.DataFrame, name: str, title: str) -> alt.LayerChart:
    lines = (
        alt.Chart(links[links.model == name])
        .mark_rule(opacity=0.35)
        .encode(x="x:Q", y="y:Q", x2="x2:Q", y2="y2:Q", color=model_colour(legend=None))
    )
    dots = (
        alt.Chart(points[points.model == name])
        .mark_point(filled=True, size=50)
        .encode(
            x=alt.X("x:Q", title="PC 1"),
            y=alt.Y("y:Q", title="PC 2"),
            color=model_colour(legend=None),
            shape=alt.Shape("kind:N", legend=alt.Legend(orient="bottom")),
            tooltip=["kind", "text"],
        )
    )
    return (lines + dots).properties(title=title, width=360, height=300)
