"""A corpus that stays on disk: DPR's psgs_w100.tsv or Parquet (or a JSONL file), read one passage at a time.

At 21M passages the text is about 13 GB, so the app cannot hold it. The store keeps two memory-mapped
arrays made by the corpus scan (`core.corpus_stream`): the position of every usable row in the file, and
the rows sorted by the hash of their id. Reading passage i is one seek; finding a passage by id is a binary
search. `stored_corpus` wraps a store as a `Corpus`, so retrieval and every analysis use it unchanged: its
`ids`, `titles` and `texts` are sequences that read the file when indexed. Iterating one of them reads the
whole file, so code that only needs a few passages indexes them, and `Corpus.position` finds an id.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .corpus import Corpus, CorpusError
from .corpus_stream import (
    ID_LOOKUP,
    ROW_POSITIONS,
    SCAN_FILE,
    CorpusScan,
    ParquetRows,
    Row,
    corpus_format,
    id_hash,
    load_scan,
    read_row_at,
    read_rows,
)

ROW_CACHE = 4096
ID, TITLE, TEXT = 0, 1, 2


def is_stored_format(path: str | Path) -> bool:
    """TSV and Parquet corpora are read from disk; JSONL files (and any other ending) into memory, as always."""
    try:
        return corpus_format(path) != "jsonl"
    except CorpusError:
        return False


def store_directory(root: Path, path: str | Path) -> Path:
    """Where the scan and row index of the corpus file at `path` live under `root` (one directory per file)."""
    digest = hashlib.sha256(str(Path(path).resolve()).encode("utf-8")).hexdigest()[:16]
    return Path(root) / "corpora" / digest


class PassageStore:
    """Rows of one scanned corpus file, read on demand; recently read rows are kept (at most ROW_CACHE)."""

    def __init__(self, scan: CorpusScan, directory: Path):
        self.scan, self.directory = scan, Path(directory).resolve()
        try:
            self.positions = np.load(self.directory / ROW_POSITIONS, mmap_mode="r")
            self.id_lookup = np.load(self.directory / ID_LOOKUP, mmap_mode="r")
        except (OSError, ValueError) as error:
            raise CorpusError(f"The row index in {self.directory} cannot be read ({error}).") from None
        expected = (scan.rows, 2)
        if self.positions.shape != expected or self.id_lookup.shape != expected:
            raise CorpusError(f"The row index in {self.directory} does not match {Path(scan.path).name}.")
        self._recent: OrderedDict[int, Row] = OrderedDict()
        self._lock = threading.Lock()
        self._parquet: ParquetRows | None = None

    def __reduce__(self):
        return (PassageStore, (self.scan, self.directory))

    def __len__(self) -> int:
        return self.scan.rows

    @property
    def fingerprint(self) -> str:
        return self.scan.fingerprint

    def row(self, index: int) -> Row:
        if not 0 <= index < self.scan.rows:
            raise IndexError(f"passage {index} is outside 0..{self.scan.rows - 1}")
        self._check_unchanged()
        with self._lock:
            if index in self._recent:
                self._recent.move_to_end(index)
                return self._recent[index]
        position, line_number = self.positions[index]
        if self.scan.format == "parquet":
            with self._lock:  # its decoded row groups are shared
                self._parquet = self._parquet or ParquetRows(Path(self.scan.path))
                row = read_row_at(self.scan, int(position), int(line_number), self._parquet)
        else:
            row = read_row_at(self.scan, int(position), int(line_number))
        with self._lock:
            self._recent[index] = row
            if len(self._recent) > ROW_CACHE:
                self._recent.popitem(last=False)
        return row

    def _check_unchanged(self) -> None:
        try:
            stat = os.stat(self.scan.path)
        except OSError as error:
            raise CorpusError(f"Corpus file {self.scan.path} cannot be read: {error.strerror}.") from None
        if (stat.st_size, stat.st_mtime_ns) != (self.scan.size, self.scan.mtime_ns):
            raise CorpusError(
                f"{Path(self.scan.path).name} changed since it was scanned; load the corpus again to rescan it."
            )

    def position(self, passage_id: str) -> int | None:
        """The row holding this id, or None: a binary search over the sorted id hashes, then a check of the id."""
        target = np.uint64(id_hash(str(passage_id)))
        hashes = self.id_lookup[:, 0]
        found = int(np.searchsorted(hashes, target))
        if found == len(hashes) or hashes[found] != target:
            return None
        row = int(self.id_lookup[found, 1])
        return row if self.row(row)[ID] == str(passage_id) else None


class StoredColumn(Sequence[str]):
    """One field (id, title or text) of every passage in a store, read from the file when indexed."""

    def __init__(self, store: PassageStore, field: int):
        self.store, self.field = store, field

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.store.row(i)[self.field] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        return self.store.row(int(index))[self.field]

    def __iter__(self) -> Iterator[str]:
        for row in read_rows(self.store.scan, 0, len(self)):
            yield row[self.field]

    def __contains__(self, value) -> bool:
        if self.field == ID:
            return self.store.position(value) is not None
        return super().__contains__(value)

    def index(self, value, start: int = 0, stop: int | None = None) -> int:
        if self.field == ID and start == 0 and stop is None:
            found = self.store.position(value)
            if found is None:
                raise ValueError(f"{value!r} is not a passage id of {Path(self.store.scan.path).name}")
            return found
        return super().index(value, start, len(self) if stop is None else stop)


def open_store(path: str | Path, root: Path, progress=None) -> PassageStore:
    """The store of the corpus file at `path`, scanning it first (once per file version) under `root`; a saved
    row index that cannot be used is made again."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"Corpus file {path} does not exist.")
    directory = store_directory(root, path)
    try:
        return PassageStore(load_scan(path, directory, progress), directory)
    except CorpusError:
        if not (directory / SCAN_FILE).is_file():
            raise
        (directory / SCAN_FILE).unlink()
        return PassageStore(load_scan(path, directory, progress), directory)


def stored_corpus(store: PassageStore) -> Corpus:
    scan = store.scan
    return Corpus(
        name=Path(scan.path).name,
        ids=StoredColumn(store, ID),
        titles=StoredColumn(store, TITLE),
        texts=StoredColumn(store, TEXT),
        warnings=scan.warnings,
        store=store,
    )


def default_store_root() -> Path:
    """$DPR_LENS_INDEX_DIR when set (where build-index scans too), else the result cache's directory."""
    from .cache import default_cache_dir
    from .ivf import index_dir_from_env

    return index_dir_from_env() or default_cache_dir()


def open_stored_corpus(path: str | Path, root: Path | None = None, progress=None) -> Corpus:
    return stored_corpus(open_store(path, root or default_store_root(), progress))
