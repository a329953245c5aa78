"""Layer similarity of A and B: linear CKA (Kornblith et al. 2019) per layer, and a 2-D PCA of the embeddings.

CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on column-centred X (n x d_A) and Y (n x d_B), the two
models' layer-l features of the same n inputs: 1 for identical features, invariant to orthogonal rotation and
isotropic scaling, defined for different widths. Features are each layer's hidden states pooled as the tower
pools (layer 0 = the embeddings): queries through the query tower, their gold passages (title, text) through
the context tower. Layer l of A is compared with layer l of B for every l both models have. With CLS pooling,
layer 0 is the same vector for every input ([CLS] + position 0), so its CKA is undefined (NaN).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .cache import Analysis, ResultCache
from .corpus import Corpus, LabelledQuery
from .errors import LensError
from .index import PASSAGE_MAX_LENGTH
from .pair import ModelPair
from .probing import layer_features

INPUTS = ("queries", "passages")
Progress = Callable[[int, int], None]


UNDEFINED = (
    "CKA is undefined at layer(s) {layers}: the model pools every input there to the same vector (under CLS "
    "pooling, layer 0 is [CLS] + position 0 for every input)."
)


class CkaError(LensError):
    """A sample CKA cannot be computed on; the message is meant for the user."""


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two feature matrices with the same rows (inputs); NaN when either is constant."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same inputs in both: {x.shape[0]} and {y.shape[0]} rows")
    x = x - x.mean(0)
    y = y - y.mean(0)
    # With fewer inputs than features the Gram matrices (n x n) are the cheaper route to the same norms.
    if x.shape[0] < min(x.shape[1], y.shape[1]):
        gram_x, gram_y = x @ x.T, y @ y.T
        cross, norm_x, norm_y = np.sum(gram_x * gram_y), np.linalg.norm(gram_x), np.linalg.norm(gram_y)
    else:
        cross, norm_x, norm_y = np.linalg.norm(y.T @ x) ** 2, np.linalg.norm(x.T @ x), np.linalg.norm(y.T @ y)
    denominator = norm_x * norm_y
    return float(cross / denominator) if denominator > 0 else float("nan")


def undefined_note(cka: dict[str, np.ndarray]) -> str | None:
    """The sentence that explains layers without a CKA value, or None when every layer has one."""
    layers = sorted({int(layer) for values in cka.values() for layer in np.flatnonzero(np.isnan(values))})
    return UNDEFINED.format(layers=", ".join(map(str, layers))) if layers else None


def pca_2d(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows x 2) coordinates on the first two principal components and the share of variance each explains."""
    centred = np.asarray(features, np.float64) - np.mean(features, 0)
    left, singular, _ = np.linalg.svd(centred, full_matrices=False)
    variance = singular**2
    return left[:, :2] * singular[:2], variance[:2] / max(variance.sum(), 1e-300)


@dataclass(frozen=True)
class LayerSimilarity:
    queries: list[str]
    passages: list[int]  # each query's gold passage
    cka: dict[str, np.ndarray]  # per input kind, (layers both models have + 1,); index 0 = embeddings
    projections: dict[str, np.ndarray]  # per model, (2 n, 2): the n queries' then their passages' final features
    explained: dict[str, np.ndarray]  # per model, variance share of the two components


LAYER_SIMILARITY = Analysis(
    "twin-cka", version=1, fields=("A", "B", "corpus", "queries", "passages", "max_length"), result_type=LayerSimilarity
)


def layer_similarity(
    pair: ModelPair,
    corpus: Corpus,
    queries: Sequence[LabelledQuery],
    cache: ResultCache | None = None,
    max_length: int = PASSAGE_MAX_LENGTH,
    progress: Progress | None = None,
) -> LayerSimilarity:
    """CKA per layer and the PCA projections for the queries and their gold passages (`source_index`)."""
    if len(queries) < 3:
        raise CkaError(f"CKA needs at least three queries with a gold passage, not {len(queries)}.")
    texts = [q.text for q in queries]
    passages = [q.source_index for q in queries]

    def compute() -> LayerSimilarity:
        features = {}
        total, done = 4, 0
        for name, encoder in pair.models.items():
            features[name, "queries"] = layer_features(encoder.query, texts)
            done += 1
            if progress:
                progress(done, total)
            features[name, "passages"] = layer_features(
                encoder.context, [corpus.titles[i] for i in passages], [corpus.texts[i] for i in passages], max_length
            )
            done += 1
            if progress:
                progress(done, total)
        layers = min(len(features["A", "queries"]), len(features["B", "queries"]))
        cka = {
            kind: np.array(
                [linear_cka(features["A", kind][layer], features["B", kind][layer]) for layer in range(layers)]
            )
            for kind in INPUTS
        }
        projections, explained = {}, {}
        for name in pair.models:
            final = np.concatenate([features[name, "queries"][-1], features[name, "passages"][-1]])
            projections[name], explained[name] = pca_2d(final)
        return LayerSimilarity(texts, passages, cka, projections, explained)

    return LAYER_SIMILARITY.get_or_compute(
        cache,
        compute,
        A=pair.a.fingerprint,
        B=pair.b.fingerprint,
        corpus=corpus.fingerprint,
        queries=texts,
        passages=passages,
        max_length=max_length,
    )
