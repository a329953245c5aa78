"""Ray jobs: shard encoding (Ray Data map_batches over an actor pool) and the chunked batch analyses (the
Figure-1 aggregate, evaluation over many queries, token-IG word clouds over many queries).

Each actor loads its model once and checks the weights' fingerprint against the driver's, so every worker
computes with the model the cache keys name. Workers read the corpus and write shards on a filesystem the
driver shares (a local disk for `ray.init()` on one machine, NFS or similar on a cluster); the batch
analyses' workers return their chunk and the driver alone writes the cache.
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .attribution.results import merge_word_sums
from .cache import Analysis, ResultCache
from .corpus import Corpus, LabelledQuery
from .corpus_stream import CorpusScan
from .errors import LensError
from .evaluation import DEPTH, EVALUATION, Evaluation, evaluate_ranked, evaluation_key
from .ivf import CARD_JSON, INDEX_FILE, IVFSettings, build_ivf
from .neuron_attribution import (
    DEFAULT_STEPS,
    NEURON_AGGREGATE,
    SITES,
    NeuronAggregate,
    _aggregate_key,
    aggregate_chunk,
    top1_passages,
)
from .pair import Encoder, ModelLoadError, ModelSpec, load_encoder
from .retrieval import QUERY_BATCH, prepare_query, retrieve
from .runtime import model_work
from .shards import (
    BATCH_SIZE,
    ShardDone,
    ShardRange,
    ShardSet,
    encode_shard,
    finish_shards,
    index_directory,
    missing_shards,
    plan_shards,
    shard_params,
)
from .token_attribution import (
    TOP_K,
    IGSettings,
    PairAttribution,
    RankingEntries,
    TokenAttribution,
    ranking_parts,
    word_sums,
)

LOCAL = "local"
CORE_DIR = Path(__file__).resolve().parent
CONNECT_TIMEOUT = 5.0  # seconds
Progress = Callable[[int, int], None]


class RayError(LensError):
    """Ray is missing or its cluster cannot be used; the message is meant for the user."""


@contextmanager
def ray_session(address: str | None):
    """Connects to `address` (LOCAL: a Ray on this machine) unless Ray is already initialised by the caller."""
    try:
        import ray
    except ImportError as error:
        raise RayError("--ray needs Ray: pip install 'ray[data]==2.60.0'.") from error
    if ray.is_initialized():
        yield ray
        return
    if address in (None, LOCAL):
        ray.init(num_cpus=os.cpu_count(), log_to_driver=False)
    else:
        _require_reachable(address)
        try:
            # The cluster's workers get this checkout's core package; models and data must be at the same paths.
            ray.init(address=address, runtime_env={"py_modules": [str(CORE_DIR)]}, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as error:
            raise RayError(f"Cannot use the Ray cluster at {address}: {error}") from error
    try:
        yield ray
    finally:
        ray.shutdown()


def _require_reachable(address: str) -> None:
    """ray.init retries an unreachable cluster for minutes; a plain TCP connection fails within seconds."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" or a malformed address: ray.init rejects these at once
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as error:
        raise RayError(
            f"No Ray cluster answers at {address} ({error.strerror or error}); start one with "
            "`ray start --head` and give its address (HOST:6379), or --ray alone for a local Ray."
        ) from error


def _load_checked(spec: ModelSpec, fingerprint: str, device: str = "cpu") -> Encoder:
    encoder = load_encoder(spec)
    if encoder.fingerprint != fingerprint:
        raise ModelLoadError(f"The worker's copy of '{spec.label}' has other weights than the driver's.")
    for tower in {id(encoder.query): encoder.query, id(encoder.context): encoder.context}.values():
        tower.model.to(device)
    return encoder


def _worker_threads() -> None:
    import ray
    import torch

    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))


def _plan_workers(ray, tasks: int, workers: int | None, use_gpus: bool = True) -> tuple[int, float, float]:
    """(actors, CPUs each, GPUs each): one GPU per actor where the cluster has GPUs (and use_gpus), else one CPU."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0)) if use_gpus else 0
    if gpus:
        return max(1, min(tasks, workers or gpus)), 1.0, 1.0
    return max(1, min(tasks, workers or int(resources.get("CPU", 1)))), 1.0, 0.0


class _ChunkWorker:
    """A Ray actor: the model is loaded once, then `work(encoder, *arguments)` runs for each chunk sent."""

    def __init__(self, spec: ModelSpec, fingerprint: str, work: Callable[..., Any], device: str):
        _worker_threads()
        self.encoder = _load_checked(spec, fingerprint, device)
        self.work = work

    def run(self, number: int, arguments: tuple) -> tuple[int, Any]:
        return number, self.work(self.encoder, *arguments)


def run_chunks(
    encoder: Encoder,
    work: Callable[..., Any],
    arguments: Callable[[int], tuple],
    todo: Sequence[int],
    done: Callable[[int, Any], None],
    spec: ModelSpec | None = None,
    address: str | None = None,
    workers: int | None = None,
    use_gpus: bool = False,
) -> None:
    """done(n, work(encoder, *arguments(n))) for each chunk n of todo, in the order the chunks finish: in this
    process, or with `spec` on a pool of Ray actors (one model each). done runs here, on the driver."""
    if spec is None:
        for number in todo:
            done(number, work(encoder, *arguments(number)))
        return
    if not todo:
        return
    with ray_session(address) as ray:
        from ray.util import ActorPool

        actors, cpus, gpus = _plan_workers(ray, len(todo), workers, use_gpus)
        worker = ray.remote(num_cpus=cpus, num_gpus=gpus)(_ChunkWorker)
        device = "cuda" if gpus else "cpu"
        pool = ActorPool([worker.remote(spec, encoder.fingerprint, work, device) for _ in range(actors)])
        for number, result in pool.map_unordered(lambda actor, n: actor.run.remote(n, arguments(n)), todo):
            done(number, result)


# --------------------------------------------------------------------------- shard encoding


class ShardEncoder:
    """A Ray Data actor: the model is loaded once, then each batch names shards to encode and write."""

    def __init__(self, spec: ModelSpec, params: dict, scan: CorpusScan, directory: str, batch_size: int):
        import torch

        _worker_threads()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.encoder = _load_checked(spec, params["model"], self.device)
        self.params, self.scan, self.directory, self.batch_size = params, scan, Path(directory), batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seconds = []
        for number, count, start, stop in zip(batch["number"], batch["count"], batch["start"], batch["stop"]):
            shard = ShardRange(int(number), int(count), int(start), int(stop))
            seconds.append(
                encode_shard(
                    self.encoder.context, self.scan, self.directory, shard, self.params, self.batch_size, self.device
                )
            )
        return {"number": batch["number"], "seconds": np.array(seconds)}


def encode_shards_ray(
    spec: ModelSpec,
    params: dict,
    scan: CorpusScan,
    directory: Path,
    shards: Sequence[ShardRange],
    address: str | None = LOCAL,
    workers: int | None = None,
    batch_size: int = BATCH_SIZE,
    on_shard: ShardDone | None = None,
) -> None:
    """The given shards in parallel, one per map_batches call, with an actor pool (one model per actor)."""
    if not shards:
        return
    with ray_session(address) as ray:
        actors, cpus, gpus = _plan_workers(ray, len(shards), workers)
        by_number = {shard.number: shard for shard in shards}
        items = [{"number": s.number, "count": s.count, "start": s.start, "stop": s.stop} for s in shards]
        dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ShardEncoder,
            batch_size=1,
            concurrency=actors,
            num_cpus=cpus,
            num_gpus=gpus,
            fn_constructor_kwargs={
                "spec": spec,
                "params": params,
                "scan": scan,
                "directory": str(directory),
                "batch_size": batch_size,
            },
        )
        for row in dataset.iter_rows():
            if on_shard:
                on_shard(by_number[int(row["number"])], float(row["seconds"]))


# --------------------------------------------------------------------------- Figure-1 aggregate in chunks


def merge_aggregates(parts: Sequence[NeuronAggregate]) -> NeuronAggregate:
    return NeuronAggregate(
        [q for part in parts for q in part.queries],
        [p for part in parts for p in part.passages],
        {site: np.concatenate([part.scores[site] for part in parts]) for site in SITES},
        parts[0].steps,
    )


def aggregate_neurons_chunked(
    encoder: Encoder,
    index,
    corpus: Corpus,
    queries: Sequence[LabelledQuery],
    cache: ResultCache,
    steps: int = DEFAULT_STEPS,
    chunk_size: int = 50,
    spec: ModelSpec | None = None,
    address: str | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> NeuronAggregate:
    """`aggregate_neurons` in chunks, each cached under the key the aggregate of its queries has, so a killed
    job resumes at its first missing chunk; with `spec` the chunks run on Ray actors. The merged result is
    stored under the whole sample's key, where the app's knowledge-neuron page looks it up."""
    if not queries:
        raise ValueError("the aggregate needs at least one query")
    whole_key = _aggregate_key(encoder, index, queries, steps)
    stored = NEURON_AGGREGATE.lookup(cache, **whole_key)
    if stored is not None:
        return stored
    texts = [prepare_query(encoder, q.text).text for q in queries]
    passages = top1_passages(encoder, index, texts)
    bounds = list(range(0, len(queries), chunk_size))
    keys = [_aggregate_key(encoder, index, queries[start : start + chunk_size], steps) for start in bounds]
    parts: dict[int, NeuronAggregate] = {}
    for number, key in enumerate(keys):
        found = NEURON_AGGREGATE.lookup(cache, **key)
        if found is not None:
            parts[number] = found
    todo = [number for number in range(len(bounds)) if number not in parts]

    def done(number: int, part: NeuronAggregate) -> None:
        parts[number] = part
        cache.set(NEURON_AGGREGATE.namespace, NEURON_AGGREGATE.key(keys[number]), part)
        if progress:
            progress(sum(len(p.queries) for p in parts.values()), len(queries))

    def chunk(number: int) -> tuple[list[str], list[int], np.ndarray, int]:
        start = bounds[number]
        chosen = passages[start : start + chunk_size]
        return texts[start : start + chunk_size], chosen, np.stack([index.embeddings[p] for p in chosen]), steps

    # On CPUs only: the attribution hooks and tensors of core.neuron_attribution live on the CPU.
    run_chunks(encoder, aggregate_chunk, chunk, todo, done, spec, address, workers)
    merged = merge_aggregates([parts[number] for number in range(len(bounds))])
    cache.set(NEURON_AGGREGATE.namespace, NEURON_AGGREGATE.key(whole_key), merged)
    return merged


# --------------------------------------------------------------------------- evaluation in chunks

EVALUATION_CHUNK = Analysis("evaluation_chunk", 1, ("index", "query_model", "queries", "depth"), np.ndarray)
EVALUATION_CHUNK_SIZE = 1024


def _encode_queries(encoder: Encoder, texts: list[str]) -> np.ndarray:
    return encoder.encode_queries(texts, batch_size=QUERY_BATCH)


def evaluate_encoder_chunked(
    encoder: Encoder,
    index,
    queries: Sequence[LabelledQuery],
    cache: ResultCache,
    chunk_size: int = EVALUATION_CHUNK_SIZE,
    spec: ModelSpec | None = None,
    address: str | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> Evaluation:
    """`evaluate_encoder` in chunks of queries, each chunk's rankings cached, so a killed job resumes at its
    missing chunks; with `spec` the chunks' queries are encoded on Ray actors. The result equals
    `evaluate_encoder`'s and is stored under its key, where the app and `evaluate` find it."""
    if not queries:
        raise ValueError("the evaluation needs at least one query")
    whole_key = evaluation_key(encoder, index, queries)
    stored = EVALUATION.lookup(cache, **whole_key)
    if stored is not None:
        return stored
    # Chunks are runs of whole batches of the length-sorted queries, the batches `search_queries` encodes: every
    # query is padded as in `evaluate_encoder`, so the rankings are its rankings.
    order = np.argsort([-len(q.text) for q in queries], kind="stable")
    texts = [queries[i].text for i in order]
    size = QUERY_BATCH * max(1, math.ceil(chunk_size / QUERY_BATCH))
    chunks = [texts[start : start + size] for start in range(0, len(texts), size)]
    keys = [
        {"index": index.params, "query_model": encoder.fingerprint, "queries": chunk, "depth": DEPTH}
        for chunk in chunks
    ]
    parts = {n: found for n, key in enumerate(keys) if (found := EVALUATION_CHUNK.lookup(cache, **key)) is not None}

    def done(number: int, vectors: np.ndarray) -> None:
        # The driver searches: the index (64 GB of embeddings at 21M passages, or an IVF index memory-mapped from
        # the driver's disk) stays where it is, and a chunk's query vectors are a few MB.
        _, parts[number] = index.search(vectors, DEPTH)
        cache.set(EVALUATION_CHUNK.namespace, EVALUATION_CHUNK.key(keys[number]), parts[number])
        if progress:
            progress(sum(len(part) for part in parts.values()), len(queries))

    todo = [number for number in range(len(chunks)) if number not in parts]
    run_chunks(encoder, _encode_queries, lambda n: (chunks[n],), todo, done, spec, address, workers)
    ranked = np.empty((len(queries), parts[0].shape[1]), dtype=parts[0].dtype)
    ranked[order] = np.concatenate([parts[number] for number in range(len(chunks))])
    evaluation = evaluate_ranked(encoder.label, ranked, queries)
    cache.set(EVALUATION.namespace, EVALUATION.key(whole_key), evaluation)
    return evaluation


# --------------------------------------------------------------------------- token-IG word clouds over many queries


@dataclass(frozen=True)
class CorpusWords:
    """Word tables (`word_sums` columns) summed over many queries' top-TOP_K passages: the passages' words, as the
    token page's clouds sum them, and the queries' words (each query's attribution summed over its passages)."""

    queries: int
    passage: pd.DataFrame
    query: pd.DataFrame


@model_work
def _attribute_rankings(
    encoder: Encoder, requests: Sequence[tuple], settings: IGSettings
) -> list[tuple[TokenAttribution | None, list[PairAttribution]]]:
    """`ranking_parts` of each (query, titles, texts, with_total, pair_rows) request of a chunk."""
    return [ranking_parts(encoder, *request, settings) for request in requests]


def word_clouds_chunked(
    encoder: Encoder,
    index,
    corpus: Corpus,
    queries: Sequence[str],
    cache: ResultCache,
    settings: IGSettings = IGSettings(),
    drop_stopwords: bool = True,
    chunk_size: int = 4,
    spec: ModelSpec | None = None,
    address: str | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> CorpusWords:
    """Token IG of each query's top-TOP_K passages as the token page computes it, every result stored under the
    page's key (the retrieval, the query total, each (query, passage) pair): the page then shows these queries at
    once, and a killed job resumes at the results it misses. Queries with missing results run in chunks, here or,
    with `spec`, on Ray actors; the word tables are merged over all queries in their order."""
    rankings = [retrieve(encoder, index, corpus, text, TOP_K, cache=cache) for text in queries]
    entries = [RankingEntries.of(encoder, corpus, r.query.text, r.indices, settings) for r in rankings]
    tables: dict[int, tuple[pd.DataFrame, pd.DataFrame]] = {}
    incomplete: dict[int, tuple[TokenAttribution | None, list[PairAttribution | None]]] = {}

    def add_tables(position: int, query_total: TokenAttribution, pairs: Sequence[PairAttribution]) -> None:
        passage_words = word_sums([pair.passage for pair in pairs], drop_stopwords)
        tables[position] = passage_words, word_sums([query_total], drop_stopwords)
        if progress:
            progress(len(tables), len(queries))

    def missing(pairs: Sequence[PairAttribution | None]) -> list[int]:
        return [n for n, pair in enumerate(pairs) if pair is None]

    def request(position: int) -> tuple:
        (query_total, pairs), indices = incomplete[position], rankings[position].indices
        titles, texts = [corpus.titles[i] for i in indices], [corpus.texts[i] for i in indices]
        return rankings[position].query.text, titles, texts, query_total is None, missing(pairs)

    def chunk_arguments(number: int) -> tuple:
        return [request(position) for position in chunks[number]], settings

    def done(number: int, results: list) -> None:
        for position, (computed_total, computed) in zip(chunks[number], results):
            query_total, pairs = incomplete.pop(position)
            rows = missing(pairs)
            entries[position].store(cache, computed_total, dict(zip(rows, computed)))
            for n, pair in zip(rows, computed):
                pairs[n] = pair
            add_tables(position, query_total if computed_total is None else computed_total, pairs)

    for position, entry in enumerate(entries):  # only the incomplete ones are kept: a query's pairs are large
        query_total, pairs = entry.stored(cache)
        if query_total is None or None in pairs:
            incomplete[position] = query_total, pairs
        else:
            add_tables(position, query_total, pairs)
    positions = sorted(incomplete)
    chunks = [positions[start : start + chunk_size] for start in range(0, len(positions), chunk_size)]
    run_chunks(
        encoder, _attribute_rankings, chunk_arguments, range(len(chunks)), done, spec, address, workers, use_gpus=True
    )
    ordered = [tables[position] for position in range(len(queries))]
    return CorpusWords(
        len(queries), merge_word_sums(words for words, _ in ordered), merge_word_sums(words for _, words in ordered)
    )


# --------------------------------------------------------------------------- build-index --shards


def build_sharded(
    encoder: Encoder,
    spec: ModelSpec,
    scan: CorpusScan,
    output: Path,
    count: int,
    settings: IVFSettings,
    address: str | None = None,
    workers: int | None = None,
    on_shard: ShardDone | None = None,
) -> tuple[Path, dict | None]:
    """Encodes the missing shards (in this process, or on Ray with an address), records the finished set and,
    from `settings.threshold` passages, builds the IVF index and its card. Returns the directory and the card."""
    params = shard_params(encoder, scan)
    directory = index_directory(output, params)
    shards = plan_shards(scan.rows, count)
    missing = missing_shards(directory, shards, params)
    if address is None:
        for shard in missing:
            seconds = encode_shard(encoder.context, scan, directory, shard, params)
            if on_shard:
                on_shard(shard, seconds)
    else:
        encode_shards_ray(spec, params, scan, directory, missing, address, workers, on_shard=on_shard)
    finish_shards(directory, shards, params)
    if scan.rows < settings.threshold:
        (directory / INDEX_FILE).unlink(missing_ok=True)  # a lower threshold earlier: serve flat as asked now
        return directory, None
    card_path = directory / CARD_JSON
    # The settings that made the index; pq_bytes only matters to PQ codes.
    ignored = {"threshold"} | ({"pq_bytes"} if settings.kind != "pq" else set())
    wanted = {key: value for key, value in asdict(settings).items() if key not in ignored}
    if card_path.is_file() and (directory / INDEX_FILE).is_file() and not missing:
        card = json.loads(card_path.read_text())
        if {key: card.get(key) for key in wanted} == wanted:
            return directory, card
    return directory, build_ivf(ShardSet.open(directory), settings)
