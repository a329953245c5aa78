"""One colour per model on every page and chart: A blue, B red."""

from __future__ import annotations

from collections.abc import Mapping

import altair as alt

MODEL_COLOURS = {"A": "#4c78a8", "B": "#e45756"}
NEUTRAL_LINE = "#555555"  # lines that belong to no model (CKA compares them), and line-style legend samples


def model_colour(
    field: str = "model:N",
    labels: Mapping[str, str] | None = None,
    legend: alt.Legend | None = alt.Legend(orient="bottom", direction="vertical", labelLimit=400, symbolOpacity=1),
) -> alt.Color:
    """Colour by model. labels maps "A"/"B" to the values the field holds when it holds more than the name. The
    default legend's dots are at full colour even where a layer sharing it is faint (a confidence band)."""
    names = list(MODEL_COLOURS)
    domain = [labels[name] for name in names] if labels else names
    return alt.Color(field, scale=alt.Scale(domain=domain, range=[MODEL_COLOURS[n] for n in names]), legend=legend)


def line_style_legend(**options) -> alt.Legend:
    """The legend of a strokeDash encoding: grey line samples, since colour is the model's (its own legend)."""
    samples = {"symbolType": "stroke", "symbolStrokeColor": NEUTRAL_LINE, "symbolStrokeWidth": 2, "symbolSize": 400}
    return alt.Legend(**samples, **options)


def dashed_lines_with_points(base: alt.Chart, dash: str, legend: alt.Legend | None = None) -> alt.LayerChart:
    """Lines styled by the `dash` field, with a dot at each value. The dots are a layer of their own: a line mark
    with point=True draws its strokeDash legend without line samples (vega-lite issue 7033)."""
    lines = base.mark_line().encode(strokeDash=alt.StrokeDash(dash, legend=legend or line_style_legend()))
    return lines + base.mark_point(filled=True, opacity=1).encode(detail=dash)
