"""Home: both models' top-k passages for the query, side by side, and how much they agree."""

import streamlit as st

from core.bundles import retrieval_bundle
from core.corpus import Corpus
from core.figures import rank_shift_chart, shared_ranks_frame
from core.pair import ModelPair
from core.retrieval import MAX_K, compare_rankings, retrieve
from ui.frame import run_page
from ui.render import STYLE, hit_card
from ui.reports import report_button
from ui.state import (
    query_box,
    require_indexes,
    result_cache,
    select_passage,
    selected_passage,
)


def render(pair: ModelPair, corpus: Corpus) -> None:
    left, right = st.columns([4, 1])
    with left:
        text = query_box()
    with right:
        k = st.number_input("top-k", min_value=1, max_value=MAX_K, value=10, step=1, key="top_k")

    if not text.strip():
        st.info("Type a query to retrieve passages, e.g. *country in Western Europe*.")
        st.stop()

    indexes = require_indexes(pair, corpus)
    rankings = {
        name: retrieve(encoder, indexes[name], corpus, text, int(k), cache=result_cache())
        for name, encoder in pair.models.items()
    }

    for name, ranking in rankings.items():
        if ranking.query.truncated:
            st.warning(
                f"Model {name} reads at most {ranking.query.max_length} tokens; the query has "
                f"{ranking.query.token_count}, so it was truncated."
            )
    if rankings["A"].query.text != text.strip():
        st.caption("Control characters in the query were replaced by spaces.")

    overlap = compare_rankings(rankings["A"], rankings["B"])
    metrics = st.columns(4)
    metrics[0].metric(f"Shared in top-{overlap.k}", f"{len(overlap.shared)}")
    metrics[1].metric(f"Jaccard@{overlap.k}", f"{overlap.jaccard:.2f}")
    metrics[2].metric("Rank-biased overlap (p=0.9)", f"{overlap.rbo:.2f}")
    metrics[3].metric("Mean |rank shift| of shared", f"{overlap.mean_abs_shift:.1f}")

    st.markdown(STYLE, unsafe_allow_html=True)
    columns = st.columns(2)
    for column, (name, encoder) in zip(columns, pair.models.items()):
        with column:
            st.subheader(f"{name}: {encoder.label}")
            cards = []
            for hit in rankings[name].hits:
                shift = overlap.rank_shift.get(hit.index)
                cards.append(
                    hit_card(
                        hit.rank,
                        hit.title,
                        hit.score,
                        hit.snippet,
                        hit.index in overlap.shared,
                        shift if name == "B" else None,
                    )
                )
            st.markdown("".join(cards), unsafe_allow_html=True)

    if overlap.shared:
        st.altair_chart(rank_shift_chart(shared_ranks_frame(rankings, overlap)), width="stretch")
    report_button(retrieval_bundle(pair, corpus, rankings, int(k)), key="retrieval_report")

    current = selected_passage(corpus)
    union = list(
        dict.fromkeys(rankings["A"].indices + rankings["B"].indices + ([current] if current is not None else []))
    )
    choice = st.selectbox(
        "Passage to analyse on the other pages",
        union,
        index=union.index(current) if current in union else 0,
        format_func=lambda i: corpus.titles[i] or corpus.ids[i],
        key="passage_choice",
    )
    select_passage(corpus, choice)


run_page("DPR Lens: retrieval", render)
