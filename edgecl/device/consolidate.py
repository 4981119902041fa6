"""Consolidation of a merged delta on the fleet's exemplars (`edgecl release --consolidate EPOCHS`).

Merging the devices' deltas costs each device some of what it learned (interference: the deltas
overlap on almost every selected element and the merge averages them, docs/server.md#interference).
When the host holds exemplars of every class the candidate will serve (mode 2, shared exemplars:
the current version's plus each device's shared ones), a few epochs of the devices' own training
on them, starting from the merged delta, can pull the merged backbone back towards every class at
once. Nothing new is invented here: the same step graph (`train_step.onnx` on plain onnxruntime),
the same drop gate and sparse SGD with the per-step cap (trainloop.train), the same mask, the
bundle's own learning rate and batch size; only the data (exemplars of every class) and the start
(the merged delta instead of the device's) differ. The projection head starts from the bundle's,
as a device's first adaptation does; it is not deployed.

Deterministic for a given seed (the trainloop's two generators): phase 2 of a release never needs
to repeat it, because a consolidated round is always judged in one phase (every class exact from
exemplars, release.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecl.errors import DataError
from edgecl.formats import manifest as mf
from edgecl.formats.exemplars import ExemplarMemory
from edgecl.formats.weights import load_weights
from edgecl.progress import progress_bar

from .infer import resolve_profile
from .ort import StepSession
from .plan import AdaptOptions, resolve_plan
from .state import open_bundle
from .trainloop import TrainSet, TrainState, steps_per_epoch, train
from .update import overlap_scale


@dataclass
class Consolidated:
    delta: np.ndarray          # [K] float32: the merged delta after the consolidation epochs
    epochs: int
    steps: int
    images: int                # exemplar images trained on, every class
    classes: list[str]
    first_loss: float | None
    last_loss: float | None
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "steps": self.steps, "images": self.images, "classes": self.classes,
                "first_loss": self.first_loss, "last_loss": self.last_loss, "seconds": round(self.seconds, 1),
                "moved": int(np.count_nonzero(self.delta))}


def consolidate(bundle_dir: str | Path, start: np.ndarray, memory: ExemplarMemory, epochs: int,
                seed: int | None = None, progress: bool = False) -> Consolidated:
    """``epochs`` of the device's training rule on ``memory`` (exemplars of every class) from ``start``
    (the merged delta, [K]) on ``bundle_dir`` (the version the delta was merged against)."""
    bundle = open_bundle(bundle_dir)
    k = bundle.mask.total_selected
    start = np.asarray(start, np.float32)
    if start.shape != (k,):
        raise DataError(f"the merged delta has {start.size} values, {bundle.root.name}'s mask selects {k}",
                        "consolidate against the version the deltas were merged on")
    if not len(memory.labels) or len(memory.classes) < 2:
        raise DataError(f"consolidation needs exemplars of at least two classes (has {len(memory.classes)})",
                        "share exemplars from the devices (share_exemplars = true), or drop --consolidate")
    profile = resolve_profile(None, bundle)
    plan = resolve_plan(AdaptOptions(epochs=int(epochs), seed=seed, gate=False, progress=progress), profile,
                        bundle.manifest, k)
    head = load_weights(bundle.path(mf.HEAD_INIT), [mf.PROJ_WEIGHT, mf.PROJ_BIAS])
    state = TrainState.fresh(plan.seed, {mf.DELTA_PARAM: start, **head})
    session = StepSession(bundle.path(mf.TRAIN_STEP), threads=profile.threads, provider=profile.execution_provider)
    data = TrainSet(memory.pixels, memory.labels.astype(np.int64), list(memory.classes))
    losses: list[float] = []
    t0 = time.perf_counter()
    with progress_bar(plan.epochs * steps_per_epoch(len(data.pixels), plan.batch_size), "consolidate",
                      progress, unit="step") as bar:
        train(plan, data, session, state, overlap_scale(bundle.mask.overlap_vector(), plan.overlap_decay),
              bundle.manifest, log=lambda record: losses.append(float(record["loss"])), bar=bar)
    return Consolidated(state.delta.astype(np.float32), plan.epochs, state.step, int(len(data.pixels)),
                        list(memory.classes), losses[0] if losses else None, losses[-1] if losses else None,
                        time.perf_counter() - t0)
