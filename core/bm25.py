"""BM25 (bm25s, English stopwords) over passages as "title text": the hard negatives of DPR training and probing."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .corpus import Corpus


def rank_by_bm25(
    corpus: Corpus, queries: Sequence[str], depth: int, passages: Sequence[int] | None = None
) -> np.ndarray:
    """(queries x min(depth, pool size)) corpus indices, best first, searching `passages` (default: all)."""
    import bm25s

    pool = np.arange(len(corpus)) if passages is None else np.asarray(passages)
    retriever = bm25s.BM25()
    texts = [f"{corpus.titles[i]} {corpus.texts[i]}" for i in pool]
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    tokens = bm25s.tokenize(list(queries), stopwords="en", show_progress=False)
    ranked, _ = retriever.retrieve(tokens, k=min(depth, len(pool)), show_progress=False)
    return pool[np.asarray(ranked)]
