"""Scale: passage encoding in one process vs Ray workers, and the IVF index choice vs flat at 1M vectors.

    python -m bench.scale             # writes bench/results_scale.md
    python -m bench.scale --quick     # shrunk sizes: checks that it runs (not results)
    python -m bench.scale --part ivf  # one part: ivf, encode or store

The vectors are synthetic with cluster structure: 768-d, 4096 cluster centres, each vector a centre plus
isotropic noise (0.4 of a centre's scale), normalised; queries are new draws from the same mixture. (A first
mixture, dominated by noise in a shared 64-d subspace, had no neighbourhoods an IVF could find: recall@10 0.63 at
nprobe 128 even for SQ8.) Real embeddings are not this mixture: the index card that `build-index` writes gives
recall on the corpus itself. Resident memory when served: a fresh process's resident set after opening the saved
index memory-mapped and answering the queries, minus its resident set just before opening it, split into anonymous
memory (the process's own) and file-backed pages (the mapped index and shards, which the kernel can evict).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from bench.harness import ROOT, Results, Row, measure, parse_args, side_by_side, sized
from core.ivf import auto_nlist, recall_at_k, train_ivf
from core.shards import ShardedEmbeddings

NAME, TITLE = "scale", "Scale benchmark: sharded encoding and the IVF index"
DIM, CENTRES, NOISE = 768, 4096, 0.4
NPROBES = (16, 32, 64, 128)
RERANKS = (0, 100, 1000)


def synthetic(rows: int, seed: int, dim: int = DIM, block: int = 131_072) -> np.ndarray:
    """Clustered unit vectors; the same mixture (centres) for every seed, new draws per seed."""
    centres = np.random.default_rng(12345).standard_normal((CENTRES, dim)).astype(np.float32)
    draws = np.random.default_rng(seed)
    out = np.empty((rows, dim), dtype=np.float32)
    for start in range(0, rows, block):
        n = min(block, rows - start)
        chunk = centres[draws.integers(0, CENTRES, n)] + NOISE * draws.standard_normal((n, dim), dtype=np.float32)
        out[start : start + n] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def _served_rss(
    index_path: Path, shard_paths: list[Path], queries_path: Path, nprobe: int, rerank: int
) -> tuple[float, float]:
    """MiB a fresh process holds after opening the index memory-mapped and searching, above what it held before:
    (anonymous, file-backed). File-backed pages are the memory-mapped index and shards the searches touched;
    the kernel can drop them, so they are the working set's cache, not memory the process owns.

    The resident set, not the peak: a process's peak is set by its imports, which hide a memory-mapped index."""
    code = (
        "import re, faiss, numpy as np\nfrom core.ivf import IVFIndex\nfrom core.shards import ShardedEmbeddings\n"
        "status = lambda key: int(re.search(key + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1)) / 1024\n"
        f"queries = np.load({str(queries_path)!r})\n"
        "before = status('RssAnon'), status('RssFile')\n"
        f"index = faiss.read_index({str(index_path)!r}, faiss.IO_FLAG_MMAP)\n"
        f"embeddings = ShardedEmbeddings([np.load(p, mmap_mode='r') for p in {[str(p) for p in shard_paths]!r}])\n"
        f"IVFIndex(index, embeddings, {{}}, {nprobe}, {rerank}).search(queries, 10)\n"
        "print(status('RssAnon') - before[0], status('RssFile') - before[1])\n"
    )
    output = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    anonymous, file_backed = output.stdout.strip().splitlines()[-1].split()
    return float(anonymous), float(file_backed)


def ivf_rows(rows: int, queries_count: int, workdir: Path) -> tuple[list[Row], str]:
    from core.ivf import IVFIndex

    base = synthetic(rows, seed=0)
    queries = synthetic(queries_count, seed=1)
    shard_paths = []
    for number, start in enumerate(range(0, rows, 262_144)):
        shard_paths.append(workdir / f"shard-{number}.npy")
        np.save(shard_paths[-1], base[start : start + 262_144])
    queries_path = workdir / "queries.npy"
    np.save(queries_path, queries)
    embeddings = ShardedEmbeddings([np.load(p, mmap_mode="r") for p in shard_paths])

    flat_build = measure(lambda: _flat(base))
    flat = flat_build.value
    exact = measure(flat.search, queries, 10)
    truth = exact.value[1]
    flat_ms = exact.min / queries_count * 1000
    flat.reset()  # frees its 3 GB before the IVF indexes are built
    out = [
        Row(f"flat (exact), {rows:,} x {DIM}: build", flat_build.min, "s", note="IndexFlatIP.add"),
        Row("flat: latency per query (batch of queries)", flat_ms, "ms"),
        Row("flat: index size", rows * DIM * 4 / 2**20, "MiB", note="all float32 vectors resident"),
    ]
    nlist = auto_nlist(rows)
    sample = base[np.random.default_rng(0).choice(rows, min(rows, 64 * nlist), replace=False)]
    curves = []
    for kind, factory in (("IVF-PQ64", f"IVF{nlist},PQ64"), ("IVF-SQ8", f"IVF{nlist},SQ8")):
        trained = measure(train_ivf, sample, factory)
        index = trained.value
        added = measure(lambda index=index: [index.add(np.ascontiguousarray(a)) for a in embeddings.arrays])
        path = workdir / f"{kind}.index"
        faiss.write_index(index, str(path))
        index.reset()
        served = faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
        out.append(
            Row(
                f"{kind} (nlist {nlist}): build",
                trained.min + added.min,
                "s",
                baseline=flat_build.min,
                note=f"train {trained.min:.0f} s on {len(sample):,} + add {added.min:.0f} s",
            )
        )
        out.append(Row(f"{kind}: index on disk", path.stat().st_size / 2**20, "MiB", baseline=rows * DIM * 4 / 2**20))
        for rerank in RERANKS:
            for nprobe in NPROBES:
                searcher = IVFIndex(served, embeddings, {}, nprobe, rerank)
                timing = measure(lambda searcher=searcher: searcher.search(queries, 10)[1])
                recall = recall_at_k(timing.value, truth)
                curves.append(
                    f"| {kind} | {nprobe} | {rerank} | {recall:.3f} | {timing.min / queries_count * 1000:.2f} |"
                )
                if nprobe == 64:
                    anonymous, file_backed = _served_rss(
                        path, shard_paths if rerank else [], queries_path, nprobe, rerank
                    )
                    label = f"{kind}{f' + exact re-rank of {rerank}' if rerank else ''}, nprobe 64"
                    out.append(Row(f"{label}: recall@10 vs flat", recall, "", note=f"{queries_count} queries"))
                    out.append(
                        Row(f"{label}: latency per query", timing.min / queries_count * 1000, "ms", baseline=flat_ms)
                    )
                    out.append(
                        Row(
                            f"{label}: resident memory when served",
                            anonymous + file_backed,
                            "MiB",
                            baseline=rows * DIM * 4 / 2**20,
                            note=f"fresh process, mmap index, {queries_count} queries: {anonymous:.0f} MiB anonymous + "
                            f"{file_backed:.0f} MiB file-backed (mapped index and shard pages the searches touched)",
                        )
                    )
    table = "| index | nprobe | re-rank | recall@10 | ms/query |\n|---|---|---|---|---|\n" + "\n".join(curves)
    return out, table


def _flat(base: np.ndarray) -> faiss.Index:
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    return index


def encode_rows_bench(passages: int, workdir: Path) -> list[Row]:
    """The offline pair's model A over the bundled corpus's first passages: one process vs 2 Ray workers."""
    import ray

    from core.corpus import load_wiki
    from core.corpus_stream import scan_corpus, write_tsv
    from core.distributed import encode_shards_ray
    from core.pair import load_pair
    from core.shards import build_shards, plan_shards, shard_params

    corpus = load_wiki(limit=passages)
    path = workdir / "psgs.tsv"
    write_tsv(path, corpus)
    scan = scan_corpus(path)
    pair = load_pair("offline")
    encoder, spec = pair.a, pair.spec.a
    params = shard_params(encoder, scan)
    shards = plan_shards(scan.rows, 8)
    ray.init(num_cpus=2, log_to_driver=False)
    try:
        timings = side_by_side(
            {
                "one process": lambda: build_shards(encoder, scan, Path(tempfile.mkdtemp(dir=workdir)), 8),
                "ray, 2 workers": lambda: encode_shards_ray(
                    spec, params, scan, Path(tempfile.mkdtemp(dir=workdir)), shards, workers=2
                ),
            }
        )
    finally:
        ray.shutdown()
    single, distributed = timings["one process"].min, timings["ray, 2 workers"].min
    return [
        Row(
            f"encode {passages} passages in 8 shards (model A, CPU)",
            distributed,
            "s",
            baseline=single,
            note=f"ours = Ray, 2 actors x 1 thread (incl. actor start and model load): {passages / distributed:.1f}"
            f" passages/s; baseline = one process, {os.cpu_count()} threads: {passages / single:.1f} "
            f"passages/s, {single / passages * 1000:.0f} ms/passage",
        )
    ]


def _anonymous_mib_of(code: str) -> float:
    """Anonymous resident MiB a fresh process adds while running `code` (after its imports)."""
    program = (
        "import re\nfrom core.corpus import load_jsonl\nfrom core.passage_store import open_stored_corpus\n"
        "anonymous = lambda: int(re.search(r'RssAnon:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) / 1024\n"
        f"before = anonymous()\n{code}\nprint(anonymous() - before)\n"
    )
    output = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, check=True)
    return float(output.stdout.strip().splitlines()[-1])


def store_rows(passages: int, workdir: Path) -> list[Row]:
    """A corpus read from disk (core.passage_store) against the same corpus read into memory (load_jsonl)."""
    import csv
    import json

    from core.corpus import load_wiki
    from core.corpus_stream import scan_corpus
    from core.passage_store import open_stored_corpus

    wiki = load_wiki()
    tsv, jsonl = workdir / "store.tsv", workdir / "store.jsonl"
    with tsv.open("w", encoding="utf-8", newline="") as tsv_file, jsonl.open("w", encoding="utf-8") as jsonl_file:
        writer = csv.writer(tsv_file, delimiter="\t", lineterminator="\n")
        writer.writerow(["id", "text", "title"])
        for row in range(passages):
            title, text = wiki.titles[row % len(wiki)], " ".join(wiki.texts[row % len(wiki)].split())
            writer.writerow([row, text, title])
            jsonl_file.write(json.dumps({"id": str(row), "title": title, "text": text}) + "\n")
    scan = measure(scan_corpus, tsv, row_index=workdir / "store-index")
    in_memory = _anonymous_mib_of(f"corpus = load_jsonl({str(jsonl)!r})")
    stored = _anonymous_mib_of(f"corpus = open_stored_corpus({str(tsv)!r}, {str(workdir)!r})")
    corpus = open_stored_corpus(tsv, workdir)
    picks = np.random.default_rng(0).choice(passages, 1000, replace=False)
    by_index = measure(lambda: [corpus.passage(int(i)) for i in picks])
    by_id = measure(lambda: [corpus.position(str(i)) for i in picks])
    size = tsv.stat().st_size / 2**20
    return [
        Row(
            f"scan + row index of {passages:,} passages ({size:.0f} MiB .tsv)",
            scan.min,
            "s",
            note=f"{scan.min / passages * 1e6:.1f} us/passage: fingerprint, bad lines, row positions, id lookup",
        ),
        Row(
            "corpus held by the process: stored vs in memory",
            stored,
            "MiB",
            baseline=in_memory,
            note="anonymous RSS a fresh process adds: open_stored_corpus(.tsv) vs load_jsonl(same rows as .jsonl)",
        ),
        # 1000 passages in `min` seconds: `min` is also the milliseconds per passage
        Row("read one passage by row (stored)", by_index.min, "ms", note="1000 random rows, fresh row cache"),
        Row("find one passage by id (stored)", by_id.min, "ms", note="1000 random ids (rows cached)"),
    ]


def bert_base_encode_row(passages: int) -> Row:
    """The paper's context encoder size (BERT-base, random weights: the cost does not depend on the values)
    over bundled passages cut to 128 tokens (psgs_w100 passages are 100 words, about 130 tokens)."""
    from transformers import BertConfig, BertModel

    from core.corpus import load_wiki
    from core.pair import ModelSpec, Tower, load_encoder

    tokenizer = load_encoder(ModelSpec("A", "minilm:")).context.tokenizer  # the same uncased BERT vocabulary
    tower = Tower(BertModel(BertConfig()).eval(), tokenizer, "cls", False)
    corpus = load_wiki(limit=passages)
    tower.encode(corpus.titles[:8], corpus.texts[:8], max_length=128)  # warm-up
    timing = measure(tower.encode, corpus.titles, corpus.texts, batch_size=32, max_length=128)
    return Row(
        f"encode {passages} passages, BERT-base size, 128 tokens (CPU)",
        timing.min / passages * 1000,
        "ms",
        note=f"ms per passage, one process, {os.cpu_count()} threads: the per-passage cost the 21M plan multiplies",
    )


def run(part: str = "all") -> tuple[list[Row], str]:
    """The rows, and the recall/latency curve against nprobe as a Markdown table ("" without the IVF part)."""
    rows, curve = [], ""
    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory)
        if part in ("all", "encode"):
            rows += encode_rows_bench(sized(512, 32), workdir)
            rows.append(bert_base_encode_row(sized(128, 8)))
        if part in ("all", "store"):
            rows += store_rows(sized(200_000, 5_000), workdir)
        if part in ("all", "ivf"):
            ivf, curve = ivf_rows(sized(1_000_000, 20_000), sized(1000, 50), workdir)
            rows += ivf
    return rows, curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", choices=("all", "ivf", "encode", "store"), default="all")
    args = parse_args(parser)
    results = Results(NAME, TITLE)
    started = time.perf_counter()
    rows, curve = run(args.part)
    description = __doc__.split("\n\n", 2)[2] + f"\n\nTotal {time.perf_counter() - started:.0f} s."
    if curve:
        description += "\n\nRecall@10 and latency against nprobe (same run):\n\n" + curve
    sections = {"all": "Speed", "ivf": "IVF vs flat", "encode": "Encoding", "store": "Passage store"}
    results.report(sections[args.part], rows, description)


if __name__ == "__main__":
    main()
