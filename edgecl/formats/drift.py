"""Semantic Drift Compensation for prototypes (Yu et al., CVPR 2020, eq. 7-8): the device moves old
classes with it (device/poststeps.py), `edgecl apply` moves a device's prototypes into the merged version.

When the backbone moves, the prototypes of classes whose images are gone go stale
(docs/benchmarks.md#b1-lesson-2). SDC estimates how an old prototype moved from how the current task's embeddings
moved: the drift of each current sample, delta_i = after_i - before_i, averaged with Gaussian
weights w_i = exp(-||before_i - p||^2 / (2 sigma^2)) centred on the old prototype p. Samples near
p in the old embedding space say most about how that region moved.

sigma: Yu et al. use a fixed 0.3 on unit-norm metric-learning embeddings. Our prototypes are means
of raw pooled features whose scale depends on the model, so the default is data-driven: the median
distance of the current samples to their own class mean in the old space (the within-class
spread). Weights are normalised with a log-sum-exp shift so a prototype far from every sample falls
back to its nearest samples' drift instead of 0/0.
"""

from __future__ import annotations

import numpy as np


def default_sigma(before: np.ndarray, labels: np.ndarray) -> float:
    """Median distance of each sample to its own class mean (old embedding space)."""
    before = np.asarray(before, np.float64)
    distances = []
    for label in np.unique(labels):
        rows = before[labels == label]
        distances.append(np.linalg.norm(rows - rows.mean(axis=0), axis=1))
    sigma = float(np.median(np.concatenate(distances))) if distances else 0.0
    return sigma if sigma > 0 else 1.0


def estimate_drift(before: np.ndarray, after: np.ndarray, prototypes: np.ndarray, sigma: float) -> np.ndarray:
    """Per-prototype shift [C, D]: Gaussian-weighted mean of (after - before) around each prototype.

    before, after: [N, D] embeddings of the same current-task images with the backbone before and
    after adaptation; prototypes: [C, D] old prototypes (old space); sigma > 0.
    """
    before = np.asarray(before, np.float64)
    after = np.asarray(after, np.float64)
    prototypes = np.atleast_2d(np.asarray(prototypes, np.float64))
    if before.shape != after.shape or before.ndim != 2:
        raise ValueError(f"before {before.shape} and after {after.shape} must both be [N, D]")
    if prototypes.shape[1] != before.shape[1]:
        raise ValueError(f"prototypes {prototypes.shape} and embeddings {before.shape} differ in D")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if prototypes.shape[0] == 0 or before.shape[0] == 0:
        return np.zeros(prototypes.shape, np.float32)
    drift = after - before                                                    # [N, D]
    sq_dist = ((prototypes[:, None, :] - before[None, :, :]) ** 2).sum(-1)  # [C, N]
    log_w = -sq_dist / (2.0 * sigma * sigma)
    log_w -= log_w.max(axis=1, keepdims=True)  # exact after normalisation, and never 0/0
    weights = np.exp(log_w)
    weights /= weights.sum(axis=1, keepdims=True)
    return (weights @ drift).astype(np.float32)


def compensate(prototypes: np.ndarray, before: np.ndarray, after: np.ndarray, sigma: float) -> np.ndarray:
    """The old prototypes moved by their estimated drift."""
    return (np.asarray(prototypes, np.float32) + estimate_drift(before, after, prototypes, sigma)).astype(np.float32)
