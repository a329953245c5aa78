"""Several sessions at once in a real browser (issue 12): every page that runs a model, 4 sessions with different
queries at the same time, each result compared number by number with the same query run alone.

One streamlit server for the whole file, on a new corpus slice (DPR_LENS_CORPUS_LIMIT=300: no prebuilt embeddings,
so the first test's sessions wait while the index is built) and a fresh cache. The references are computed here,
in the test process, with core directly: the same pair, the same corpus slice, a separate fresh cache.

Tolerances: numbers the page prints with 4 decimals (retrieval scores, s(q, p), token attributions, s(x)) must be
within TOL_PRINTED = 1e-4 of the reference (rounding is 5e-5; the rest is float noise between two processes and,
for the top-1 passage's tokens, between the page's batched run and the reference's single run, ~1e-6);
counts, ranks and titles must be equal; full-precision table cells (evaluation means, probe accuracies) within 1e-6.

Tests run in file order and share the server: the retrieval test builds the index the others use.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property

import pytest

pytest.importorskip("playwright.sync_api")
from playwright.sync_api import sync_playwright  # noqa: E402

from bench.browser import (  # noqa: E402
    MINUTE,
    AppServer,
    act_and_wait,
    captions,
    chromium_available,
    dataframes,
    enter_through_home,
    goto,
    hit_columns,
    launch_chromium,
    metrics,
    numbers_after,
    problems,
    seen_together,
    submit_queries,
    token_blocks,
    wait_all,
    wait_done,
    wait_for_widget,
)

pytestmark = pytest.mark.skipif(not chromium_available(), reason="chromium is not installed (make browser)")

LIMIT = 300
TOL_PRINTED = 1e-4
TOL_FULL = 1e-6
SESSIONS = 4
RETRIEVAL_QUERIES = ["tower in Paris", "Japanese poetry form", "opera by Mozart", "ancient Greek temple"]
TOKEN_QUERIES = ["epic poem", "jazz music", "Gothic cathedral", "silent film"]
NEURON_QUERIES = ["famous painting", "string instrument", "Russian novel", "Egyptian pyramid"]
PROBE_SEEDS = [1, 2, 3, 4]
EVAL_QUERIES_PER_SESSION = 6


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("sessions")
    app = AppServer(base / "streamlit.log", cache_dir=base / "server-cache", corpus_limit=LIMIT)
    try:
        app.start()
    except RuntimeError as error:
        pytest.fail(str(error))
    yield app
    app.stop()


@pytest.fixture(scope="module")
def tabs(server):
    """SESSIONS + 1 tabs in one browser context, reused by every test (each test navigates them: new sessions)."""
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        # app.py's first run configures the server's logging, which the job-log checks read.
        enter_through_home(browser, server.url)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        context.set_default_timeout(5 * MINUTE)
        yield [context.new_page() for _ in range(SESSIONS + 1)]
        context.close()
        browser.close()


class Reference:
    """The same pair and corpus slice as the server's, run alone in this process with its own fresh cache."""

    def __init__(self, directory):
        from core.cache import ResultCache
        from core.corpus import load_corpus
        from core.pair import load_pair

        self.pair = load_pair("offline")
        self.corpus = load_corpus(None, LIMIT)  # as ui.state builds it with DPR_LENS_CORPUS_LIMIT
        self.cache = ResultCache(directory)

    @cached_property
    def indexes(self):
        from core.index import load_index

        return {name: load_index(encoder, self.corpus, self.cache) for name, encoder in self.pair.models.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    result = Reference(tmp_path_factory.mktemp("reference-cache"))
    yield result
    result.cache.close()


def job_key(server: AppServer, namespace: str, params: dict) -> str:
    """The scheduler key the server gives the job that computes this request (cache directory | cache key)."""
    from pathlib import Path

    from core.cache import cache_key

    return f"{Path(server.env['DPR_LENS_CACHE'])}|{cache_key(namespace, params)}"


def starts_of(server: AppServer, key: str) -> list:
    return [start for start in server.job_starts() if start.key == key]


def last_job_number(server: AppServer) -> int:
    return max((start.number for start in server.job_starts()), default=0)


def keyed_starts_since(server: AppServer, number: int, namespace: str = "") -> list:
    """Keyed jobs started after job `number` (optionally only those of one cache namespace)."""
    return [
        start
        for start in server.job_starts()
        if start.number > number and start.key != "None" and f"|{namespace}:" in start.key
    ]


def assert_each_key_started_once(server: AppServer, since: int) -> None:
    """No request was computed twice: a second session asking for a key joins the job, or finds its result."""
    starts = keyed_starts_since(server, since)
    twice = sorted({start.key for start in starts if sum(s.key == start.key for s in starts) > 1})
    assert not twice, f"keys started more than once: {twice}\n{server.log()[-4000:]}"


def assert_clean(tab_list, server: AppServer) -> None:
    for number, tab in enumerate(tab_list):
        found = problems(tab)
        assert not found, f"session {number + 1} shows an exception or error: {found}\n{server.log()[-4000:]}"


def close_to(page_value: float, reference_value: float, tolerance: float) -> bool:
    return abs(page_value - reference_value) <= tolerance


# --------------------------------------------------------------------------- retrieval (index built while waiting)


def test_retrieval_four_sessions_wait_for_one_new_index_and_get_their_own_hits(server, tabs, reference):
    from core.retrieval import retrieve

    expected = {
        query: {
            name: retrieve(encoder, reference.indexes[name], reference.corpus, query, 10, cache=reference.cache).hits
            for name, encoder in reference.pair.models.items()
        }
        for query in RETRIEVAL_QUERIES
    }
    sessions = tabs[:SESSIONS]
    for tab in sessions:
        goto(tab, server.url)
    submit_queries(sessions, RETRIEVAL_QUERIES)
    watch = wait_all(sessions, ready="document.querySelectorAll('.lens-hit').length >= 20", timeout=1800)
    assert_clean(sessions, server)

    for tab, query in zip(sessions, RETRIEVAL_QUERIES):
        columns = hit_columns(tab)
        for name in "AB":
            page = [(hit["title"], hit["score"]) for hit in columns[name]]
            alone = [(hit.title, hit.score) for hit in expected[query][name]]
            assert [title for title, _ in page] == [title for title, _ in alone], (query, name, page, alone)
            for (title, score), (_, alone_score) in zip(page, alone):
                assert close_to(score, alone_score, TOL_PRINTED), (query, name, title, score, alone_score)

    # The corpus slice has no prebuilt embeddings: every session waited for the index at the same time, and each
    # model's corpus was encoded by exactly one job although all four sessions asked for it.
    for name in "AB":
        label = f"Indexing {LIMIT:,} passages for model {name}"
        assert seen_together(watch, range(SESSIONS), re.escape(label)), (label, watch.statuses)
    encodings = keyed_starts_since(server, 0, "embeddings")
    assert len(encodings) == 2 and len({start.key for start in encodings}) == 2, encodings
    assert_each_key_started_once(server, 0)


# --------------------------------------------------------------------------- token attributions


@dataclass
class TokenReference:
    indices: list[int]
    query_total: object  # TokenAttribution
    top_pair: object  # PairAttribution of the top-1 passage
    job_key: str


def token_reference(reference: Reference, server: AppServer, query: str) -> dict[str, TokenReference]:
    """As the page computes them, but alone: the query's attribution summed over the top-25 (the same calls as
    attribute_ranking's first run) and the top-1 passage's pair (attribute_pair, one input per batch)."""
    from core.retrieval import retrieve
    from core.token_attribution import (
        TOP_K,
        IGSettings,
        attribute_pair,
        attribute_queries,
        passage_embeddings,
        ranking_params,
    )

    settings = IGSettings()  # the page's defaults: 20 Gauss-Legendre steps, adaptive first pass with sinh
    corpus = reference.corpus
    rankings = {
        name: retrieve(encoder, reference.indexes[name], corpus, query, TOP_K, cache=reference.cache)
        for name, encoder in reference.pair.models.items()
    }
    text = rankings["A"].query.text
    result = {}
    for name, encoder in reference.pair.models.items():
        indices = rankings[name].indices
        embeddings = passage_embeddings(
            encoder, [corpus.titles[i] for i in indices], [corpus.texts[i] for i in indices], settings
        )
        total = attribute_queries(encoder, [text], embeddings.sum(0, keepdims=True), settings)[0]
        top = indices[0]
        pair = attribute_pair(encoder, text, corpus.titles[top], corpus.texts[top], settings)
        key = job_key(server, "token_ig_ranking", ranking_params(encoder, corpus, text, indices, settings))
        result[name] = TokenReference(indices, total, pair, key)
    return result


def assert_tokens_equal(page_tokens, attribution, what) -> None:
    alone = [(token.text, token.score) for token in attribution.tokens if not token.special]  # [CLS]/[SEP]: not drawn
    assert [t for t, _ in page_tokens] == [t for t, _ in alone], (what, page_tokens, alone)
    for (token, value), (_, alone_value) in zip(page_tokens, alone):
        assert close_to(value, alone_value, TOL_PRINTED), (what, token, value, alone_value)


def assert_completeness_equal(caption: str, attribution, what) -> None:
    found = numbers_after(caption, "s(x)", "s(baseline)", "Σ attributions")
    alone = {"s(x)": attribution.score, "s(baseline)": attribution.baseline_score, "Σ attributions": attribution.total}
    assert found.keys() == alone.keys(), (what, caption)
    for name, value in found.items():
        assert close_to(value, alone[name], TOL_PRINTED), (what, name, value, alone[name], caption)


def assert_token_page_matches(tab, expected: dict[str, TokenReference], query: str) -> None:
    blocks = token_blocks(tab)  # per model: query summed over the top 25, query for the top-1, top-1 passage
    completeness = captions(tab, "s(x) = ", warnings=True)
    assert len(blocks) == 6 and len(completeness) == 6, (query, len(blocks), completeness)
    for number, name in enumerate("AB"):
        alone = expected[name]
        parts = (alone.query_total, alone.top_pair.query, alone.top_pair.passage)
        for offset, (attribution, what) in enumerate(zip(parts, ("query total", "query, top-1", "passage, top-1"))):
            assert_tokens_equal(blocks[3 * number + offset], attribution, (query, name, what))
            assert_completeness_equal(completeness[3 * number + offset], attribution, (query, name, what))


def test_token_attributions_four_sessions_queue_fairly_and_match_each_query_alone(server, tabs, reference):
    expected = {query: token_reference(reference, server, query) for query in TOKEN_QUERIES}
    queries = TOKEN_QUERIES + TOKEN_QUERIES[:1]  # a fifth session asks the first session's query
    since = last_job_number(server)
    for tab in tabs:
        goto(tab, server.url, "token_attributions")
    pressed = submit_queries(tabs, queries)
    watch = wait_all(tabs, ready="document.querySelectorAll('.lens-tokens').length >= 6", timeout=2400)
    assert_clean(tabs, server)
    for tab, query in zip(tabs, queries):
        assert_token_page_matches(tab, expected[query], query)

    # Queue position: while the first session's job ran, the sessions behind it were told where they stand.
    positions = watch.queue_positions()
    for number in range(1, SESSIONS):
        assert any(p >= 1 for p in positions[number]), (number + 1, watch.statuses[number])

    # Same query in sessions 1 and 5: one computation per model. Both waited for it at once (shown together,
    # the fifth asked before the job ended) and its key was started exactly once: 5 sessions, 2 models, 8 jobs.
    rankings = keyed_starts_since(server, since, "token_ig_ranking")
    assert len(rankings) == 2 * len(TOKEN_QUERIES), [start.key for start in rankings]
    assert_each_key_started_once(server, since)
    log_ends = server.job_ends()
    for name in "AB":
        key = expected[queries[0]][name].job_key
        starts = starts_of(server, key)
        assert len(starts) == 1, (name, key, [s.key for s in server.job_starts() if "token_ig_ranking" in s.key])
        label = f"Model {name}: Integrated Gradients for the query and its top-"
        assert seen_together(watch, (0, SESSIONS), re.escape(label)), (name, watch.statuses[0], watch.statuses[-1])
        end = log_ends[starts[0].number]
        assert not end.cancelled
        assert datetime.fromtimestamp(pressed[SESSIONS]) < end.time, (pressed[SESSIONS], end)


# --------------------------------------------------------------------------- knowledge neurons


def test_knowledge_neurons_four_sessions_match_each_query_alone(server, tabs, reference):
    from core.neuron_attribution import DEFAULT_STEPS, DEFAULT_THRESHOLD, attribute_query
    from core.suppression import DEFAULT_MAX_K, curve_ks, suppression_curve

    corpus = reference.corpus
    expected = {}
    for query in NEURON_QUERIES:
        expected[query] = {}
        for name, encoder in reference.pair.models.items():
            index = reference.indexes[name]
            analysed = attribute_query(encoder, index, corpus, query, None, DEFAULT_STEPS, reference.cache)
            curve = suppression_curve(encoder, index, analysed, curve_ks(DEFAULT_MAX_K))
            expected[query][name] = (analysed, curve)
    since = last_job_number(server)
    sessions = tabs[:SESSIONS]
    for tab in sessions:
        goto(tab, server.url, "knowledge_neurons")
    submit_queries(sessions, NEURON_QUERIES)
    ready = (
        "document.querySelectorAll('[data-testid=\"stMetric\"]').length >= 4 && Array.from("
        "document.querySelectorAll('[data-testid=\"stDataFrame\"] th')).some(th => th.textContent === "
        "'rank of passage')"
    )
    wait_all(sessions, ready=ready, timeout=1800)
    assert_clean(sessions, server)

    assert_each_key_started_once(server, since)
    for tab, query in zip(sessions, NEURON_QUERIES):
        scores = captions(tab, "s(q, p) = ")
        shown = [(label, value) for label, value in metrics(tab) if label.startswith("Strongly activated")]
        assert len(scores) == 2 and len(shown) == 4, (query, scores, shown)
        suppression = next(frame for frame in dataframes(tab) if frame and "rank of passage" in frame[0])
        for number, name in enumerate("AB"):
            analysed, curve = expected[query][name]
            attribution = analysed.attribution
            title = corpus.titles[analysed.passage]
            assert f"passage: {title} · " in scores[number], (query, name, scores[number], title)
            page_score = numbers_after(scores[number], "s(q, p)")["s(q, p)"]
            assert close_to(page_score, attribution.score, TOL_PRINTED), (query, name, page_score, attribution.score)
            strong = attribution.strongly_activated(DEFAULT_THRESHOLD)
            assert shown[2 * number] == ("Strongly activated: intermediate", str(strong["intermediate"])), (
                query,
                name,
                shown,
                strong,
            )
            assert shown[2 * number + 1] == ("Strongly activated: output", str(strong["output"])), (
                query,
                name,
                shown,
                strong,
            )
            rows = [row for row in suppression if row["model"] == name]
            alone = [
                {
                    "model": name,
                    "k": str(k),
                    "rank of passage": str(rank),
                    "retrieved first": " · ".join(corpus.titles[i] for i in top[:3]),
                }
                for k, rank, top in zip(curve.ks, curve.ranks, curve.top)
                if k in (curve.ks[0], curve.ks[-1])
            ]
            assert rows == alone, (query, name, rows, alone)


# --------------------------------------------------------------------------- probing & evaluation


def labelled_query_sets(corpus) -> list[list[str]]:
    """SESSIONS disjoint sets of description -> article queries from the slice, as JSONL lines."""
    lines = [
        json.dumps({"query": description, "gold_ids": [corpus.ids[i]]})
        for i, description in enumerate(corpus.descriptions)
        if description
    ]
    size = EVAL_QUERIES_PER_SESSION
    return [lines[size * n : size * (n + 1)] for n in range(SESSIONS)]


def test_evaluation_four_sessions_with_their_own_queries_match_each_set_alone(server, tabs, reference):
    from core.evaluation import evaluate_pair, outcome_counts, parse_query_lines, wins_losses

    sets = labelled_query_sets(reference.corpus)
    expected = []
    for lines in sets:
        queries = parse_query_lines(lines, reference.corpus, "pasted queries")
        evaluations = evaluate_pair(reference.pair, reference.corpus, queries, reference.cache, reference.indexes)
        expected.append((evaluations, outcome_counts(wins_losses(queries, evaluations["A"], evaluations["B"], 1))))
    since = last_job_number(server)
    sessions = tabs[:SESSIONS]
    for tab in sessions:
        goto(tab, server.url, "probing_evaluation")
    for tab in sessions:  # the held-out evaluation first (the same for all four), then each its own queries
        wait_done(tab, ready="document.querySelectorAll('[data-testid=\"stMetric\"]').length >= 4")
        act_and_wait(
            tab,
            lambda tab=tab: tab.get_by_text("My labelled queries (JSONL)").click(),
            ready="document.querySelector('textarea') !== null",
        )
    boxes = [wait_for_widget(tab, "…or paste JSONL lines") for tab in sessions]
    for box, lines in zip(boxes, sets):
        box.fill("\n".join(lines))
    for box in boxes:
        box.press("Control+Enter")
    ready = (
        "document.querySelectorAll('[data-testid=\"stMetric\"]').length >= 4 && Array.from("
        "document.querySelectorAll('[data-testid=\"stDataFrame\"] th')).some(th => th.textContent === 'B 95% CI')"
    )
    wait_all(sessions, ready=ready, timeout=1200)
    assert_clean(sessions, server)

    assert_each_key_started_once(server, since)
    for number, (tab, (evaluations, counts)) in enumerate(zip(sessions, expected)):
        table = next(frame for frame in dataframes(tab) if frame and "B 95% CI" in frame[0])
        assert [row["metric"] for row in table] == list(evaluations["A"].means), (number, table)
        for row in table:
            for name in "AB":
                page_value, alone = float(row[name]), evaluations[name].means[row["metric"]]
                assert close_to(page_value, alone, TOL_FULL), (number, row["metric"], name, page_value, alone)
        shown = {label.removesuffix(" right"): int(value) for label, value in metrics(tab)}
        assert shown == counts, (number, shown, counts)
        assert captions(tab, f"of {EVAL_QUERIES_PER_SESSION} queries"), (number, captions(tab))


def test_probing_four_sessions_with_the_smallest_settings_match_each_run_alone(server, tabs, reference):
    from core.probing import ProbeConfig, run_probing

    configs = [ProbeConfig(ns=(2,), train_queries=5, test_queries=2, seed=seed) for seed in PROBE_SEEDS]
    expected = [run_probing(reference.pair, reference.corpus, config, reference.cache) for config in configs]
    since = last_job_number(server)
    sessions = tabs[:SESSIONS]
    for tab in sessions:
        goto(tab, server.url, "probing_evaluation")
    for tab, seed in zip(sessions, PROBE_SEEDS):
        wait_done(tab, ready="document.querySelectorAll('[data-testid=\"stMetric\"]').length >= 4")
        act_and_wait(
            tab,
            lambda tab=tab: tab.get_by_text("Layer-wise probing").click(),
            ready="document.querySelector('[data-testid=\"stMultiSelect\"]') !== null",
        )
        for n in (5, 4, 3):  # keep N = 2 only
            remove = f'[data-testid="stMultiSelect"] button[aria-label="Remove {n}"]'
            act_and_wait(
                tab,
                lambda tab=tab, remove=remove: tab.locator(remove).dispatch_event("click"),
                ready=f"document.querySelector('{remove}') === null",
            )
        for label, value in (("Training queries", 5), ("Held-out queries", 2), ("Seed", seed)):
            box = tab.get_by_label(label, exact=True)
            box.fill(str(value))
            act_and_wait(tab, lambda box=box: box.press("Enter"))
        assert tab.get_by_role("button", name="Run probing").is_visible(), captions(tab)
    buttons = [tab.get_by_role("button", name="Run probing") for tab in sessions]
    for button in buttons:
        button.click()
    ready = (
        "Array.from(document.querySelectorAll('[data-testid=\"stDataFrame\"] th')).some(th => th.textContent === 'L0')"
    )
    wait_all(sessions, ready=ready, timeout=1200)
    assert_clean(sessions, server)

    assert_each_key_started_once(server, since)
    for number, (tab, result) in enumerate(zip(sessions, expected)):
        table = next(frame for frame in dataframes(tab) if frame and "L0" in frame[0])
        alone = {
            (row["model"], row["kind"], f"L{row['layer']}"): row["accuracy"]
            for row in result.rows
            if row["n"] == 2 and row["kind"] in ("probe", "untrained")
        }
        checked = 0
        for row in table:
            assert row["N"] == "2", (number, row)
            for column, cell in row.items():
                if column.startswith("L"):
                    value = alone[(row["model"], row["kind"], column)]
                    assert close_to(float(cell), value, TOL_FULL), (
                        number,
                        row["model"],
                        row["kind"],
                        column,
                        cell,
                        value,
                    )
                    checked += 1
        assert checked == len(alone), (number, checked, len(alone), table)
        assert captions(tab, f"{result.test_queries} held-out queries, probes fitted on {result.train_queries}")
