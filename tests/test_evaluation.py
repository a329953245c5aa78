import json
import math
from pathlib import Path

import numpy as np
import pytest

from core.cache import ResultCache
from core.cli import QUESTION_SETS
from core.corpus import Corpus, LabelledQuery, description_queries, is_held_out, load_wiki, split_indices
from core.evaluation import (
    A_WINS,
    B_WINS,
    BOTH,
    NEITHER,
    QueryFileError,
    bootstrap_interval,
    evaluate_pair,
    evaluate_ranked,
    first_relevant_rank,
    load_query_file,
    outcome_counts,
    paired_difference,
    parse_query_lines,
    per_query_metrics,
    wins_losses,
)
from core.pair import custom_pair, load_pair

APP = Path(__file__).resolve().parent.parent / "app.py"
SMALL = Corpus(
    "small",
    ("p0", "p1", "p2", "42"),
    ("Paris", "Rome", "Oslo", "Answer"),
    ("Paris is in France.", "Rome is in Italy.", "Oslo is in Norway.", "Forty-two."),
)


def _query(relevant, text="q"):
    return LabelledQuery(text, min(relevant), frozenset(relevant))


def test_metrics_on_hand_made_rankings_with_several_relevant():
    ranked = np.array(
        [
            [5, 7, 1, 9, 3, 11, 12, 13, 14, 15, 16, 17],  # relevant {1, 3} at ranks 3 and 5
            [2, 0, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22],  # relevant {2} at rank 1
            [0, 1, 4, 5, 6, 7, 8, 10, 11, 12, 9, 13],  # relevant {9} at rank 11: beyond every @10 cut
        ]
    )
    metrics = per_query_metrics(ranked, [frozenset({1, 3}), frozenset({2}), frozenset({9})])
    assert set(metrics) == {"R@1", "R@5", "R@10", "MRR@10", "nDCG@10"}  # R@100 needs depth 100
    np.testing.assert_allclose(metrics["R@1"], [0, 1, 0])
    np.testing.assert_allclose(metrics["R@5"], [1, 1, 0])
    np.testing.assert_allclose(metrics["R@10"], [1, 1, 0])
    np.testing.assert_allclose(metrics["MRR@10"], [1 / 3, 1, 0])
    dcg = 1 / math.log2(4) + 1 / math.log2(6)
    ideal = 1 + 1 / math.log2(3)
    np.testing.assert_allclose(metrics["nDCG@10"], [dcg / ideal, 1, 0])


def test_bootstrap_interval_contains_the_mean_and_collapses_on_constants():
    values = np.random.default_rng(1).binomial(1, 0.3, size=400).astype(float)
    low, high = bootstrap_interval(values)
    assert low < values.mean() < high
    assert 0.03 < high - low < 0.15  # about 4 standard errors of a proportion near 0.3 over 400 queries
    assert bootstrap_interval(np.full(50, 0.25)) == (0.25, 0.25)


def test_paired_difference_is_b_minus_a_with_a_paired_interval():
    a = np.array([0, 1, 0, 1, 0, 0, 1, 0] * 25, dtype=float)
    b = a.copy()
    b[:40] = 1.0  # B is right on the first 40 queries, 15 of which A already had
    diff, low, high = paired_difference(a, b)
    assert diff == pytest.approx((b - a).mean())
    assert 0 < low < diff < high
    same, low_same, high_same = paired_difference(a, a)
    assert (same, low_same, high_same) == (0.0, 0.0, 0.0)


def test_wins_and_losses_on_a_hand_made_case():
    queries = [_query({1}, "b only"), _query({2}, "a only"), _query({3}, "both"), _query({4}, "neither")]
    ranked_a = np.array([[9, 1, 0], [2, 9, 8], [3, 0, 1], [0, 1, 2]])
    ranked_b = np.array([[1, 9, 0], [9, 8, 2], [3, 1, 0], [5, 6, 7]])
    a, b = evaluate_ranked("A", ranked_a, queries), evaluate_ranked("B", ranked_b, queries)
    at_one = wins_losses(queries, a, b, k=1)
    assert [o.outcome for o in at_one] == [B_WINS, A_WINS, BOTH, NEITHER]
    assert [(o.rank_a, o.rank_b) for o in at_one] == [(2, 1), (1, 3), (1, 1), (None, None)]
    assert outcome_counts(at_one) == {B_WINS: 1, A_WINS: 1, BOTH: 1, NEITHER: 1}
    at_three = wins_losses(queries, a, b, k=3)
    assert [o.outcome for o in at_three] == [BOTH, BOTH, BOTH, NEITHER]
    assert first_relevant_rank([4, 5, 6], frozenset({6, 5})) == 2


def test_query_jsonl_accepts_ids_lists_and_numbers(tmp_path):
    path = tmp_path / "queries.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"query": "capital of France", "gold_ids": ["p0"]}),
                "",
                json.dumps({"query": "  Nordic capitals ", "gold_ids": ["p2", "p0"]}),
                json.dumps({"query": "the answer", "gold_id": 42}),
                json.dumps({"query": "eternal city", "gold": "p1"}),
            ]
        )
        + "\n"
    )
    queries = load_query_file(path, SMALL)
    assert [q.text for q in queries] == ["capital of France", "Nordic capitals", "the answer", "eternal city"]
    assert [q.relevant for q in queries] == [{0}, {2, 0}, {3}, {1}]
    assert queries[1].source_index == 2  # the first listed gold passage is the one to analyse


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"query": "x", "gold_ids": ["p0"]', "line 2: not valid JSON"),
        ('["query", "p0"]', "line 2: not a JSON object"),
        ('{"gold_ids": ["p0"]}', 'line 2: missing a non-empty "query"'),
        ('{"query": "x"}', "line 2: missing gold passage ids"),
        ('{"query": "x", "gold_ids": []}', "line 2: missing gold passage ids"),
        ('{"query": "x", "gold_ids": ["Pariss"]}', "line 2: gold id 'Pariss' is not in corpus small"),
    ],
)
def test_a_bad_query_line_is_an_error_naming_its_line(line, message):
    lines = [json.dumps({"query": "ok", "gold_ids": ["p0"]}), line]
    with pytest.raises(QueryFileError, match="gold_ids") as error:
        parse_query_lines(lines, SMALL, "mine.jsonl")
    assert message in str(error.value) and str(error.value).startswith("mine.jsonl: 1 bad line(s)")


def test_empty_or_missing_query_file(tmp_path):
    with pytest.raises(QueryFileError, match="has no queries"):
        parse_query_lines(["", "  "], SMALL, "empty.jsonl")
    with pytest.raises(QueryFileError, match="does not exist"):
        load_query_file(tmp_path / "nope.jsonl", SMALL)


def test_cli_reports_the_bad_line_without_a_traceback(tmp_path, capsys):
    from core.cli import main

    corpus_path, queries_path = tmp_path / "corpus.jsonl", tmp_path / "queries.jsonl"
    corpus_path.write_text(
        "".join(
            json.dumps({"id": i, "title": t, "text": x}) + "\n" for i, t, x in zip(SMALL.ids, SMALL.titles, SMALL.texts)
        )
    )
    queries_path.write_text('{"query": "x", "gold_ids": ["p1"]}\n{"query": "y", "gold_ids": ["zzz"]}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "--cache",
                str(tmp_path / "cache"),
                "evaluate",
                "--corpus",
                str(corpus_path),
                "--queries-jsonl",
                str(queries_path),
            ]
        )
    assert exit_info.value.code == 2
    assert "queries.jsonl: 1 bad line(s): line 2: gold id 'zzz'" in capsys.readouterr().err


def test_evaluate_pair_matches_brute_force_search(tiny_bert_dir, tiny_dpr_dirs, wiki_slice, cache):
    question, context = tiny_dpr_dirs
    pair = load_pair(custom_pair(str(tiny_bert_dir), str(question), str(context)))
    queries = description_queries(wiki_slice, split_indices(wiki_slice)[1])
    evaluations = evaluate_pair(pair, wiki_slice, queries, cache)
    for name, encoder in pair.models.items():
        scores = (
            encoder.encode_queries([q.text for q in queries])
            @ encoder.encode_passages(wiki_slice.titles, wiki_slice.texts, max_length=256).T
        )
        ranked = np.array(evaluations[name].ranked)
        assert ranked.shape == (len(queries), 100) and all(len(set(row)) == 100 for row in ranked)
        # batch padding moves scores by ~1e-6, so compare the scores at each rank, not tie-prone indices
        np.testing.assert_allclose(np.take_along_axis(scores, ranked, 1), -np.sort(-scores, 1)[:, :100], atol=1e-4)
        expected = per_query_metrics(np.argsort(-scores, 1)[:, :100], [q.relevant for q in queries])
        assert evaluations[name].means == pytest.approx({k: v.mean() for k, v in expected.items()})
    assert evaluate_pair(pair, wiki_slice, queries, cache)["B"] == evaluations["B"]


def open_page(monkeypatch, tmp_path, model_a, model_b, model_b_context=""):
    """The probing & evaluation page on a 150-passage slice with a custom pair, set before the first run."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("DPR_LENS_CORPUS_LIMIT", "150")
    monkeypatch.setenv("DPR_LENS_CACHE", str(tmp_path / "cache"))
    at = AppTest.from_file(str(APP), default_timeout=180)
    for key, value in (
        ("pair_key", "custom"),
        ("custom_a", str(model_a)),
        ("custom_b", str(model_b)),
        ("custom_b_context", str(model_b_context)),
    ):
        at.session_state[key] = value
    return at.switch_page("pages/probing_evaluation.py").run()


def test_page_evaluates_and_links_a_query_to_the_retrieval_page(monkeypatch, tmp_path, tiny_bert_dir, tiny_dpr_dirs):
    at = open_page(monkeypatch, tmp_path, tiny_bert_dir, *tiny_dpr_dirs)
    assert not at.exception
    assert any(c.value.startswith("**Custom:") and "150 passages" in c.value for c in at.caption)
    metrics = at.dataframe[0].value
    assert list(metrics["metric"]) == ["R@1", "R@5", "R@10", "R@100", "MRR@10", "nDCG@10"]
    # The page's cache: its embeddings are reused, while a different query set or pair would miss it.
    corpus, expected_cache = load_wiki(limit=150), ResultCache(tmp_path / "cache")
    try:
        expected = evaluate_pair(
            load_pair(custom_pair(str(tiny_bert_dir), *map(str, tiny_dpr_dirs))),
            corpus,
            description_queries(corpus, split_indices(corpus)[1]),
            expected_cache,
        )
    finally:
        expected_cache.close()
    for name, evaluation in expected.items():
        assert metrics.set_index("metric")[name].to_dict() == pytest.approx(evaluation.means)
    at.multiselect(key="eval_outcomes").set_value([B_WINS, A_WINS, BOTH, NEITHER]).run()
    outcomes = at.dataframe[1].value
    assert len(outcomes) == sum(int(m.value) for m in at.metric) > 0
    assert at.selectbox(key="eval_pick").value == 0
    at.button(key="eval_open").click().run()
    assert not at.exception
    assert at.session_state["query"] == outcomes.iloc[0]["query"]
    assert at.title[0].value == "DPR Lens: retrieval"


def test_page_reports_a_bad_pasted_query_line(monkeypatch, tmp_path, tiny_bert_dir):
    at = open_page(monkeypatch, tmp_path, tiny_bert_dir, tiny_bert_dir)
    at.radio(key="eval_queries").set_value("My labelled queries (JSONL)").run()
    assert at.info and not at.exception
    at.text_area(key="eval_pasted").input('{"query": "q", "gold_ids": ["Aeneid"]}\nnot json\n').run()
    assert not at.exception
    assert "line 2: not valid JSON" in at.error[0].value


def test_the_shipped_question_sets_ask_about_held_out_articles_only_and_share_none():
    corpus = load_wiki()
    golds, sizes = [], []
    for path in QUESTION_SETS:
        queries = load_query_file(path, corpus)
        sizes.append(len(queries))
        assert queries and len({q.text for q in queries}) == len(queries), path
        assert all(is_held_out(corpus.titles[i]) for q in queries for i in q.relevant), path
        golds.append(set().union(*(q.relevant for q in queries)))
    assert all(not golds[i] & golds[j] for i in range(len(golds)) for j in range(i + 1, len(golds)))
    assert sizes == [69, 59, 219]
