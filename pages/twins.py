"""Twin analyses: where in the network B's retrieval behaviour lives (activation patching), whether B recruits new
knowledge neurons or reuses A's (neuron overlap), whether phrasings of one need agree (paraphrases), and how
similar the two models' layers are (linear CKA, PCA)."""

from collections.abc import Callable

import streamlit as st

from core.bundles import TwinResults, twins_bundle
from core.cka import layer_similarity, undefined_note
from core.corpus import Corpus, LabelledQuery
from core.errors import LensError
from core.neuron_attribution import aggregate_sample, lookup_aggregate
from core.overlap import neuron_overlap
from core.pair import ModelPair
from core.paraphrase import (
    DEFAULT_K,
    load_needs,
    lookup_paraphrase_agreement,
    paraphrase_agreement,
    parse_phrasings,
)
from core.patching import aggregate_patching, lookup_patching_aggregate, near_tie_note, patch_query, require_twins
from core.runtime import report_progress
from ui import twin_views as views
from ui.frame import run_page
from ui.jobs import activity
from ui.neuron_views import steps_slider, threshold_slider
from ui.render import escape
from ui.reports import report_button
from ui.state import query_box, require_indexes, result_cache


def section(draw: Callable[[], None]) -> None:
    """One analysis; a LensError (e.g. a pair that is not twins) ends this section only, in one sentence."""
    try:
        draw()
    except LensError as error:
        st.info(escape(str(error)))


def sample(corpus: Corpus, label: str, key: str, default: int) -> list[LabelledQuery]:
    size = st.number_input(f"{label} (a fixed sample of held-out description queries)", 1, 500, default, key=key)
    return aggregate_sample(corpus, int(size))


def render(pair: ModelPair, corpus: Corpus) -> None:
    cache = result_cache()
    text = query_box()
    indexes = require_indexes(pair, corpus)
    has_descriptions = any(corpus.descriptions)
    left, right = st.columns(2)
    threshold = threshold_slider(left, "tw_threshold")
    steps = steps_slider(right, "tw_steps")
    computed, settings, figures, tables = TwinResults(), {"threshold": threshold, "steps": steps}, {}, {}

    st.header("Activation patching")
    st.caption(
        "A←B: A runs on the query with one layer's site replaced by B's activation (all positions); B←A the "
        "reverse. Target: B's indexed embedding of B's top-1 passage, for both directions; ranks are in B's "
        "index. Recovered fraction (s_patched − s_recipient) / (s_donor − s_recipient): 0 = the recipient's own "
        "score, 1 = the donor's. Over many queries (pooled): the fractions weighted by |s_donor − s_recipient|, so "
        "that a query whose two clean scores nearly tie cannot dominate, with the median fraction in the table."
    )

    def patching() -> None:
        require_twins(pair, "Patching")
        if text.strip():
            with activity("Patching every layer and site of both models"):
                result = patch_query(pair, indexes["B"], corpus, text, cache=cache)
            scores = {d.recipient: d.recipient_score for d in result.directions.values()}
            st.caption(
                f"Target: {escape(corpus.titles[result.passage] or corpus.ids[result.passage])} · "
                f"s_A = {scores['A']:.4f} · s_B = {scores['B']:.4f}"
            )
            if note := near_tie_note(result):
                st.info(note)
            frame = views.query_patching_frame(result.directions)
            chart = views.patching_heatmaps(frame, "This query")
            st.altair_chart(chart)
            computed.patching, figures["patching"], tables["patching"] = result, chart.to_dict(), frame
            st.download_button(
                "Patching of this query (CSV)",
                frame.to_csv(index=False),
                "patching.csv",
                "text/csv",
                on_click="ignore",
                key="tw_patch_csv",
            )
        else:
            st.info("Type a query to patch it, or compute the aggregate below.")
        if not has_descriptions:
            return
        queries = sample(corpus, "Queries for the patching aggregate", "tw_patch_n", 50)
        aggregate = lookup_patching_aggregate(pair, indexes["B"], queries, cache)
        if aggregate is None and st.button(f"Patch {len(queries)} queries", key="tw_patch_compute"):
            with activity(f"Patching {len(queries)} queries"):
                aggregate = aggregate_patching(pair, indexes["B"], corpus, queries, cache, report_progress)
        if aggregate is not None:
            frame = views.aggregate_patching_frame(aggregate)
            chart = views.patching_heatmaps(frame, f"Pooled over {len(queries)} queries")
            st.altair_chart(chart)
            st.dataframe(frame, hide_index=True)
            computed.patching_aggregate, settings["patching_queries"] = aggregate, len(queries)
            figures["patching-aggregate"], tables["patching-aggregate"] = chart.to_dict(), frame

    section(patching)

    st.header("Neuron overlap")
    st.caption(
        "Query-tower knowledge neurons above t × max, each model against its own top-1 passage: kept (both), "
        "dropped (only A), recruited (only B); Jaccard = |A ∩ B| / |A ∪ B| per layer."
    )

    def overlap() -> None:
        require_twins(pair, "Neuron overlap")
        if text.strip():
            with activity("Attributing every FFN neuron of both models"):
                one = neuron_overlap(
                    pair, indexes, corpus, [LabelledQuery(text, -1, frozenset())], cache, threshold, steps
                )
            frame = views.overlap_frame(one)
            chart = views.overlap_chart(frame, "This query")
            st.altair_chart(chart)
            st.dataframe(frame, hide_index=True)
            computed.overlap, figures["overlap"], tables["overlap"] = one, chart.to_dict(), frame
        if not has_descriptions:
            return
        queries = sample(corpus, "Queries for the overlap aggregate", "tw_overlap_n", 20)
        ready = all(
            lookup_aggregate(encoder, indexes[name], queries, steps, cache) is not None
            for name, encoder in pair.models.items()
        )
        if ready or st.button(f"Attribute {len(queries)} queries in both models", key="tw_overlap_compute"):
            with activity(f"Neuron overlap over {len(queries)} queries"):
                many = neuron_overlap(
                    pair,
                    indexes,
                    corpus,
                    queries,
                    cache,
                    threshold,
                    steps,
                    lambda name, done, total: report_progress(done, total),
                )
            frame = views.overlap_frame(many)
            chart = views.overlap_chart(frame, f"Mean over {len(queries)} queries")
            st.altair_chart(chart)
            st.caption(
                "Share of B's neurons above threshold that A did not have: "
                + ", ".join(f"{site} {many.recruited_share(site):.2f}" for site in many.sites)
            )
            st.dataframe(frame, hide_index=True)
            computed.overlap_aggregate, settings["overlap_queries"] = many, len(queries)
            figures["overlap-aggregate"], tables["overlap-aggregate"] = chart.to_dict(), frame

    section(overlap)

    st.header("Paraphrase agreement")
    st.caption(
        "Per model: mean pairwise Jaccard of the phrasings' top-k passages and of their knowledge-neuron sets "
        "(every phrasing attributed against the same passage: the gold one, else the model's top-1 of the "
        "first phrasing)."
    )
    k = st.number_input("Top-k compared", 1, 100, DEFAULT_K, key="tw_para_k")
    settings["paraphrase_k"] = int(k)

    def paraphrases() -> None:
        phrasings = st.text_area(
            "Your phrasings of one need, one per line",
            key="tw_phrasings",
            placeholder="highest mountain on Earth\ntallest peak in the Himalayas",
        )
        if phrasings.strip():
            need = parse_phrasings(phrasings)
            with activity("Attributing every phrasing in both models"):
                report = paraphrase_agreement(pair, indexes, corpus, [need], cache, int(k), threshold, steps)
            columns = st.columns(2)
            for column, name in zip(columns, pair.models):
                column.metric(f"{name}: top-{k} Jaccard", f"{report.needs[0].models[name].retrieval_jaccard:.2f}")
            frame = views.paraphrase_layer_frame(report)
            chart = views.paraphrase_chart(frame, "Your phrasings")
            st.altair_chart(chart)
            computed.phrasings, settings["phrasings"] = report, list(need.phrasings)
            figures["paraphrases"], tables["paraphrases"] = chart.to_dict(), frame
        needs = load_needs()
        count = st.number_input("Built-in needs (first N of the set)", 1, len(needs), len(needs), key="tw_para_n")
        needs = needs[: int(count)]
        report = lookup_paraphrase_agreement(pair, indexes, needs, cache, int(k), threshold, steps)
        if report is None and st.button(f"Compare the phrasings of {len(needs)} built-in needs", key="tw_para_compute"):
            with activity(f"Paraphrase agreement of {len(needs)} needs"):
                report = paraphrase_agreement(
                    pair, indexes, corpus, needs, cache, int(k), threshold, steps, report_progress
                )
        if report is not None:
            lines = []
            for label, site in (
                ("top-k sets", None),
                ("intermediate neurons", "intermediate"),
                ("output neurons", "output"),
            ):
                mean, low, high, count = report.difference(site)
                lines.append(f"{label}: B − A = {mean:+.3f} [{low:+.3f}, {high:+.3f}] over {count} needs")
            st.caption("Paired bootstrap (95%) of B's agreement minus A's: " + "; ".join(lines))
            st.caption(
                "Every phrasing finds the gold passage in its top-k: "
                + ", ".join(f"{name} {report.found_by_all(name):.2f}" for name in pair.models)
            )
            frame = views.paraphrase_layer_frame(report)
            chart = views.paraphrase_chart(frame, f"{len(needs)} built-in needs")
            st.altair_chart(chart)
            per_need = views.paraphrase_need_frame(report, corpus.titles)
            st.dataframe(per_need, hide_index=True)
            computed.needs, settings["needs"] = report, len(needs)
            figures["paraphrases-needs"], tables["paraphrases-needs"] = chart.to_dict(), frame
            tables["paraphrases-per-need"] = per_need

    section(paraphrases)

    st.header("Layer similarity")
    st.caption(
        "Linear CKA of A's and B's layer-l features (pooled as each tower pools; layer 0 = embeddings) on the "
        "same held-out queries and their gold passages, and a 2-D PCA of the final embeddings."
    )

    def similarity() -> None:
        if not has_descriptions:
            st.info("CKA uses the corpus's description queries; this corpus has none.")
            return
        queries = sample(corpus, "Queries for CKA", "tw_cka_n", 50)
        if len(queries) < 3:
            st.info("CKA needs at least three queries.")
            return
        with activity(f"Layer features of {len(queries)} queries and passages"):
            result = layer_similarity(pair, corpus, queries, cache, progress=report_progress)
        frame = views.cka_frame(result)
        chart = views.cka_chart(frame, "Linear CKA of A and B per layer")
        st.altair_chart(chart)
        if note := undefined_note(result.cka):
            st.caption(note)
        points, links = views.pca_frames(result, corpus.titles)
        computed.similarity, settings["cka_queries"] = result, len(queries)
        figures["cka"], tables["cka"], tables["pca"] = chart.to_dict(), frame, points
        columns = st.columns(2)
        for column, name in zip(columns, pair.models):
            share = result.explained[name].sum()
            chart = views.pca_chart(
                points, links, name, f"{name}: PCA of queries and gold passages ({share:.0%} of variance)"
            )
            column.altair_chart(chart)
            figures[f"pca-{name}"] = chart.to_dict()

    section(similarity)

    if computed.any():
        report_button(twins_bundle(pair, corpus, text, computed, settings, figures, tables), key="tw_report")


run_page("Twin analyses", render, method="A and its DPR-trained twin B, layer by layer.")
