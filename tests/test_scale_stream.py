"""Streaming corpus readers, sharded encoding (one process and Ray) and resuming a killed build."""

from __future__ import annotations

import numpy as np
import pytest

from core.corpus import CorpusError, load_jsonl
from core.corpus_stream import corpus_rows_fingerprint, load_scan, read_rows, row_batches, rows_fingerprint, scan_corpus
from core.shards import ShardSet, build_shards, finish_shards, plan_shards, shard_params


def test_tsv_scan_matches_the_corpus_and_reads_from_checkpoints(tsv_path, wiki_2000, monkeypatch):
    monkeypatch.setattr("core.corpus_stream.CHECKPOINT_ROWS", 300)
    scan = scan_corpus(tsv_path)
    assert scan.rows == 2000 and scan.bad_rows == 0
    expected = [(wiki_2000.ids[i], wiki_2000.titles[i], wiki_2000.texts[i].replace("\n", " ")) for i in range(2000)]
    assert scan.fingerprint == rows_fingerprint(expected)
    assert list(read_rows(scan, 905, 1210)) == expected[905:1210]  # starts and ends between checkpoints
    assert [len(batch) for batch in row_batches(scan, 0, 250, 100)] == [100, 100, 50]


def test_bad_rows_are_skipped_with_line_numbers_in_every_format(tmp_path):
    tsv = tmp_path / "bad.tsv"
    tsv.write_text('id\ttext\ttitle\n1\tfirst text\tA\n2\tonly two fields\n3\t\tC\n4\t"quoted ""x"""\tD\n')
    scan = scan_corpus(tsv)
    assert scan.rows == 2 and scan.warnings == (
        "line 3: 2 tab-separated fields, expected 3 (id, text, title); skipped",
        "line 4: empty text; skipped",
    )
    assert list(read_rows(scan, 0, 2))[1] == ("4", "D", 'quoted "x"')
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"id": "a", "text": "x"}\nnot json\n\n{"id": "b", "title": "T", "text": "y"}\n')
    scan = scan_corpus(jsonl)
    assert scan.rows == 2 and scan.warnings[0].startswith("line 2: not valid JSON")
    assert scan.fingerprint == corpus_rows_fingerprint(load_jsonl(jsonl))
    duplicate = tmp_path / "duplicate.jsonl"
    duplicate.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    with pytest.raises(CorpusError, match="lines 2"):
        scan_corpus(duplicate)
    with pytest.raises(CorpusError, match="header"):
        (tmp_path / "nohead.tsv").write_text("1\ttext\ttitle\n")
        scan_corpus(tmp_path / "nohead.tsv")


def test_parquet_rows_and_bad_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": ["p1", "p2", "p3"], "title": ["A", None, "C"], "text": ["one", "", "three"]})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=2)
    scan = scan_corpus(tmp_path / "c.parquet")
    assert scan.rows == 2 and scan.warnings == ("row 2: missing a non-empty 'text'; skipped",)
    assert list(read_rows(scan, 1, 2)) == [("p3", "C", "three")]


def test_scan_is_saved_and_reused_until_the_file_changes(tmp_path, tsv_path):
    first = load_scan(tsv_path, tmp_path)
    assert (tmp_path / "corpus-scan.json").is_file() and load_scan(tsv_path, tmp_path) == first
    copy = tmp_path / "copy.tsv"
    copy.write_bytes(tsv_path.read_bytes()[: tsv_path.stat().st_size // 2].rsplit(b"\n", 1)[0] + b"\n")
    assert load_scan(copy, tmp_path).rows < first.rows


def _shard_arrays(directory):
    shard_set = ShardSet.open(directory)
    return np.asarray(shard_set.embeddings()), [i for s in shard_set.shards for i in shard_set.ids(s)]


def test_ray_shards_equal_one_process_shards(tmp_path, tsv_path, tiny, tiny_spec, wiki_2000):
    ray = pytest.importorskip("ray")
    from core.distributed import encode_shards_ray

    scan = scan_corpus(tsv_path)
    params = shard_params(tiny, scan)
    shards = plan_shards(scan.rows, 4)
    build_shards(tiny, scan, tmp_path / "single", 4)
    finish_shards(tmp_path / "single", shards, params)
    ray.init(num_cpus=2, log_to_driver=False)
    try:
        encode_shards_ray(tiny_spec, params, scan, tmp_path / "ray", shards, workers=2)
    finally:
        ray.shutdown()
    finish_shards(tmp_path / "ray", shards, params)
    single, single_ids = _shard_arrays(tmp_path / "single")
    distributed, ray_ids = _shard_arrays(tmp_path / "ray")
    assert single.shape == (2000, tiny.context.dim) and single_ids == ray_ids == list(wiki_2000.ids)
    np.testing.assert_allclose(distributed, single, rtol=1e-4, atol=1e-5)
    reference = tiny.encode_passages(
        wiki_2000.titles[:64], [t.replace("\n", " ") for t in wiki_2000.texts[:64]], max_length=256
    )
    np.testing.assert_allclose(single[:64], reference, rtol=1e-4, atol=1e-5)


def test_killed_build_resumes_at_the_first_missing_shard(tmp_path, tsv_path, tiny):
    scan = scan_corpus(tsv_path)
    params = shard_params(tiny, scan)
    written = []

    def die_after_two(shard, seconds):
        written.append(shard.number)
        if len(written) == 2:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        build_shards(tiny, scan, tmp_path / "run", 5, on_shard=die_after_two)
    stale = tmp_path / "run" / ".shard-00002-of-00005.npy.999.tmp"
    stale.write_bytes(b"half a file")  # what a SIGKILL during a write leaves behind
    (tmp_path / "run" / "shard-00003-of-00005.npy").write_bytes(b"no metadata: not committed")
    written.clear()
    shards = build_shards(tiny, scan, tmp_path / "run", 5, on_shard=lambda shard, seconds: written.append(shard.number))
    assert written == [2, 3, 4]
    finish_shards(tmp_path / "run", shards, params)
    build_shards(tiny, scan, tmp_path / "fresh", 5)
    finish_shards(tmp_path / "fresh", shards, params)
    resumed, fresh = _shard_arrays(tmp_path / "run"), _shard_arrays(tmp_path / "fresh")
    np.testing.assert_array_equal(resumed[0], fresh[0])
    assert resumed[1] == fresh[1]
    damaged = tmp_path / "run" / "shard-00000-of-00005.npy"
    damaged.write_bytes(damaged.read_bytes()[:-4] + b"\x00\x00\x80\x7f")
    written.clear()
    build_shards(tiny, scan, tmp_path / "run", 5, on_shard=lambda shard, seconds: written.append(shard.number))
    assert written == [0]  # a checksum mismatch is a missing shard
