"""Corpora read from disk (core.passage_store): passages by index and by id, every format, stale files, and
the app retrieving from a stored corpus through its built index without encoding it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.corpus import CorpusError, load_corpus, split_indices
from core.corpus_stream import ID_LOOKUP, ROW_POSITIONS, corpus_rows_fingerprint, read_rows, scan_corpus, write_tsv
from core.distributed import build_sharded
from core.evaluation import parse_query_lines
from core.index import IndexMissingError, load_index
from core.ivf import INDEX_DIR_ENV_VAR, IVFSettings
from core.pair import ModelSpec, load_encoder
from core.paraphrase import gold_index
from core.passage_store import open_stored_corpus, store_directory
from tests.conftest import tiny_pair_state

APP = Path(__file__).resolve().parent.parent / "app.py"


def _expected(wiki, i: int) -> tuple[str, str, str]:
    return wiki.ids[i], wiki.titles[i], wiki.texts[i].replace("\n", " ")


def test_a_tsv_corpus_is_read_from_disk_by_index_and_by_id(tmp_path, tsv_path, wiki_2000, monkeypatch):
    corpus = open_stored_corpus(tsv_path, tmp_path)
    assert corpus.store is not None and len(corpus) == 2000 and corpus.name == "psgs_w100.tsv"
    for i in (0, 1, 999, 1999):
        passage = corpus.passage(i)
        assert (passage.id, passage.title, passage.text) == _expected(wiki_2000, i)
    assert corpus.titles[-1] == wiki_2000.titles[1999] and corpus.titles[3:6] == list(wiki_2000.titles[3:6])
    with pytest.raises(IndexError):
        corpus.texts[2000]
    for i in (0, 7, 1234, 1999):
        assert corpus.position(wiki_2000.ids[i]) == i and corpus.ids.index(wiki_2000.ids[i]) == i
    assert corpus.position("no such passage") is None and "no such passage" not in corpus.ids
    assert wiki_2000.ids[5] in corpus.ids
    scan = scan_corpus(tsv_path)
    assert corpus.fingerprint == scan.fingerprint == corpus_rows_fingerprint(corpus)
    directory = store_directory(tmp_path, tsv_path)
    assert (directory / ROW_POSITIONS).is_file() and (directory / ID_LOOKUP).is_file()
    monkeypatch.setattr("core.corpus_stream.scan_corpus", lambda *a, **k: pytest.fail("the saved scan was not reused"))
    assert open_stored_corpus(tsv_path, tmp_path).position(wiki_2000.ids[42]) == 42


def test_gold_ids_of_a_query_file_are_found_in_a_stored_corpus(tmp_path, tsv_path, wiki_2000):
    corpus = open_stored_corpus(tsv_path, tmp_path)
    lines = [json.dumps({"query": "q", "gold_ids": [wiki_2000.ids[10], wiki_2000.ids[1500]]})]
    (query,) = parse_query_lines(lines, corpus)
    assert query.source_index == 10 and query.relevant == {10, 1500}


def test_a_jsonl_file_stays_in_memory_and_its_store_gives_the_same_ids_and_rows(tmp_path, monkeypatch):
    path = tmp_path / "corpus.jsonl"
    path.write_text(
        '{"id": "a", "title": "A", "text": "first"}\n'
        "not json\n"
        "\n"
        '{"title": "no id", "text": "named by its line"}\n'
        '{"id": 7, "text": "a number id, no title"}\n'
    )
    monkeypatch.setenv(INDEX_DIR_ENV_VAR, str(tmp_path / "indexes"))
    in_memory, stored = load_corpus(path), open_stored_corpus(path)
    assert in_memory.store is None and stored.store is not None
    assert list(stored.ids) == list(in_memory.ids) == ["a", "4", "7"]
    assert [stored.passage(i) for i in range(3)] == [in_memory.passage(i) for i in range(3)]
    assert stored.warnings == ("line 2: not valid JSON (Expecting value); skipped",)
    assert stored.position("4") == 1 and in_memory.position("4") == 1
    assert (tmp_path / "indexes" / "corpora").is_dir()  # the row index lives under $DPR_LENS_INDEX_DIR


def test_a_parquet_corpus_is_read_from_disk_row_group_by_row_group(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"passage number {i}" if i != 4 else "" for i in range(10)]
    pq.write_table(
        pa.table({"id": [f"p{i}" for i in range(10)], "title": [f"T{i}" for i in range(10)], "text": texts}),
        tmp_path / "c.parquet",
        row_group_size=3,
    )
    corpus = open_stored_corpus(tmp_path / "c.parquet", tmp_path)
    assert len(corpus) == 9 and corpus.warnings == ("row 5: missing a non-empty 'text'; skipped",)
    expected = list(read_rows(corpus.store.scan, 0, 9))
    assert [corpus.store.row(i) for i in (8, 0, 5, 3, 7, 1, 2, 4, 6)] == [
        expected[i] for i in (8, 0, 5, 3, 7, 1, 2, 4, 6)
    ]
    assert corpus.passage(4).id == "p5" and corpus.texts[8] == "passage number 9"
    assert corpus.position("p7") == 6 and corpus.position("p4") is None
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(CorpusError, match="not a readable Parquet file"):
        open_stored_corpus(tmp_path / "broken.parquet", tmp_path)


def test_tsv_lines_with_an_unclosed_quote_are_bad_and_long_passages_are_read(tmp_path):
    path = tmp_path / "c.tsv"
    long_text = "word " * 40_000  # 200,000 characters: more than csv's default field limit
    path.write_text(f'id\ttext\ttitle\n1\t"an unclosed quote\tA\n2\t{long_text}\tB\n')
    corpus = open_stored_corpus(path, tmp_path)
    assert len(corpus) == 1 and corpus.warnings[0].startswith("line 2: malformed quoting")
    assert corpus.texts[0] == long_text


def test_an_unusable_row_index_is_made_again_and_head_reads_rows_once(tmp_path, tsv_path, wiki_2000, monkeypatch):
    open_stored_corpus(tsv_path, tmp_path)
    (store_directory(tmp_path, tsv_path) / ROW_POSITIONS).write_bytes(b"garbage")
    corpus = open_stored_corpus(tsv_path, tmp_path)
    assert corpus.passage(1500) == open_stored_corpus(tsv_path, tmp_path).passage(1500)
    assert corpus.passage(1500).id == wiki_2000.ids[1500]
    monkeypatch.setattr("core.passage_store.read_row_at", lambda *a, **k: pytest.fail("head read row by row"))
    head = corpus.head(50)
    assert head.store is None and list(head.titles) == list(wiki_2000.titles[:50])


def test_analyses_that_need_descriptions_or_titles_do_not_read_a_stored_corpus_through(tmp_path, tsv_path, wiki_2000):
    corpus = open_stored_corpus(tsv_path, tmp_path)
    with pytest.raises(CorpusError, match="is read from disk"):
        split_indices(corpus)
    assert gold_index(corpus, wiki_2000.ids[77]) == 77  # by id
    assert gold_index(corpus, "A title that is nowhere") is None


def test_a_file_changed_after_its_scan_is_rescanned_or_refused(tmp_path, wiki_2000):
    path = tmp_path / "c.tsv"
    path.write_text("id\ttext\ttitle\n1\tone\tA\n2\ttwo\tB\n")
    corpus = open_stored_corpus(path, tmp_path)
    assert corpus.texts[1] == "two"
    path.write_text("id\ttext\ttitle\n1\tone\tA\n2\tsecond passage\tB\n3\tthree\tC\n")
    os.utime(path, ns=(1, 1))
    with pytest.raises(CorpusError, match="changed since it was scanned"):
        corpus.texts[0]
    reopened = open_stored_corpus(path, tmp_path)
    assert len(reopened) == 3 and reopened.texts[1] == "second passage"


def test_a_large_stored_corpus_without_a_built_index_gets_a_clear_message(
    tmp_path, tsv_path, tiny_encoder, cache, monkeypatch
):
    corpus = open_stored_corpus(tsv_path, tmp_path)
    monkeypatch.setattr("core.index.IN_PROCESS_ENCODE_LIMIT", 1000)
    with pytest.raises(IndexMissingError, match="2,000 passages and no index built"):
        load_index(tiny_encoder, corpus, cache)


def test_the_app_retrieves_from_a_stored_corpus_through_its_built_index(
    tmp_path, monkeypatch, wiki_2000, tiny_bert_dir, tiny_dpr_dirs
):
    path = tmp_path / "psgs.tsv"
    write_tsv(path, wiki_2000.head(300))
    root = tmp_path / "indexes"
    settings = IVFSettings(threshold=100, kind="sq8", nlist=8, nprobe=8, card_queries=20)  # SQ8 trains fastest
    question, context = tiny_dpr_dirs
    for spec in (ModelSpec("a", str(tiny_bert_dir)), ModelSpec("b", str(question), str(context))):
        scan = open_stored_corpus(path, root).store.scan
        build_sharded(load_encoder(spec), spec, scan, root, 2, settings)
    monkeypatch.setenv(INDEX_DIR_ENV_VAR, str(root))
    monkeypatch.setenv("DPR_LENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DPR_LENS_CORPUS_LIMIT", raising=False)
    monkeypatch.setattr("core.index.encode_corpus", lambda *a, **k: pytest.fail("the app encoded the corpus"))
    at = AppTest.from_file(str(APP), default_timeout=180)
    for key, value in {
        **tiny_pair_state(tiny_bert_dir, tiny_dpr_dirs),
        "corpus_path": str(path),
        "kept_corpus_path": str(path),
    }.items():
        at.session_state[key] = value
    at.run()
    at.text_input(key="query_input").set_value(wiki_2000.descriptions[3]).run()
    assert not at.exception
    assert any("psgs.tsv (300 passages)" in caption.value for caption in at.caption)
    html = "\n".join(m.value for m in at.markdown)
    assert html.count('class="lens-hit"') == 20
