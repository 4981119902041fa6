"""RanPAC's head (McDonnell et al. 2023), the third head family B1 / B6 score (the head rule,
docs/benchmarks.md#head-rule).

A fixed random projection of the embedding to M dims + ReLU, then ridge regression from the
accumulated Gram matrix G = H^T H and Q = H^T Y. Memory: M x M; the projection is regenerated from its
seed, never stored. Its statistics are of ReLU features, so a moving backbone cannot be compensated in
them: they stay as computed when each task was seen. That, and its M x M memory, is why the device
does not offer it (docs/device.md): it lives here, with the benchmarks that measure it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RanpacHead:
    """Random projection + ReLU, then ridge regression on accumulated G and Q."""

    dim: int
    projection_dim: int = 2000
    ridge: float = 1e4
    seed: int = 0
    gram: np.ndarray = field(default=None)  # type: ignore[assignment,arg-type]  # [M, M]
    targets: dict[int, np.ndarray] = field(default_factory=dict)  # label -> Q column [M]

    def __post_init__(self) -> None:
        if self.gram is None:
            self.gram = np.zeros((self.projection_dim, self.projection_dim), np.float64)
        self._projection = np.random.default_rng(self.seed).standard_normal((self.dim, self.projection_dim))

    def features(self, embeddings: np.ndarray) -> np.ndarray:
        return np.maximum(np.asarray(embeddings, np.float64) @ self._projection, 0.0)

    def add(self, embeddings: np.ndarray, labels: np.ndarray) -> None:
        x, y = np.asarray(embeddings, np.float64), np.asarray(labels)
        if x.ndim != 2 or y.shape != (len(x),):
            raise ValueError(f"embeddings must be [N, D] and labels [N], got {x.shape} and {y.shape}")
        h = self.features(x)
        self.gram += h.T @ h
        for label in np.unique(y):
            column = h[y == label].sum(axis=0)
            key = int(label)
            self.targets[key] = self.targets.get(key, 0.0) + column

    def logits(self, embeddings: np.ndarray, labels: list[int], ridge: float | None = None) -> np.ndarray:
        """[N, C] ridge-regression scores for ``labels`` (in that column order)."""
        q = np.stack([self.targets[int(c)] for c in labels], axis=1)
        lam = self.ridge if ridge is None else ridge
        w = np.linalg.solve(self.gram + lam * np.eye(self.projection_dim), q)
        return self.features(embeddings) @ w
