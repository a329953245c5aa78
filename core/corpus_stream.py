"""Corpora too large for memory: DPR's psgs_w100.tsv, JSONL and Parquet, read in batches.

One scan (`scan_corpus`) reads the file once without keeping any text: it counts the usable rows, lists bad
lines with their line numbers (as `core.corpus.load_jsonl` does), computes the streaming fingerprint and
records a checkpoint (byte offset, or file row for Parquet) every `CHECKPOINT_ROWS` usable rows, so that a
shard of rows [start, stop) is read by seeking to the nearest checkpoint, not by re-reading the file from its
top. The scan is saved next to the shards and reused while the file's size and modification time match.
Saved with it is the row index (`ROW_INDEX`): every usable row's position and its id's hash, sorted, which
`core.passage_store` memory-maps to read any one passage or find a passage by id without loading the corpus.

Row numbers count usable rows only: bad rows are skipped, and the same rows are skipped whenever the file is read.
Unlike `load_jsonl`, a duplicate id is an error, not a skipped line: skipping it would mean keeping every id
in memory; the check keeps a 64-bit hash per row instead (168 MB at 21M rows).
"""

from __future__ import annotations

import array
import csv
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .corpus import Corpus, CorpusError

csv.field_size_limit(2**31 - 1)  # a passage is one field; the default limit (128 KiB) would fail on long ones
CHECKPOINT_ROWS = 10_000
MAX_WARNINGS = 100
SCAN_FILE = "corpus-scan.json"
ROW_POSITIONS, ID_LOOKUP = "row-positions.npy", "id-lookup.npy"
FORMATS = ("tsv", "jsonl", "parquet")
TSV_COLUMNS = ("id", "text", "title")

Row = tuple[str, str, str]  # id, title, text


def corpus_format(path: str | Path) -> str:
    suffixes = "".join(Path(path).suffixes).lower()
    for fmt, endings in (("tsv", (".tsv", ".tsv.txt")), ("jsonl", (".jsonl", ".json")), ("parquet", (".parquet",))):
        if suffixes.endswith(endings):
            return fmt
    raise CorpusError(f"Cannot tell the format of {Path(path).name}: use .tsv (DPR psgs_w100), .jsonl or .parquet.")


class RowFingerprint:
    """sha256 over the usable rows in order (id, title, text); the same for a file and for its rows in memory."""

    def __init__(self):
        self._digest = hashlib.sha256(b"dpr-lens-rows-v1")

    def update(self, row: Row) -> None:
        for part in row:
            self._digest.update(part.encode("utf-8"))
            self._digest.update(b"\x00")

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def rows_fingerprint(rows: Iterable[Row]) -> str:
    fingerprint = RowFingerprint()
    for row in rows:
        fingerprint.update(row)
    return fingerprint.hexdigest()


def corpus_rows_fingerprint(corpus: Corpus) -> str:
    """The streaming fingerprint of a corpus, to find the sharded index built from its file."""
    if corpus.store is not None:
        return corpus.store.fingerprint
    return rows_fingerprint(zip(corpus.ids, corpus.titles, corpus.texts))


# --------------------------------------------------------------------------- parsing one record


def _parse_tsv(line: str, line_number: int) -> Row | str:
    """A row, or the reason it is bad. DPR quotes text fields csv-style ("" inside quotes); a quoted field
    cannot span lines here (each line is read on its own), so an unclosed quote makes the line bad."""
    try:
        fields = next(csv.reader([line], delimiter="\t", strict=True), [])
    except csv.Error as error:
        return f"malformed quoting ({error})"
    if len(fields) != 3:
        return f"{len(fields)} tab-separated fields, expected 3 (id, text, title)"
    passage_id, text, title = fields
    if not text.strip():
        return "empty text"
    return passage_id, title, text


def _parse_json(line: str, line_number: int) -> Row | str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return f"not valid JSON ({error.msg})"
    if not isinstance(record, dict):
        return "not a JSON object"
    if not isinstance(record.get("text"), str) or not record["text"].strip():
        return "missing a non-empty 'text'"
    return str(record.get("id", line_number)), str(record.get("title") or ""), record["text"]


def _parse_record(record: dict, row_number: int) -> Row | str:
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        return "missing a non-empty 'text'"
    passage_id = record.get("id")
    return str(row_number if passage_id is None else passage_id), str(record.get("title") or ""), text


# --------------------------------------------------------------------------- raw readers


def _text_lines(path: Path, offset: int, line_number: int) -> Iterator[tuple[int, int, str]]:
    """(byte offset, 1-based line number, decoded line) from `offset`, which starts line `line_number`."""
    with path.open("rb") as handle:
        handle.seek(offset)
        for raw in handle:
            yield offset, line_number, raw.decode("utf-8", errors="replace").rstrip("\r\n")
            offset += len(raw)
            line_number += 1


def _raw_records(path: Path, fmt: str, position: int, line_number: int) -> Iterator[tuple[int, int, Row | str]]:
    """(position, line or row number, parsed row or problem) from a checkpoint; blank lines are left out."""
    if fmt == "parquet":
        yield from _parquet_records(path, position)
        return
    parse = _parse_tsv if fmt == "tsv" else _parse_json
    lines = _text_lines(path, position, line_number)
    if fmt == "tsv" and position == 0:
        _check_tsv_header(next(lines, (0, 1, ""))[2], path)
    for offset, number, line in lines:
        if line.strip():
            yield offset, number, parse(line, number)


def _check_tsv_header(header: str, path: Path) -> None:
    if tuple(column.strip().lower() for column in header.split("\t")) != TSV_COLUMNS:
        raise CorpusError(
            f"{path.name}: the first line must be the header 'id<TAB>text<TAB>title' "
            f"(DPR's psgs_w100.tsv), not {header[:80]!r}."
        )


def _open_parquet(path: Path):
    """The Parquet file and the columns read from it; a file pyarrow cannot read is a CorpusError."""
    import pyarrow
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise CorpusError(f"{path.name} is not a readable Parquet file ({error}).") from None
    names = set(parquet.schema_arrow.names)
    if "text" not in names:
        raise CorpusError(f"{path.name} has no 'text' column (columns: {', '.join(sorted(names))}).")
    return parquet, [name for name in ("id", "title", "text") if name in names]


class ParquetRows:
    """File rows of one Parquet file by number: the row group is found by bisection and the last few decoded
    groups are kept, so reading passages near each other decodes each group once. Not thread-safe: callers lock."""

    KEPT_GROUPS = 2

    def __init__(self, path: Path):
        self.path = Path(path)
        self.parquet, self.columns = _open_parquet(self.path)
        sizes = [self.parquet.metadata.row_group(g).num_rows for g in range(self.parquet.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self._groups: dict[int, Any] = {}

    def record(self, file_row: int) -> Row | str:
        group = int(np.searchsorted(self.starts, file_row, side="right")) - 1
        if not 0 <= group < len(self.starts) - 1:
            return f"row {file_row + 1} is gone"
        if group not in self._groups:
            if len(self._groups) >= self.KEPT_GROUPS:
                self._groups.pop(next(iter(self._groups)))
            self._groups[group] = self.parquet.read_row_group(group, columns=self.columns)
        table = self._groups[group]
        return _parse_record(table.slice(file_row - int(self.starts[group]), 1).to_pylist()[0], file_row + 1)


def _parquet_records(path: Path, first_row: int) -> Iterator[tuple[int, int, Row | str]]:
    parquet, columns = _open_parquet(path)
    group_start = 0
    for group in range(parquet.num_row_groups):
        group_rows = parquet.metadata.row_group(group).num_rows
        if group_start + group_rows <= first_row:
            group_start += group_rows
            continue
        row = group_start
        for batch in parquet.iter_batches(row_groups=[group], columns=columns, batch_size=4096):
            for record in batch.to_pylist():
                if row >= first_row:
                    yield row, row + 1, _parse_record(record, row + 1)
                row += 1
        group_start += group_rows


# --------------------------------------------------------------------------- the scan


@dataclass(frozen=True)
class CorpusScan:
    """What one pass over a corpus file found; `checkpoints[j]` is where usable row j * CHECKPOINT_ROWS starts."""

    path: str
    format: str
    size: int
    mtime_ns: int
    rows: int
    fingerprint: str
    checkpoints: tuple[tuple[int, int], ...]  # (byte offset or file row, line number)
    warnings: tuple[str, ...]
    bad_rows: int

    def matches(self, path: Path) -> bool:
        stat = path.stat()
        return (self.path, self.size, self.mtime_ns) == (str(path.resolve()), stat.st_size, stat.st_mtime_ns)

    def save(self, path: Path) -> None:
        replace_atomically(path, lambda temporary: temporary.write_text(json.dumps(asdict(self)) + "\n"))

    @classmethod
    def load(cls, path: Path) -> CorpusScan | None:
        try:
            data = json.loads(path.read_text())
            data["checkpoints"] = tuple(tuple(point) for point in data["checkpoints"])
            data["warnings"] = tuple(data["warnings"])
            return cls(**data)
        except (OSError, ValueError, TypeError, KeyError):
            return None


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(temporary)` to a new, uniquely named file beside `path`, then rename it over `path`: a reader sees
    the old file or the whole new one, and concurrent writers (processes or threads) never share a temporary."""
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _save_array(path: Path, array_: np.ndarray) -> None:
    with path.open("wb") as handle:  # np.save(path) would append .npy to the temporary's name
        np.save(handle, array_)


def id_hash(passage_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(passage_id.encode("utf-8"), digest_size=8).digest(), "little")


def scan_corpus(path: str | Path, progress=None, row_index: Path | None = None) -> CorpusScan:
    """One pass: usable rows, bad lines, fingerprint, checkpoints; raises CorpusError on duplicate ids or no rows.

    With `row_index` (a directory), also writes the row index there: `ROW_POSITIONS`, the byte offset (file
    row for Parquet) and line number of every usable row, and `ID_LOOKUP`, (id hash, row) pairs sorted by hash.
    """
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"Corpus file {path} does not exist.")
    fmt = corpus_format(path)
    stat = path.stat()
    fingerprint = RowFingerprint()
    checkpoints: list[tuple[int, int]] = []
    warnings: list[str] = []
    bad_rows = 0
    hashes, line_numbers, positions = array.array("Q"), array.array("Q"), array.array("Q")
    for position, number, parsed in _raw_records(path, fmt, 0, 1):
        if isinstance(parsed, str):
            bad_rows += 1
            if len(warnings) < MAX_WARNINGS:
                warnings.append(f"{'row' if fmt == 'parquet' else 'line'} {number}: {parsed}; skipped")
            continue
        if len(hashes) % CHECKPOINT_ROWS == 0:
            checkpoints.append((position, number))
        hashes.append(id_hash(parsed[0]))
        line_numbers.append(number)
        positions.append(position)
        fingerprint.update(parsed)
        if progress and len(hashes) % CHECKPOINT_ROWS == 0:
            progress(len(hashes))
    if not hashes:
        detail = f" ({warnings[0]})" if warnings else ""
        raise CorpusError(f"Corpus file {path.name} has no usable passage{detail}.")
    hash_array = np.frombuffer(hashes, dtype=np.uint64)
    order = _check_unique(hash_array, np.frombuffer(line_numbers, dtype=np.uint64), path)
    if row_index is not None:
        try:
            row_index.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CorpusError(f"Cannot write the corpus's row index to {row_index}: {error.strerror}.") from None
        line_array = np.frombuffer(line_numbers, dtype=np.uint64)
        row_positions = np.stack([np.frombuffer(positions, dtype=np.uint64), line_array], 1)
        id_lookup = np.stack([hash_array[order], order.astype(np.uint64)], axis=1)
        replace_atomically(row_index / ROW_POSITIONS, lambda temporary: _save_array(temporary, row_positions))
        replace_atomically(row_index / ID_LOOKUP, lambda temporary: _save_array(temporary, id_lookup))
    if bad_rows > len(warnings):
        warnings.append(f"... and {bad_rows - len(warnings)} more bad rows")
    return CorpusScan(
        str(path.resolve()),
        fmt,
        stat.st_size,
        stat.st_mtime_ns,
        len(hashes),
        fingerprint.hexdigest(),
        tuple(checkpoints),
        tuple(warnings),
        bad_rows,
    )


def _check_unique(hashes: np.ndarray, line_numbers: np.ndarray, path: Path) -> np.ndarray:
    """The rows in id-hash order, after checking that no two rows share an id hash."""
    order = np.argsort(hashes, kind="stable")
    repeated = np.flatnonzero(hashes[order][1:] == hashes[order][:-1])
    if len(repeated):
        lines = sorted(int(line_numbers[order[i + 1]]) for i in repeated[:5])
        raise CorpusError(
            f"{path.name}: {len(repeated)} rows repeat an earlier id (e.g. lines "
            f"{', '.join(map(str, lines))}); a streamed corpus needs unique ids."
        )
    return order


def load_scan(path: str | Path, directory: Path | None = None, progress=None) -> CorpusScan:
    """The saved scan of this file in `directory` if it still matches the file, else a fresh scan.

    A fresh scan is saved in `directory` with its row index; the scan file is written last, so a scan whose
    row index is incomplete is never found."""
    path = Path(path)
    saved = directory / SCAN_FILE if directory is not None else None
    has_row_index = directory is not None and all((directory / name).is_file() for name in (ROW_POSITIONS, ID_LOOKUP))
    if saved is not None and saved.is_file() and has_row_index:
        scan = CorpusScan.load(saved)
        if scan is not None and path.is_file() and scan.matches(path):
            return scan
    scan = scan_corpus(path, progress, row_index=directory)
    if saved is not None:
        scan.save(saved)
    return scan


def write_tsv(path: Path, corpus: Corpus) -> None:
    """A corpus in DPR's psgs_w100.tsv layout: a header, then id, text (csv-quoted, newlines as spaces), title."""
    with Path(path).open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(TSV_COLUMNS)
        for passage_id, title, text in zip(corpus.ids, corpus.titles, corpus.texts):
            writer.writerow([passage_id, text.replace("\n", " "), title])


def read_row_at(scan: CorpusScan, position: int, line_number: int, parquet: ParquetRows | None = None) -> Row:
    """The usable row that starts at `position` (a byte offset, or the file row for Parquet) of the scanned file;
    `line_number` is its line (a JSONL record without an id is named by it). For Parquet, pass a ParquetRows
    of the file to keep its decoded row groups between calls."""
    name = Path(scan.path).name
    if scan.format == "parquet":
        parsed = (parquet or ParquetRows(Path(scan.path))).record(position)
    else:
        with open(scan.path, "rb") as handle:
            handle.seek(position)
            line = handle.readline().decode("utf-8", errors="replace").rstrip("\r\n")
        parsed = (_parse_tsv if scan.format == "tsv" else _parse_json)(line, line_number)
    if isinstance(parsed, str):
        raise CorpusError(f"{name} changed since it was scanned ({parsed} at {position}); scan it again.")
    return parsed


def read_rows(scan: CorpusScan, start: int, stop: int) -> Iterator[Row]:
    """Usable rows [start, stop) of the scanned file, from the checkpoint at or before `start`."""
    stop = min(stop, scan.rows)
    if start >= stop:
        return
    checkpoint = start // CHECKPOINT_ROWS
    row = checkpoint * CHECKPOINT_ROWS
    position, line_number = scan.checkpoints[checkpoint]
    for _, _, parsed in _raw_records(Path(scan.path), scan.format, position, line_number):
        if isinstance(parsed, str):
            continue
        if row >= start:
            yield parsed
        row += 1
        if row >= stop:
            return


def row_batches(scan: CorpusScan, start: int, stop: int, batch_size: int) -> Iterator[list[Row]]:
    """Rows [start, stop) in lists of at most `batch_size`: the whole text is never in memory."""
    batch: list[Row] = []
    for row in read_rows(scan, start, stop):
        batch.append(row)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
