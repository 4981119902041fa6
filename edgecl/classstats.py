"""Class statistics across a backbone change: the one owner of every rule that merges, moves or carries them.

A class's statistics (its mean embedding and how many images it counts, and the LDA head's pooled
scatter) are comparable, and add up, only when they were computed under the same backbone
(docs/design-notes.md). When the backbone moves there are two ways to keep them valid:

- recompute them from the images (exact: ``class_sums`` + ``merge_by_counts``); only whoever holds
  the images can do it (the device, or the host for shared exemplars);
- move them by an estimate of how the class moved (approximate, measured in docs/benchmarks.md):
  ``shift_by_exemplars`` (the class's own stored exemplars, embedded before and after),
  ``compensate_drift`` (semantic drift compensation from other images, for a class without
  exemplars) and ``fit_linear_drift`` (an affine map that carries the LDA head's scatter and means).

Every caller (the device's post-steps, `edgecl upgrade`, `edgecl delta`, `edgecl apply`, the release
and the benchmark harness) uses these functions; none re-codes them. Numpy only: every side imports
this module, it imports no side.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DRIFT_RIDGE = 1.0  # fit_linear_drift's ridge, x N x the mean per-dimension variance (B1: 0.1 and 1 equal)


# -- exact: sums and counts ------------------------------------------------------------------------

def merge_by_counts(means: Sequence[np.ndarray] | np.ndarray, counts: Sequence[int] | np.ndarray,
                    shares: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """One class's means computed on disjoint image sets (under one backbone) -> the mean of all of
    them and the total count. Exact: equal to the mean over the union of the images. ``shares`` (the
    fleet merge's capped shares, summing to 1) weigh the means instead of their counts."""
    stacked = np.asarray(np.stack([np.asarray(m, np.float64) for m in means]), np.float64)
    n = np.asarray(counts, np.float64)
    if stacked.ndim != 2 or n.shape != (len(stacked),):
        raise ValueError(f"means must be [K, D] and counts [K], got {stacked.shape} and {n.shape}")
    total = int(n.sum())
    if shares is None:
        if total <= 0:
            raise ValueError("merging class means needs a positive total count")
        weights = n / n.sum()
    else:
        weights = np.asarray(shares, np.float64)
    return weights @ stacked, total


def class_sums(embeddings: np.ndarray, labels: np.ndarray, classes: Sequence[str]
               ) -> dict[str, tuple[np.ndarray, int]]:
    """Per class present in ``labels``: (mean embedding [D] float64, count)."""
    x = np.asarray(embeddings, np.float64)
    out: dict[str, tuple[np.ndarray, int]] = {}
    for i, name in enumerate(classes):
        rows = labels == i
        if rows.any():
            out[name] = (x[rows].mean(axis=0), int(rows.sum()))
    return out


def remove_from_mean(mean: np.ndarray, count: int, taken: np.ndarray) -> tuple[np.ndarray, int]:
    """A mean over ``count`` images with ``taken`` [k, D] (embeddings of images it counts) taken out:
    (the sum of the rest, how many are left). The sum, not the mean: the rest may be empty."""
    taken = np.asarray(taken, np.float64).reshape(-1, np.asarray(mean).shape[-1])
    k = min(len(taken), int(count))
    return np.asarray(mean, np.float64) * count - taken[:k].sum(axis=0), int(count) - k


# -- approximate: moving a class by how its images moved -------------------------------------------

def shift_by_exemplars(mean: np.ndarray, before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """A class mean moved by its own exemplars' drift: ``mean + mean(after) - mean(before)``.

    ``before``/``after`` [n, D]: the same exemplar images embedded under the backbone the mean was
    computed with and under the one it moves to. The prototype computed from all of a class's images
    stays that, only shifted (a mean over a few exemplars alone is noisier). Swap ``before`` and
    ``after`` to move a mean back (the delta's base-space estimate)."""
    return (np.asarray(mean, np.float64) + np.asarray(after, np.float64).mean(axis=0)
            - np.asarray(before, np.float64).mean(axis=0))


def default_sigma(before: np.ndarray, labels: np.ndarray) -> float:
    """Semantic drift compensation's kernel width: the median distance of each sample to its own
    class mean in the old space (the within-class spread). Yu et al. use a fixed 0.3 on unit-norm
    embeddings; ours are raw pooled features whose scale depends on the model."""
    before = np.asarray(before, np.float64)
    distances = []
    for label in np.unique(labels):
        rows = before[labels == label]
        distances.append(np.linalg.norm(rows - rows.mean(axis=0), axis=1))
    sigma = float(np.median(np.concatenate(distances))) if distances else 0.0
    return sigma if sigma > 0 else 1.0


def estimate_drift(before: np.ndarray, after: np.ndarray, means: np.ndarray, sigma: float) -> np.ndarray:
    """Per-class shift [C, D] (Semantic Drift Compensation, Yu et al., CVPR 2020, eq. 7-8): the
    Gaussian-weighted mean of (after - before) of the current images around each old mean. Samples
    near a mean in the old space say most about how that region moved. Weights are normalised with a
    log-sum-exp shift, so a mean far from every sample takes its nearest samples' drift, never 0/0."""
    before = np.asarray(before, np.float64)
    after = np.asarray(after, np.float64)
    means = np.atleast_2d(np.asarray(means, np.float64))
    if before.shape != after.shape or before.ndim != 2:
        raise ValueError(f"before {before.shape} and after {after.shape} must both be [N, D]")
    if means.shape[1] != before.shape[1]:
        raise ValueError(f"means {means.shape} and embeddings {before.shape} differ in D")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if means.shape[0] == 0 or before.shape[0] == 0:
        return np.zeros(means.shape, np.float32)
    drift = after - before                                                # [N, D]
    sq_dist = ((means[:, None, :] - before[None, :, :]) ** 2).sum(-1)     # [C, N]
    log_w = -sq_dist / (2.0 * sigma * sigma)
    log_w -= log_w.max(axis=1, keepdims=True)
    weights = np.exp(log_w)
    weights /= weights.sum(axis=1, keepdims=True)
    return (weights @ drift).astype(np.float32)


def compensate_drift(means: np.ndarray, before: np.ndarray, after: np.ndarray, sigma: float) -> np.ndarray:
    """Old class means [C, D] moved by their estimated semantic drift (``estimate_drift``)."""
    return (np.asarray(means, np.float32) + estimate_drift(before, after, means, sigma)).astype(np.float32)


def fit_linear_drift(before: np.ndarray, after: np.ndarray, ridge: float = DRIFT_RIDGE) -> np.ndarray:
    """Affine map W [(D + 1), D] with [before, 1] @ W ~ after, ridge-regularised towards the identity
    (Learnable Drift Compensation, Gomez-Villa et al., ECCV 2024, in closed form): it carries the LDA
    head's scatter and means (``LdaHead.move``) when the backbone reshapes classes, not only shifts them.

    The penalty lam * ||L - I||^2 (lam = ridge * N * the mean per-dimension variance of ``before``; the
    bias is not penalised) keeps the directions the samples do not span where they were. No drift
    (after == before) gives exactly the identity.
    """
    b, a = np.asarray(before, np.float64), np.asarray(after, np.float64)
    if b.shape != a.shape or b.ndim != 2:
        raise ValueError(f"before {b.shape} and after {a.shape} must both be [N, D]")
    n, d = b.shape
    x = np.hstack([b, np.ones((n, 1))])
    lam = ridge * n * max(float(np.mean(b.var(axis=0))), 1e-12)
    reg = np.eye(d + 1) * lam
    reg[d, d] = 0.0
    identity = np.vstack([np.eye(d), np.zeros((1, d))])
    return np.linalg.solve(x.T @ x + reg, x.T @ a + reg @ identity)
