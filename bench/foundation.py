"""Foundation: encoding throughput, index build/search, cached retrieval, cold start, peak memory.

python -m bench.foundation      # prints a table; writes bench/results_foundation.md
python -m bench.foundation --quick   # shrunk sizes, no browser: checks that it runs (not results)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.browser import AppServer, chromium_available, launch_chromium, submit_queries
from bench.harness import Results, Row, child_peak_rss_mib, is_quick, measure, parse_args, side_by_side, sized
from core.cache import ResultCache
from core.corpus import load_wiki
from core.index import DenseIndex, load_index
from core.pair import load_pair
from core.retrieval import retrieve
from core.runtime import model_work

NAME, TITLE = "foundation", "Foundation benchmark"
QUERY = "country in Western Europe"


def encoding_rows(pair, corpus) -> list[Row]:
    sample = corpus.subset(range(0, len(corpus), len(corpus) // sized(256, 16)))
    encoder = pair.a

    @model_work  # like Tower.encode: on the model worker, whose thread must be the one in inference mode
    def unsorted_batches():
        tower = encoder.context
        with torch.inference_mode():
            for start in range(0, len(sample), 64):
                batch = tower.tokenize(sample.titles[start : start + 64], sample.texts[start : start + 64], 256)
                tower.forward(batch)

    timings = side_by_side(
        {
            "ours": lambda: encoder.encode_passages(sample.titles, sample.texts, batch_size=16, max_length=256),
            "baseline": unsorted_batches,
        }
    )
    ours, baseline = timings["ours"].min, timings["baseline"].min
    return [
        Row(
            f"encode {len(sample)} passages (model A)",
            ours,
            "s",
            baseline,
            f"{len(sample) / ours:.1f} vs {len(sample) / baseline:.1f} passages/s; baseline = unsorted batches of 64",
        )
    ]


def index_rows(pair, corpus, cache) -> list[Row]:
    loaded = measure(load_index, pair.a, corpus, cache)
    index = loaded.value
    repeats = sized(3, 1)
    build = measure(lambda: DenseIndex(index.embeddings, index.params, "built"), repeats=repeats)
    count = sized(100, 10)
    queries = pair.a.encode_queries([corpus.descriptions[i] or corpus.titles[i] for i in range(0, 10 * count, 10)])
    search = side_by_side(
        {
            "faiss": lambda: index.search(queries, 10),
            "numpy": lambda: np.argsort(-(queries @ index.embeddings.T), axis=1)[:, :10],
        },
        repeats,
    )
    return [
        Row(
            f"load prebuilt embeddings ({len(corpus)} passages, verified)",
            loaded.min,
            "s",
            note=f"source: {index.source}",
        ),
        Row("build FAISS IndexFlatIP", build.min, "s"),
        Row(f"search {count} queries, top-10 (FAISS vs numpy argsort)", search["faiss"].min, "s", search["numpy"].min),
    ]


def retrieval_rows(pair, corpus, cache) -> list[Row]:
    indexes = {name: load_index(encoder, corpus, cache) for name, encoder in pair.models.items()}
    cache.clear()

    def both():
        return [
            retrieve(encoder, indexes[name], corpus, QUERY, 10, cache=cache) for name, encoder in pair.models.items()
        ]

    first = measure(both)
    repeat = measure(both, repeats=sized(3, 1))
    return [
        Row(
            "retrieve a new query, both models (cached repeat vs first)",
            repeat.min,
            "s",
            first.min,
            "goal: cached repeat <= 1 s",
        )
    ]


def cold_start_row() -> Row:
    """From `streamlit run` to both result columns in a headless browser, with an empty cache."""
    name = "cold start: streamlit run -> both result columns"
    if is_quick():
        return Row(name, None, "s", note="skipped in quick mode")
    if not chromium_available():
        return Row(name, None, "s", note="skipped: chromium not installed (make browser)")
    from playwright.sync_api import sync_playwright

    workdir = Path(tempfile.mkdtemp())
    server = AppServer(workdir / "streamlit.log", cache_dir=workdir / "cache")
    opened = {}

    def first_answer() -> None:
        server.start()
        opened["playwright"] = sync_playwright().start()
        page = launch_chromium(opened["playwright"]).new_page()
        page.goto(server.url)
        submit_queries([page], [QUERY])
        page.wait_for_function("document.querySelectorAll('.lens-hit').length >= 20", timeout=300_000)

    try:
        elapsed = measure(first_answer).min  # the browser and the server are closed outside the timed span
    finally:
        if "playwright" in opened:
            opened["playwright"].stop()
        server.stop()
    return Row(name, elapsed, "s", note="empty cache, prebuilt embeddings; goal <= 60 s")


def peak_memory_row() -> Row:
    """Peak RSS of a fresh process holding the offline pair and both full-corpus indexes."""
    code = (
        "from core.pair import load_pair; from core.corpus import load_wiki;"
        "from core.cache import ResultCache; from core.index import load_index; import tempfile;"
        "p = load_pair('offline'); c = load_wiki(); cache = ResultCache(tempfile.mkdtemp());"
        "[load_index(e, c, cache) for e in p.models.values()];"
        f"p.a.encode_queries([{QUERY!r}])"
    )
    return Row(
        "peak RSS, offline pair + both indexes loaded",
        child_peak_rss_mib(code),
        "MiB",
        note="fresh process; goal <= 2048 MiB",
    )


def run() -> list[Row]:
    pair = load_pair("offline")
    corpus = load_wiki()
    with tempfile.TemporaryDirectory() as directory:
        cache = ResultCache(directory)
        rows = encoding_rows(pair, corpus) + index_rows(pair, corpus, cache) + retrieval_rows(pair, corpus, cache)
        cache.close()
    return rows + [cold_start_row(), peak_memory_row()]


def main() -> None:
    parse_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    results = Results(NAME, TITLE)
    results.report("Speed", run())


if __name__ == "__main__":
    main()
