"""Value bounds checked at push: how far a delta may move a weight, how large a prototype may be.

A finite delta can still be poison: 3e38 passes every finiteness check, survives the merge and
turns the next version's predictions into NaN. So the server bounds each value by the size of the
weight it moves. When a bundle's files are stored (``edgecl server bundle add``), the server keeps
a small table: for each masked tensor, ``max |W0|`` over the whole tensor, and ``max |prototype|``
of the bundle's prototypes. A pushed delta is refused (``values_out_of_range``) when

    |delta_i| > DELTA_FACTOR * max(max |W0| of the tensor of element i, MIN_WEIGHT_SCALE)
    |prototype value| > PROTOTYPE_FACTOR * max(max |bundle prototype value|, 1)

Why 10x: an adapted weight that ends ten times further from zero than the largest weight of its
tensor has left the trained model behind (the device's lr and step counts move weights by a few
percent); the floor 1e-3 keeps tensors that are all ~0 (fresh biases) adaptable. Prototypes are
means of embeddings, whose scale the backbone sets: 1000x leaves every honest change through.

A bundle registered without its weights (manifest + mask only, as before 0.2) gets absolute bounds
(``UNSCALED_*``); they still stop 3e38.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DELTA_FACTOR = 10.0
MIN_WEIGHT_SCALE = 1e-3
PROTOTYPE_FACTOR = 1e3
UNSCALED_DELTA_LIMIT = 1e3
UNSCALED_PROTOTYPE_LIMIT = 1e6


@dataclass
class Limits:
    per_element: np.ndarray      # float32 [K]: bound on |delta| at each position of the delta vector
    tensor_of: np.ndarray        # int32 [K]: index into ``names`` (for the message)
    names: list[str]
    prototype: float             # bound on |prototype mean value|
    scaled: bool                 # bounds from the bundle's weights (else the absolute ones)


def scale_table(weights_path: Path | None, mask_bytes: bytes, prototypes_path: Path | None) -> dict:
    """{"tensors": {name: max |W0|}, "prototypes": max |P|} from the bundle's files."""
    from safetensors import safe_open

    from edgecl.formats.mask import Mask

    mask = Mask.from_bytes(mask_bytes)
    tensors: dict[str, float] = {}
    if weights_path is not None and Path(weights_path).exists():
        with safe_open(str(weights_path), framework="numpy") as f:
            available = set(f.keys())
            for name in mask.order:
                if name in available:
                    tensors[name] = float(np.max(np.abs(f.get_tensor(name)))) if mask.shapes[name] else 0.0
    prototypes = 0.0
    if prototypes_path is not None and Path(prototypes_path).exists():
        from edgecl.formats.prototypes import Prototypes

        means = Prototypes.load_file(prototypes_path).means
        prototypes = float(np.max(np.abs(means))) if means.size else 0.0
    return {"tensors": tensors, "prototypes": prototypes}


def limits_for(mask_bytes: bytes, scales: dict | None) -> Limits:
    from edgecl.formats.mask import Mask

    mask = Mask.from_bytes(mask_bytes)
    k = mask.total_selected
    per_element = np.full(k, UNSCALED_DELTA_LIMIT, np.float32)
    tensor_of = np.zeros(k, np.int32)
    known = (scales or {}).get("tensors", {})
    for i, (name, sl) in enumerate(mask.slices().items()):
        tensor_of[sl] = i
        if name in known:
            per_element[sl] = DELTA_FACTOR * max(float(known[name]), MIN_WEIGHT_SCALE)
    proto = (PROTOTYPE_FACTOR * max(float(scales.get("prototypes", 0.0)), 1.0) if scales
             else UNSCALED_PROTOTYPE_LIMIT)
    return Limits(per_element, tensor_of, list(mask.order), proto, bool(known))


def out_of_range(limits: Limits, positions: np.ndarray, values: np.ndarray,
                 prototype_means: np.ndarray | None, scatters: dict[str, Any] | None = None) -> str:
    """"" when every value is inside its bound, else the problem in one line. ``scatters`` (name ->
    formats.scatter.Scatter): a statistics delta's within-class scatter, bounded per image by what
    embeddings inside the prototype bound can spread: trace / count <= D x (2 x prototype bound)^2."""
    positions = np.asarray(positions, np.int64)
    if positions.size:
        bound = limits.per_element[positions]
        over = np.abs(values) > bound
        if over.any():
            j = int(np.flatnonzero(over)[0])
            name = limits.names[int(limits.tensor_of[positions[j]])]
            basis = (f"{DELTA_FACTOR:g} x max(max |W0| of {name}, {MIN_WEIGHT_SCALE:g})" if limits.scaled
                     else "the absolute bound for a bundle stored without weights")
            return (f"{int(over.sum())} delta value(s) exceed their bound, e.g. {float(values[j]):.3g} at element "
                    f"{int(positions[j])} of {name} (bound {float(bound[j]):.3g} = {basis})")
    if prototype_means is not None and prototype_means.size:
        peak = float(np.max(np.abs(prototype_means)))
        if peak > limits.prototype:
            return f"a prototype value is {peak:.3g}, over the bound {limits.prototype:.3g}"
    for name, scatter in (scatters or {}).items():
        if scatter is None:
            continue
        per_image = (float(np.sum(np.square(scatter.factor, dtype=np.float64))) + scatter.residual) / max(scatter.count, 1)
        bound = scatter.dim * (2.0 * limits.prototype) ** 2
        if not per_image <= bound:
            return f"the {name}'s trace per image is {per_image:.3g}, over the bound {bound:.3g}"
    return ""
