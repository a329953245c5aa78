"""What token IG returns, and the tabular views of it: token rows, tokens merged into words, word tables, cloud
weights."""

from __future__ import annotations

import math
import string
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from bm25s.stopwords import STOPWORDS_EN_PLUS

from .quadrature import Quadrature

DELTA_TOLERANCE = 0.01  # of |s(x) - s(baseline)|
STOPWORDS = frozenset(STOPWORDS_EN_PLUS)


@dataclass(frozen=True)
class Token:
    text: str  # the tokenizer's token, e.g. "##ing"
    segment: int  # 0 = query or passage title, 1 = passage text, -1 = special token
    start: int  # character span in segments[segment]
    end: int
    word: int  # word number within its segment (sub-words share it), -1 for special tokens
    score: float

    @property
    def special(self) -> bool:
        return self.segment < 0


@dataclass(frozen=True)
class Word:
    text: str
    segment: int
    score: float
    tokens: int


@dataclass(frozen=True)
class TokenAttribution:
    """IG attributions of one input; `score` and `baseline_score` are s(x) and s(baseline); the rule used."""

    segments: tuple[str, ...]
    tokens: tuple[Token, ...]
    score: float
    baseline_score: float
    truncated: bool
    quadrature: Quadrature

    @property
    def n_steps(self) -> int:
        return self.quadrature.n_steps

    @property
    def total(self) -> float:
        return float(sum(t.score for t in self.tokens))

    @property
    def delta(self) -> float:
        return abs(self.total - (self.score - self.baseline_score))

    @property
    def relative_delta(self) -> float:
        gap = abs(self.score - self.baseline_score)
        return self.delta / gap if gap > 0 else (0.0 if self.delta == 0 else math.inf)

    @property
    def within_tolerance(self) -> bool:
        return self.relative_delta <= DELTA_TOLERANCE

    def words(self) -> list[Word]:
        """Sub-word tokens merged into words (the word's text is its span in the original input)."""
        groups: dict[tuple[int, int], list[Token]] = {}
        for token in self.tokens:
            if not token.special:
                groups.setdefault((token.segment, token.word), []).append(token)
        words = []
        for (segment, _), members in groups.items():
            start, end = min(t.start for t in members), max(t.end for t in members)
            words.append(
                Word(self.segments[segment][start:end], segment, float(sum(t.score for t in members)), len(members))
            )
        return words


def token_attribution(
    batch,
    row: int,
    segments: tuple[str, ...],
    scores: np.ndarray,
    score: float,
    baseline_score: float,
    quadrature: Quadrature,
) -> TokenAttribution:
    """Row `row` of a tokenized batch (fast tokenizer, offsets and special-tokens mask) with its per-token scores."""
    encoding = batch.encodings[row]
    special = batch["special_tokens_mask"][row].tolist()
    tokens = []
    for position, text in enumerate(encoding.tokens):
        if not encoding.attention_mask[position]:
            continue
        sequence, word = encoding.sequence_ids[position], encoding.word_ids[position]
        start, end = encoding.offsets[position]
        is_special = bool(special[position]) or sequence is None or word is None
        tokens.append(
            Token(
                text=text,
                segment=-1 if is_special else sequence,
                start=0 if is_special else start,
                end=0 if is_special else end,
                word=-1 if is_special else word,
                score=float(scores[row, position]),
            )
        )
    return TokenAttribution(
        segments,
        tuple(tokens),
        float(score),
        float(baseline_score),
        truncated=bool(encoding.overflowing),
        quadrature=quadrature,
    )


@dataclass(frozen=True)
class PairAttribution:
    query: TokenAttribution  # the passage embedding fixed
    passage: TokenAttribution  # the query embedding fixed


@dataclass(frozen=True)
class RankingAttribution:
    """Attributions for a query and its top-k passages (in rank order)."""

    passage_indices: tuple[int, ...]
    query_total: TokenAttribution  # target pooled(q) · Σ_i e_i, one IG run
    pairs: tuple[PairAttribution, ...]

    def pair_for(self, passage_index: int) -> PairAttribution | None:
        if passage_index in self.passage_indices:
            return self.pairs[self.passage_indices.index(passage_index)]
        return None

    def passage_rules(self) -> dict[Quadrature, int]:
        """Quadrature rule -> how many passages were attributed with it."""
        counts: dict[Quadrature, int] = {}
        for pair in self.pairs:
            counts[pair.passage.quadrature] = counts.get(pair.passage.quadrature, 0) + 1
        return counts


def token_rows(attribution: TokenAttribution, **labels) -> list[dict]:
    """One row per token of one input (special tokens included), after the `labels` columns."""
    return [
        dict(
            labels,
            position=n,
            token=t.text,
            segment=t.segment,
            surface="" if t.special else attribution.segments[t.segment][t.start : t.end],
            attribution=t.score,
            n_steps=attribution.n_steps,
            quadrature=attribution.quadrature.describe(),
        )
        for n, t in enumerate(attribution.tokens)
    ]


def is_stopword(word: str) -> bool:
    """Stop words and words made only of punctuation."""
    folded = word.casefold()
    return folded in STOPWORDS or all(ch in string.punctuation or ch.isspace() for ch in folded)


def word_sums(attributions: Iterable[TokenAttribution], drop_stopwords: bool = False) -> pd.DataFrame:
    """Word-level attribution summed over inputs (case-folded words), most positive first.

    Columns: word, total (signed sum), positive and negative (sums of the positive / negative occurrences),
    occurrences, inputs (how many inputs contain the word).
    """
    rows: dict[str, dict] = {}
    for number, attribution in enumerate(attributions):
        for word in attribution.words():
            key = word.text.casefold()
            if drop_stopwords and is_stopword(key):
                continue
            row = rows.setdefault(
                key, {"word": key, "total": 0.0, "positive": 0.0, "negative": 0.0, "occurrences": 0, "inputs": set()}
            )
            row["total"] += word.score
            row["positive" if word.score > 0 else "negative"] += word.score
            row["occurrences"] += 1
            row["inputs"].add(number)
    table = pd.DataFrame(
        [dict(row, inputs=len(row["inputs"])) for row in rows.values()],
        columns=["word", "total", "positive", "negative", "occurrences", "inputs"],
    )
    return table.sort_values("total", ascending=False, ignore_index=True)


def merge_word_sums(tables: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """`word_sums` tables of different inputs as one: the `word_sums` of all those inputs, most positive first."""
    frames = [table for table in tables if len(table)]
    if not frames:
        return word_sums([])
    merged = pd.concat(frames, ignore_index=True).groupby("word", as_index=False, sort=False).sum()
    return merged.sort_values("total", ascending=False, ignore_index=True)


def cloud_weights(table: pd.DataFrame, sign: Literal["positive", "negative"], limit: int = 150) -> dict[str, float]:
    """Word -> |total| for the words whose summed attribution has this sign (largest first)."""
    chosen = table[table["total"] > 0] if sign == "positive" else table[table["total"] < 0]
    chosen = chosen.reindex(chosen["total"].abs().sort_values(ascending=False).index).head(limit)
    return {word: float(abs(total)) for word, total in zip(chosen["word"], chosen["total"])}
