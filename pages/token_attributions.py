"""Token attributions: Integrated Gradients of s(q, p) for the query and passages, both models side by side."""

import streamlit as st

from core.bundles import token_bundle
from core.corpus import Corpus
from core.figures import deletion_chart, deletion_frame
from core.pair import ModelPair
from core.retrieval import retrieve
from core.runtime import report_progress
from core.token_attribution import (
    DEFAULT_METHOD,
    DEFAULT_STEPS,
    DELTA_TOLERANCE,
    METHODS,
    START_STEPS,
    TOP_K,
    IGSettings,
    SinhSubstitution,
    cached_deletion_curve,
    cached_pair,
    cached_ranking,
    cloud_weights,
    word_sums,
)
from ui.frame import run_page
from ui.jobs import activity
from ui.method_views import methods_section, pairs_section
from ui.reports import report_button
from ui.state import query_box, require_indexes, result_cache, selected_passage
from ui.token_views import (
    STYLE,
    attribution_frame,
    attribution_json,
    cloud_png,
    legend_html,
    show_tokens,
    steps_text,
)


def render(pair: ModelPair, corpus: Corpus) -> None:
    text = query_box()
    with st.expander("Settings"):
        settings_columns = st.columns(4)
        n_steps = settings_columns[0].number_input(
            "IG steps", min_value=2, max_value=256, value=DEFAULT_STEPS, key="token_ig_steps"
        )
        method = settings_columns[1].selectbox(
            "Integration method", METHODS, index=METHODS.index(DEFAULT_METHOD), key="token_ig_method"
        )
        k_max = settings_columns[2].slider("Deletion curve: tokens removed (K)", 1, 30, 10, key="token_ig_k")
        drop_stopwords = settings_columns[3].checkbox(
            "Leave stop words and punctuation out of clouds and table", value=True, key="token_ig_stopwords"
        )
        adaptive_columns = st.columns(3)
        adaptive = adaptive_columns[0].checkbox(
            f"Adaptive: a cheaper first pass, then the IG steps only where completeness δ is above "
            f"{DELTA_TOLERANCE:.0%}",
            value=True,
            key="token_ig_adaptive",
        )
        start_steps = adaptive_columns[1].number_input(
            "First-pass steps",
            min_value=1,
            max_value=256,
            value=START_STEPS,
            disabled=not adaptive,
            key="token_ig_start_steps",
        )
        substitute = adaptive_columns[2].checkbox(
            "First pass: sinh substitution (nodes crowd where the offline models' integrand peaks)",
            value=True,
            disabled=not adaptive,
            key="token_ig_substitution",
        )
    settings = IGSettings(
        int(n_steps),
        method,
        start_steps=int(start_steps) if adaptive else None,
        start_substitution=SinhSubstitution() if substitute else None,
    )

    if not text.strip():
        st.info(
            "Type a query to see which of its tokens and of its passages' tokens drive the score, "
            "e.g. *country in Western Europe*."
        )
        st.stop()

    indexes = require_indexes(pair, corpus)
    cache = result_cache()
    rankings = {
        name: retrieve(encoder, indexes[name], corpus, text, TOP_K, cache=cache)
        for name, encoder in pair.models.items()
    }
    query = rankings["A"].query.text
    for name, ranking in rankings.items():
        if ranking.query.truncated:
            st.warning(
                f"Model {name} reads at most {ranking.query.max_length} tokens of the query; the rest is ignored."
            )

    analyses = {}
    for name, encoder in pair.models.items():
        with activity(f"Model {name}: Integrated Gradients for the query and its top-{TOP_K} passages"):
            analyses[name] = cached_ranking(
                cache, encoder, corpus, query, rankings[name].indices, settings, progress=report_progress
            )

    st.markdown(STYLE, unsafe_allow_html=True)
    st.markdown(legend_html(), unsafe_allow_html=True)
    selected = selected_passage(corpus)
    chosen, chosen_pairs = {}, {}
    for column, (name, encoder) in zip(st.columns(2), pair.models.items()):
        with column:
            st.subheader(f"{name}: {encoder.label}")
            st.markdown(f"**Query, attribution summed over the top-{TOP_K} passages**")
            show_tokens(analyses[name].query_total)
            st.caption(steps_text(analyses[name], settings))
            options = list(rankings[name].indices)
            if selected is not None and selected not in options:
                options.insert(0, selected)
            ranks = {index: rank for rank, index in enumerate(rankings[name].indices, start=1)}
            choice = st.selectbox(
                "Passage",
                options,
                index=options.index(selected) if selected in options else 0,
                format_func=lambda i, ranks=ranks: (
                    (f"{ranks[i]}. " if i in ranks else "selected: ") + (corpus.titles[i] or corpus.ids[i])
                ),
                key=f"token_ig_passage_{name}",
            )
            chosen[name] = choice
            chosen_pairs[name] = analyses[name].pair_for(choice)
            if chosen_pairs[name] is None:
                with activity(f"Model {name}: Integrated Gradients for this passage"):
                    chosen_pairs[name] = cached_pair(
                        cache, encoder, query, corpus.titles[choice], corpus.texts[choice], settings
                    )
            st.markdown("**Query, for this passage**")
            show_tokens(chosen_pairs[name].query)
            st.markdown("**Passage**")
            show_tokens(chosen_pairs[name].passage)

    st.header(f"Words over the top-{TOP_K} passages")
    st.caption(
        "Passage-side attributions with sub-words merged into words, summed over the passages; a word goes "
        "into the positive or the negative cloud by the sign of its sum."
    )
    for column, (name, encoder) in zip(st.columns(2), pair.models.items()):
        with column:
            st.subheader(f"{name}: {encoder.label}")
            table = word_sums([p.passage for p in analyses[name].pairs], drop_stopwords=drop_stopwords)
            for sign, colormap in (("positive", "Blues"), ("negative", "Reds")):
                weights = cloud_weights(table, sign)
                if not weights:
                    st.caption(f"No word with a {sign} sum.")
                    continue
                image = cloud_png(weights, colormap)
                st.image(
                    image, caption=f"{sign} words (size ∝ |sum|; largest {max(weights.values()):.4f})", width="stretch"
                )
                st.download_button(
                    f"Download the {sign} cloud (PNG)",
                    image,
                    f"cloud-{name}-{sign}.png",
                    "image/png",
                    key=f"token_ig_cloud_{name}_{sign}",
                )
            st.dataframe(
                table,
                hide_index=True,
                width="stretch",
                height=280,
                column_config={
                    c: st.column_config.NumberColumn(format="%.4f") for c in ("total", "positive", "negative")
                },
            )
            # Callables: the files are built on click, not on every rerun.
            downloads = st.columns(2)
            downloads[0].download_button(
                "Attributions (CSV)",
                lambda analysis=analyses[name]: attribution_frame(analysis, corpus).to_csv(index=False),
                f"token-attributions-{name}.csv",
                "text/csv",
                key=f"token_ig_csv_{name}",
            )
            downloads[1].download_button(
                "Attributions (JSON)",
                lambda analysis=analyses[name], label=encoder.label: attribution_json(
                    analysis, corpus, label, settings.params()
                ),
                f"token-attributions-{name}.json",
                "application/json",
                key=f"token_ig_json_{name}",
            )

    st.header("Faithfulness: deletion curves")
    side = st.radio("Tokens removed from", ["query", "passage"], horizontal=True, key="token_ig_side")
    st.caption(
        f"For each model's chosen passage: replace the k most attributed {side} tokens by [PAD] and rescore "
        "(lower means the attribution found what the score depends on), against random tokens."
    )
    curves = {}
    with activity("Deletion curves"):
        for name, encoder in pair.models.items():
            curves[name] = cached_deletion_curve(
                cache, encoder, chosen_pairs[name], side, k_max=int(k_max), settings=settings
            )
    st.altair_chart(deletion_chart(deletion_frame(curves)), width="stretch")
    report_button(
        token_bundle(pair, corpus, settings, analyses, chosen, chosen_pairs, curves, side, int(k_max), drop_stopwords),
        key="token_ig_report",
    )

    bundle = methods_section(pair, corpus, cache, indexes, query, settings, int(k_max))
    if bundle is not None:
        report_button(bundle, key="token_ig_methods_report")
    pairs_section(pair, corpus, cache, query, settings)


run_page(
    "Token attributions",
    render,
    method="Integrated Gradients of s(q, p) = pooled(q) · pooled(p) with the [PAD] baseline (all tokens but "
    "[CLS]/[SEP] replaced by [PAD]); the other side's embedding stays fixed.",
)
