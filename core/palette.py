"""One colour per model on every page and chart: A blue, B red."""

from __future__ import annotations

from collections.abc import Mapping

import altair as alt

MODEL_COLOURS = {"A": "#4c78a8", "B": "#e45756"}


def model_colour(
    field: str = "model:N",
    labels: Mapping[str, str] | None = None,
    legend: alt.Legend | None = alt.Legend(orient="bottom", direction="vertical", labelLimit=400),
) -> alt.Color:
    """Colour by model. labels maps "A"/"B" to the values the field holds when it holds more than the name."""
    names = list(MODEL_COLOURS)
    domain = [labels[name] for name in names] if labels else names
    return alt.Color(field, scale=alt.Scale(domain=domain, range=[MODEL_COLOURS[n] for n in names]), legend=legend)
