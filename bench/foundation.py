"""Foundation: encoding throughput, index build/search, cached retrieval, cold start, peak memory.

    python -m bench.foundation      # prints a table; writes bench/results_foundation.md
"""
from __future__ import annotations

import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from core.cache import ResultCache
from core.corpus import load_wiki
from core.index import DenseIndex, load_index
from core.pair import load_pair
from core.retrieval import retrieve

RESULTS = Path(__file__).with_name("results_foundation.md")
ROOT = Path(__file__).resolve().parent.parent
QUERY = "country in Western Europe"


def _timed(function, repeats: int = 1):
    best, value = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        value = function()
        best = min(best, time.perf_counter() - started)
    return best, value


def encoding_rows(pair, corpus) -> list[dict]:
    sample = corpus.subset(range(0, len(corpus), len(corpus) // 256))
    encoder = pair.a
    ours, _ = _timed(lambda: encoder.encode_passages(sample.titles, sample.texts, batch_size=16, max_length=256))

    def unsorted_batches():
        tower = encoder.context
        import torch

        with torch.inference_mode():
            for start in range(0, len(sample), 64):
                batch = tower.tokenize(sample.titles[start:start + 64], sample.texts[start:start + 64], 256)
                tower.forward(batch)

    baseline, _ = _timed(unsorted_batches)
    return [{"name": f"encode {len(sample)} passages (model A, passages/s)", "ours_s": ours,
             "baseline_s": baseline, "ratio": baseline / ours,
             "note": f"{len(sample) / ours:.1f} vs {len(sample) / baseline:.1f} passages/s; "
                     "baseline = unsorted batches of 64"}]


def index_rows(pair, corpus, cache) -> list[dict]:
    load, index = _timed(lambda: load_index(pair.a, corpus, cache))
    build, _ = _timed(lambda: DenseIndex(index.embeddings, index.params, "built"), repeats=3)
    queries = pair.a.encode_queries([corpus.descriptions[i] or corpus.titles[i] for i in range(0, 1000, 10)])
    faiss_search, _ = _timed(lambda: index.search(queries, 10), repeats=3)
    numpy_search, _ = _timed(lambda: np.argsort(-(queries @ index.embeddings.T), axis=1)[:, :10], repeats=3)
    return [
        {"name": f"load prebuilt embeddings ({len(corpus)} passages, verified)", "ours_s": load,
         "baseline_s": None, "ratio": None, "note": f"source: {index.source}"},
        {"name": "build FAISS IndexFlatIP", "ours_s": build, "baseline_s": None, "ratio": None, "note": ""},
        {"name": "search 100 queries, top-10 (FAISS vs numpy argsort)", "ours_s": faiss_search,
         "baseline_s": numpy_search, "ratio": numpy_search / faiss_search, "note": ""},
    ]


def retrieval_rows(pair, corpus, cache) -> list[dict]:
    indexes = {name: load_index(encoder, corpus, cache) for name, encoder in pair.models.items()}
    cache.clear()

    def both():
        return [retrieve(encoder, indexes[name], corpus, QUERY, 10, cache=cache)
                for name, encoder in pair.models.items()]

    first, _ = _timed(both)
    repeat, _ = _timed(both, repeats=3)
    return [{"name": "retrieve a new query, both models (cached repeat vs first)", "ours_s": repeat,
             "baseline_s": first, "ratio": first / repeat, "note": "goal: cached repeat <= 1 s"}]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cold_start_row() -> dict:
    """From `streamlit run` to both result columns in a headless browser, with an empty cache."""
    chromium = shutil.which("chromium")
    if not chromium:
        return {"name": "cold start to first answer", "ours_s": None, "baseline_s": None, "ratio": None,
                "note": "skipped: chromium not installed (make browser)"}
    from playwright.sync_api import sync_playwright

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "DPR_LENS_CORPUS_LIMIT"}
    env["DPR_LENS_CACHE"] = tempfile.mkdtemp()
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                               "--server.headless", "true"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            try:
                urllib.request.urlopen(f"{url}/_stcore/health", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            page = browser.new_page()
            page.goto(url)
            page.get_by_label("Query").fill(QUERY)
            page.get_by_label("Query").press("Enter")
            page.wait_for_function("document.querySelectorAll('.lens-hit').length >= 20", timeout=300_000)
            elapsed = time.perf_counter() - started
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"name": "cold start: streamlit run -> both result columns", "ours_s": elapsed, "baseline_s": None,
            "ratio": None, "note": "empty cache, prebuilt embeddings; goal <= 60 s"}


def peak_memory_row() -> dict:
    """Peak RSS of a fresh process holding the offline pair and both full-corpus indexes."""
    code = ("import resource; from core.pair import load_pair; from core.corpus import load_wiki;"
            "from core.cache import ResultCache; from core.index import load_index; import tempfile;"
            "p = load_pair('offline'); c = load_wiki(); cache = ResultCache(tempfile.mkdtemp());"
            "[load_index(e, c, cache) for e in p.models.values()];"
            "p.a.encode_queries(['country in Western Europe']);"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    output = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    peak_mib = int(output.stdout.strip().splitlines()[-1]) / 1024
    return {"name": "peak RSS, offline pair + both indexes loaded (MiB)", "ours_s": None, "baseline_s": None,
            "ratio": None, "note": f"{peak_mib:.0f} MiB; goal <= 2048 MiB", "value": peak_mib}


def run() -> list[dict]:
    pair = load_pair("offline")
    corpus = load_wiki()
    with tempfile.TemporaryDirectory() as directory:
        cache = ResultCache(directory)
        rows = encoding_rows(pair, corpus) + index_rows(pair, corpus, cache) + retrieval_rows(pair, corpus, cache)
        cache.close()
    return rows + [cold_start_row(), peak_memory_row()]


def format_table(rows: list[dict]) -> str:
    def seconds(value):
        return "" if value is None else f"{value:.3f}"

    lines = ["| benchmark | ours (s) | baseline (s) | ratio | note |", "|---|---|---|---|---|"]
    for row in rows:
        ratio = "" if row.get("ratio") is None else f"{row['ratio']:.1f}x"
        lines.append(f"| {row['name']} | {seconds(row.get('ours_s'))} | {seconds(row.get('baseline_s'))} | "
                     f"{ratio} | {row.get('note', '')} |")
    return "\n".join(lines)


def main() -> None:
    rows = run()
    table = format_table(rows)
    print(table)
    header = f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()}, " \
             f"{os.cpu_count()} cores.\n\n"
    RESULTS.write_text("# Foundation benchmark (last run)\n\n" + header + table + "\n")


if __name__ == "__main__":
    main()
