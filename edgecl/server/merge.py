"""Merge the deltas of a fleet into one delta: pure numpy behind a one-method strategy.

The default strategy (``weighted-mean``), per element of the delta vector: the mean of the values
of the devices that changed it, weighted by each device's ``samples_seen``; an element changed by
one device takes its value; elements no device changed stay unchanged. Prototypes of a class held
by several devices are averaged the same way, weighted by the per-class image counts (which makes
the merged prototype the mean embedding over all those images). The per-element overlap counts
(METHOD.md step 2) go up by one wherever any device changed the element.

Like Flower's ``aggregate.py``: the strategy only sees arrays; consistency (same bundle, same K)
is checked by ``merge_deltas`` before anything is aggregated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edgecl.errors import EdgeclError
from edgecl.formats.delta import MERGE_DEVICE_ID, Delta
from edgecl.formats.mask import Mask, overlap_to_bytes
from edgecl.formats.prototypes import Prototypes


class MergeError(EdgeclError):
    """The deltas cannot be merged (none, mixed bundles, wrong K, zero weight...)."""


@dataclass
class MergeInput:
    positions: np.ndarray            # int positions in [0, K) this device changed (decoded value != 0)
    values: np.ndarray               # float32 values at those positions
    weight: float                    # > 0: samples seen on the device
    prototypes: Prototypes | None    # the device's class prototypes (counts are the weights)


@dataclass
class MergeResult:
    positions: np.ndarray            # int32, increasing: elements at least one device changed
    values: np.ndarray               # float32 merged values there
    contributors: np.ndarray         # int32 [K]: how many devices changed each element
    prototypes: Prototypes | None


class MergeStrategy(Protocol):
    name: str

    def merge(self, inputs: Sequence[MergeInput], k: int) -> MergeResult: ...


class WeightedMean:
    """Per element: sum(w_d * v_d) / sum(w_d) over the devices d that changed it."""

    name = "weighted-mean"

    def merge(self, inputs: Sequence[MergeInput], k: int) -> MergeResult:
        if not inputs:
            raise MergeError("nothing to merge", "push at least one delta for this bundle first")
        for i, item in enumerate(inputs):
            if not (np.isfinite(item.weight) and item.weight > 0):
                raise MergeError(f"delta {i} has weight {item.weight}", "merge only deltas with samples_seen >= 1")
        positions = np.concatenate([np.asarray(x.positions, np.int64) for x in inputs])
        if positions.size and (positions.min() < 0 or positions.max() >= k):
            raise MergeError(f"a position is outside the delta vector [0, {k})", "merge deltas made for this mask")
        weights = np.concatenate([np.full(len(x.positions), x.weight, np.float64) for x in inputs])
        values = np.concatenate([np.asarray(x.values, np.float64) for x in inputs])
        # float64 accumulation: 100 devices' fp32 values sum without visible rounding.
        weighted_sum = np.bincount(positions, weights=weights * values, minlength=k)
        weight_sum = np.bincount(positions, weights=weights, minlength=k)
        contributors = np.bincount(positions, minlength=k).astype(np.int32)
        changed = np.flatnonzero(contributors).astype(np.int32)
        merged = (weighted_sum[changed] / weight_sum[changed]).astype(np.float32)
        return MergeResult(changed, merged, contributors, merge_prototypes([x.prototypes for x in inputs]))


def merge_prototypes(tables: Sequence[Prototypes | None]) -> Prototypes | None:
    """Per class name: count-weighted mean of the means, counts summed; class order = first seen."""
    tables = [t for t in tables if t is not None and len(t)]
    if not tables:
        return None
    dims = {int(t.means.shape[1]) for t in tables}
    if len(dims) != 1:
        raise MergeError(f"prototypes have different sizes {sorted(dims)}", "merge deltas of one bundle only")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for table in tables:
        for name, mean, count in zip(table.classes, np.asarray(table.means, np.float64), table.counts, strict=True):
            sums[name] = sums.get(name, 0.0) + mean * int(count)
            counts[name] = counts.get(name, 0) + int(count)
    names = list(sums)
    means = np.stack([sums[n] / counts[n] for n in names]).astype(np.float32)
    return Prototypes(names, means, np.array([counts[n] for n in names], np.int64))


def update_overlap(overlap: np.ndarray, contributors: np.ndarray) -> np.ndarray:
    """Overlap counts [K] + 1 wherever at least one device changed the element."""
    return (np.asarray(overlap, np.int32) + (np.asarray(contributors) > 0)).astype(np.int32)


STRATEGIES: dict[str, MergeStrategy] = {WeightedMean.name: WeightedMean()}


def get_strategy(name: str) -> MergeStrategy:
    if name not in STRATEGIES:
        raise MergeError(f"unknown merge strategy {name!r}", f"use one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


@dataclass
class MergeOutput:
    delta: Delta                                      # device_id "merge", same bundle/version as inputs
    overlap: dict[str, tuple[np.ndarray, np.ndarray]]  # tensor name -> (indices int32, counts int32)
    shared_elements: int                              # elements changed by more than one device

    def overlap_bytes(self) -> bytes:
        return overlap_to_bytes(self.overlap)


def merge_deltas(deltas: Sequence[Delta], mask: Mask, strategy: str = WeightedMean.name) -> MergeOutput:
    """Check the deltas belong together and to ``mask``, merge them, update the overlap counts.

    Deterministic: the merged delta's ``created_utc`` is the newest input's, so merging the same
    deltas twice gives byte-identical files (and one content address on the server).
    """
    if not deltas:
        raise MergeError("nothing to merge", "push at least one delta for this bundle first")
    first = deltas[0]
    k = mask.total_selected
    for d in deltas:
        same = (d.bundle_id, d.bundle_version, d.base_sha256, d.mask_sha256)
        if same != (first.bundle_id, first.bundle_version, first.base_sha256, first.mask_sha256):
            raise MergeError(f"delta from {d.device_id} is for bundle {d.bundle_id} v{d.bundle_version}, "
                             f"not {first.bundle_id} v{first.bundle_version}", "merge the deltas of one bundle version")
        if d.delta_k != k:
            raise MergeError(f"delta from {d.device_id} has K={d.delta_k}, the mask selects {k}",
                             "merge with the mask of the bundle the deltas were made for")
    inputs = [MergeInput(d.changed_positions(), d.values[d.values != 0], float(d.samples_seen), d.prototypes)
              for d in deltas]
    result = get_strategy(strategy).merge(inputs, k)
    counts = update_overlap(mask.overlap_vector(), result.contributors)
    overlap = {name: (mask.indices[name], counts[sl]) for name, sl in mask.slices().items()}
    shared = int(np.count_nonzero(result.contributors > 1))
    merged = Delta(bundle_id=first.bundle_id, bundle_version=first.bundle_version, base_sha256=first.base_sha256,
                   mask_sha256=first.mask_sha256, device_id=MERGE_DEVICE_ID, delta_k=k,
                   positions=result.positions, values=result.values,
                   steps=sum(d.steps for d in deltas), samples_seen=sum(d.samples_seen for d in deltas),
                   metrics={"deltas": len(deltas), "changed": int(result.positions.size), "shared": shared},
                   created_utc=max(d.created_utc for d in deltas), prototypes=result.prototypes)
    return MergeOutput(merged, overlap, shared)
