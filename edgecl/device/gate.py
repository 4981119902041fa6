"""Do no harm: score an adaptation on images it never trained on before keeping it.

A share of each task class's images (and of each old class's stored exemplars) is held out of
training. After the loop, candidate states are built from the same training rows with the same
post-steps: the adapted state (its delta, statistics moved) and the prototypes-only one (old delta,
the task's classes added from the old backbone: what `--epochs 0` gives). Both are scored on the
held-out images with the head the device uses. The last epoch is kept unless it is worse; then the
state saved at the end of each earlier epoch is scored too, and the best of those that are not
worse is kept (``choose_epoch``); with none, prototypes only.
``--select-lr`` scores its (lr, epochs) trials with the same function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .heads import LdaHead
from .poststeps import Heads, Moved, run_post_steps


def holdout_split(labels: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, hold out round(share * n) rows (at least one when the class has two or more)."""
    rng = np.random.default_rng(seed)
    train: list[int] = []
    held: list[int] = []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        k = max(1, int(round(share * len(rows)))) if len(rows) >= 2 else 0
        held.extend(rows[:k])
        train.extend(rows[k:])
    return np.sort(np.asarray(train, np.int64)), np.sort(np.asarray(held, np.int64))


@dataclass
class HeldOut:
    embeddings_of: Callable[[np.ndarray], np.ndarray]   # delta -> [M, D] held-out images embedded
    names: list[str]                                     # true class of each held-out image

    def __len__(self) -> int:
        return len(self.names)


def accuracy(heads: Heads, embeddings: np.ndarray, names: list[str], head: str) -> tuple[float, dict[str, float]]:
    """(accuracy, accuracy per true class) of ``heads`` on embedded images with true class ``names``."""
    protos = heads.prototypes
    if not len(names) or not len(protos):
        return float("nan"), {}
    if head == "lda":
        lda: LdaHead = heads.lda
        scores = lda.logits(embeddings, lda.means_for(protos.classes, protos.means))
    else:
        e = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
        p = protos.means / np.maximum(np.linalg.norm(protos.means, axis=1, keepdims=True), 1e-12)
        scores = e @ p.T
    right = np.array([protos.classes[j] == name for j, name in zip(np.argmax(scores, axis=1), names, strict=True)])
    true = np.asarray(names)
    return float(right.mean()), {c: float(right[true == c].mean()) for c in sorted(set(names))}


def choose_epoch(prototypes_only: float, epochs: dict[int, float]) -> int | None:
    """The epoch whose state to keep, or None for prototypes only, from held-out accuracies.

    The last epoch (the validated schedule) whenever it is not worse than prototypes only: choosing
    among epochs on a few dozen held-out images would fit their noise (measured in `make demo`: the
    held-out maximum, epoch 6 of 10, scored 67.8% on device A's test classes, the last epoch 74.2%).
    Otherwise the best earlier epoch that is not worse (ties: the later one), so an adaptation that
    went wrong late keeps what it gained before; none -> prototypes only. Ties keep the adaptation:
    "never keeps an adaptation that made it worse".
    """
    last = max(epochs)
    if epochs[last] >= prototypes_only:
        return last
    fine = [e for e, accuracy in epochs.items() if accuracy >= prototypes_only]
    return max(fine, key=lambda e: (epochs[e], e)) if fine else None


def score(start: Heads, moved: Moved, held: HeldOut, delta: np.ndarray, head: str) -> tuple[float, dict[str, float]]:
    """Held-out accuracy (overall, per class) of the state that ``moved`` (built on the training rows) leads to."""
    return accuracy(run_post_steps(start, moved), held.embeddings_of(delta), held.names, head)
