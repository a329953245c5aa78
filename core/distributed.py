"""Ray jobs: shard encoding (Ray Data map_batches over an actor pool) and the chunked Figure-1 aggregate.

Each actor loads its model once and checks the weights' fingerprint against the driver's, so every worker
computes with the model the cache keys name. Workers read the corpus and write shards on a filesystem the
driver shares (a local disk for `ray.init()` on one machine, NFS or similar on a cluster); the aggregate's
workers return their chunk and the driver alone writes the cache.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .cache import ResultCache
from .corpus import Corpus, LabelledQuery
from .corpus_stream import CorpusScan
from .errors import LensError
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
from .retrieval import prepare_query
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

LOCAL = "local"
CORE_DIR = Path(__file__).resolve().parent
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
        # The cluster's workers get this checkout's core package; models and data must be at the same paths there.
        ray.init(address=address, runtime_env={"py_modules": [str(CORE_DIR)]}, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


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


def _plan_workers(ray, tasks: int, workers: int | None) -> tuple[int, float, float]:
    """(actors, CPUs each, GPUs each): one GPU per actor where the cluster has GPUs, else one CPU."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return max(1, min(tasks, workers or gpus)), 1.0, 1.0
    return max(1, min(tasks, workers or int(resources.get("CPU", 1)))), 1.0, 0.0


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


class _NeuronWorker:
    def __init__(self, spec: ModelSpec, fingerprint: str, steps: int):
        _worker_threads()
        self.encoder = _load_checked(spec, fingerprint)
        self.steps = steps

    def run(self, number: int, texts: list[str], passages: list[int], targets: np.ndarray) -> tuple[int, Any]:
        return number, aggregate_chunk(self.encoder, texts, passages, targets, self.steps)


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

    def chunk(number: int) -> tuple[list[str], list[int], np.ndarray]:
        start = bounds[number]
        chosen = passages[start : start + chunk_size]
        return texts[start : start + chunk_size], chosen, np.stack([index.embeddings[p] for p in chosen])

    if spec is None:
        for number in todo:
            done(number, aggregate_chunk(encoder, *chunk(number), steps))
    elif todo:
        with ray_session(address) as ray:
            from ray.util import ActorPool

            actors, cpus, _ = _plan_workers(ray, len(todo), workers)
            # CPU only: the attribution hooks and tensors of core.neuron_attribution live on the CPU.
            worker = ray.remote(num_cpus=cpus)(_NeuronWorker)
            pool = ActorPool([worker.remote(spec, encoder.fingerprint, steps) for _ in range(actors)])
            for number, part in pool.map_unordered(lambda actor, n: actor.run.remote(n, *chunk(n)), todo):
                done(number, part)
    merged = merge_aggregates([parts[number] for number in range(len(bounds))])
    cache.set(NEURON_AGGREGATE.namespace, NEURON_AGGREGATE.key(whole_key), merged)
    return merged


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
    wanted = {key: value for key, value in asdict(settings).items() if key != "threshold"}
    if card_path.is_file() and (directory / INDEX_FILE).is_file() and not missing:
        card = json.loads(card_path.read_text())
        if {key: card.get(key) for key in wanted} == wanted:
            return directory, card
    return directory, build_ivf(ShardSet.open(directory), settings)
