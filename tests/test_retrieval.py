import pytest

from core.retrieval import Hit, PreparedQuery, QueryError, Ranking, clean_query, compare_rankings, rank_biased_overlap


def _ranking(indices):
    query = PreparedQuery("q", 1, 512)
    return Ranking(query, tuple(Hit(r, i, str(i), str(i), 1.0 / r, "") for r, i in enumerate(indices, 1)))


def test_clean_query_removes_control_characters_and_keeps_unicode():
    assert (
        clean_query("  \x00caf\u00e9\x07 \U0001f600 \u05e9\u05dc\u05d5\u05dd\x1b ")
        == "caf\u00e9  \U0001f600 \u05e9\u05dc\u05d5\u05dd"
    )
    assert clean_query(None) == ""
    assert clean_query(" \t\n ") == ""


def test_rank_biased_overlap_bounds():
    assert rank_biased_overlap([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    assert rank_biased_overlap([1, 2, 3], [4, 5, 6]) == 0.0
    swapped = rank_biased_overlap([1, 2, 3], [2, 1, 3])
    tail_swap = rank_biased_overlap([1, 2, 3], [1, 3, 2])
    assert 0 < swapped < tail_swap < 1


def test_compare_rankings():
    overlap = compare_rankings(_ranking([5, 6, 7, 8]), _ranking([7, 5, 9, 10]))
    assert overlap.shared == {5, 7}
    assert overlap.jaccard == pytest.approx(2 / 6)
    assert overlap.rank_shift == {5: 1, 7: -2}
    assert overlap.mean_abs_shift == pytest.approx(1.5)


def test_empty_query_asks_for_one(tiny_bert_dir):
    from core.pair import ModelSpec, load_encoder
    from core.retrieval import prepare_query

    encoder = load_encoder(ModelSpec("tiny", str(tiny_bert_dir)))
    with pytest.raises(QueryError, match="Type a query"):
        prepare_query(encoder, " \x00 \n")
    long = prepare_query(encoder, "word " * 5000)
    assert long.truncated and long.max_length == 128
