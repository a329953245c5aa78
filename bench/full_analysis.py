"""Full analysis of a new query on the offline pair, as the pages compute it, then its cached repeat.

"Full" = for both models: top-10 retrieval, the top-25 token IG ranking (query total, 25 passages),
deletion curves of the top passage (both sides), query-tower knowledge neurons (target: own top-1)
and the suppression curve. Goals (issue 6): new query <= 90 s, cached repeat <= 1 s.

    python -m bench.full_analysis           # writes bench/results_full_analysis.md
    python -m bench.full_analysis --quick   # top-3, 4 neuron steps, k <= 10: checks that it runs (not results)
"""

from __future__ import annotations

import argparse
import tempfile

from bench.harness import Results, Row, measure, parse_args, sized
from core.cache import ResultCache
from core.corpus import load_wiki
from core.index import load_index
from core.neuron_attribution import DEFAULT_STEPS as NEURON_STEPS
from core.neuron_attribution import attribute_query
from core.pair import load_pair
from core.retrieval import retrieve
from core.suppression import DEFAULT_MAX_K, curve_ks, suppression_curve
from core.token_attribution import TOP_K, cached_deletion_curve, cached_ranking

NAME, TITLE = "full_analysis", "Full-analysis benchmark"
QUERY = "river that flows through Vienna"


def analyse(
    pair,
    indexes,
    corpus,
    cache: ResultCache,
    query: str,
    top_k: int = TOP_K,
    neuron_steps: int = NEURON_STEPS,
    max_k: int = DEFAULT_MAX_K,
) -> None:
    for name, encoder in pair.models.items():
        index = indexes[name]
        retrieve(encoder, index, corpus, query, 10, cache=cache)
        hits = retrieve(encoder, index, corpus, query, top_k, cache=cache).indices
        ranking = cached_ranking(cache, encoder, corpus, query, hits)
        for side in ("query", "passage"):
            cached_deletion_curve(cache, encoder, ranking.pairs[0], side)
        neurons = attribute_query(encoder, index, corpus, query, steps=neuron_steps, cache=cache)
        suppression_curve(encoder, index, neurons, curve_ks(max_k))


def run(query: str = QUERY) -> list[Row]:
    pair = load_pair("offline")
    corpus = load_wiki()
    index_cache = ResultCache()
    indexes = {name: load_index(encoder, corpus, index_cache) for name, encoder in pair.models.items()}
    sizes = {"top_k": sized(TOP_K, 3), "neuron_steps": sized(NEURON_STEPS, 4), "max_k": sized(DEFAULT_MAX_K, 10)}
    with tempfile.TemporaryDirectory() as directory:
        cache = ResultCache(directory)
        first = measure(analyse, pair, indexes, corpus, cache, query, **sizes)
        repeat = measure(analyse, pair, indexes, corpus, cache, query, **sizes)
        cache.close()
    note = (
        f"query '{query}', both models: retrieval, top-{sizes['top_k']} token IG, deletion curves, query-tower "
        "neurons, suppression curve (suppression re-encodes, it is not cached)"
    )
    return [
        Row("full analysis of a new query (goal <= 90 s)", first.min, "s", note=note),
        Row(
            "full analysis, cached repeat (goal <= 1 s)",
            repeat.min,
            "s",
            note="the same calls, served from the disk cache",
        ),
    ]


def main() -> None:
    parse_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    results = Results(NAME, TITLE)
    results.report("Speed", run())


if __name__ == "__main__":
    main()
