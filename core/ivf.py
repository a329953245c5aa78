"""The index at scale: FAISS IVF-PQ over the shards, memory-mapped when served, re-ranked exactly.

Chosen by measurement (bench/scale.py, bench/results_scale.md, docs/scale.md). Over 1M clustered 768-d vectors
(recall@10 against exact search, 1000 queries, nprobe 64):
- IVF-PQ64 alone 0.084; re-ranking its best 100 candidates exactly 0.568; its best 1000, 1.000 (4.2 ms/query);
- IVF-SQ8 alone 0.933; re-ranking its best 100, 1.000 (6.3 ms/query).
PQ64 keeps 64 bytes a vector (1.3 GB at 21M, which fits the 4 GB goal in memory) and SQ8 768 (15 GB at 21M),
so the default is PQ64 with an exact re-rank of 1000 candidates against the float embeddings memory-mapped from
the shards; SQ8 stays a setting (`--ivf-kind sq8`). `IVFIndex` is a drop-in for `DenseIndex`:
`.search(vectors, k)`, `.params`, `.embeddings` (rows on demand), `len()`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from .cli_args import cli_option
from .corpus import Corpus
from .corpus_stream import corpus_rows_fingerprint, replace_atomically
from .index import DenseIndex
from .shards import ShardedEmbeddings, ShardError, ShardSet, file_sha256, index_directory

INDEX_FILE, CARD_JSON, CARD_MD = "ivf.index", "index-card.json", "index-card.md"
INDEX_DIR_ENV_VAR = "DPR_LENS_INDEX_DIR"
NPROBE_ENV_VAR = "DPR_LENS_NPROBE"
KINDS = ("pq", "sq8")
RERANK_BLOCK_FLOATS = 2**26  # candidates' vectors gathered at once for re-ranking: 256 MiB of float32


@dataclass(frozen=True)
class IVFSettings:
    threshold: int = cli_option(
        1_000_000, "passages from which build-index makes an IVF index (below: flat)", flags=("--ivf-threshold",)
    )
    kind: str = cli_option(
        "pq", "IVF codes: product quantization (pq) or 8-bit scalar (sq8)", flags=("--ivf-kind",), choices=KINDS
    )
    nlist: int = cli_option(0, "IVF lists (0: about sqrt(passages), a power of two)")
    pq_bytes: int = cli_option(64, "PQ code bytes per vector (the largest divisor of the dimension up to this)")
    nprobe: int = cli_option(64, "lists searched per query (also $DPR_LENS_NPROBE when served)")
    rerank: int = cli_option(1000, "PQ/SQ candidates re-scored exactly from the shards (0: none)")
    train_size: int = cli_option(0, "vectors sampled from the shards to train the index (0: 64 x nlist)")
    card_queries: int = cli_option(500, "sampled passage vectors used as queries for the card's recall@10")


def auto_nlist(rows: int) -> int:
    """About sqrt(rows) lists, each with enough training points (faiss wants 39 per centroid)."""
    return max(1, min(2 ** round(math.log2(math.sqrt(rows))), rows // 39))


def pq_subquantizers(dim: int, pq_bytes: int) -> int:
    return max(m for m in range(1, min(pq_bytes, dim) + 1) if dim % m == 0)


def factory_string(settings: IVFSettings, rows: int, dim: int) -> str:
    nlist = nlist_for(settings, rows)
    codes = f"PQ{pq_subquantizers(dim, settings.pq_bytes)}" if settings.kind == "pq" else "SQ8"
    return f"IVF{nlist},{codes}"


def nlist_for(settings: IVFSettings, rows: int) -> int:
    return settings.nlist or auto_nlist(rows)


def train_ivf(sample: np.ndarray, factory: str) -> faiss.Index:
    index = faiss.index_factory(sample.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return index


def sample_rows(embeddings: ShardedEmbeddings, size: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).choice(len(embeddings), min(size, len(embeddings)), replace=False)
    return embeddings.rows(np.sort(rows))


def exact_top_k(
    embeddings: ShardedEmbeddings | np.ndarray, queries: np.ndarray, k: int, block: int = 262_144
) -> np.ndarray:
    """Exact inner-product top-k, streaming over the rows so the whole matrix is never in memory at once."""
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(embeddings), block):
        rows = np.arange(start, min(start + block, len(embeddings)))
        scores = np.asarray(queries, dtype=np.float32) @ np.asarray(embeddings[rows], dtype=np.float32).T
        best_scores = np.concatenate([best_scores, scores], axis=1)
        best_rows = np.concatenate([best_rows, np.broadcast_to(rows, scores.shape)], axis=1)
        keep = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(best_scores, keep, 1)
        best_rows = np.take_along_axis(best_rows, keep, 1)
    return best_rows


def recall_at_k(found: np.ndarray, exact: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(f[:k]) & set(e[:k])) / k for f, e in zip(found, exact)]))


def resident_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class IVFIndex:
    """Approximate inner-product search, used exactly like `DenseIndex`."""

    def __init__(
        self,
        faiss_index: faiss.Index,
        embeddings: ShardedEmbeddings,
        params: dict,
        nprobe: int,
        rerank: int,
        source: str = "ivf",
    ):
        self.faiss_index, self.embeddings, self.source = faiss_index, embeddings, source
        self.nprobe, self.rerank = nprobe, rerank
        faiss.extract_index_ivf(faiss_index).nprobe = nprobe
        # Retrievals cached under these params never mix with exact ones, or with another nprobe.
        self.params = dict(params, index=self.describe())

    def describe(self) -> str:
        kind = type(faiss.extract_index_ivf(self.faiss_index)).__name__
        return f"{kind}:nprobe={self.nprobe}:rerank={self.rerank}"

    def __len__(self) -> int:
        return self.faiss_index.ntotal

    def search(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = max(1, min(k, len(self)))
        queries = np.ascontiguousarray(query_vectors, dtype=np.float32)
        scores, rows = self.faiss_index.search(queries, max(k, self.rerank))
        if not self.rerank:
            return scores[:, :k], rows[:, :k]
        found = rows >= 0  # -1: fewer candidates than asked in the probed lists
        exact = np.full(rows.shape, -np.inf, dtype=np.float32)
        block = max(1, RERANK_BLOCK_FLOATS // (rows.shape[1] * queries.shape[1]))  # bounds the gathered vectors
        for start in range(0, len(queries), block):
            part = slice(start, start + block)
            vectors = self.embeddings.rows(np.where(found[part], rows[part], 0))
            exact[part] = np.where(found[part], np.einsum("qcd,qd->qc", vectors, queries[part]), -np.inf)
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(exact, order, 1), np.take_along_axis(rows, order, 1)


def build_ivf(shard_set: ShardSet, settings: IVFSettings, progress=None) -> dict:
    """Trains on a sample, adds the shards one by one (memory-mapped), saves the index and its card."""
    embeddings = shard_set.embeddings()
    rows, dim = embeddings.shape
    factory = factory_string(settings, rows, dim)
    started = time.perf_counter()
    train_size = settings.train_size or 64 * nlist_for(settings, rows)
    trained_index = train_ivf(sample_rows(embeddings, train_size), factory)
    trained = time.perf_counter()
    for done, array in enumerate(embeddings.arrays, start=1):
        trained_index.add(np.ascontiguousarray(array, dtype=np.float32))
        if progress:
            progress(done, len(embeddings.arrays))
    added = time.perf_counter()
    path = shard_set.directory / INDEX_FILE
    replace_atomically(path, lambda temporary: faiss.write_index(trained_index, str(temporary)))
    trained_index.reset()  # frees the codes before the served (memory-mapped) copy is measured
    card = {
        "factory": factory,
        "metric": "inner product",
        "rows": rows,
        "dim": dim,
        "train_seconds": round(trained - started, 1),
        "add_seconds": round(added - trained, 1),
        "disk_mib": round(path.stat().st_size / 2**20, 1),
        "sha256": file_sha256(path),
        **{key: value for key, value in asdict(settings).items() if key != "threshold"},
    }
    card.update(_measure(shard_set, settings))
    (shard_set.directory / CARD_JSON).write_text(json.dumps(card, indent=1) + "\n")
    (shard_set.directory / CARD_MD).write_text(card_markdown(card))
    return card


def _measure(shard_set: ShardSet, settings: IVFSettings) -> dict:
    """Recall@10 against exact search, latency and resident memory of the served (memory-mapped) index."""
    before = resident_mib()
    index = open_index(shard_set.directory, settings.nprobe, settings.rerank)
    embeddings = index.embeddings
    queries = sample_rows(embeddings, settings.card_queries, seed=1)
    started = time.perf_counter()
    _, found = index.search(queries, 10)
    latency = (time.perf_counter() - started) / len(queries)
    served = resident_mib() - before
    exact = exact_top_k(embeddings, queries, 10)
    return {
        "recall_at_10": round(recall_at_k(found, exact), 4),
        "queries": len(queries),
        "query_source": "passage vectors sampled from the corpus (each finds itself: an easier case than "
        "real queries for rank 1, not for ranks 2-10)",
        "ms_per_query": round(latency * 1000, 2),
        "resident_mib_served": round(served, 1),
    }


def card_markdown(card: dict) -> str:
    return (
        f"# Index card\n\n`{card['factory']}` ({card['metric']}) over {card['rows']:,} passages of "
        f"dimension {card['dim']}, nprobe {card['nprobe']}, exact re-ranking of the best {card['rerank']} "
        f"candidates from the memory-mapped shards.\n\n"
        f"| measure | value |\n|---|---|\n"
        f"| recall@10 vs exact search ({card['queries']} queries) | {card['recall_at_10']:.3f} |\n"
        f"| latency per query (one at a time in a batch) | {card['ms_per_query']:.2f} ms |\n"
        f"| resident memory added by serving | {card['resident_mib_served']:.0f} MiB |\n"
        f"| index on disk | {card['disk_mib']:.0f} MiB |\n"
        f"| train / add | {card['train_seconds']:.0f} s / {card['add_seconds']:.0f} s |\n\n"
        f"Queries: {card['query_source']}.\n"
    )


def open_index(directory: Path, nprobe: int | None = None, rerank: int | None = None) -> DenseIndex | IVFIndex:
    """The served index of a finished build: the IVF file memory-mapped if there is one, else flat."""
    shard_set = ShardSet.open(Path(directory))
    embeddings = shard_set.embeddings()
    path = shard_set.directory / INDEX_FILE
    if not path.is_file():
        return DenseIndex(np.asarray(embeddings), dict(shard_set.params, index="flat"), "shards")
    card = (
        json.loads((shard_set.directory / CARD_JSON).read_text()) if (shard_set.directory / CARD_JSON).is_file() else {}
    )
    nprobe = nprobe or int(os.environ.get(NPROBE_ENV_VAR) or card.get("nprobe") or IVFSettings.nprobe)
    rerank = card.get("rerank", IVFSettings.rerank) if rerank is None else rerank
    return IVFIndex(faiss.read_index(str(path), faiss.IO_FLAG_MMAP), embeddings, shard_set.params, nprobe, rerank)


def open_built_index(root: Path, fingerprint: str, corpus: Corpus, max_length: int) -> DenseIndex | IVFIndex | None:
    """The index build-index made under `root` for this model and corpus, if there is one."""
    params = {"model": fingerprint, "corpus": corpus_rows_fingerprint(corpus), "max_length": max_length}
    directory = index_directory(root, params)
    if not directory.is_dir():
        return None
    try:
        return open_index(directory)
    except ShardError:
        return None


def index_dir_from_env() -> Path | None:
    configured = os.environ.get(INDEX_DIR_ENV_VAR, "").strip()
    return Path(configured).expanduser() if configured else None
