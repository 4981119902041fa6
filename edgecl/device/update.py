"""The drop-gated sparse update step, in numpy (docs/method.md#step-3).

Why numpy and not an ORT optimizer graph: the gate must be a fresh Bernoulli draw per element per
step from a stream we can checkpoint and resume exactly, and the optimizer must not move elements
whose gradient was dropped. Plain SGD without momentum has that property; momentum and AdamW do
not (an element with zero gradient keeps moving by its running average; docs/benchmarks.md#b1-lesson-1:
the reference optimiser changes ~99% of the weights every step).

What "updated" means (docs/device.md): an element is updated in a step iff its value changes.
With no momentum and weight decay applied only inside the gate, that is exactly the gated
elements with a non-zero (scaled) gradient or non-zero decay term; every other element keeps its
bit pattern.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def draw_gate(rng: np.random.Generator, size: int, drop_rate: float) -> np.ndarray:
    """Bernoulli keep-gate, [size] bool, each element kept with probability 1 - drop_rate."""
    if not 0.0 <= drop_rate <= 1.0:
        raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate}")
    # rng.random() < keep: one uniform per element, so the stream advances by `size` draws every step.
    return rng.random(size) < (1.0 - drop_rate)


def cap_gate(gate: np.ndarray, max_gated: int, rng: np.random.Generator) -> np.ndarray:
    """Keep at most ``max_gated`` open gates: a uniform random subset of them when the draw has more.

    Why: the Bernoulli count fluctuates around K * (1 - drop_rate); at the paper's defaults that mean
    sits right at 0.5% of all weights, so without a cap about half of all steps would exceed the
    promise "under 0.5% of the weights change in any step" by a few elements. The extra draw comes
    from the gate's own Generator, so a resumed run replays it. ``max_gated`` < 0 means no cap.
    """
    if max_gated < 0:
        return gate
    open_positions = np.flatnonzero(gate)
    if open_positions.size <= max_gated:
        return gate
    capped = np.zeros_like(gate)
    capped[rng.choice(open_positions, size=max_gated, replace=False)] = True
    return capped


def overlap_scale(overlap: np.ndarray, decay: float) -> np.ndarray:
    """Gradient scale ``decay ** overlap`` (docs/method.md#overlap: less interference with earlier rounds)."""
    return np.power(np.float32(decay), overlap.astype(np.float32)).astype(np.float32)


@dataclass
class StepResult:
    delta: np.ndarray        # the new delta [K]
    gated: int               # elements that passed the gate
    changed: int             # elements whose value changed (the definition of "updated")


def sparse_sgd_step(delta: np.ndarray, grad: np.ndarray, gate: np.ndarray, scale: np.ndarray, lr: float,
                    weight_decay: float = 0.0) -> StepResult:
    """delta[g] -= lr * (scale[g] * grad[g] + weight_decay * delta[g]) for gated g; others untouched.

    Only the gated positions are written, so an element outside the gate keeps its exact bits.
    """
    new = np.array(delta, dtype=np.float32, copy=True)
    positions = np.flatnonzero(gate)
    if positions.size:
        step = scale[positions] * grad[positions]
        if weight_decay:
            step = step + np.float32(weight_decay) * new[positions]
        new[positions] = new[positions] - np.float32(lr) * step.astype(np.float32)
    changed = int(np.count_nonzero(new != delta))
    return StepResult(new, int(positions.size), changed)


def sgd_step(param: np.ndarray, grad: np.ndarray, lr: float) -> np.ndarray:
    """Dense SGD for the projection head (it is not part of the deployed backbone)."""
    return (param - np.float32(lr) * grad).astype(np.float32)
