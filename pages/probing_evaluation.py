"""Retrieval quality of A and B with bootstrap intervals and per-query wins/losses; layer-wise probing (Table 1)."""

import streamlit as st

from core.bundles import evaluation_bundle, probing_bundle
from core.corpus import Corpus, description_queries, split_indices
from core.evaluation import (
    A_WINS,
    B_WINS,
    OUTCOMES,
    QUERY_FILE_FORMAT,
    QueryFileError,
    evaluate_pair,
    outcome_counts,
    parse_query_lines,
    wins_losses,
)
from core.pair import ModelPair
from core.probing import KINDS, NEGATIVE_SOURCES, ProbeConfig, ProbeError, lookup_probing, run_probing
from core.runtime import report_progress
from ui.frame import run_page
from ui.jobs import activity
from ui.probing_views import (
    KIND_LABELS,
    metrics_chart,
    metrics_table,
    outcomes_frame,
    probe_chart,
    probe_frame,
    probe_table,
    rank_note,
)
from ui.render import escape
from ui.reports import report_button
from ui.state import require_indexes, result_cache, select_passage

HELD_OUT, USER_QUERIES = "Held-out description → article", "My labelled queries (JSONL)"


def render(pair: ModelPair, corpus: Corpus) -> None:
    labels = {name: encoder.label for name, encoder in pair.models.items()}
    section = st.radio(
        "Section",
        ["Retrieval evaluation", "Layer-wise probing"],
        horizontal=True,
        key="pe_section",
        label_visibility="collapsed",
    )

    def labelled_queries():
        """The chosen query set and where it comes from, or a message and None."""
        source = st.radio("Queries", [HELD_OUT, USER_QUERIES], horizontal=True, key="eval_queries")
        if source == HELD_OUT:
            if not corpus.descriptions:
                st.info("This corpus has no article descriptions to use as queries; choose *My labelled queries*.")
                return None
            queries = description_queries(corpus, split_indices(corpus)[1])
            if not queries:
                st.info("No held-out article of this corpus has a description to use as a query.")
                return None
            st.caption(
                f"{len(queries)} queries: the description of each held-out article (never trained on), "
                "relevant = that article and any article with the same description."
            )
            return queries, HELD_OUT
        uploaded = st.file_uploader("JSONL file of labelled queries", type=["jsonl", "json", "txt"], key="eval_file")
        pasted = st.text_area(
            "…or paste JSONL lines",
            key="eval_pasted",
            height=120,
            placeholder='{"query": "capital of France", "gold_ids": ["Paris"]}',
        )
        st.caption(f"Format: {QUERY_FILE_FORMAT}. Ids are the corpus passage ids (Wikipedia: the article title).")
        if uploaded is not None:
            text, name = uploaded.getvalue().decode("utf-8", errors="replace"), uploaded.name
        elif pasted.strip():
            text, name = pasted, "pasted queries"
        else:
            st.info("Upload or paste labelled queries to evaluate both models on them.")
            return None
        try:
            return parse_query_lines(text.splitlines(), corpus, name), name
        except QueryFileError as error:
            st.error(escape(str(error)))
            return None

    def evaluation_section() -> None:
        labelled = labelled_queries()
        if labelled is None:
            return
        queries, source = labelled
        indexes = require_indexes(pair, corpus)
        with activity(f"Retrieving the top 100 for {len(queries)} queries with both models"):
            evaluations = evaluate_pair(pair, corpus, queries, result_cache(), indexes)
        st.subheader("Retrieval quality")
        st.caption(
            "Mean over queries with a 95% bootstrap interval (1,000 resamples of the queries); "
            "B − A is paired: both models resampled on the same queries."
        )
        metrics = metrics_table(evaluations)
        st.dataframe(
            metrics,
            hide_index=True,
            column_config={name: st.column_config.NumberColumn(format="%.3f") for name in ("A", "B", "B - A")},
        )
        chart = metrics_chart(evaluations, labels)
        st.altair_chart(chart, height=440)

        st.subheader("Per-query wins and losses of B vs A")
        left, right = st.columns([1, 3])
        k = left.selectbox("Right = a relevant passage in the top", [1, 5, 10, 100], key="eval_win_at")
        outcomes = wins_losses(queries, evaluations["A"], evaluations["B"], int(k))
        counts = outcome_counts(outcomes)
        for column, (name, count) in zip(right.columns(len(counts)), counts.items()):
            column.metric(f"{name} right", count)
        frame = outcomes_frame(outcomes, corpus)
        filters = st.columns([2, 2])
        chosen = filters[0].multiselect("Show", OUTCOMES, default=[B_WINS, A_WINS], key="eval_outcomes")
        contains = filters[1].text_input("Query or gold title contains", key="eval_contains").strip().casefold()
        shown = frame[frame["outcome"].isin(chosen)]
        if contains:
            shown = shown[
                shown["query"].str.casefold().str.contains(contains, regex=False)
                | shown["gold"].str.casefold().str.contains(contains, regex=False)
            ]
        st.dataframe(shown.drop(columns="position"), hide_index=True)
        st.caption(f"{len(shown)} of {len(frame)} queries. {rank_note()}")
        report_button(
            evaluation_bundle(
                pair,
                corpus,
                source,
                evaluations,
                outcomes,
                int(k),
                {"outcomes_shown": chosen, "contains": contains},
                {"metrics": chart.to_dict()},
                {"metrics": metrics, "outcomes": frame.drop(columns="position")},
            ),
            key="eval_report",
        )
        if shown.empty:
            return
        pick = st.selectbox(
            "Query to analyse on the other pages",
            shown["position"].tolist(),
            key="eval_pick",
            format_func=lambda p: f"{frame.at[p, 'query']} → {frame.at[p, 'gold']} ({frame.at[p, 'outcome']})",
        )
        if st.button("Open on the retrieval page", key="eval_open"):
            st.session_state["query"] = queries[pick].text
            select_passage(corpus, queries[pick].source_index)
            st.switch_page("pages/retrieval.py")

    def probing_section() -> None:
        st.caption(
            "For each layer (0 = embeddings) a linear probe on frozen pooled features of the query and of "
            "N candidate passages (the positive and N − 1 hard negatives) picks the positive; trained on "
            "queries of training articles, scored on held-out ones (arXiv 2402.11035, Table 1)."
        )
        if not corpus.descriptions:
            st.info(
                "Probing uses description → article queries, and this corpus has no descriptions. "
                "Choose the bundled Wikipedia corpus in the sidebar."
            )
            return
        defaults = ProbeConfig()
        columns = st.columns([2, 1, 1, 1, 1])
        ns = columns[0].multiselect("N candidates", [2, 3, 4, 5, 6, 8, 10], default=list(defaults.ns), key="probe_ns")
        train = columns[1].number_input("Training queries", 5, 5000, defaults.train_queries, step=50, key="probe_train")
        test = columns[2].number_input("Held-out queries", 2, 1000, defaults.test_queries, step=50, key="probe_test")
        negatives = columns[3].selectbox(
            "Hard negatives",
            NEGATIVE_SOURCES,
            key="probe_negatives",
            format_func=lambda s: "BM25" if s == "bm25" else f"model {s}'s retrievals",
        )
        seed = columns[4].number_input("Seed", 0, 10_000, defaults.seed, key="probe_seed")
        if not ns:
            st.info("Choose at least one N.")
            return
        try:
            config = ProbeConfig(
                ns=tuple(sorted(ns)),
                train_queries=int(train),
                test_queries=int(test),
                seed=int(seed),
                negatives=negatives,
            )
        except ProbeError as error:
            st.error(str(error))
            return
        result = lookup_probing(pair, corpus, config, result_cache())
        if result is None:
            notice = st.empty()
            notice.info(
                "Not computed yet for these settings. On a 2-core CPU the default sample takes several minutes "
                "(encoding is most of it); `python -m core probe` fills the same cache."
            )
            if not st.button("Run probing", key="probe_run", type="primary"):
                return
            notice.empty()
            indexes = require_indexes(pair, corpus) if negatives != "bm25" else None
            try:
                with activity("Probing: encoding the sample and fitting probes, step"):
                    result = run_probing(pair, corpus, config, result_cache(), indexes, progress=report_progress)
            except ProbeError as error:
                st.error(escape(str(error)))
                return
        st.caption(
            f"{result.test_queries} held-out queries, probes fitted on {result.train_queries}; "
            f"computed in {result.seconds:.0f} s. "
            + " · ".join(
                f"{name}: {escape(result.models[name])} ({result.towers[name]}, {result.layers[name]} layers)"
                for name in result.models
            )
        )
        kinds = st.multiselect(
            "Rows", KINDS, default=["probe", "untrained"], key="probe_kinds", format_func=KIND_LABELS.get
        )
        if not kinds:
            st.info("Choose at least one kind of row.")
            return
        table = probe_table(result, kinds)
        layer_columns = [c for c in table.columns if c.startswith("L")]
        st.dataframe(
            table,
            hide_index=True,
            column_config={c: st.column_config.NumberColumn(format="%.3f") for c in layer_columns},
        )
        n = st.selectbox("Chart for N =", result.config["ns"], key="probe_chart_n")
        chart = probe_chart(result, int(n), kinds)
        st.altair_chart(chart, height=560)
        note = (
            "Shaded: 95% bootstrap interval over held-out queries. Dashed grey: chance (1/N). The probe on the "
            "passage alone shows what is solvable without the query (positives and hard negatives differ in kind), "
            "so read the linear probe against it as well as against chance."
        )
        if any(encoder.query.pooling != "mean" for encoder in pair.models.values()):
            note += " With CLS pooling, layer 0 is the same vector for every text, so it sits at chance."
        st.caption(note)
        report_button(
            probing_bundle(
                pair,
                corpus,
                result,
                {"rows": kinds, "chart_n": int(n)},
                {f"probing-N{n}": chart.to_dict()},
                {"table-1": table, "probing": probe_frame(result)},
            ),
            key="probe_report",
        )

    if section == "Retrieval evaluation":
        evaluation_section()
    else:
        probing_section()


run_page("Probing & evaluation", render)
