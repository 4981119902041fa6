"""Classifier heads on top of the backbone's embeddings (METHOD.md step 4), numpy only.

SimpleCIL's cosine prototypes (`edgecl.formats.prototypes`, the default) treat every embedding
dimension as independent and equally scaled. Two second-stage heads use the embeddings' correlations,
and both learn new classes without a gradient step, from statistics accumulated once per task:

- ``LdaHead`` (streaming linear discriminant analysis, Hayes & Kanan 2020): the class means (the
  prototypes) and one within-class covariance pooled over every task. Logits
  ``z . S^-1 mu_c - mu_c . S^-1 mu_c / 2`` with ``S`` shrunk towards a scaled identity. The covariance
  is of deviations from class means, so it does not change when the backbone shifts every
  embedding of a class by the same vector: old classes stay right with only their means moved
  (exemplar or semantic drift compensation), which is what makes it fit a moving backbone.
  Memory: D x D (Lite0: 1280^2 float64 = 13 MB).
- ``RanpacHead`` (RanPAC, McDonnell et al. 2023): a fixed random projection to M dims + ReLU, then
  ridge regression from the accumulated Gram matrix G = H^T H and Q = H^T Y. Memory: M x M; the
  projection is regenerated from its seed, never stored. Its statistics are of ReLU features, so a
  moving backbone cannot be compensated in them: they stay as computed when each task was seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load as _st_load

from edgecl.errors import DeviceError
from edgecl.formats.atomic import atomic_write_bytes
from edgecl.formats.canonical import canonical_safetensors, read_metadata

LDA_FORMAT = "edgecl-lda"
DEFAULT_SHRINKAGE = 0.3  # chosen on B1's validation split (grid 0.03 / 0.1 / 0.3), 64 and 96 px


def _check(embeddings: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(embeddings, np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or y.shape != (len(x),):
        raise ValueError(f"embeddings must be [N, D] and labels [N], got {x.shape} and {y.shape}")
    return x, y


@dataclass
class LdaHead:
    """Pooled within-class scatter; the means are passed in (they are the prototypes)."""

    dim: int
    shrinkage: float = DEFAULT_SHRINKAGE      # S <- (1 - s) S + s * trace(S)/D * I
    scatter: np.ndarray = field(default=None)  # type: ignore[assignment]  # sum of outer products [D, D]
    count: int = 0                            # samples in the scatter
    groups: int = 0                           # (task, class) groups the deviations were taken from

    def __post_init__(self) -> None:
        if not 0.0 <= self.shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {self.shrinkage}")
        if self.scatter is None:
            self.scatter = np.zeros((self.dim, self.dim), np.float64)

    def add(self, embeddings: np.ndarray, labels: np.ndarray) -> None:
        """Accumulate deviations from each class's mean in this batch of one task."""
        x, y = _check(embeddings, labels)
        for label in np.unique(y):
            rows = x[y == label]
            centred = rows - rows.mean(axis=0)
            self.scatter += centred.T @ centred
            self.count += len(rows)
            self.groups += 1

    def covariance(self) -> np.ndarray:
        dof = max(self.count - self.groups, 1)
        cov = self.scatter / dof
        scale = float(np.trace(cov)) / self.dim if self.count else 1.0
        return (1.0 - self.shrinkage) * cov + self.shrinkage * max(scale, 1e-12) * np.eye(self.dim)

    def logits(self, embeddings: np.ndarray, means: np.ndarray) -> np.ndarray:
        """[N, C] linear discriminant scores against class means [C, D]."""
        means = np.atleast_2d(np.asarray(means, np.float64))
        weights = np.linalg.solve(self.covariance(), means.T)  # [D, C]
        bias = -0.5 * np.einsum("cd,dc->c", means, weights)
        return np.asarray(embeddings, np.float64) @ weights + bias

    # -- the device state's file (state/gen-N/lda.safetensors) -----------------------------------
    def to_bytes(self) -> bytes:
        return canonical_safetensors({"scatter": np.ascontiguousarray(self.scatter, np.float64)},
                                     metadata={"format": LDA_FORMAT, "format_version": "1",
                                               "count": str(self.count), "groups": str(self.groups)})

    @classmethod
    def from_bytes(cls, data: bytes, shrinkage: float = DEFAULT_SHRINKAGE) -> LdaHead:
        try:
            meta = read_metadata(data)
            if meta.get("format") != LDA_FORMAT:
                raise ValueError("not an edgecl LDA statistics file")
            scatter = _st_load(data)["scatter"].astype(np.float64)
            if scatter.ndim != 2 or scatter.shape[0] != scatter.shape[1]:
                raise ValueError(f"scatter has shape {scatter.shape}")
            return cls(scatter.shape[0], shrinkage, scatter, int(meta["count"]), int(meta["groups"]))
        except Exception as exc:
            raise DeviceError(f"the LDA head's statistics are damaged ({exc})",
                              "run `edgecl rollback`, or use --head ncm") from exc

    def save_file(self, path: Path) -> None:
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load_file(cls, path: Path, shrinkage: float = DEFAULT_SHRINKAGE) -> LdaHead:
        return cls.from_bytes(Path(path).read_bytes(), shrinkage)


@dataclass
class RanpacHead:
    """Random projection + ReLU, then ridge regression on accumulated G and Q."""

    dim: int
    projection_dim: int = 2000
    ridge: float = 1e4
    seed: int = 0
    gram: np.ndarray = field(default=None)  # type: ignore[assignment]  # [M, M]
    targets: dict[int, np.ndarray] = field(default_factory=dict)  # label -> Q column [M]

    def __post_init__(self) -> None:
        if self.gram is None:
            self.gram = np.zeros((self.projection_dim, self.projection_dim), np.float64)
        self._projection = np.random.default_rng(self.seed).standard_normal((self.dim, self.projection_dim))

    def features(self, embeddings: np.ndarray) -> np.ndarray:
        return np.maximum(np.asarray(embeddings, np.float64) @ self._projection, 0.0)

    def add(self, embeddings: np.ndarray, labels: np.ndarray) -> None:
        x, y = _check(embeddings, labels)
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
