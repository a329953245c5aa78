import json

import pytest

from core.corpus import (
    CorpusError,
    description_queries,
    is_held_out,
    load_jsonl,
    load_jsonl_bytes,
    load_wiki,
    split_indices,
)


def test_bundled_wikipedia_is_complete():
    corpus = load_wiki()
    assert len(corpus) == 10_033
    assert len(set(corpus.ids)) == len(corpus)
    assert all(text.strip() for text in corpus.texts)
    france = corpus.titles.index("France")
    assert corpus.ids[france] == "France"
    assert corpus.descriptions[france] == "Country primarily in Western Europe"
    assert corpus.texts[france].startswith("France, officially the French Republic, is a country primarily located")
    assert sum(1 for d in corpus.descriptions if d) == 9_862  # every description of the file, none lost or blanked


def test_held_out_split_is_fixed_and_about_ten_percent():
    corpus = load_wiki()
    train, held_out = split_indices(corpus)
    assert not set(train) & set(held_out) and len(train) + len(held_out) == len(corpus)
    assert 0.08 < len(held_out) / len(corpus) < 0.12
    assert split_indices(corpus) == (train, held_out)
    assert all(is_held_out(corpus.titles[i]) for i in held_out)


def test_description_queries_count_every_article_with_the_same_description(wiki_slice):
    queries = description_queries(wiki_slice, range(len(wiki_slice)))
    assert all(q.source_index in q.relevant for q in queries)
    assert len(queries) == sum(1 for d in wiki_slice.descriptions if d)
    for q in queries:
        assert {wiki_slice.descriptions[i].casefold() for i in q.relevant} == {q.text.casefold()}


def test_fingerprint_tracks_content(wiki_slice):
    assert wiki_slice.fingerprint == load_wiki(limit=120).fingerprint
    assert wiki_slice.fingerprint != wiki_slice.head(119).fingerprint


def test_jsonl_bad_lines_are_reported_with_line_numbers(tmp_path):
    path = tmp_path / "corpus.jsonl"
    lines = [
        json.dumps({"id": "a", "title": "Alpha", "text": "first passage"}),
        "{not json",
        json.dumps({"id": "b", "title": "Beta"}),
        "",
        json.dumps({"id": "a", "title": "Again", "text": "duplicate id"}),
        json.dumps({"id": "c", "title": "<script>alert(1)</script>", "text": "third passage"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    corpus = load_jsonl(path)
    assert corpus.ids == ("a", "c")
    assert [w.split(":")[0] for w in corpus.warnings] == ["line 2", "line 3", "line 5"]
    assert "<script>" in corpus.titles[1]


def test_jsonl_without_usable_lines_is_an_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("[1, 2]\n")
    with pytest.raises(CorpusError, match="no usable passage.*line 1"):
        load_jsonl(path)
    with pytest.raises(CorpusError, match="does not exist"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_uploaded_bytes_read_exactly_like_the_same_file_on_disk(tmp_path):
    # CRLF endings, a U+2028 inside a text (a line break to str.splitlines, not to a file) and invalid UTF-8.
    lines = [
        json.dumps({"id": "a", "title": "Alpha", "text": "one\u2028line"}, ensure_ascii=False).encode(),
        b"{not json",
        b'{"id": "b", "text": "bad \xff byte"}',
    ]
    data = b"\r\n".join(lines) + b"\r\n"
    path = tmp_path / "upload.jsonl"
    path.write_bytes(data)
    on_disk, uploaded = load_jsonl(path), load_jsonl_bytes(data, "upload.jsonl")
    for field in ("ids", "titles", "texts", "warnings"):
        assert getattr(uploaded, field) == getattr(on_disk, field)
    assert uploaded.ids == ("a", "b") and uploaded.texts == ("one\u2028line", "bad \ufffd byte")
    assert [w.split(":")[0] for w in uploaded.warnings] == ["line 2"]
    assert (uploaded.name, on_disk.name) == ("upload.jsonl", "upload")
    with pytest.raises(CorpusError, match=r"Corpus file empty<b>\.jsonl has no usable passage\."):
        load_jsonl_bytes(b"\n \n", "empty<b>.jsonl")
