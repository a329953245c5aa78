"""Tables and Altair charts for the probing & evaluation page (pure builders: data in, frame/chart out)."""

from __future__ import annotations

from collections.abc import Sequence

import altair as alt
import pandas as pd

from core.corpus import Corpus
from core.evaluation import DEPTH, Evaluation, QueryOutcome, paired_difference
from core.palette import dashed_lines_with_points, line_style_legend, model_colour
from core.probing import ProbeResult

KIND_LABELS = {
    "probe": "linear probe",
    "passage only": "probe on the passage alone",
    "untrained": "untrained probe (chance control)",
    "dot product": "plain dot product (no probe)",
}


def probe_frame(result: ProbeResult) -> pd.DataFrame:
    return pd.DataFrame(result.rows)


def probe_table(result: ProbeResult, kinds: Sequence[str]) -> pd.DataFrame:
    """Table 1 layout: rows (model, N, kind), columns L0..L (L0 = embeddings)."""
    frame = probe_frame(result)
    frame = frame[frame["kind"].isin(kinds)]
    table = frame.pivot_table(index=["model", "n", "kind"], columns="layer", values="accuracy")
    table.columns = [f"L{layer}" for layer in table.columns]
    order = {kind: i for i, kind in enumerate(kinds)}
    table = table.reset_index()
    table["kind"] = pd.Categorical(table["kind"], categories=sorted(order, key=order.get), ordered=True)
    return table.sort_values(["model", "n", "kind"]).rename(columns={"n": "N"}).reset_index(drop=True)


def probe_chart(result: ProbeResult, n: int, kinds: Sequence[str]) -> alt.Chart:
    """Accuracy by layer, A vs B (colour), one line style per kind, 95% band for the trained probes."""
    frame = probe_frame(result)
    frame = frame[(frame["n"] == n) & frame["kind"].isin(kinds)].copy()
    frame["model"] = frame["model"].map(lambda name: f"{name}: {result.models[name]}")
    frame["kind"] = frame["kind"].map(KIND_LABELS)
    x = alt.X("layer:O", title="layer (0 = embeddings)", axis=alt.Axis(labelAngle=0))
    labels = {name: f"{name}: {label}" for name, label in result.models.items()}
    color = model_colour(labels=labels)
    base = alt.Chart(frame).encode(
        x=x,
        y=alt.Y("accuracy:Q", title="held-out accuracy", scale=alt.Scale(domain=[0, 1])),
        color=color,
        tooltip=[
            "model:N",
            "kind:N",
            "layer:O",
            alt.Tooltip("accuracy:Q", format=".3f"),
            alt.Tooltip("low:Q", format=".3f"),
            alt.Tooltip("high:Q", format=".3f"),
        ],
    )
    lines = dashed_lines_with_points(
        base, "kind:N", line_style_legend(orient="bottom", direction="vertical", labelLimit=400)
    )
    bands = (
        alt.Chart(frame.dropna(subset=["low"]))
        .mark_area(opacity=0.12)
        .encode(x=x, y="low:Q", y2="high:Q", color=color, detail="kind:N")
    )
    chance = (
        alt.Chart(pd.DataFrame({"chance": [1 / n]})).mark_rule(color="gray", strokeDash=[2, 2]).encode(y="chance:Q")
    )
    return (bands + lines + chance).properties(title=f"N = {n} candidates (chance = {1 / n:.2f})", height=360)


def metrics_table(evaluations: dict[str, Evaluation]) -> pd.DataFrame:
    """One row per metric: each model's mean with its 95% bootstrap interval, and the paired B - A."""
    a, b = evaluations["A"], evaluations["B"]
    rows = []
    for metric in a.means:
        diff, low, high = paired_difference(a.per_query[metric], b.per_query[metric])
        row = {"metric": metric}
        for name, evaluation in evaluations.items():
            row[f"{name}"] = evaluation.means[metric]
            row[f"{name} 95% CI"] = "[{:.3f}, {:.3f}]".format(*evaluation.intervals[metric])
        row["B - A"] = diff
        row["B - A 95% CI"] = f"[{low:+.3f}, {high:+.3f}]"
        rows.append(row)
    return pd.DataFrame(rows)


def metrics_chart(evaluations: dict[str, Evaluation], labels: dict[str, str]) -> alt.Chart:
    rows = [
        {
            "metric": metric,
            "model": f"{name}: {labels[name]}",
            "mean": evaluation.means[metric],
            "low": evaluation.intervals[metric][0],
            "high": evaluation.intervals[metric][1],
        }
        for name, evaluation in evaluations.items()
        for metric in evaluation.means
    ]
    frame = pd.DataFrame(rows)
    base = alt.Chart(frame).encode(
        x=alt.X("model:N", title=None, axis=alt.Axis(labels=False, ticks=False)),
        color=model_colour(labels={name: f"{name}: {labels[name]}" for name in evaluations}),
    )
    bars = base.mark_bar().encode(
        y=alt.Y("mean:Q", title="mean over queries", scale=alt.Scale(domain=[0, 1])),
        tooltip=[
            "metric:N",
            "model:N",
            alt.Tooltip("mean:Q", format=".3f"),
            alt.Tooltip("low:Q", format=".3f"),
            alt.Tooltip("high:Q", format=".3f"),
        ],
    )
    errors = base.mark_rule(color="black").encode(y="low:Q", y2="high:Q")
    return (
        (bars + errors)
        .properties(width=90, height=240)
        .facet(column=alt.Column("metric:N", sort=list(evaluations["A"].means), title=None))
    )


def outcomes_frame(outcomes: Sequence[QueryOutcome], corpus: Corpus) -> pd.DataFrame:
    """One row per query; ranks beyond the evaluated depth are empty."""
    return pd.DataFrame(
        [
            {
                "query": o.query,
                "gold": corpus.titles[o.gold[0]] or corpus.ids[o.gold[0]],
                "also relevant": len(o.gold) - 1,
                "rank A": o.rank_a,
                "rank B": o.rank_b,
                "outcome": o.outcome,
                "position": o.position,
            }
            for o in outcomes
        ]
    ).astype({"rank A": "Int64", "rank B": "Int64"})


def rank_note() -> str:
    return f"Ranks are of the first relevant passage in each model's top {DEPTH}; None = not in the top {DEPTH}."
