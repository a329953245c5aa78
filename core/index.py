"""Dense passage embeddings and their FAISS inner-product index, cached and prebuilt for the offline pair."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from .cache import Analysis, ResultCache
from .corpus import Corpus
from .errors import LensError
from .pair import ASSETS, Encoder

log = logging.getLogger(__name__)
PASSAGE_MAX_LENGTH = 256
PREBUILT_DIR = ASSETS / "embeddings"
EMBEDDINGS = Analysis(
    "embeddings", version=1, fields=("model", "corpus", "pooling", "normalize", "max_length"), result_type=np.ndarray
)
Progress = Callable[[int, int], None]
# Above this many passages a corpus read from disk is encoded by `build-index --shards`, not inside the app
# (at 80 passages/s on 2 CPU cores, 200,000 passages take 40 minutes).
IN_PROCESS_ENCODE_LIMIT = 200_000


class PrebuiltIndexError(RuntimeError):
    pass


class IndexMissingError(LensError):
    """A large corpus read from disk that has no built index for this model."""


def embedding_params(encoder: Encoder, corpus: Corpus, max_length: int = PASSAGE_MAX_LENGTH) -> dict:
    return {
        "model": encoder.fingerprint,
        "corpus": corpus.fingerprint,
        "pooling": encoder.context.pooling,
        "normalize": encoder.context.normalize,
        "max_length": max_length,
    }


def encode_corpus(
    encoder: Encoder,
    corpus: Corpus,
    max_length: int = PASSAGE_MAX_LENGTH,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> np.ndarray:
    """Passages are encoded as (title, text) pairs, the DPR convention."""
    if corpus.store is not None:  # at most IN_PROCESS_ENCODE_LIMIT rows: read them once, in file order
        corpus = corpus.head(len(corpus))
    return encoder.encode_passages(
        corpus.titles, corpus.texts, max_length=max_length, batch_size=batch_size, progress=progress
    )


def _prebuilt_stem(params: dict) -> str:
    return f"{params['model'][:16]}-{params['corpus'][:16]}-{params['max_length']}"


def save_prebuilt(embeddings: np.ndarray, params: dict, directory: Path = PREBUILT_DIR) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    stem = _prebuilt_stem(params)
    array_path = directory / f"{stem}.npy"
    np.save(array_path, embeddings.astype(np.float32))
    meta = dict(params, shape=list(embeddings.shape), sha256=_file_sha256(array_path))
    (directory / f"{stem}.json").write_text(json.dumps(meta, indent=1) + "\n")
    return array_path


def load_prebuilt(params: dict, directory: Path = PREBUILT_DIR) -> np.ndarray | None:
    """Prebuilt embeddings if some match these fingerprints and are intact; None if there are none.

    Raises PrebuiltIndexError when a matching file exists but is damaged (the caller rebuilds).
    """
    stem = _prebuilt_stem(params)
    meta_path, array_path = directory / f"{stem}.json", directory / f"{stem}.npy"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise PrebuiltIndexError(f"prebuilt index metadata {meta_path.name} is unreadable") from error
    if any(meta.get(key) != value for key, value in params.items()):
        return None
    if not array_path.is_file() or _file_sha256(array_path) != meta.get("sha256"):
        raise PrebuiltIndexError(f"prebuilt embeddings {array_path.name} are damaged (checksum mismatch)")
    embeddings = np.load(array_path)
    if list(embeddings.shape) != meta.get("shape"):
        raise PrebuiltIndexError(f"prebuilt embeddings {array_path.name} have the wrong shape")
    return embeddings


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class DenseIndex:
    """Exact inner-product search over passage embeddings."""

    embeddings: np.ndarray
    params: dict
    source: str  # "prebuilt", "cache" or "built"

    def __post_init__(self):
        self.faiss_index = faiss.IndexFlatIP(self.embeddings.shape[1])
        self.faiss_index.add(np.ascontiguousarray(self.embeddings, dtype=np.float32))

    def __len__(self) -> int:
        return self.faiss_index.ntotal

    def search(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = max(1, min(k, len(self)))
        scores, indices = self.faiss_index.search(np.ascontiguousarray(query_vectors, dtype=np.float32), k)
        return scores, indices


def load_index(
    encoder: Encoder,
    corpus: Corpus,
    cache: ResultCache,
    max_length: int = PASSAGE_MAX_LENGTH,
    progress: Progress | None = None,
    prebuilt_dir: Path = PREBUILT_DIR,
) -> DenseIndex:
    """A build-index --shards index under $DPR_LENS_INDEX_DIR, else prebuilt embeddings when their fingerprints
    match, else the disk cache, else encode the corpus."""
    built_index = _built_index(encoder, corpus, max_length)
    if built_index is not None:
        return built_index
    params = embedding_params(encoder, corpus, max_length)
    try:
        prebuilt = load_prebuilt(params, prebuilt_dir)
    except PrebuiltIndexError as error:
        log.warning("%s; rebuilding from the model", error)
        prebuilt = None
    if prebuilt is not None:
        return DenseIndex(prebuilt, params, "prebuilt")
    if corpus.store is not None and len(corpus) > IN_PROCESS_ENCODE_LIMIT:
        raise IndexMissingError(
            f"{corpus.name} has {len(corpus):,} passages and no index built for this model under "
            "$DPR_LENS_INDEX_DIR. Build it there first: python -m core build-index --pair PAIR "
            f"--corpus {corpus.store.scan.path} --shards N [--ray], then start the app with DPR_LENS_INDEX_DIR set."
        )
    expected_shape = (len(corpus), encoder.context.dim)
    built = []

    def compute() -> np.ndarray:
        built.append(True)
        return encode_corpus(encoder, corpus, max_length, progress=progress)

    embeddings = EMBEDDINGS.get_or_compute(cache, compute, check=lambda value: value.shape == expected_shape, **params)
    return DenseIndex(embeddings, params, "built" if built else "cache")


def _built_index(encoder: Encoder, corpus: Corpus, max_length: int):
    """The sharded (flat or IVF) index `build-index --shards` made under $DPR_LENS_INDEX_DIR for this model and
    corpus, if that is set and has one; it searches like a DenseIndex."""
    from .ivf import index_dir_from_env, open_built_index  # core.ivf imports this module

    root = index_dir_from_env()
    return None if root is None else open_built_index(root, encoder.fingerprint, corpus, max_length)
