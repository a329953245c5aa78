"""Absolute times on one device (issue 14), for the offline pair and a BERT-base-sized random pair.

    python -m bench.device --device cuda      # writes bench/results_device.md
    python -m bench.device --device cpu --quick

Rows per case: encode PASSAGES passages (per model), top-25 token IG of one query for both models, knowledge neurons
of one query (both sites, m = 20, per model) and the Figure-1 aggregate over QUERIES queries (per model), plus the
aggregate of --compare queries batched across queries vs one query at a time (offline model A). Every row gives the
device, the precision and the peak memory (CUDA: max_memory_allocated since the row started; CPU: the process's
peak RSS so far). The BERT-base pair is two BertConfig() models with random weights and the offline model's uncased
30,522-word tokenizer (no download), CLS pooling.

Goals on one H200 (not measured here; no GPU in this checkout's machine):
- encode 10,000 passages: at most 15 s per model;
- top-25 token IG, both models: at most 3 s;
- neurons of one query: at most 0.3 s;
- the Figure-1 aggregate over 1,000 queries: at most 2 min.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import BertConfig, BertModel

from bench.harness import Results, Row, is_quick, measure, parse_args, peak_rss_mib, sized
from core.corpus import load_corpus
from core.device import ENCODE_DTYPES, device_name, encode_dtype, model_device, use_device
from core.index import PASSAGE_MAX_LENGTH, load_index
from core.neuron_attribution import aggregate_chunk, aggregate_sample, attribute_neurons
from core.pair import Encoder, ModelPair, PairSpec, Tower, load_pair
from core.retrieval import retrieve
from core.token_attribution import TOP_K, attribute_ranking

NAME, TITLE = "device", "Device benchmark (issue 14)"
QUERY = "which french composer wrote the opera carmen that premiered in paris in the year 1875"
DESCRIPTION = (
    "Absolute times of one run (best of one); peak MiB: CUDA max_memory_allocated during the row, CPU the "
    "process's peak RSS so far. Goals on one H200: encode 10,000 passages <= 15 s per model, top-25 token "
    "IG both models <= 3 s, neurons <= 0.3 s per query, Figure-1 over 1,000 queries <= 2 min."
)


def _sync() -> None:
    if model_device().type == "cuda":
        torch.cuda.synchronize()


def _timed(function, *args, **kwargs):
    """One timed call (device work finished), and the peak memory in MiB while it ran."""
    if model_device().type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def run():
        value = function(*args, **kwargs)
        _sync()
        return value

    timing = measure(run)
    peak = torch.cuda.max_memory_allocated() / 2**20 if model_device().type == "cuda" else peak_rss_mib()
    return timing, peak


def _row(name: str, function, *args, dtype: str = "fp32", baseline: float | None = None, note: str = "", **kwargs):
    timing, peak = _timed(function, *args, **kwargs)
    row = Row(
        name,
        timing.min,
        "s",
        baseline,
        note,
        {"device": device_name(model_device()), "dtype": dtype, "peak MiB": f"{peak:.0f}"},
    )
    print(f"{name}: {timing.min:.2f} s, peak {peak:.0f} MiB{'; ' + note if note else ''}", flush=True)
    return row, timing.value


def bert_base_pair(tokenizer, spec: PairSpec, layers: int | None = None) -> ModelPair:
    """Two BERT-base-sized models with random weights (seeds 0 and 1) on the chosen device."""
    encoders = []
    for seed, label in enumerate(("A", "B")):
        torch.manual_seed(seed)
        config = BertConfig(**({"num_hidden_layers": layers} if layers else {}))
        tower = Tower(BertModel(config).eval().to(model_device()), tokenizer, "cls", False)
        encoders.append(Encoder(f"BERT-base random {label}", f"random-bert-base-{seed}", tower, tower))
    return ModelPair(spec, *encoders)


def case_rows(
    case: str,
    pair: ModelPair,
    corpus,
    passages: int,
    queries: int,
    top: list[int],
    steps: int,
    targets: dict[str, np.ndarray],
) -> list[Row]:
    rows = []
    titles, texts = corpus.titles[:passages], corpus.texts[:passages]
    for name, encoder in pair.models.items():
        rows.append(
            _row(
                f"{case} {name}: encode {passages:,} passages",
                encoder.encode_passages,
                titles,
                texts,
                max_length=PASSAGE_MAX_LENGTH,
                batch_size=32,
                dtype=encode_dtype(),
            )[0]
        )
    top_titles, top_texts = [corpus.titles[i] for i in top], [corpus.texts[i] for i in top]

    def both_ig():
        for encoder in pair.models.values():
            attribute_ranking(encoder, QUERY, top_titles, top_texts, top)

    rows.append(_row(f"{case}: top-{len(top)} token IG, both models", both_ig)[0])
    sample = aggregate_sample(corpus, queries)
    texts_q = [q.text for q in sample]
    for name, encoder in pair.models.items():
        batch = encoder.query.tokenize([QUERY])
        rows.append(
            _row(
                f"{case} {name}: neurons of one query (both sites, m = {steps})",
                attribute_neurons,
                encoder.query,
                batch,
                targets[name][0],
                steps,
            )[0]
        )
        rows.append(
            _row(
                f"{case} {name}: Figure-1 aggregate, {len(sample)} queries (m = {steps})",
                aggregate_chunk,
                encoder,
                texts_q,
                list(range(len(sample))),
                targets[name][: len(sample)],
                steps,
            )[0]
        )
    return rows


def batching_row(encoder: Encoder, corpus, count: int, steps: int, targets: np.ndarray) -> Row:
    """The aggregate batched across queries vs one query at a time, same queries and targets."""
    texts = [q.text for q in aggregate_sample(corpus, count)]
    targets = targets[: len(texts)]

    def one_at_a_time():
        return [
            attribute_neurons(encoder.query, encoder.query.tokenize([text]), target, steps)
            for text, target in zip(texts, targets)
        ]

    single, _ = _timed(one_at_a_time)
    row, batched = _row(
        f"offline A: Figure-1 aggregate of {len(texts)} queries, batched vs one at a time",
        aggregate_chunk,
        encoder,
        texts,
        list(range(len(texts))),
        targets,
        steps,
        baseline=single.min,
    )
    difference = max(
        float(
            np.abs(batched.scores[site] - np.stack([a.scores[site] for a in single.value])).max()
            / np.abs(batched.scores[site]).max()
        )
        for site in batched.scores
    )
    row.note = f"m = {steps}; max abs difference / max abs score = {difference:.1e}"
    print(f"  ratio {row.ratio:.2f}x; {row.note}", flush=True)
    return row


def run(passages: int | None = None, queries: int | None = None, compare: int | None = None) -> list[Row]:
    """On the device chosen by core.device (main: --device)."""
    passages = passages or sized(10_000, 64)
    queries = queries or sized(1_000, 4)
    compare = compare or sized(40, 3)
    steps = sized(20, 4)
    started = time.perf_counter()
    pair = load_pair("offline")
    corpus = load_corpus(None)
    indexes = {name: load_index(encoder, corpus, None) for name, encoder in pair.models.items()}
    top = list(retrieve(pair.a, indexes["A"], corpus, QUERY, sized(TOP_K, 3)).indices)
    rng = np.random.default_rng(0)
    size = max(queries, compare)
    offline_targets = {name: index.embeddings[rng.integers(0, len(index), size)] for name, index in indexes.items()}
    rows = [batching_row(pair.a, corpus, compare, steps, offline_targets["A"])]
    rows += case_rows("offline", pair, corpus, passages, queries, top, steps, offline_targets)
    bert = bert_base_pair(pair.a.query.tokenizer, pair.spec, 2 if is_quick() else None)
    bert_targets = {name: rng.normal(size=(size, 768)).astype(np.float32) for name in bert.models}
    rows += case_rows(
        "BERT-base random" + (" (quick: 2 layers)" if is_quick() else ""),
        bert,
        corpus,
        passages,
        queries,
        top,
        steps,
        bert_targets,
    )
    print(f"all rows in {time.perf_counter() - started:.0f} s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is a GPU)")
    parser.add_argument("--encode-dtype", choices=tuple(ENCODE_DTYPES), help="precision of the encode rows")
    parser.add_argument("--passages", type=int, help="passages encoded per model (default 10,000; quick 64)")
    parser.add_argument("--queries", type=int, help="queries of the Figure-1 aggregate (default 1,000; quick 4)")
    parser.add_argument("--compare", type=int, help="queries of the batched vs one-at-a-time row (default 40)")
    args = parse_args(parser)
    use_device(args.device, args.encode_dtype)
    rows = run(args.passages, args.queries, args.compare)
    Results(NAME, TITLE).report(
        "Times",
        rows,
        f"{DESCRIPTION} Device {device_name(model_device())}, encoding {encode_dtype()}, attributions fp32.",
    )


if __name__ == "__main__":
    main()
