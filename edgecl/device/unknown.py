"""Unknown detection on the device: how unlike every known class an image is (numpy only).

``predict`` always answers a known class; the unknown score says whether it should have (higher =
less like any known class; docs/device.md#unknown-images):

- With the LDA statistics: the relative Mahalanobis distance (Ren et al., "A Simple Fix to
  Mahalanobis Distance for Improving Near-OOD Detection", 2021): ``min_c MD_c(z) - MD_0(z)``, where
  ``MD_c`` uses the class means and the pooled within-class covariance the LDA head already keeps,
  and ``MD_0`` a class-agnostic Gaussian (the mean of the class means; the within-class covariance
  plus the covariance of the class means). Subtracting ``MD_0`` discounts what makes an image far
  from everything in directions that do not tell the classes apart, which plain Mahalanobis mostly
  ranks (B9: benchmarks/b8_b9_floor/).
- Without them (a fresh bundle): ``1 - max cosine`` to the prototypes.

``calibrate`` is the pure function the place that makes the LDA statistics calls (`edgecl adapt`):
held-out embeddings and labels in, the calibration record (edgecl/formats/calibration.py: threshold
at a false-unknown rate, a temperature per head) out; ``calibrate_held_out`` takes a state's
prototypes and LDA head and the held-out images' class names instead (the gate's ``HeldOut``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgecl.formats.calibration import (
    DEFAULT_FALSE_UNKNOWN_RATE,
    SCORE_COSINE,
    SCORE_RELATIVE_MAHALANOBIS,
    calibration_record,
    cosine_scores,
)
from edgecl.formats.prototypes import Prototypes

from .heads import LdaHead


@dataclass
class MahalanobisScorer:
    """The LDA statistics prepared once, in float64; then per batch of N images one triangular
    [N, D] x [D, D] float32 product.

    relative MD = min_c (z - m_c)' S^-1 (z - m_c) - (z - m_0)' B^-1 (z - m_0)
                = z' Q z + min_c (m_c' S^-1 m_c - 2 z' S^-1 m_c) - (m_0' B^-1 m_0 - 2 z' B^-1 m_0),
    Q = S^-1 - B^-1, so serving needs one quadratic form in Q and a D x (C + 1) product. B is S plus
    the (shrunk) covariance of the class means, so Q is positive semi-definite and z' Q z = |z L|^2
    with L its lower-triangular Cholesky factor: half the multiply-adds and half the bytes of Q
    itself (B8: the quadratic form is D^2 work per image, 0.1 ms of watch's ~1 ms per image at
    D = 1280 with Q taken whole, its 6.5 MB pushed out of cache by each batch's forward). float32
    keeps about 6 significant digits of the scores, far finer than the calibrated threshold;
    calibration uses the same code."""

    factor: tuple[tuple[int, np.ndarray], ...]  # F with F F' = Q in column blocks: (first row, F[first:, cols]) float32
    linear: np.ndarray             # [D, C + 1] float32: S^-1 m_c for every class, then B^-1 m_0
    offsets: np.ndarray            # [C + 1] float64: m_c' S^-1 m_c, then m_0' B^-1 m_0
    within: np.ndarray             # [D, D] float64 S^-1 (``distances`` only: not on the serving path)

    @classmethod
    def create(cls, lda: LdaHead, means: np.ndarray) -> MahalanobisScorer:
        means = np.atleast_2d(np.asarray(means, np.float64))
        centre = means.mean(axis=0)
        spread = means - centre
        # D x D float64 matrices are 13 MB each at Lite0's D = 1280: built in place, fewer alive at a time
        # (watch loads a state after every adapt; its RSS after ServingState.create: +120 -> +74 MB).
        within = _inverse(lda.covariance())
        background = lda.scatter / max(lda.count - lda.groups, 1)
        background += spread.T @ spread / len(means)  # the total covariance: within-class + between class means
        # The background is shrunk like the head's covariance, towards ITS OWN mean variance. Adding the
        # between-class covariance to the already shrunk within-class one keeps the within-class
        # isotropic floor, far below the spread of the class means: B9's near AUROC 0.81 instead of 0.92.
        dim = background.shape[0]
        floor = lda.shrinkage * max(float(np.trace(background)) / dim, 1e-12)
        background *= 1.0 - lda.shrinkage
        background.flat[:: dim + 1] += floor
        back = _inverse(background)
        del background
        linear = np.concatenate([within @ means.T, (back @ centre)[:, None]], axis=1)
        offsets = np.concatenate([np.einsum("cd,dc->c", means, linear[:, :-1]), [centre @ linear[:, -1]]])
        quadratic = np.subtract(within, back, out=back)  # S^-1 - B^-1, in B^-1's memory
        return cls(_factor_blocks(quadratic), linear.astype(np.float32), offsets, within)

    def distances(self, embeddings: np.ndarray) -> np.ndarray:
        """[N, C] squared Mahalanobis distance to each class mean (float64; for reports and tests)."""
        z = np.asarray(embeddings, np.float64)
        quad = np.einsum("nd,de,ne->n", z, self.within, z)
        return quad[:, None] - 2.0 * z @ self.linear[:, :-1].astype(np.float64) + self.offsets[:-1]

    def unknown_scores(self, embeddings: np.ndarray) -> np.ndarray:
        """[N] relative Mahalanobis: the nearest class's distance minus the background's."""
        z = np.asarray(embeddings, np.float32)
        projected = np.empty((len(z), sum(block.shape[1] for _, block in self.factor)), np.float32)
        column = 0
        for first, block in self.factor:  # z @ F, skipping the zeros above the triangle
            np.matmul(z[:, first:], block, out=projected[:, column:column + block.shape[1]])
            column += block.shape[1]
        quad = np.einsum("nk,nk->n", projected, projected, dtype=np.float64)
        lin = (z @ self.linear).astype(np.float64)
        nearest = np.min(self.offsets[:-1] - 2.0 * lin[:, :-1], axis=1)
        return quad + nearest - (self.offsets[-1] - 2.0 * lin[:, -1])


_FACTOR_BLOCK = 64  # columns per block of the triangular factor (B8 at D = 1280: 64 beat 128 and 256)


def _factor_blocks(quadratic: np.ndarray) -> tuple[tuple[int, np.ndarray], ...]:
    """F with F F' = ``quadratic`` (symmetric positive semi-definite) as float32 column blocks
    (first row, F[first:, columns]).

    F is the lower-triangular Cholesky factor, so the rows of a block above its first column are
    zero: neither stored nor multiplied. A matrix Cholesky refuses (semi-definite to rounding: one
    class, where B = S and Q = 0) is factored through its eigenvalues, clipped at 0: one full block."""
    q = np.asarray(quadratic, np.float64)
    try:
        low = np.linalg.cholesky(q)
    except np.linalg.LinAlgError:
        values, vectors = np.linalg.eigh(q)
        return ((0, np.ascontiguousarray(vectors * np.sqrt(np.clip(values, 0.0, None)), np.float32)),)
    return tuple((j, np.ascontiguousarray(low[j:, j:j + _FACTOR_BLOCK], np.float32))
                 for j in range(0, len(low), _FACTOR_BLOCK))


def _inverse(cov: np.ndarray) -> np.ndarray:
    """The inverse of a symmetric positive definite matrix through its Cholesky factor (symmetric)."""
    w = _inverse_cholesky_t(cov)
    return w @ w.T


def _inverse_cholesky_t(cov: np.ndarray) -> np.ndarray:
    """L^-T with cov = L L^T, so that ||(x - mu) @ L^-T||^2 is the squared Mahalanobis distance."""
    chol = np.linalg.cholesky(np.asarray(cov, np.float64))
    return np.linalg.inv(chol).T


def unknown_scores(embeddings: np.ndarray, prototypes: np.ndarray, lda: LdaHead | None = None,
                   lda_means: np.ndarray | None = None) -> tuple[str, np.ndarray]:
    """(score name, [N] scores): relative Mahalanobis with LDA statistics, else 1 - max cosine."""
    if lda is not None:
        means = prototypes if lda_means is None else lda_means
        return SCORE_RELATIVE_MAHALANOBIS, MahalanobisScorer.create(lda, means).unknown_scores(embeddings)
    return SCORE_COSINE, 1.0 - cosine_scores(embeddings, prototypes).max(axis=1)


def calibrate(embeddings: np.ndarray, labels: np.ndarray, prototypes: np.ndarray, lda: LdaHead | None = None,
              lda_means: np.ndarray | None = None,
              false_unknown_rate: float = DEFAULT_FALSE_UNKNOWN_RATE) -> dict[str, Any]:
    """Calibration record from held-out images of known classes.

    ``embeddings`` [N, D] and ``labels`` [N] (row indices into ``prototypes`` [C, D], the ncm head's
    class order) of images that neither the prototypes nor ``lda`` counted; ``lda_means`` [C, D]
    the LDA head's means in the same order (``LdaHead.means_for``; default: the prototypes). With
    ``lda`` the unknown score is relative Mahalanobis and both heads get a temperature; without it,
    the cosine score and the ncm head only."""
    x = np.asarray(embeddings, np.float64)
    y = np.asarray(labels, np.int64)
    if x.ndim != 2 or y.shape != (len(x),) or not len(x):
        raise ValueError(f"embeddings must be [N, D] and labels [N] with N > 0, got {x.shape} and {y.shape}")
    protos = np.asarray(prototypes, np.float64)
    if y.min() < 0 or y.max() >= len(protos):
        raise ValueError(f"labels must index the {len(protos)} prototypes")
    heads = {"ncm": cosine_scores(x, protos)}
    if lda is not None:
        means = protos if lda_means is None else np.asarray(lda_means, np.float64)
        heads["lda"] = lda.logits(x, means)
    score, u = unknown_scores(x, protos, lda, lda_means)
    return calibration_record(u, heads, y, score, false_unknown_rate)


def calibrate_held_out(prototypes: Prototypes, lda: LdaHead | None, embeddings: np.ndarray, names: list[str],
                       false_unknown_rate: float = DEFAULT_FALSE_UNKNOWN_RATE) -> dict[str, Any] | None:
    """``calibrate`` for a state's statistics and held-out images named by class (the gate's ``HeldOut``).

    For `edgecl adapt`: the statistics the kept candidate was built with from the training rows
    (``run_post_steps(start, moved).prototypes`` / ``.lda``), the held-out images embedded with the
    kept delta, their class names. Images of a class the statistics lack are left out; None when no
    image is left (then the committed state reports ``unknown: null``)."""
    index = {name: i for i, name in enumerate(prototypes.classes)}
    rows = [i for i, name in enumerate(names) if name in index]
    if not rows:
        return None
    x = np.asarray(embeddings, np.float64)[rows]
    y = np.asarray([index[names[i]] for i in rows], np.int64)
    means = lda.means_for(list(prototypes.classes), prototypes.means) if lda is not None else None
    return calibrate(x, y, prototypes.means, lda, means, false_unknown_rate)
