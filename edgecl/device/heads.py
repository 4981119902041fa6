"""Classifier heads on top of the backbone's embeddings (docs/method.md#step-4), numpy only.

SimpleCIL's cosine prototypes (`edgecl.formats.prototypes`, the default) treat every embedding
dimension as independent and equally scaled. The second-stage head here uses the embeddings'
correlations and, like them, learns new classes without a gradient step, from statistics accumulated
once per task (RanPAC, measured in B1 and not offered, lives with the benchmarks:
benchmarks/b1_b6_accuracy/ranpac.py):

- ``LdaHead`` (streaming linear discriminant analysis, Hayes & Kanan 2020): the class means (the
  prototypes) and one within-class covariance pooled over every task. Logits
  ``z . S^-1 mu_c - mu_c . S^-1 mu_c / 2`` with ``S`` shrunk towards a scaled identity. The covariance
  is of deviations from class means, so it does not change when the backbone shifts every
  embedding of a class by the same vector: old classes stay right with only their means moved
  (exemplar or semantic drift compensation), which is what makes it fit a moving backbone.
  Memory: D x D (Lite0: 1280^2 float64 = 13 MB).
- ``edgecl.classstats.fit_linear_drift`` / ``LdaHead.move`` (Learnable Drift Compensation, Gomez-Villa et al., ECCV
  2024, in closed form): when the backbone reshapes the classes, not only shifts them, the pooled
  covariance goes stale. An affine map old space -> new space, fitted by ridge regression towards the
  identity on the images embedded before and after an adaptation (the task's images and the stored
  exemplars), carries the covariance **and the head's own class means** over. On B1 at lr 1e-2
  (torch, seeds 1993 / 7) LDA went from 79.8 / 78.2 to 83.7 / 82.7, through the edgecl path to
  83.4 / 83.2; moving the covariance alone, with the exemplar-shifted prototypes as means, gave only
  80.2 (seed 7): the means must move with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as _st_load

from edgecl.errors import DeviceError
from edgecl.formats import scatter as sc
from edgecl.formats.atomic import atomic_write_bytes
from edgecl.formats.canonical import canonical_safetensors, read_metadata
from edgecl.formats.scatter import DEFAULT_SHRINKAGE, class_scatter, covariance

LDA_FORMAT = "edgecl-lda"


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
    scatter: np.ndarray = field(default=None)  # type: ignore[assignment,arg-type]  # sum of outer products [D, D]
    count: int = 0                            # samples in the scatter
    groups: int = 0                           # (task, class) groups the deviations were taken from
    means: dict[str, np.ndarray] = field(default_factory=dict)  # the head's own class means (moved by drift)
    # Unknown threshold + temperatures fitted on held-out images against these statistics
    # (edgecl.device.unknown.calibrate); None once the statistics change (add, move), until recalibrated.
    calibration: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {self.shrinkage}")
        if self.scatter is None:
            self.scatter = np.zeros((self.dim, self.dim), np.float64)

    def add(self, embeddings: np.ndarray, labels: np.ndarray) -> None:
        """Accumulate deviations from each class's mean in this batch of one task."""
        scatter, count, groups = class_scatter(*_check(embeddings, labels))
        self.scatter += scatter
        self.count += count
        self.groups += groups
        self.calibration = None  # its threshold was fitted against the statistics before this task

    def covariance(self) -> np.ndarray:
        return covariance(self.scatter, self.count, self.groups, self.shrinkage)

    def move(self, drift: np.ndarray) -> None:
        """Carry the scatter and the means through an affine drift map W [(D + 1), D]: x -> [x, 1] @ W."""
        w = np.asarray(drift, np.float64)
        if w.shape != (self.dim + 1, self.dim):
            raise ValueError(f"drift map must be [{self.dim + 1}, {self.dim}], got {w.shape}")
        linear = w[: self.dim]
        self.scatter = linear.T @ self.scatter @ linear
        self.means = {name: np.append(mu, 1.0) @ w for name, mu in self.means.items()}
        self.calibration = None

    def means_for(self, classes: list[str], fallback: np.ndarray) -> np.ndarray:
        """[C, D] means in ``classes`` order; a class the head has no mean of takes its row of ``fallback``."""
        return np.stack([self.means.get(c, fallback[i]) for i, c in enumerate(classes)]).astype(np.float64)

    def logits(self, embeddings: np.ndarray, means: np.ndarray) -> np.ndarray:
        """[N, C] linear discriminant scores against class means [C, D]."""
        means = np.atleast_2d(np.asarray(means, np.float64))
        weights = np.linalg.solve(self.covariance(), means.T)  # [D, C]
        bias = -0.5 * np.einsum("cd,dc->c", means, weights)
        return np.asarray(embeddings, np.float64) @ weights + bias

    # -- the device state's file (state/gen-N/lda.safetensors) -----------------------------------
    def to_bytes(self) -> bytes:
        names = list(self.means)
        means = (np.stack([self.means[n] for n in names]) if names else np.zeros((0, self.dim))).astype(np.float64)
        metadata = {"format": LDA_FORMAT, "format_version": "1", "count": str(self.count),
                    "groups": str(self.groups), "classes": json.dumps(names)}
        if self.calibration is not None:  # absent, the bytes are those of a file from before calibration
            metadata["calibration"] = json.dumps(self.calibration, sort_keys=True)
        return canonical_safetensors({"scatter": np.ascontiguousarray(self.scatter, np.float64),
                                      "means": np.ascontiguousarray(means)}, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes, shrinkage: float = DEFAULT_SHRINKAGE) -> LdaHead:
        try:
            meta = read_metadata(data)
            if meta.get("format") != LDA_FORMAT:
                raise ValueError("not an edgecl LDA statistics file")
            tensors = _st_load(data)
            scatter = tensors["scatter"].astype(np.float64)
            if scatter.ndim != 2 or scatter.shape[0] != scatter.shape[1]:
                raise ValueError(f"scatter has shape {scatter.shape}")
            names = json.loads(meta.get("classes", "[]"))
            means = tensors.get("means", np.zeros((0, scatter.shape[0])))
            if means.shape != (len(names), scatter.shape[0]):
                raise ValueError(f"means {means.shape} do not fit {len(names)} classes of dimension {scatter.shape[0]}")
            calibration = None
            if "calibration" in meta:
                from edgecl.formats.calibration import check_record
                calibration = check_record(meta["calibration"], "its calibration record")
            return cls(scatter.shape[0], shrinkage, scatter, int(meta["count"]), int(meta["groups"]),
                       {n: means[i].astype(np.float64) for i, n in enumerate(names)}, calibration)
        except Exception as exc:
            raise DeviceError(f"the LDA head's statistics are damaged ({exc})",
                              "run `edgecl rollback`, or use --head ncm") from exc

    def save_file(self, path: Path) -> None:
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load_file(cls, path: Path, shrinkage: float = DEFAULT_SHRINKAGE) -> LdaHead:
        return cls.from_bytes(Path(path).read_bytes(), shrinkage)


def fleet_head(path: Path, dim: int, shrinkage: float = DEFAULT_SHRINKAGE) -> LdaHead:
    """The LDA statistics a released version ships (``fleet_scatter.safetensors``: the fleet's pooled
    within-class scatter under its backbone, the one its release check judged with), with no class
    means of its own (the state's prototypes are its means) and the calibration the release fitted on
    its held-out images (unknown threshold, temperatures), if any."""
    shipped, _, calibration = sc.load_file(path, dim)
    head = scatter_head(shipped, shrinkage)
    head.calibration = calibration
    return head


def scatter_head(scatter: sc.Scatter, shrinkage: float = DEFAULT_SHRINKAGE) -> LdaHead:
    """An LDA head of a low-rank scatter (no class means of its own, no calibration)."""
    return LdaHead(scatter.dim, shrinkage, scatter=scatter.dense(), count=scatter.count, groups=scatter.groups)
