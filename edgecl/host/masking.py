"""The mask: per-tensor top elements by MI-Fisher score, under a whole-model budget.

Policy (documented in README "Mask policy"):
- ``select_rate`` is the share of ALL parameters of the exported embedding model that become
  trainable (the paper's "<5%" is of all parameters), whatever the per-kind policy below.
- 1-D tensors (biases, including the shifts BatchNorm folding creates, and norm scales/shifts) are
  fully trainable, as in the reference code, when together they fit in a quarter of the budget;
  otherwise they are ranked like the weights.
- The rest of the budget is spread over the remaining tensors at one rate r; each tensor keeps
  its top round(r * numel) elements by score (a per-tensor quantile threshold, docs/method.md#overlap),
  at least one. Ties break towards the lower flat index, so masks are reproducible.
- ``exclude`` keeps whole tensors out of the mask (no element is selected; they stay frozen).
  The budget is still ``select_rate`` of all parameters, spread over the tensors left. Default
  export policy "no-depthwise": depthwise conv weights are excluded (``depthwise_weight_names``)
  because a constant depthwise weight lets onnxruntime run its fast convolution kernels and the
  step graph take the cheap input-gradient path (docs/design-notes.md#fast-path-layout); their biases stay trainable.
- The ImageNet classifier is not part of an embedding model, so it is never in the mask; the MI
  projection head is trained in full on the device but is not part of the deployed model.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

import numpy as np

from edgecl.errors import ConfigError
from edgecl.formats.mask import Mask

if TYPE_CHECKING:
    from torch import nn

_SMALL_SHARE_OF_BUDGET = 0.25


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    flat = scores.reshape(-1)
    k = int(min(max(k, 0), flat.size))
    if k == 0:
        return np.zeros(0, np.int32)
    # lexsort: primary key descending score, secondary ascending index -> deterministic ties
    order = np.lexsort((np.arange(flat.size), -flat.astype(np.float64)))
    return np.sort(order[:k]).astype(np.int32)


SMALL_TENSOR_POLICIES = ("full", "ranked")


def select_mask(scores: dict[str, np.ndarray], select_rate: float,
                overlap: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                exclude: Collection[str] = frozenset(), small_tensors: str = "full") -> Mask:
    """scores: parameter name -> score array (the exported model's parameters, in model order).

    ``exclude``: parameter names that get no element (see the module docstring).

    ``small_tensors``: "full" trains 1-D tensors entirely (the reference code's policy, when they fit
    in a quarter of the budget); "ranked" ranks them by score like every other tensor.
    """
    if not 0.0 < select_rate <= 1.0:
        raise ConfigError(f"select rate {select_rate} is outside (0, 1]", "pass e.g. --select-rate 0.05")
    if small_tensors not in SMALL_TENSOR_POLICIES:
        raise ConfigError(f"unknown small-tensor policy {small_tensors!r}", "use full or ranked")
    excluded = set(exclude)
    unknown = sorted(excluded - set(scores))
    if unknown:
        raise ConfigError(f"cannot exclude {unknown[0]} from the mask: the model has no such parameter",
                          "exclude names of the exported model's parameters")
    if scores and excluded >= set(scores):
        raise ConfigError("every parameter is excluded from the mask", "leave some tensors trainable")
    total = int(sum(s.size for s in scores.values()))
    budget = select_rate * total
    eligible = [n for n in scores if n not in excluded]
    small = [n for n in eligible if scores[n].ndim <= 1] if small_tensors == "full" else []
    small_total = sum(scores[n].size for n in small)
    full = set(small) if small_total <= _SMALL_SHARE_OF_BUDGET * budget else set()
    ranked_total = sum(scores[n].size for n in eligible) - sum(scores[n].size for n in full)
    rate = (budget - sum(scores[n].size for n in full)) / max(ranked_total, 1)
    indices: dict[str, np.ndarray] = {}
    for name, s in scores.items():
        if name in excluded:
            indices[name] = np.zeros(0, np.int32)
        elif name in full:
            indices[name] = np.arange(s.size, dtype=np.int32)
        else:
            indices[name] = top_k_indices(s, max(1, int(round(rate * s.size))))
    order = [n for n in scores if indices[n].size]
    counts = {}
    for name in order:
        counts[name] = np.zeros(indices[name].size, np.int32)
        if overlap and name in overlap:
            prev_idx, prev_cnt = overlap[name]
            pos = np.searchsorted(prev_idx, indices[name])
            pos = np.clip(pos, 0, max(len(prev_idx) - 1, 0))
            hit = (len(prev_idx) > 0) & (prev_idx[pos] == indices[name]) if len(prev_idx) else np.zeros(0, bool)
            if len(prev_idx):
                counts[name][hit] = prev_cnt[pos[hit]]
    return Mask(order=order, shapes={n: tuple(scores[n].shape) for n in order},
                indices={n: indices[n] for n in order}, total_params=total, overlap=counts)


def depthwise_weight_names(model: nn.Module) -> set[str]:
    """Parameter names of the depthwise convolution weights of a torch model (groups == in_channels > 1).

    The "no-depthwise" mask policy passes these to ``select_mask(exclude=...)``.
    """
    from torch import nn  # here, so the mask policy itself stays numpy-only

    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels:
            names.add(f"{module_name}.weight" if module_name else "weight")
    return names
