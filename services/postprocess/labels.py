"""Zero-shot labelling: cosine similarity against label-description embeddings."""

from __future__ import annotations

import numpy as np

from services.common.errors import InvalidArgument


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    normalised: np.ndarray = v / np.maximum(norms, 1e-12)
    return normalised


class LabelIndex:
    def __init__(self, names: list[str], embeddings: np.ndarray) -> None:
        if len(names) != len(embeddings):
            raise ValueError("one embedding per label")
        self.names = names
        self.matrix = l2_normalise(embeddings)

    def scores(self, embedding: np.ndarray) -> dict[str, float]:
        """Every label's cosine similarity with a (normalised) embedding."""
        self._check(embedding)
        return {name: float(s) for name, s in zip(self.names, self.matrix @ embedding, strict=True)}

    def _check(self, embedding: np.ndarray) -> None:
        if embedding.shape != (self.matrix.shape[1],):
            raise InvalidArgument(f"embedding of shape {list(embedding.shape)}, expected [{self.matrix.shape[1]}]")

    def top(self, embedding: np.ndarray, k: int) -> list[tuple[str, float]]:
        """The ``k`` best labels for a (normalised) embedding, best first."""
        self._check(embedding)
        scores = self.matrix @ embedding
        order = np.argsort(-scores, kind="stable")[: max(0, k)]
        return [(self.names[i], float(scores[i])) for i in order]
