"""Within-class scatter in a few kilobytes: what the LDA head needs besides the class means.

The LDA head (edgecl.device.heads) scores with one covariance pooled over every class's deviations
from its mean. Like a mean and a count, a class's scatter adds up across devices only under one
backbone, so the release round carries it the same way: each device re-embeds its images under the
candidate and sends its classes' scatter; the host adds the pieces and judges with the head the
devices serve (docs/server.md, "The release round").

A D x D scatter is 1280^2 floats for EfficientNet-Lite0 (6.5 MB in fp32), more than the model's
delta. It travels as a rank-k factor F (float16, [D, k]: the top eigenvectors scaled by the root
of their eigenvalues) plus the trace of what the factor leaves out, spread evenly over the other
directions:

    S ~= F F^T + residual / (D - k) * (I - Q Q^T)      (Q: an orthonormal basis of F's columns)

which keeps the scatter's trace (the LDA's shrinkage target) exact. Measured on the demo's fleet
(benchmarks: docs/server.md, "The release round"): one device's classes at rank 16 and the pooled
scatter at rank 128 move the LDA head's held-out accuracy by 0.5 points or less against the exact
scatter. numpy only: host, device and server import this module.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as _st_load

from edgecl.errors import BundleError
from edgecl.formats.atomic import atomic_write_bytes
from edgecl.formats.canonical import canonical_safetensors, read_metadata

DEFAULT_SHRINKAGE = 0.3  # chosen on B1's validation split (grid 0.03 / 0.1 / 0.3), 64 and 96 px
RANK_DEVICE = 16        # a device's classes in a statistics delta: 1280 x 16 x 2 B = 40 kB for Lite0
RANK_BUNDLE = 128       # the pooled scatter a released bundle ships (every class of the fleet)
MAX_RANK = 256


def class_scatter(embeddings: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, int, int]:
    """(scatter [D, D] float64, images, classes): deviations of each class's rows from that class's
    mean, summed as outer products (what ``LdaHead.add`` accumulates)."""
    x = np.asarray(embeddings, np.float64)
    y = np.asarray(labels).reshape(-1)
    scatter = np.zeros((x.shape[1], x.shape[1]), np.float64)
    groups = 0
    for label in np.unique(y):
        rows = x[y == label]
        centred = rows - rows.mean(axis=0)
        scatter += centred.T @ centred
        groups += 1
    return scatter, int(len(x)), groups


def covariance(scatter: np.ndarray, count: int, groups: int, shrinkage: float = DEFAULT_SHRINKAGE) -> np.ndarray:
    """The LDA head's covariance: the pooled within-class scatter over its degrees of freedom, shrunk
    towards a scaled identity (S <- (1 - s) S + s * trace(S)/D * I). The one owner of that rule."""
    dim = scatter.shape[0]
    cov = np.asarray(scatter, np.float64) / max(count - groups, 1)
    scale = float(np.trace(cov)) / dim if count else 1.0
    return (1.0 - shrinkage) * cov + shrinkage * max(scale, 1e-12) * np.eye(dim)


@dataclass
class Scatter:
    """A low-rank within-class scatter of ``count`` images in ``groups`` classes."""
    factor: np.ndarray      # [D, k] float32 (stored as float16)
    residual: float         # trace of the scatter the factor leaves out (>= 0)
    count: int
    groups: int

    @property
    def dim(self) -> int:
        return int(self.factor.shape[0])

    @classmethod
    def from_dense(cls, scatter: np.ndarray, count: int, groups: int, rank: int) -> Scatter:
        s = np.asarray(scatter, np.float64)
        s = (s + s.T) / 2.0
        values, vectors = np.linalg.eigh(s)
        values, vectors = np.clip(values[::-1], 0.0, None), vectors[:, ::-1]
        k = int(min(rank, s.shape[0] - 1, MAX_RANK))
        factor = (vectors[:, :k] * np.sqrt(values[:k])).astype(np.float16).astype(np.float32)
        # What the float16 factor does not hold of the trace goes to the residual: the trace stays exact.
        residual = max(float(np.trace(s)) - float(np.sum(factor.astype(np.float64) ** 2)), 0.0)
        return cls(factor, residual, int(count), int(groups))

    @classmethod
    def of(cls, embeddings: np.ndarray, labels: np.ndarray, rank: int) -> Scatter:
        return cls.from_dense(*class_scatter(embeddings, labels), rank=rank)

    def dense(self) -> np.ndarray:
        f = self.factor.astype(np.float64)
        d, k = f.shape
        out = f @ f.T
        if self.residual > 0 and d > k:
            q = np.linalg.qr(f)[0] if k else np.zeros((d, 0))
            out += self.residual / (d - k) * (np.eye(d) - q @ q.T)
        return out


def pooled(parts: Sequence[Scatter | tuple[np.ndarray, int, int]]) -> tuple[np.ndarray, int, int]:
    """The sum of several scatters (low-rank or dense (scatter, count, groups)): scatter, images, classes."""
    if not parts:
        raise ValueError("nothing to pool")
    total: np.ndarray | None = None
    count = groups = 0
    for p in parts:
        dense, n, g = (p.dense(), p.count, p.groups) if isinstance(p, Scatter) else p
        total = dense.copy() if total is None else total + dense
        count, groups = count + n, groups + g
    assert total is not None
    return total, count, groups


def check(scatter: Scatter, dim: int, count: int, groups: int) -> str | None:
    """Why ``scatter`` cannot be the within-class scatter of ``count`` images in ``groups`` classes of
    embeddings of size ``dim`` (None: it can)."""
    f = scatter.factor
    if f.ndim != 2 or f.shape[0] != dim or not 0 <= f.shape[1] <= min(MAX_RANK, dim - 1):
        return f"its factor is {list(f.shape)}, not [{dim}, k <= {min(MAX_RANK, dim - 1)}]"
    if not np.all(np.isfinite(f)) or not np.isfinite(scatter.residual) or scatter.residual < 0:
        return "it holds NaN, infinite or negative values"
    if scatter.count != count or scatter.groups != groups:
        return (f"it counts {scatter.count} images in {scatter.groups} classes, the statistics "
                f"{count} in {groups}")
    return None


# -- a released bundle's file: the fleet's pooled scatter (manifest.FLEET_LDA) ----------------------
FILE_FORMAT = "edgecl-fleet-scatter"


def save_file(path: str | Path, scatter: Scatter, classes: list[str], calibration: dict[str, Any] | None = None
              ) -> None:
    """The pooled within-class scatter of ``classes`` under the bundle's backbone (temp + rename), with the
    LDA head's calibration record (unknown threshold, temperatures) fitted on held-out images, if any."""
    meta = {"format": FILE_FORMAT, "classes": json.dumps(list(classes)), "count": str(int(scatter.count)),
            "groups": str(int(scatter.groups)), "residual": repr(float(scatter.residual))}
    if calibration is not None:
        meta["calibration"] = json.dumps(calibration, sort_keys=True)
    atomic_write_bytes(path, canonical_safetensors({"factor": scatter.factor.astype(np.float16)}, meta))


def load_file(path: str | Path, dim: int) -> tuple[Scatter, list[str], dict[str, Any] | None]:
    """Read and check a bundle's scatter file (its sha256 was checked against the manifest already):
    the scatter, its classes, and its calibration record (None: none fitted)."""
    data = Path(path).read_bytes()
    try:
        meta = read_metadata(data)
        factor = _st_load(data)["factor"].astype(np.float32)
        classes = json.loads(meta["classes"])
        calibration = json.loads(meta["calibration"]) if "calibration" in meta else None
        scatter = Scatter(factor, float(meta["residual"]), int(meta["count"]), int(meta["groups"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise BundleError(f"{path} is not a scatter file ({exc})", "re-download the bundle version") from exc
    why = check(scatter, dim, scatter.count, scatter.groups) if meta.get("format") == FILE_FORMAT else "its format"
    if why is None and not (isinstance(classes, list) and scatter.count >= scatter.groups >= 1):
        why = "its counts"
    if why is None and calibration is not None and not isinstance(calibration, dict):
        why = "its calibration record"
    if why is not None:
        raise BundleError(f"{path} is not a usable scatter file: {why}", "re-download the bundle version")
    return scatter, classes, calibration
