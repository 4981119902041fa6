"""The calibration record: an unknown threshold and softmax temperatures fitted on held-out images.

Shared by the host (`edgecl export` calibrates the bundle's own prototypes) and the device (`edgecl
adapt` calibrates its LDA statistics; predict, eval and watch read the record); the device's unknown
score and its method are in edgecl/device/unknown.py. numpy only.

The record (JSON: a bundle's ``calibration.json``, or the ``calibration`` metadata of the device
state's ``lda.safetensors``)::

    {"format": "edgecl-calibration", "format_version": 1,
     "score": "relative-mahalanobis" | "cosine",     # which unknown score the threshold is for
     "threshold": float,                             # unknown = score > threshold
     "false_unknown_rate": float,                    # the target share of known images flagged
     "flagged_share": float,                         # the share flagged on the images it was fitted on
     "images": int,                                  # held-out images it was fitted on
     "temperature": {"ncm": float, "lda": float},    # per head: softmax(scores / T)
     "ece": {"ncm": {"before": float, "after": float}, ...}}   # on those same images

- **Threshold**: the ``1 - false_unknown_rate`` quantile of the scores of held-out images of known
  classes, so that share of known images is flagged (default 5%).
- **Temperature** per head: T minimising the negative log-likelihood of the held-out images' true
  classes under ``softmax(scores / T)`` (Guo et al., "On Calibration of Modern Neural Networks",
  2017). It rescales the scores without changing their ranking.

The images must be held out from the statistics they are scored against: an image the statistics
count scores closer than a new one, which would flag too few known images.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

CALIBRATION_FORMAT = "edgecl-calibration"
CALIBRATION_FILE = "calibration.json"  # in a bundle: the calibration of its own prototypes (`edgecl export`)
DEFAULT_FALSE_UNKNOWN_RATE = 0.05   # share of known images flagged unknown (issue 23's default)
SCORE_RELATIVE_MAHALANOBIS = "relative-mahalanobis"
SCORE_COSINE = "cosine"
ECE_BINS = 15                       # Guo et al. 2017's equal-width bins

# Softmax temperature of the ncm head's cosine scores when no calibration was fitted. A cosine gap of
# 0.1 between two classes is then an odds ratio of e^2 = 7.4; 0.05 sits in the range cosine
# classifiers are trained at (SupCon 0.07, CosFace-style scales s = 10..30 i.e. T = 0.1..0.03).
NCM_TEMPERATURE = 0.05


def cosine_scores(embeddings: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """[N, C] cosine similarity (what inference.onnx's ``logits`` output holds)."""
    z = np.asarray(embeddings, np.float64)
    p = np.asarray(prototypes, np.float64)
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    return z @ p.T



# -- probabilities --------------------------------------------------------------------------------

def softmax(scores: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row softmax of scores / temperature; a row with a non-finite score gives NaN."""
    z = np.asarray(scores, np.float64) / temperature
    with np.errstate(invalid="ignore", over="ignore"):
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


def _nll(scores: np.ndarray, labels: np.ndarray, log_t: float) -> float:
    z = scores / np.exp(log_t)
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(labels)), labels]))


def fit_temperature(scores: np.ndarray, labels: np.ndarray, around: float = 1.0, span: float = 100.0) -> float:
    """The T > 0 minimising the mean negative log-likelihood of ``labels`` under softmax(scores / T).

    The NLL is convex in 1/T, hence unimodal in log T: a coarse grid then golden-section search, within
    ``[around / span, around * span]``. Images a head separates perfectly drive the NLL's minimum to
    T -> 0 (every probability 1.000); the bound keeps such a fit a sharpening, not a step function."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels, np.int64)
    if s.ndim != 2 or y.shape != (len(s),) or not len(s):
        raise ValueError(f"scores must be [N, C] and labels [N] with N > 0, got {s.shape} and {y.shape}")
    keep = np.isfinite(s).all(axis=1)
    s, y = s[keep], y[keep]
    if not len(s) or s.shape[1] < 2:
        return 1.0
    grid = np.linspace(np.log(around / span), np.log(around * span), 81)
    values = [_nll(s, y, g) for g in grid]
    best = int(np.argmin(values))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    for _ in range(40):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if _nll(s, y, a) < _nll(s, y, b):
            hi = b
        else:
            lo = a
    return float(np.exp((lo + hi) / 2.0))


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE (Guo et al. 2017): |accuracy - mean confidence| of the top class per equal-width bin,
    weighted by the bin's share of images."""
    p = np.asarray(probabilities, np.float64)
    keep = np.isfinite(p).all(axis=1)
    p, y = p[keep], np.asarray(labels)[keep]
    if not len(p):
        return float("nan")
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    error = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            error += sel.mean() * abs(correct[sel].mean() - confidence[sel].mean())
    return float(error)


# -- the calibration record -----------------------------------------------------------------------

def calibration_record(scores_unknown: np.ndarray, head_scores: dict[str, np.ndarray], labels: np.ndarray,
                       score: str, false_unknown_rate: float = DEFAULT_FALSE_UNKNOWN_RATE) -> dict[str, Any]:
    """The record from held-out images' unknown scores [N] and each head's class scores [N, C]."""
    if not 0.0 < false_unknown_rate < 1.0:
        raise ValueError(f"false_unknown_rate must be in (0, 1), got {false_unknown_rate}")
    u = np.asarray(scores_unknown, np.float64)
    y = np.asarray(labels, np.int64)
    u_finite = u[np.isfinite(u)]
    if not len(u_finite):
        raise ValueError("no held-out image has a finite unknown score")
    threshold = float(np.quantile(u_finite, 1.0 - false_unknown_rate))
    temperature, ece = {}, {}
    for head, raw in head_scores.items():
        t = fit_temperature(raw, y, around=uncalibrated_temperature(head))
        temperature[head] = t
        ece[head] = {"before": expected_calibration_error(softmax(raw, uncalibrated_temperature(head)), y),
                     "after": expected_calibration_error(softmax(raw, t), y)}
    return {"format": CALIBRATION_FORMAT, "format_version": 1, "score": score, "threshold": threshold,
            "false_unknown_rate": float(false_unknown_rate), "images": int(len(u_finite)),
            "flagged_share": float(np.mean(u_finite > threshold)), "temperature": temperature, "ece": ece}


def uncalibrated_temperature(head: str) -> float:
    """The temperature a head's softmax uses without a calibration record."""
    return NCM_TEMPERATURE if head == "ncm" else 1.0


def calibrate_leave_one_out(embeddings: np.ndarray, labels: np.ndarray,
                            false_unknown_rate: float = DEFAULT_FALSE_UNKNOWN_RATE) -> dict[str, Any]:
    """Cosine calibration of prototypes that are the class means of ``embeddings`` (`edgecl export`).

    Each image is scored as if held out: against its own class's mean without it,
    (n mu - z) / (n - 1), and the other classes' full means. Exact, and no image is spent on it."""
    x = np.asarray(embeddings, np.float64)
    y = np.asarray(labels, np.int64)
    if x.ndim != 2 or y.shape != (len(x),) or not len(x) or y.min() < 0:
        raise ValueError(f"embeddings must be [N, D] and labels [N] >= 0 with N > 0, got {x.shape} and {y.shape}")
    counts = np.bincount(y)
    if counts.min() < 2:
        raise ValueError("leave-one-out calibration needs labels 0..C-1 with two images of every class")
    means = np.stack([x[y == c].mean(axis=0) for c in range(len(counts))])
    cos = cosine_scores(x, means)
    own = (counts[y, None] * means[y] - x) / (counts[y, None] - 1)
    cos[np.arange(len(y)), y] = _row_cosine(x, own)
    return calibration_record(1.0 - cos.max(axis=1), {"ncm": cos}, y, SCORE_COSINE, false_unknown_rate)


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na = np.maximum(np.linalg.norm(a, axis=1), 1e-12)
    nb = np.maximum(np.linalg.norm(b, axis=1), 1e-12)
    return np.sum(a * b, axis=1) / (na * nb)


def check_record(record: Any, where: str) -> dict[str, Any]:
    """A calibration record read from a file, checked enough to use (ValueError names what is wrong)."""
    if isinstance(record, (str, bytes)):
        record = json.loads(record)
    if not isinstance(record, dict) or record.get("format") != CALIBRATION_FORMAT:
        raise ValueError(f"{where} is not an edgecl calibration record")
    if record.get("score") not in (SCORE_RELATIVE_MAHALANOBIS, SCORE_COSINE):
        raise ValueError(f"{where} names an unknown score {record.get('score')!r}")
    threshold = record.get("threshold")
    temps = record.get("temperature")
    if not isinstance(threshold, (int, float)) or not np.isfinite(threshold) or not isinstance(temps, dict) \
            or not all(isinstance(t, (int, float)) and t > 0 for t in temps.values()):
        raise ValueError(f"{where} has no usable threshold or temperatures")
    return record


def auroc(known_scores: np.ndarray, unknown_scores_: np.ndarray) -> float:
    """Area under the ROC curve of separating unknown (positive) from known images by score
    (higher = unknown): the Mann-Whitney U statistic, ties counted half."""
    k = np.asarray(known_scores, np.float64)
    u = np.asarray(unknown_scores_, np.float64)
    if not len(k) or not len(u):
        return float("nan")
    ranks = _average_ranks(np.concatenate([k, u]))
    return float((ranks[len(k):].sum() - len(u) * (len(u) + 1) / 2.0) / (len(k) * len(u)))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing their mean rank."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    return (upper - (counts - 1) / 2.0)[inverse]
