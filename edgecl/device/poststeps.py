"""After the training loop: keep every class's statistics valid under the moved backbone.

Each post-step is a function of the embeddings before and after the adaptation (``Moved``) and the
device's class statistics (``Heads``), which it updates in order:

1. ``carry_lda``: the LDA head's pooled covariance and its own class means (a class it has none of
   starts from its prototype as it was) are carried through an affine old->new drift map fitted on
   every image embedded before and after (LDC), then it takes the task's within-class deviations;
2. ``shift_old_classes``: an old class with stored exemplars moves its prototype by its own
   exemplars' drift, p += mean(after) - mean(before);
3. ``compensate_old_classes``: an old class without exemplars moves by semantic drift compensation
   (edgecl.classstats), estimated from the task's images;
4. ``merge_task_classes``: the task's classes get the mean of their images. A class seen before
   (the same product under a new camera) is MERGED by counts with its (moved) old prototype, so
   its earlier cameras are not forgotten; a new class is added. An image the mean already counts
   (its fingerprint is in ``Prototypes.seen``: the bundle's calibration set, an earlier adapt) is
   counted once: its old embedding is taken out before its new one goes in;
5. ``update_memory``: the exemplar memory takes the task's classes (herding, within budget).

Run with ``trained=False`` (the backbone did not move) they reduce to "prototypes only", the
baseline the do-no-harm gate compares against.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edgecl import classstats
from edgecl.formats.exemplars import ExemplarMemory
from edgecl.formats.prototypes import Prototypes, image_fingerprints

from .heads import LdaHead

MAX_EXEMPLARS_PER_CLASS = 20          # cap even when the byte budget allows more


@dataclass
class Moved:
    """What the adaptation did to the embeddings (``after is before`` when nothing trained)."""
    trained: bool
    task_pixels: np.ndarray               # uint8 [N, H, W, 3] the task images the statistics use
    task_labels: np.ndarray               # [N] index into task_classes
    task_classes: list[str]
    before: np.ndarray                    # [N, D] task images, old backbone
    after: np.ndarray                     # [N, D] task images, new backbone
    exemplars_before: dict[str, np.ndarray] = field(default_factory=dict)  # old class -> [n, D]
    exemplars_after: dict[str, np.ndarray] = field(default_factory=dict)
    drift_sigma: float | None = None
    drift_compensation: bool = True
    use_exemplars: bool = True
    exemplar_budget_bytes: int = 0
    task_fingerprints: np.ndarray | None = None  # [N] image_fingerprints(task_pixels); computed if not given

    def __post_init__(self) -> None:
        if self.task_fingerprints is None:
            self.task_fingerprints = image_fingerprints(self.task_pixels)


@dataclass
class Heads:
    """The device's class statistics; post-steps update them in place."""
    prototypes: Prototypes
    lda: LdaHead
    memory: ExemplarMemory
    from_exemplars: list[str] = field(default_factory=list)
    drift_compensated: list[str] = field(default_factory=list)
    lda_moved: bool = False
    start_means: dict[str, np.ndarray] = field(default_factory=dict)  # prototypes before the post-steps

    def copy(self) -> Heads:
        return Heads(self.prototypes.copy(), copy.deepcopy(self.lda), self.memory)


def shift_old_classes(heads: Heads, moved: Moved) -> None:
    if not moved.trained:
        return
    for name, ex_after in moved.exemplars_after.items():
        if name not in heads.prototypes.classes or not len(ex_after):
            continue
        row = heads.prototypes.classes.index(name)
        heads.prototypes.means[row] = classstats.shift_by_exemplars(
            heads.prototypes.means[row], moved.exemplars_before[name], ex_after)
        heads.from_exemplars.append(name)


def compensate_old_classes(heads: Heads, moved: Moved) -> None:
    if not (moved.trained and moved.drift_compensation and len(moved.before)):
        return
    drifting = [c for c in heads.prototypes.classes if c not in heads.from_exemplars]
    if not drifting:
        return
    rows = [heads.prototypes.classes.index(c) for c in drifting]
    sigma = moved.drift_sigma or classstats.default_sigma(moved.before, moved.task_labels)
    heads.prototypes.means[rows] = classstats.compensate_drift(heads.prototypes.means[rows], moved.before,
                                                               moved.after, sigma)
    heads.drift_compensated = drifting


def carry_lda(heads: Heads, moved: Moved) -> None:
    # A class the head has no mean of yet starts from its prototype before this adaptation.
    for i, name in enumerate(heads.prototypes.classes):
        heads.lda.means.setdefault(name, heads.prototypes.means[i].astype(np.float64))
    if moved.trained and len(moved.after):
        before = np.concatenate([moved.before, *moved.exemplars_before.values()])
        after = np.concatenate([moved.after, *moved.exemplars_after.values()])
        heads.lda.move(classstats.fit_linear_drift(before, after))
        heads.lda_moved = True
    if len(moved.after):
        heads.lda.add(moved.after, moved.task_labels)


def merge_task_classes(heads: Heads, moved: Moved) -> None:
    protos = heads.prototypes
    fingerprints = moved.task_fingerprints
    assert fingerprints is not None  # set by Moved.__post_init__
    for i, name in enumerate(moved.task_classes):
        rows = moved.task_labels == i
        if not rows.any():
            continue
        after, count = moved.after[rows].astype(np.float64), int(rows.sum())
        fps = fingerprints[rows]
        if name not in protos.classes:
            heads.lda.means[name] = after.mean(0)
            protos.upsert(name, after.mean(0), count)
            protos.mark_seen(name, fps)
            continue
        row = protos.classes.index(name)
        old_count, old_mean = int(protos.counts[row]), protos.means[row].astype(np.float64)
        lda_old = heads.lda.means.get(name, old_mean)
        # Images the mean already counts (shown before: the bundle's calibration set, an earlier adapt)
        # are taken out with their old embeddings, moved the way the class moved, and counted once,
        # with their new ones. The LDA mean moved by the drift map, which was fitted on these very
        # images: their new embeddings stand in for their mapped old ones.
        again = protos.seen_mask(name, fps)
        shift = old_mean - heads.start_means.get(name, old_mean)
        old_sum, rest = classstats.remove_from_mean(old_mean, old_count, moved.before[rows][again] + shift)
        lda_sum, _ = classstats.remove_from_mean(lda_old, old_count, moved.after[rows][again])
        if rest <= 0:  # every image the mean counted is in this task: its fresh mean
            merged, lda_merged = after.mean(0), after.mean(0)
        else:
            merged, _ = classstats.merge_by_counts([old_sum / rest, after.mean(0)], [rest, count])
            lda_merged, _ = classstats.merge_by_counts([lda_sum / rest, after.mean(0)], [rest, count])
        heads.lda.means[name] = lda_merged
        protos.upsert(name, merged, rest + count)
        protos.mark_seen(name, fps)


def update_memory(heads: Heads, moved: Moved) -> None:
    if not moved.use_exemplars:
        return
    per_class = {name: (moved.task_pixels[moved.task_labels == i], moved.after[moved.task_labels == i])
                 for i, name in enumerate(moved.task_classes) if (moved.task_labels == i).any()}
    heads.memory = heads.memory.update(per_class, moved.exemplar_budget_bytes, MAX_EXEMPLARS_PER_CLASS)


# carry_lda runs first: a class the LDA head has no mean of yet starts from its prototype BEFORE this
# adaptation and is then carried through the drift map once (after the prototype moves it would be
# moved twice).
POST_STEPS: tuple[Callable[[Heads, Moved], None], ...] = (
    carry_lda, shift_old_classes, compensate_old_classes, merge_task_classes, update_memory)


def run_post_steps(start: Heads, moved: Moved) -> Heads:
    heads = start.copy()
    heads.start_means = {c: start.prototypes.means[i].astype(np.float64) for i, c in enumerate(start.prototypes.classes)}
    for post_step in POST_STEPS:
        post_step(heads, moved)
    return heads
