"""Scoring a table of class statistics on embeddings: the ncm or the LDA head's choice, in numpy.

The release gate scores several tables (current, frozen baseline, candidate, candidate among the
current classes) on held-out embeddings computed once per backbone; `edgecl pull` scores the
released statistics of a device's classes against its own on the images it holds. Both sides import
this module; it imports none.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgecl.formats.prototypes import Prototypes


def score(embeddings: np.ndarray, truth: list[str], table: Prototypes | None,
          covariance: np.ndarray | None = None) -> dict[str, Any] | None:
    """Accuracy of ``table`` on embeddings of images of classes ``truth``: cosine nearest class mean
    (the ncm head), or with ``covariance`` (the LDA head's, shrunk: ``LdaHead.covariance``) linear
    discriminant scores ``z . S^-1 mu - mu . S^-1 mu / 2`` against the table's means. Images of classes
    the table lacks are not scored. None: nothing scored."""
    if table is None or not len(table):
        return None
    rows = np.asarray([i for i, t in enumerate(truth) if t in table.classes], np.int64)
    if not rows.size:
        return None
    e = np.asarray(embeddings, np.float64)[rows]
    p = np.asarray(table.means, np.float64)
    if covariance is None:
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
        scores = e @ p.T
    else:
        weights = np.linalg.solve(np.asarray(covariance, np.float64), p.T)     # [D, C]
        scores = e @ weights - 0.5 * np.einsum("cd,dc->c", p, weights)
    predicted = [table.classes[j] for j in scores.argmax(axis=1)]
    names = [truth[i] for i in rows]
    per_class = {}
    for name in sorted(set(names)):
        hits = [pr == name for pr, t in zip(predicted, names, strict=True) if t == name]
        per_class[name] = {"accuracy": float(np.mean(hits)), "images": len(hits)}
    correct = sum(pr == t for pr, t in zip(predicted, names, strict=True))
    return {"accuracy": correct / len(names), "images": len(names), "per_class": per_class}


def restrict(table: Prototypes, classes: list[str]) -> Prototypes:
    rows = [table.classes.index(c) for c in classes if c in table.classes]
    return Prototypes([table.classes[i] for i in rows], table.means[rows], table.counts[rows])
