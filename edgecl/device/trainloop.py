"""The training loop of `edgecl adapt`, and the ``TrainState`` that IS its checkpoint.

Per step (docs/method.md#step-3): a batch of images -> two augmented views -> the step graph
(forward + backward of the MI loss, plain onnxruntime) -> a fresh Bernoulli drop gate per selected
element -> sparse SGD on the gated elements of the delta, dense SGD on the projection head.

Determinism: two numpy Generators from SeedSequence(seed) drive everything random (one for the
shuffle and augmentations, one for the drop gate). Their states, the epoch's permutation, the
position and the trainable values are the whole ``TrainState``; a checkpoint saves it and
``--resume`` reloads it, so a resumed run replays the exact stream (bit-identical result).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecl.errors import DeviceError
from edgecl.formats import manifest as mf
from edgecl.formats.images import two_views

from .ort import StepSession
from .plan import Plan
from .state import TRAINABLE, RunDir, load_trainable, save_trainable
from .update import cap_gate, draw_gate, sgd_step, sparse_sgd_step


def _rng(state: dict[str, Any]) -> np.random.Generator:
    bit_generator = np.random.PCG64()
    bit_generator.state = state  # type: ignore[assignment]
    return np.random.Generator(bit_generator)


@dataclass
class TrainState:
    epoch: int
    batch: int                            # next batch within the epoch
    step: int                             # steps done
    perm: np.ndarray | None               # this epoch's order of the training rows (None = draw at epoch start)
    delta: np.ndarray                     # [K] float32
    proj_weight: np.ndarray               # [P, D]
    proj_bias: np.ndarray                 # [P]
    data_rng: np.random.Generator
    gate_rng: np.random.Generator

    @classmethod
    def fresh(cls, seed: int, trainable: dict[str, np.ndarray]) -> TrainState:
        data_seq, gate_seq = np.random.SeedSequence(seed).spawn(2)
        return cls(0, 0, 0, None, trainable[mf.DELTA_PARAM].astype(np.float32).copy(),
                   trainable[mf.PROJ_WEIGHT].astype(np.float32).copy(), trainable[mf.PROJ_BIAS].astype(np.float32).copy(),
                   np.random.Generator(np.random.PCG64(data_seq)), np.random.Generator(np.random.PCG64(gate_seq)))

    def trainable(self) -> dict[str, np.ndarray]:
        return {mf.DELTA_PARAM: self.delta, mf.PROJ_WEIGHT: self.proj_weight, mf.PROJ_BIAS: self.proj_bias}

    def save(self, run_dir: RunDir) -> None:
        position = {"epoch": self.epoch, "batch": self.batch, "step": self.step,
                    "perm": None if self.perm is None else self.perm.tolist()}
        run_dir.save_checkpoint(self.step, lambda tmp: save_trainable(tmp / TRAINABLE, self.trainable()),
                                {"position": position, "data_rng": self.data_rng.bit_generator.state,
                                 "gate_rng": self.gate_rng.bit_generator.state})

    @classmethod
    def load(cls, ckpt_dir: Path, resume: dict[str, Any], delta_size: int) -> TrainState:
        values = load_trainable(ckpt_dir / TRAINABLE, delta_size)
        pos = resume["position"]
        return cls(pos["epoch"], pos["batch"], pos["step"],
                   None if pos.get("perm") is None else np.asarray(pos["perm"], np.int64),
                   values[mf.DELTA_PARAM].astype(np.float32), values[mf.PROJ_WEIGHT].astype(np.float32),
                   values[mf.PROJ_BIAS].astype(np.float32), _rng(resume["data_rng"]), _rng(resume["gate_rng"]))


@dataclass
class TrainSet:
    pixels: np.ndarray                    # uint8 [N, H, W, 3]: the task's training rows + replayed exemplars
    labels: np.ndarray                    # int64 [N]
    classes: list[str]                    # label index -> class name (task classes, then replayed ones)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def train(plan: Plan, data: TrainSet, session: StepSession, state: TrainState, scale: np.ndarray,
          manifest: mf.BundleManifest, *, log: Callable[[dict[str, Any]], None] | None = None,
          checkpoint: Callable[[TrainState], None] | None = None, bar: Any = None) -> TrainState:
    """Run the steps from ``state``'s position to the end of ``plan.epochs``; ``state`` is updated in place."""
    per_epoch = steps_per_epoch(len(data.pixels), plan.batch_size)
    while state.epoch < plan.epochs:
        if state.perm is None:
            state.perm = state.data_rng.permutation(len(data.pixels))
        while state.batch < per_epoch:
            t0 = time.perf_counter()
            rows = state.perm[state.batch * plan.batch_size:(state.batch + 1) * plan.batch_size]
            views = two_views(data.pixels[rows], state.data_rng, manifest.mean, manifest.std, manifest.interpolation)
            labels = np.concatenate([data.labels[rows], data.labels[rows]])
            out = session.step(views, labels, state.delta, state.proj_weight, state.proj_bias)
            if not math.isfinite(out.loss):
                raise DeviceError(f"the loss became {out.loss} at step {state.step + 1}",
                                  "lower --lr (the state before this adaptation is unchanged)")
            # The drop gate: a fresh Bernoulli draw per selected element, capped per step.
            gate = cap_gate(draw_gate(state.gate_rng, state.delta.size, plan.drop_rate), plan.max_gated,
                            state.gate_rng)
            result = sparse_sgd_step(state.delta, out.grad_delta, gate, scale, plan.lr, plan.weight_decay)
            state.delta = result.delta
            # The projection head is not deployed: dense SGD.
            state.proj_weight = sgd_step(state.proj_weight, out.grad_proj_weight, plan.lr_head)
            state.proj_bias = sgd_step(state.proj_bias, out.grad_proj_bias, plan.lr_head)
            state.batch += 1
            state.step += 1
            if log is not None:
                log({"step": state.step, "epoch": state.epoch + 1, "loss": out.loss, "gated": result.gated,
                     "changed": result.changed, "changed_fraction": result.changed / manifest.total_params,
                     "seconds": round(time.perf_counter() - t0, 6)})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{out.loss:.4f}", epoch=f"{state.epoch + 1}/{plan.epochs}")
            if state.batch == per_epoch:
                state.epoch, state.batch, state.perm = state.epoch + 1, 0, None
                if checkpoint is not None:
                    checkpoint(state)
                break
            if checkpoint is not None and plan.checkpoint_every and state.step % plan.checkpoint_every == 0:
                checkpoint(state)
    return state
