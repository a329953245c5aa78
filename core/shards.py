"""Sharded, resumable passage encoding: shard i holds the embeddings of a contiguous range of corpus rows.

A shard is three files written atomically (a temporary file in the same directory, then os.replace): the
embeddings (.npy), the passage ids (.ids.json) and, last, the metadata (.json: model and corpus fingerprints,
row range, shape, checksums). The metadata is the commit mark: a shard without it, or whose checksums or
fingerprints do not match, is missing and made again, so a run killed at any point resumes at the first
missing shard and ends with the same files. One process or many Ray workers (core.distributed) call the same
`encode_shard`, so both make the same files up to floating-point tolerance.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .corpus_stream import CorpusScan, Row, read_rows, replace_atomically
from .errors import LensError
from .index import PASSAGE_MAX_LENGTH
from .pair import Encoder, Tower
from .runtime import model_work

BATCH_SIZE = 32
MANIFEST = "shards.json"
ShardDone = Callable[["ShardRange", float], None]


class ShardError(LensError):
    """Shards that cannot be used; the message is meant for the user."""


@dataclass(frozen=True)
class ShardRange:
    number: int
    count: int
    start: int
    stop: int

    @property
    def stem(self) -> str:
        return f"shard-{self.number:05d}-of-{self.count:05d}"


def plan_shards(rows: int, count: int) -> list[ShardRange]:
    if not 1 <= count <= rows:
        raise ShardError(f"--shards must be between 1 and the number of passages ({rows}), not {count}.")
    bounds = np.linspace(0, rows, count + 1).round().astype(int)
    return [ShardRange(i, count, int(bounds[i]), int(bounds[i + 1])) for i in range(count)]


def shard_params(encoder: Encoder, scan: CorpusScan, max_length: int = PASSAGE_MAX_LENGTH) -> dict:
    """What the embeddings depend on; every shard's metadata must hold exactly these values."""
    return {
        "model": encoder.fingerprint,
        "corpus": scan.fingerprint,
        "rows": scan.rows,
        "pooling": encoder.context.pooling,
        "normalize": encoder.context.normalize,
        "max_length": max_length,
    }


def index_directory(root: Path, params: dict) -> Path:
    return Path(root) / f"{params['model'][:16]}-{params['corpus'][:16]}-{params['max_length']}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- encoding one shard


@model_work
def encode_rows(
    tower: Tower,
    rows: Sequence[Row],
    max_length: int = PASSAGE_MAX_LENGTH,
    batch_size: int = BATCH_SIZE,
    device: str = "cpu",
) -> np.ndarray:
    """(title, text) pairs as `Tower.encode` does it, on `device` (a Ray worker may have a GPU)."""
    titles, texts = [row[1] for row in rows], [row[2] for row in rows]
    out = np.zeros((len(rows), tower.dim), dtype=np.float32)
    with torch.inference_mode():
        for _, chosen, batch in tower.length_batches(titles, texts, batch_size, max_length):
            batch = {key: value.to(device) for key, value in batch.items()}
            out[chosen] = tower.forward(batch).float().cpu().numpy()
    return out


def write_shard(directory: Path, shard: ShardRange, params: dict, embeddings: np.ndarray, ids: list[str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    array_path, ids_path = directory / f"{shard.stem}.npy", directory / f"{shard.stem}.ids.json"
    replace_atomically(array_path, lambda path: _save_npy(path, embeddings))
    replace_atomically(ids_path, lambda path: path.write_text(json.dumps(ids)))
    meta = dict(
        params,
        shard=shard.number,
        shards=shard.count,
        start=shard.start,
        stop=shard.stop,
        shape=list(embeddings.shape),
        sha256=file_sha256(array_path),
        ids_sha256=file_sha256(ids_path),
    )
    replace_atomically(directory / f"{shard.stem}.json", lambda path: path.write_text(json.dumps(meta, indent=1)))


def _save_npy(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as handle:  # np.save(path) would append .npy to the temporary name
        np.save(handle, np.ascontiguousarray(array, dtype=np.float32))


def shard_is_complete(directory: Path, shard: ShardRange, params: dict, verify: bool = True) -> bool:
    """Metadata present and matching these params and row range; with verify, both files' checksums too."""
    try:
        meta = json.loads((directory / f"{shard.stem}.json").read_text())
    except (OSError, ValueError):
        return False
    expected = dict(params, shard=shard.number, shards=shard.count, start=shard.start, stop=shard.stop)
    if any(meta.get(key) != value for key, value in expected.items()):
        return False
    if not verify:
        return True
    array_path, ids_path = directory / f"{shard.stem}.npy", directory / f"{shard.stem}.ids.json"
    return (
        array_path.is_file()
        and ids_path.is_file()
        and file_sha256(array_path) == meta.get("sha256")
        and file_sha256(ids_path) == meta.get("ids_sha256")
    )


def encode_shard(
    tower: Tower,
    scan: CorpusScan,
    directory: Path,
    shard: ShardRange,
    params: dict,
    batch_size: int = BATCH_SIZE,
    device: str = "cpu",
) -> float:
    """Reads, encodes and writes one shard; returns the seconds it took."""
    started = time.perf_counter()
    rows = list(read_rows(scan, shard.start, shard.stop))
    if len(rows) != shard.stop - shard.start:
        raise ShardError(
            f"{Path(scan.path).name} changed while it was being encoded (shard {shard.number} has "
            f"{len(rows)} rows, not {shard.stop - shard.start}); delete the scan and start again."
        )
    embeddings = encode_rows(tower, rows, params["max_length"], batch_size, device)
    write_shard(directory, shard, params, embeddings, [row[0] for row in rows])
    return time.perf_counter() - started


def missing_shards(directory: Path, shards: Sequence[ShardRange], params: dict) -> list[ShardRange]:
    return [shard for shard in shards if not shard_is_complete(directory, shard, params)]


def build_shards(
    encoder: Encoder,
    scan: CorpusScan,
    directory: Path,
    count: int,
    max_length: int = PASSAGE_MAX_LENGTH,
    batch_size: int = BATCH_SIZE,
    on_shard: ShardDone | None = None,
) -> list[ShardRange]:
    """Every shard in this process, skipping the complete ones; `on_shard` after each one written."""
    params = shard_params(encoder, scan, max_length)
    shards = plan_shards(scan.rows, count)
    for shard in missing_shards(directory, shards, params):
        seconds = encode_shard(encoder.context, scan, directory, shard, params, batch_size)
        if on_shard:
            on_shard(shard, seconds)
    return shards


def finish_shards(directory: Path, shards: Sequence[ShardRange], params: dict) -> None:
    """Records the complete set (the commit mark of the whole build) after checking every shard."""
    missing = missing_shards(directory, shards, params)
    if missing:
        raise ShardError(f"{len(missing)} shards are missing or damaged (first: {missing[0].stem}).")
    manifest = {"params": params, "shards": len(shards)}
    replace_atomically(directory / MANIFEST, lambda path: path.write_text(json.dumps(manifest, indent=1)))


# --------------------------------------------------------------------------- reading shards back


class ShardedEmbeddings:
    """The shards' embeddings as one read-only (rows, dim) array, memory-mapped: rows are read on demand."""

    def __init__(self, arrays: Sequence[np.ndarray]):
        self.arrays = list(arrays)
        self.offsets = np.cumsum([0] + [len(array) for array in self.arrays])
        self.dtype = np.dtype(np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.offsets[-1]), int(self.arrays[0].shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, row) -> np.ndarray:
        if isinstance(row, (int, np.integer)):
            row = int(row) + len(self) if row < 0 else int(row)
            if not 0 <= row < len(self):
                raise IndexError(f"passage {row} is outside 0..{len(self) - 1}")
            shard = bisect.bisect_right(self.offsets, row) - 1
            return np.asarray(self.arrays[shard][row - self.offsets[shard]])
        return self.rows(np.asarray(row))

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """Embeddings of any array of row numbers, shaped indices.shape + (dim,)."""
        flat = indices.reshape(-1).astype(np.int64)
        out = np.empty((len(flat), self.shape[1]), dtype=np.float32)
        shards = np.searchsorted(self.offsets, flat, side="right") - 1
        for shard in np.unique(shards):
            chosen = np.flatnonzero(shards == shard)
            local = flat[chosen] - self.offsets[shard]
            order = np.argsort(local)  # ascending reads from the memory map
            out[chosen[order]] = self.arrays[shard][local[order]]
        return out.reshape(*indices.shape, self.shape[1])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.concatenate(self.arrays).astype(dtype or np.float32, copy=False)


@dataclass
class ShardSet:
    directory: Path
    params: dict
    shards: list[ShardRange]

    @classmethod
    def open(cls, directory: Path) -> ShardSet:
        """The shards `finish_shards` recorded (checked by metadata, not re-hashed: the build verified them)."""
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except (OSError, ValueError) as error:
            raise ShardError(
                f"{directory} holds no finished set of shards; run python -m core build-index --shards N (it resumes)."
            ) from error
        params, shards = manifest["params"], plan_shards(manifest["params"]["rows"], manifest["shards"])
        if not all(shard_is_complete(directory, shard, params, verify=False) for shard in shards):
            raise ShardError(f"{directory}: some shards are missing; run build-index again (it resumes).")
        return cls(directory, params, shards)

    def embeddings(self) -> ShardedEmbeddings:
        return ShardedEmbeddings([np.load(self.directory / f"{s.stem}.npy", mmap_mode="r") for s in self.shards])

    def ids(self, shard: ShardRange) -> list[str]:
        return json.loads((self.directory / f"{shard.stem}.ids.json").read_text())
