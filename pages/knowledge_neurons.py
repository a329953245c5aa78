"""Knowledge neurons (Dai et al. 2022, as in arXiv 2402.11035 Section 3): which FFN neurons of A and B
carry the query-passage score, over many queries (Figure 1), and what zeroing them does to retrieval."""

import streamlit as st

from core.bundles import neurons_bundle
from core.cloze import ClozeError, fill_in_blank
from core.corpus import Corpus
from core.neuron_attribution import (
    aggregate_neurons,
    aggregate_sample,
    attribute_passage,
    attribute_query,
    lookup_aggregate,
)
from core.pair import ModelPair
from core.runtime import report_progress
from core.suppression import DEFAULT_MAX_K, curve_ks, ranked_neurons, suppression_curve
from ui import neuron_views as views
from ui.frame import run_page
from ui.jobs import activity
from ui.render import escape
from ui.reports import report_button
from ui.state import (
    cloze_model,
    query_box,
    require_indexes,
    result_cache,
    selected_passage,
)


def render(pair: ModelPair, corpus: Corpus) -> None:
    cache = result_cache()
    text = query_box()
    chosen = selected_passage(corpus)
    left, middle, right = st.columns(3)
    threshold = views.threshold_slider(left, "kn_threshold")
    steps = views.steps_slider(left, "kn_steps")
    with middle:
        tower = st.radio(
            "Tower",
            ["query", "context"],
            horizontal=True,
            key="kn_tower",
            format_func=lambda t: "Query tower" if t == "query" else "Passage tower",
        )
        st.caption(
            "Query tower: target = the passage's embedding, fixed. Passage tower: the passage's "
            "(title, text) is analysed; target = the fixed query embedding."
        )
    with right:
        options = ["top1"] + (["selected"] if chosen is not None else [])
        mode = st.radio(
            "Target passage" if tower == "query" else "Passage analysed",
            options,
            key="kn_passage",
            format_func=lambda o: (
                "each model's own top-1" if o == "top1" else f"selected on Retrieval: {escape(corpus.titles[chosen])}"
            ),
        )
        if chosen is None:
            st.caption("Pick a passage on the Retrieval page to analyse it here.")

    if not text.strip():
        st.info("Type a query to find the neurons that carry its score, e.g. *country in Western Europe*.")
        st.stop()

    indexes = require_indexes(pair, corpus)
    passage = chosen if mode == "selected" else None

    def analyse(name: str, which: str):
        encoder, index = pair.models[name], indexes[name]
        if which == "query":
            return attribute_query(encoder, index, corpus, text, passage, steps, cache)
        return attribute_passage(encoder, index, corpus, text, passage, steps, cache)

    with activity("Attributing every FFN neuron of both models"):
        analysed = {name: analyse(name, tower) for name in pair.models}

    attributions = {name: result.attribution for name, result in analysed.items()}
    figures, tables, aggregates = {}, {}, None
    st.caption(f"Query: {escape(analysed['A'].query)}")
    columns = st.columns(2)
    for column, (name, encoder) in zip(columns, pair.models.items()):
        result = analysed[name]
        strong = result.attribution.strongly_activated(threshold)
        with column:
            st.subheader(f"{name}: {escape(encoder.label)}")
            st.caption(
                f"{'Target' if tower == 'query' else 'Analysed'} passage: "
                f"{escape(corpus.titles[result.passage] or corpus.ids[result.passage])} · "
                f"s(q, p) = {result.attribution.score:.4f} · {len(result.attribution.tokens)} tokens analysed"
            )
            metrics = st.columns(2)
            metrics[0].metric("Strongly activated: intermediate", strong["intermediate"])
            metrics[1].metric("Strongly activated: output", strong["output"])
            chart = views.attribution_heatmaps(result.attribution, threshold, f"Model {name}")
            st.altair_chart(chart)
            figures[f"neurons-{name}"] = chart.to_dict()
            st.download_button(
                f"Heatmaps of {name} (PNG)",
                views.png_bytes(chart),
                f"neurons-{name}.png",
                "image/png",
                on_click="ignore",
                key=f"kn_png_{name}",
            )

    counts = {name: attribution.layer_counts(threshold) for name, attribution in attributions.items()}
    chart = views.layer_count_chart(counts, f"Neurons above t = {threshold:.3f} per layer, A vs B")
    st.altair_chart(chart)
    figures["layer-counts"] = chart.to_dict()
    tables["layer-counts"] = views.layer_count_frame(counts)
    totals = tables["layer-counts"].groupby(["model", "site"])["neurons"].sum().unstack()
    st.dataframe(totals.rename_axis(columns=None), width="content")
    tables["neurons"] = views.attribution_table(attributions, threshold)
    st.download_button(
        "All neuron attributions (CSV)",
        tables["neurons"].to_csv(index=False),
        "neuron-attributions.csv",
        "text/csv",
        on_click="ignore",
        key="kn_csv",
    )
    with st.expander("Completeness: Σ attributions vs s(x) − s(α=0), per layer and site"):
        st.caption(f"A Riemann sum with m = {steps} steps; the delta shrinks as m grows.")
        tables["completeness"] = views.completeness_table(attributions)
        st.dataframe(tables["completeness"], hide_index=True)

    st.header("Figure 1: neurons over many queries")
    if not any(corpus.descriptions):
        st.info("The aggregate uses the corpus's description queries; this corpus has none.")
    else:
        size = st.number_input("Queries (a fixed sample of held-out description queries)", 1, 1000, 200, key="kn_n")
        queries = aggregate_sample(corpus, int(size))
        if not queries:
            st.info("This corpus has no held-out description queries.")
        else:
            aggregates = {
                name: lookup_aggregate(encoder, indexes[name], queries, steps, cache)
                for name, encoder in pair.models.items()
            }
            if not all(aggregates.values()):
                st.caption(
                    f"Not precomputed for {len(queries)} queries and m = {steps}: run `python -m core "
                    f"neurons-aggregate --queries {len(queries)} --steps {steps}` or compute it here."
                )
                if st.button(f"Compute the aggregate for {len(queries)} queries", key="kn_compute"):
                    for name, encoder in pair.models.items():
                        with activity(f"Model {name}: Figure-1 aggregate, queries"):
                            aggregates[name] = aggregate_neurons(
                                encoder, indexes[name], corpus, queries, cache, steps, report_progress
                            )
            if all(aggregates.values()):
                columns = st.columns(2)
                for column, (name, aggregate) in zip(columns, aggregates.items()):
                    with column:
                        chart = views.aggregate_heatmaps(aggregate, threshold, f"Model {name}")
                        st.altair_chart(chart)
                        figures[f"figure1-{name}"] = chart.to_dict()
                        st.download_button(
                            f"Figure 1 of {name} (PNG)",
                            views.png_bytes(chart),
                            f"figure1-{name}.png",
                            "image/png",
                            on_click="ignore",
                            key=f"kn_f1_{name}",
                        )
                labels = {name: aggregate.layer_counts(threshold) for name, aggregate in aggregates.items()}
                chart = views.layer_count_chart(labels, "Neurons above threshold in at least one query")
                st.altair_chart(chart)
                figures["figure1-layer-counts"] = chart.to_dict()
                tables["figure1-layer-counts"] = views.layer_count_frame(labels)
                strong = {
                    name: {
                        site: float(values.mean()) for site, values in aggregate.strongly_activated(threshold).items()
                    }
                    for name, aggregate in aggregates.items()
                }
                st.caption(
                    "Strongly activated neurons per query, mean over the sample (Table 2): "
                    + "; ".join(
                        f"{name}: {values['intermediate']:.1f} intermediate, {values['output']:.1f} output"
                        for name, values in strong.items()
                    )
                )
                st.download_button(
                    "Per-layer counts (CSV)",
                    tables["figure1-layer-counts"].to_csv(index=False),
                    "figure1-layer-counts.csv",
                    "text/csv",
                    on_click="ignore",
                    key="kn_f1_csv",
                )

    st.header("Suppression: zeroing the top-k neurons")
    max_k = st.slider(
        "Zero up to k query-tower neurons (both sites, ranked by attribution / site max)",
        1,
        200,
        DEFAULT_MAX_K,
        key="kn_max_k",
    )
    st.caption(
        "The query is re-encoded with the neurons zeroed at every position and re-retrieved from the "
        "model's own index; the chart follows the "
        + ("selected (gold) passage." if passage is not None else "model's original top-1 passage.")
    )
    with activity("Suppression: re-encoding the query with neurons zeroed"):
        query_side = analysed if tower == "query" else {name: analyse(name, "query") for name in pair.models}
        curves = {
            name: suppression_curve(pair.models[name], indexes[name], query_side[name], curve_ks(max_k))
            for name in pair.models
        }
    chart = views.suppression_chart(curves, "Rank of the passage as more neurons are zeroed")
    st.altair_chart(chart)
    figures["suppression"] = chart.to_dict()
    tables["suppression"] = views.suppression_frame(curves)
    titles = [
        {
            "model": name,
            "k": k,
            "rank of passage": rank,
            "retrieved first": " · ".join(corpus.titles[i] for i in top[:3]),
        }
        for name, curve in curves.items()
        for k, rank, top in zip(curve.ks, curve.ranks, curve.top)
        if k in (curve.ks[0], curve.ks[-1])
    ]
    st.dataframe(titles, hide_index=True)
    shown = aggregates if aggregates and all(aggregates.values()) else None
    settings = {
        "tower": tower,
        "target": "selected passage" if passage is not None else "each model's own top-1",
        "threshold": threshold,
        "steps": steps,
        "max_k": max_k,
        "figure1_queries": len(shown["A"].queries) if shown else None,
    }
    report_button(
        neurons_bundle(pair, corpus, analysed, threshold, curves, shown, settings, figures, tables),
        key="kn_report",
    )

    clozes = {name: cloze_model(encoder) for name, encoder in pair.models.items()}
    if any(clozes.values()):
        st.header("Fill in the blank: does the model know the fact?")
        st.caption(
            "As Dai et al. check knowledge: the masked-LM head's top words for the blank, then the same "
            f"with this query's top-{max_k} query-tower neurons (from the retrieval attribution above) zeroed."
        )
        prompt = st.text_input(
            "Prompt with one blank ([MASK] or ___)", "The capital of France is [MASK].", max_chars=500, key="kn_cloze"
        )
        for name, cloze in clozes.items():
            if cloze is None:
                st.caption(f"Model {name} ({escape(pair.models[name].label)}) has no masked-LM head.")
                continue
            try:
                before = fill_in_blank(cloze, prompt)
                after = fill_in_blank(cloze, prompt, zeroed=ranked_neurons(query_side[name].attribution, max_k))
            except ClozeError as error:
                st.info(str(error))
                break
            st.markdown(f"**{name}: {escape(pair.models[name].label)}**")
            st.dataframe(
                views.cloze_frame(before, after),
                hide_index=True,
                column_config={
                    c: st.column_config.NumberColumn(format="%.3f")
                    for c in ("probability", "probability, neurons zeroed")
                },
            )


run_page(
    "Knowledge neurons",
    render,
    method="Attr = activation × mean gradient of s(q, p) while the site is scaled from 0 to 1 (Riemann sum).",
)
