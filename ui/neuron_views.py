"""Altair charts and tables for the knowledge-neuron page.

Heatmaps never draw one mark per neuron: neurons are grouped into at most NEURON_BINS bins per layer
(a BERT-base layer has 3072 intermediate neurons), so a chart stays a few hundred rectangles.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping

import altair as alt
import numpy as np
import pandas as pd

from core.cloze import Prediction
from core.neuron_attribution import (
    DEFAULT_STEPS,
    DEFAULT_THRESHOLD,
    SITES,
    NeuronAggregate,
    NeuronAttribution,
    above_threshold,
)
from core.palette import model_colour
from core.suppression import SuppressionCurve

NEURON_BINS = 64
SITE_TITLES = {"intermediate": "FFN intermediate", "output": "FFN output"}


def threshold_slider(container, key: str) -> float:
    """The knowledge-neuron threshold t, drawn in `container` (a column, the sidebar, or st)."""
    return container.slider(
        "Threshold t (× the site's largest attribution)", 0.005, 0.3, DEFAULT_THRESHOLD, 0.005, format="%.3f", key=key
    )


def steps_slider(container, key: str) -> int:
    """The knowledge-neuron Riemann steps m, drawn in `container`."""
    return container.select_slider("Riemann steps m", [5, 10, 20, 30, 50], value=DEFAULT_STEPS, key=key)


def _bin_edges(neurons: int, bins: int = NEURON_BINS) -> np.ndarray:
    return np.linspace(0, neurons, min(bins, neurons) + 1).astype(int)


def _layer_label(layer: int, count: int) -> str:
    return f"layer {layer + 1} ({count})"


def binned_frame(values: np.ndarray, layer_counts: np.ndarray, bins: int = NEURON_BINS) -> pd.DataFrame:
    """One row per (layer, neuron bin): the sum of `values` in the bin and its largest single value."""
    edges = _bin_edges(values.shape[1], bins)
    rows = []
    for layer in range(values.shape[0]):
        sums = np.add.reduceat(values[layer], edges[:-1])
        peaks = np.maximum.reduceat(values[layer], edges[:-1])
        for number, (first, last) in enumerate(zip(edges[:-1], edges[1:])):
            rows.append(
                {
                    "layer": _layer_label(layer, int(layer_counts[layer])),
                    "order": layer,
                    "bin": number,
                    "neurons": f"{first}–{last - 1}",
                    "value": float(sums[number]),
                    "peak": float(peaks[number]),
                }
            )
    return pd.DataFrame(rows)


def _heatmap(frame: pd.DataFrame, title: str, color_title: str, peak_title: str) -> alt.Chart:
    return (
        alt.Chart(frame, title=title)
        .mark_rect()
        .encode(
            x=alt.X("bin:O", title="neuron bin", axis=alt.Axis(labels=False, ticks=False)),
            y=alt.Y("layer:N", title=None, sort=alt.SortField("order", order="descending")),
            color=alt.Color("value:Q", title=color_title, scale=alt.Scale(scheme="orangered")),
            tooltip=[
                alt.Tooltip("layer:N"),
                alt.Tooltip("neurons:N"),
                alt.Tooltip("value:Q", title=color_title),
                alt.Tooltip("peak:Q", title=peak_title, format=".3f"),
            ],
        )
        .properties(height=alt.Step(20), width=320)  # at 16 px Vega hid every other layer's label
    )


def attribution_heatmaps(attribution: NeuronAttribution, threshold: float, title: str) -> alt.VConcatChart:
    """Both sites of one model: colour = neurons above threshold per bin; labels = per-layer counts."""
    counts = attribution.layer_counts(threshold)
    charts = []
    for site in SITES:
        scores = attribution.scores[site]
        frame = binned_frame(above_threshold(scores, threshold).astype(float), counts[site])
        peak = scores.max()
        relative = binned_frame(scores / peak if peak > 0 else np.zeros_like(scores), counts[site])
        frame["peak"] = relative["peak"]
        charts.append(
            _heatmap(
                frame, f"{title} · {SITE_TITLES[site]}", "neurons above threshold", "largest attribution / site max"
            )
        )
    return alt.vconcat(*charts).resolve_scale(color="independent")


def aggregate_heatmaps(aggregate: NeuronAggregate, threshold: float, title: str) -> alt.VConcatChart:
    """Figure 1: colour = (neuron, query) pairs above threshold per bin; labels = neurons active in >= 1 query."""
    counts, labels = aggregate.query_counts(threshold), aggregate.layer_counts(threshold)
    charts = []
    for site in SITES:
        frame = binned_frame(counts[site].astype(float), labels[site])
        charts.append(
            _heatmap(
                frame,
                f"{title} · {SITE_TITLES[site]} ({len(aggregate.queries)} queries)",
                "activations (neuron × query)",
                "most queries for one neuron",
            )
        )
    return alt.vconcat(*charts).resolve_scale(color="independent")


def layer_count_frame(counts: Mapping[str, Mapping[str, np.ndarray]]) -> pd.DataFrame:
    """counts[model][site] = per-layer counts -> long table (model, site, layer, neurons)."""
    return pd.DataFrame(
        [
            {"model": model, "site": SITE_TITLES[site], "layer": layer + 1, "neurons": int(value)}
            for model, by_site in counts.items()
            for site in SITES
            for layer, value in enumerate(by_site[site])
        ]
    )


def layer_count_chart(counts: Mapping[str, Mapping[str, np.ndarray]], title: str) -> alt.FacetChart:
    return (
        alt.Chart(layer_count_frame(counts))
        .mark_bar()
        .encode(
            x=alt.X("layer:O", title="layer"),
            xOffset="model:N",
            y=alt.Y("neurons:Q", title="neurons above threshold"),
            color=model_colour(legend=alt.Legend()),
            tooltip=["model:N", "site:N", "layer:O", "neurons:Q"],
        )
        .properties(width=260, height=200)
        .facet(column=alt.Column("site:N", title=None))
        .properties(title=title)
    )


def attribution_table(attributions: Mapping[str, NeuronAttribution], threshold: float) -> pd.DataFrame:
    """Every neuron of every model and site: attribution, attribution / site max, above threshold."""
    frames = []
    for model, attribution in attributions.items():
        for site in SITES:
            scores = attribution.scores[site]
            layers, neurons = np.indices(scores.shape)
            peak = scores.max()
            frames.append(
                pd.DataFrame(
                    {
                        "model": model,
                        "site": site,
                        "layer": layers.ravel() + 1,
                        "neuron": neurons.ravel(),
                        "attribution": scores.ravel(),
                        "relative": (scores / peak).ravel() if peak > 0 else 0.0,
                        "above_threshold": above_threshold(scores, threshold).ravel(),
                    }
                )
            )
    return pd.concat(frames, ignore_index=True)


def completeness_table(attributions: Mapping[str, NeuronAttribution]) -> pd.DataFrame:
    rows = []
    for model, attribution in attributions.items():
        sums, expected, deltas = (
            attribution.attribution_sums(),
            attribution.expected_sums(),
            attribution.completeness_deltas(),
        )
        for site in SITES:
            for layer in range(attribution.layers):
                rows.append(
                    {
                        "model": model,
                        "site": SITE_TITLES[site],
                        "layer": layer + 1,
                        "Σ attributions": sums[site][layer],
                        "s(x) − s(α=0)": expected[site][layer],
                        "|delta|": deltas[site][layer],
                    }
                )
    return pd.DataFrame(rows)


def suppression_frame(curves: Mapping[str, SuppressionCurve]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"model": model, "k": k, "rank": rank, "score": score}
            for model, curve in curves.items()
            for k, rank, score in zip(curve.ks, curve.ranks, curve.scores)
        ]
    )


def suppression_chart(curves: Mapping[str, SuppressionCurve], title: str) -> alt.Chart:
    return (
        alt.Chart(suppression_frame(curves), title=title)
        .mark_line(point=True)
        .encode(
            x=alt.X("k:Q", title="top-k neurons zeroed"),
            y=alt.Y("rank:Q", title="rank of the passage (log)", scale=alt.Scale(type="log", reverse=True)),
            color=model_colour(legend=alt.Legend()),
            tooltip=["model:N", "k:Q", "rank:Q", alt.Tooltip("score:Q", format=".4f")],
        )
        .properties(height=260)
    )


def png_bytes(chart: alt.TopLevelMixin) -> Callable[[], bytes]:
    """Deferred PNG rendering (vl-convert), run only when the download button is clicked."""

    def render() -> bytes:
        buffer = io.BytesIO()
        chart.save(buffer, format="png", scale_factor=2)
        return buffer.getvalue()

    return render


def cloze_frame(before: list[Prediction], after: list[Prediction]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "rank": range(1, len(before) + 1),
            "word": [p.word for p in before],
            "probability": [p.probability for p in before],
            "word, neurons zeroed": [p.word for p in after],
            "probability, neurons zeroed": [p.probability for p in after],
        }
    )
