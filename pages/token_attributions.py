"""Token attributions: Integrated Gradients of s(q, p) for the query and passages, both models side by side."""
import streamlit as st

from core.retrieval import QueryError, retrieve
from core.token_attribution import (DEFAULT_METHOD, DEFAULT_STEPS, DELTA_TOLERANCE, METHODS, START_STEPS, TOP_K,
                                    AttributionError, IGSettings, SinhSubstitution, cached_deletion_curve,
                                    cached_pair, cached_ranking, cloud_weights, word_sums)
from ui.render import escape
from ui.state import (query_box, require_corpus, require_indexes, require_pair, result_cache, selected_passage,
                      sidebar)
from ui.token_views import (STYLE, attribution_frame, attribution_json, cloud_png, deletion_chart, legend_html,
                            show_tokens, steps_text)

sidebar()
st.title("Token attributions")
pair = require_pair()
corpus = require_corpus()
st.caption(
    f"**{pair.spec.title}** · corpus: {escape(corpus.name)} ({len(corpus):,} passages) · Integrated Gradients of "
    f"s(q, p) = pooled(q) · pooled(p) with the [PAD] baseline (all tokens but [CLS]/[SEP] replaced by [PAD]); "
    f"the other side's embedding stays fixed."
)
text = query_box()
with st.expander("Settings"):
    settings_columns = st.columns(4)
    n_steps = settings_columns[0].number_input("IG steps", min_value=2, max_value=256, value=DEFAULT_STEPS,
                                               key="token_ig_steps")
    method = settings_columns[1].selectbox("Integration method", METHODS, index=METHODS.index(DEFAULT_METHOD),
                                           key="token_ig_method")
    k_max = settings_columns[2].slider("Deletion curve: tokens removed (K)", 1, 30, 10, key="token_ig_k")
    drop_stopwords = settings_columns[3].checkbox("Leave stop words and punctuation out of clouds and table",
                                                  value=True, key="token_ig_stopwords")
    adaptive_columns = st.columns(3)
    adaptive = adaptive_columns[0].checkbox(
        f"Adaptive: a cheaper first pass, then the IG steps only where completeness δ is above "
        f"{DELTA_TOLERANCE:.0%}", value=True, key="token_ig_adaptive")
    start_steps = adaptive_columns[1].number_input("First-pass steps", min_value=1, max_value=256, value=START_STEPS,
                                                   disabled=not adaptive, key="token_ig_start_steps")
    substitute = adaptive_columns[2].checkbox(
        "First pass: sinh substitution (nodes crowd where the offline models' integrand peaks)", value=True,
        disabled=not adaptive, key="token_ig_substitution")
settings = IGSettings(int(n_steps), method, start_steps=int(start_steps) if adaptive else None,
                      start_substitution=SinhSubstitution() if substitute else None)

if not text.strip():
    st.info("Type a query to see which of its tokens and of its passages' tokens drive the score, "
            "e.g. *country in Western Europe*.")
    st.stop()

indexes = require_indexes(pair, corpus)
cache = result_cache()
try:
    rankings = {name: retrieve(encoder, indexes[name], corpus, text, TOP_K, cache=cache)
                for name, encoder in pair.models.items()}
except QueryError as error:
    st.info(str(error))
    st.stop()
query = rankings["A"].query.text
for name, ranking in rankings.items():
    if ranking.query.truncated:
        st.warning(f"Model {name} reads at most {ranking.query.max_length} tokens of the query; the rest is ignored.")

analyses = {}
bar = st.progress(0.0, text="Token attributions…")
try:
    for number, (name, encoder) in enumerate(pair.models.items()):
        def update(done: int, total: int, number=number, name=name) -> None:
            bar.progress((number + done / total) / len(pair.models),
                         text=f"Model {name}: Integrated Gradients for the query and its top-{TOP_K} passages "
                              f"({done}/{total})")

        analyses[name] = cached_ranking(cache, encoder, corpus, query, rankings[name].indices, settings,
                                        progress=update)
except AttributionError as error:
    bar.empty()
    st.error(str(error))
    st.stop()
bar.empty()

st.markdown(STYLE, unsafe_allow_html=True)
st.markdown(legend_html(), unsafe_allow_html=True)
selected = selected_passage(corpus)
chosen_pairs = {}
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
            "Passage", options, index=options.index(selected) if selected in options else 0,
            format_func=lambda i, ranks=ranks: (f"{ranks[i]}. " if i in ranks else "selected: ")
            + (corpus.titles[i] or corpus.ids[i]),
            key=f"token_ig_passage_{name}",
        )
        chosen = analyses[name].pair_for(choice)
        if chosen is None:
            with st.spinner("Integrated Gradients for this passage…"):
                chosen = cached_pair(cache, encoder, query, corpus.titles[choice], corpus.texts[choice], settings)
        chosen_pairs[name] = chosen
        st.markdown("**Query, for this passage**")
        show_tokens(chosen.query)
        st.markdown("**Passage**")
        show_tokens(chosen.passage)

st.header(f"Words over the top-{TOP_K} passages")
st.caption("Passage-side attributions with sub-words merged into words, summed over the passages; a word goes "
           "into the positive or the negative cloud by the sign of its sum.")
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
            st.image(image, caption=f"{sign} words (size ∝ |sum|; largest {max(weights.values()):.4f})",
                     width="stretch")
            st.download_button(f"Download the {sign} cloud (PNG)", image, f"cloud-{name}-{sign}.png", "image/png",
                               key=f"token_ig_cloud_{name}_{sign}")
        st.dataframe(table, hide_index=True, width="stretch", height=280,
                     column_config={c: st.column_config.NumberColumn(format="%.4f")
                                    for c in ("total", "positive", "negative")})
        # Callables: the files are built on click, not on every rerun.
        downloads = st.columns(2)
        downloads[0].download_button(
            "Attributions (CSV)", lambda analysis=analyses[name]: attribution_frame(analysis, corpus).to_csv(index=False),
            f"token-attributions-{name}.csv", "text/csv", key=f"token_ig_csv_{name}")
        downloads[1].download_button(
            "Attributions (JSON)",
            lambda analysis=analyses[name], label=encoder.label: attribution_json(analysis, corpus, label,
                                                                                  settings.params()),
            f"token-attributions-{name}.json", "application/json", key=f"token_ig_json_{name}")

st.header("Faithfulness: deletion curves")
side = st.radio("Tokens removed from", ["query", "passage"], horizontal=True, key="token_ig_side")
st.caption(f"For each model's chosen passage: replace the k most attributed {side} tokens by [PAD] and rescore "
           "(lower means the attribution found what the score depends on), against random tokens.")
curves = {}
with st.spinner("Deletion curves…"):
    for name, encoder in pair.models.items():
        curves[name] = cached_deletion_curve(cache, encoder, chosen_pairs[name], side, k_max=int(k_max),
                                             settings=settings)
st.altair_chart(deletion_chart(curves), width="stretch")
