"""Merge the deltas of a fleet into one delta: pure numpy behind a one-method strategy.

Shared by the server (``edgecl merge``, ``POST .../merge``) and the host (``edgecl apply`` of several
deltas), so it lives in ``formats``: no side imports another. Spec: docs/server.md, "Merge".

What counts, before any strategy sees a value (``merge_deltas``):
- one delta per device (``newest_per_device``): a device that pushed twice for a bundle version
  counts once, with the delta that arrived last (the server's arrival order; for files given to
  ``apply``, the order given). A device's clock (``created_utc``) is not what decides: the server
  can trust the order it received deltas in, not a device's clock;
- weights are bounded: a device's weight is its ``samples_seen`` (at most ``MAX_SAMPLES_SEEN``,
  the server refuses more at push), and no device holds more than ``max_share`` of the total
  weight (the excess is spread over the others in proportion to theirs): one device claiming 9e18
  images cannot make the merge equal to its delta.

Strategies, per element of the delta vector:
- ``weighted-mean`` (default): the mean of the values of the devices that changed it, weighted as
  above; an element changed by one device takes its value; elements no device changed stay 0.
- ``trimmed-mean``: every device votes on every element (0 where it changed nothing, which is
  what its model holds there); per element the ``trim`` share of the lowest and of the highest
  votes is dropped and the rest averaged, unweighted (coordinate-wise trimmed mean, Yin et al.
  2018, "Byzantine-robust distributed learning", ICML). With fewer than 1 / trim devices nothing
  is trimmed.
- ``median``: the coordinate-wise median of the same votes (Yin et al. 2018).
- ``ties``: sign election (the sign step of TIES-merging, Yadav et al. 2023, NeurIPS): per element
  the sign of the weighted sum of the devices' values wins, and the weighted mean of the values
  of that sign alone is kept. Where two devices pull an element in opposite directions the mean
  cancels both; sign election keeps the stronger side's step whole. No trim step (the deltas are
  already sparse and quantized).
The robust strategies bound what a minority of devices can do to any element, at the price of
damping elements that only a few devices changed (their median is 0 once most devices did not).

Prototypes of a class held by several devices: the count-weighted mean of their means, with the
same share cap per class; counts summed. Overlap counts (docs/method.md#overlap) go up by one wherever
the merged delta changed the element (``formats.overlap.round_increment``, the host's rule too).

Like Flower's ``aggregate.py``: the strategy only sees arrays; consistency (same bundle, same K) is
checked by ``merge_deltas`` before anything is aggregated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np

from edgecl import classstats
from edgecl.errors import EdgeclError
from edgecl.formats.delta import MERGE_DEVICE_ID, Delta
from edgecl.formats.mask import Mask, overlap_to_bytes
from edgecl.formats.overlap import round_increment
from edgecl.formats.prototypes import Prototypes

MAX_SAMPLES_SEEN = 10**9        # a device's claimed images: the server refuses more at push
DEFAULT_MAX_SHARE = 0.5         # no device holds more than half the merge weight (when there are 2+)
DEFAULT_TRIM = 0.2              # trimmed-mean: share of votes dropped at each end, per element
_COLUMNS_PER_CHUNK = 1 << 16    # robust strategies hold [devices, chunk] float32 at a time
T = TypeVar("T")


class MergeError(EdgeclError):
    """The deltas cannot be merged (none, mixed bundles, wrong K, zero weight...)."""


@dataclass
class MergeInput:
    positions: np.ndarray            # int positions in [0, K) this device changed (decoded value != 0)
    values: np.ndarray               # float32 values at those positions
    weight: float                    # > 0: the device's bounded share of the merge
    prototypes: Prototypes | None    # the device's class prototypes (counts are the weights)


@dataclass
class MergeResult:
    positions: np.ndarray            # int32, increasing: elements whose merged value is nonzero
    values: np.ndarray               # float32 merged values there
    contributors: np.ndarray         # int32 [K]: how many devices changed each element
    prototypes: Prototypes | None


class MergeStrategy(Protocol):
    name: str

    def merge(self, inputs: Sequence[MergeInput], k: int) -> MergeResult: ...


def _check_inputs(inputs: Sequence[MergeInput], k: int) -> np.ndarray:
    """All positions concatenated (int64), after checking weights and ranges."""
    if not inputs:
        raise MergeError("nothing to merge", "push at least one delta for this bundle first")
    for i, item in enumerate(inputs):
        if not (np.isfinite(item.weight) and item.weight > 0):
            raise MergeError(f"delta {i} has weight {item.weight}", "merge only deltas with samples_seen >= 1")
    positions = np.concatenate([np.asarray(x.positions, np.int64) for x in inputs])
    if positions.size and (positions.min() < 0 or positions.max() >= k):
        raise MergeError(f"a position is outside the delta vector [0, {k})", "merge deltas made for this mask")
    return positions


def _result(values_dense: np.ndarray, contributors: np.ndarray, inputs: Sequence[MergeInput],
            max_share: float | None) -> MergeResult:
    changed = np.flatnonzero(values_dense).astype(np.int32)
    return MergeResult(changed, values_dense[changed].astype(np.float32), contributors,
                       merge_prototypes([x.prototypes for x in inputs], max_share))


class WeightedMean:
    """Per element: sum(w_d * v_d) / sum(w_d) over the devices d that changed it."""

    name = "weighted-mean"

    def merge(self, inputs: Sequence[MergeInput], k: int) -> MergeResult:
        positions = _check_inputs(inputs, k)
        weights = np.concatenate([np.full(len(x.positions), x.weight, np.float64) for x in inputs])
        values = np.concatenate([np.asarray(x.values, np.float64) for x in inputs])
        # float64 accumulation: 100 devices' fp32 values sum without visible rounding.
        weighted_sum = np.bincount(positions, weights=weights * values, minlength=k)
        weight_sum = np.bincount(positions, weights=weights, minlength=k)
        contributors = np.bincount(positions, minlength=k).astype(np.int32)
        changed = np.flatnonzero(contributors).astype(np.int32)
        merged = (weighted_sum[changed] / weight_sum[changed]).astype(np.float32)
        # Keep every changed element (even one whose mean is exactly 0): same as before the robust options.
        return MergeResult(changed, merged, contributors, merge_prototypes([x.prototypes for x in inputs]))


class SignElected:
    """Per element: elect the sign of sum(w_d * v_d); keep sum(w_d * v_d) / sum(w_d) over the devices d
    whose value has that sign (a tie, sum exactly 0, keeps the positive side)."""

    name = "ties"

    @staticmethod
    def accumulate(sums: np.ndarray, positions: np.ndarray, values: np.ndarray, weights: np.ndarray) -> None:
        """Add values into ``sums`` [4, K] float64 (positive: weighted sum, weight; negative: the
        same), in the order given: the in-memory and the streaming merge both call this, device by
        device, so their float64 sums agree to the bit."""
        positive = values > 0
        for row, side in ((0, positive), (2, ~positive)):
            np.add.at(sums[row], positions[side], weights[side] * values[side])
            np.add.at(sums[row + 1], positions[side], weights[side])

    @staticmethod
    def finish(sums: np.ndarray) -> np.ndarray:
        """The merged K-vector (float32) from the sums."""
        positive = sums[0] + sums[2] >= 0
        num = np.where(positive, sums[0], sums[2])
        den = np.where(positive, sums[1], sums[3])
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0).astype(np.float32)

    def merge(self, inputs: Sequence[MergeInput], k: int) -> MergeResult:
        _check_inputs(inputs, k)
        sums = np.zeros((4, k), np.float64)
        contributors = np.zeros(k, np.int32)
        for x in inputs:
            pos = np.asarray(x.positions, np.int64)
            vals = np.asarray(x.values, np.float64)
            contributors[pos] += 1
            self.accumulate(sums, pos, vals, np.full(len(pos), x.weight, np.float64))
        return _result(self.finish(sums), contributors, inputs, None)


@dataclass
class _Coordinatewise:
    """Robust per-element statistic over all devices' full vectors (0 where a device changed nothing)."""

    name: str
    trim: float = 0.0          # share dropped at each end; median ignores it

    def cut(self, n: int) -> int:
        """Votes dropped at each end of n (trimmed mean); never all of them."""
        cut = int(np.floor(self.trim * n)) if self.name == "trimmed-mean" else 0
        return (n - 1) // 2 if 2 * cut >= n else cut

    def reduce(self, columns: np.ndarray, values: np.ndarray, n: int, width: int) -> np.ndarray:
        """The statistic of each of ``width`` columns of n votes, from its NONZERO votes only:
        ``columns`` (the column of each, int) and ``values`` (float32), in device order; every
        other vote is 0 (the device changed nothing there). The one definition both the in-memory
        and the streaming merge (merge_stream.py) call, so they agree to the bit whatever columns
        they hold at a time.

        A column's sorted votes are its negative values ascending, its zeros, its positive values
        ascending; only the nonzero ones are sorted (a device changes a fraction of the elements),
        and the work grows linearly with the devices. Trimmed mean: the votes of ranks [cut,
        n - cut) summed in that order in float64 (the zeros add nothing), divided by n - 2 cut.
        Median: the middle vote, or the float32 mean of the two middle ones (numpy's median)."""
        col, val = _sort_by_column_then_value(columns, values)
        nonzero = np.bincount(col, minlength=width)
        starts = np.concatenate([[0], np.cumsum(nonzero)[:-1]])
        zeros = n - nonzero
        negative = np.bincount(col, weights=(val < 0), minlength=width).astype(np.int64)
        within = np.arange(val.size) - starts[col]
        rank = np.where(val < 0, within, within + zeros[col])         # rank among the column's n votes
        if self.name == "median":
            def at(r: int) -> np.ndarray:        # the vote of rank r in every column
                index = np.where(r < negative, starts + r, starts + r - zeros)
                is_zero = (r >= negative) & (r < negative + zeros)
                picked = val[np.clip(index, 0, max(val.size - 1, 0))] if val.size else np.zeros(width, np.float32)
                return np.where(is_zero, np.float32(0), picked).astype(np.float32)

            if n % 2:
                return at(n // 2)
            return (at(n // 2 - 1) + at(n // 2)) / np.float32(2)
        cut = self.cut(n)
        kept = (rank >= cut) & (rank < n - cut)
        total = np.bincount(col, weights=np.where(kept, val.astype(np.float64), 0.0), minlength=width)
        return total / (n - 2 * cut)

    def merge(self, inputs: Sequence[MergeInput], k: int) -> MergeResult:
        _check_inputs(inputs, k)
        n = len(inputs)
        contributors = np.zeros(k, np.int32)
        for x in inputs:
            contributors[np.asarray(x.positions, np.int64)] += 1
        out = np.zeros(k, np.float32)
        for start in range(0, k, _COLUMNS_PER_CHUNK):
            stop = min(k, start + _COLUMNS_PER_CHUNK)
            columns, values = [], []
            for x in inputs:
                pos = np.asarray(x.positions, np.int64)
                vals = np.asarray(x.values, np.float32)
                sel = (pos >= start) & (pos < stop) & (vals != 0)
                columns.append(pos[sel] - start)
                values.append(vals[sel])
            out[start:stop] = self.reduce(np.concatenate(columns), np.concatenate(values), n, stop - start)
        return _result(out, contributors, inputs, None)


def _sort_by_column_then_value(columns: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(columns, values) sorted by column, then by value: one sort of a uint64 key, the column in
    the high half and the float32 value's bits made order-preserving in the low half (negative
    values: all bits flipped; others: the sign bit set), decoded back after the sort."""
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32)
    ordered = np.where(bits >> np.uint32(31), ~bits, bits | np.uint32(0x80000000))
    key = (np.asarray(columns, np.uint64) << np.uint64(32)) | ordered.astype(np.uint64)
    key.sort()
    low = (key & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    back = np.where(low >> np.uint32(31), low & np.uint32(0x7FFFFFFF), ~low).astype(np.uint32)
    return (key >> np.uint64(32)).astype(np.int64), back.view(np.float32)


def merge_prototypes(tables: Sequence[Prototypes | None], max_share: float | None = None) -> Prototypes | None:
    """Per class name: count-weighted mean of the means (each device's share of a class capped at
    ``max_share`` when given), counts summed; class order = first seen."""
    present: list[Prototypes] = [t for t in tables if t is not None and len(t)]
    if not present:
        return None
    dims = {int(t.means.shape[1]) for t in present}
    if len(dims) != 1:
        raise MergeError(f"prototypes have different sizes {sorted(dims)}", "merge deltas of one bundle only")
    rows: dict[str, list[tuple[np.ndarray, int]]] = {}
    for table in present:
        for name, mean, count in zip(table.classes, np.asarray(table.means, np.float64), table.counts, strict=True):
            rows.setdefault(name, []).append((mean, int(count)))
    names = list(rows)
    merged = []
    for name in names:
        counts = np.array([c for _, c in rows[name]], np.float64)
        shares = capped_shares(counts, max_share) if max_share is not None else None
        merged.append(classstats.merge_by_counts([m for m, _ in rows[name]], counts, shares))
    return Prototypes(names, np.stack([m for m, _ in merged]).astype(np.float32),
                      np.array([n for _, n in merged], np.int64))


def capped_shares(weights: np.ndarray, max_share: float | None) -> np.ndarray:
    """Weights -> shares summing to 1, none above ``max_share`` (water-filling: the excess of a
    capped share goes to the others in proportion to their weights). With fewer than 1 / max_share
    entries the cap cannot hold and the shares are equal."""
    w = np.asarray(weights, np.float64)
    if w.size == 0:
        return w
    shares = w / w.sum()
    if max_share is None or max_share >= 1 or w.size == 1:
        return shares
    if max_share * w.size <= 1:
        return np.full(w.size, 1.0 / w.size)
    capped = np.zeros(w.size, bool)
    for _ in range(w.size):              # each round caps at least one more entry, or stops
        over = (shares > max_share + 1e-12) & ~capped
        if not over.any():
            break
        capped |= over
        free = 1.0 - max_share * capped.sum()
        rest = w * ~capped
        shares = np.where(capped, max_share, free * rest / rest.sum())
    return shares


STRATEGIES: dict[str, MergeStrategy] = {
    WeightedMean.name: WeightedMean(),
    "trimmed-mean": _Coordinatewise("trimmed-mean", DEFAULT_TRIM),
    "median": _Coordinatewise("median"),
    SignElected.name: SignElected(),
}


def get_strategy(name: str, trim: float | None = None) -> MergeStrategy:
    if name not in STRATEGIES:
        raise MergeError(f"unknown merge strategy {name!r}", f"use one of {', '.join(STRATEGIES)}")
    if trim is not None and name == "trimmed-mean":
        if not 0 <= trim < 0.5:
            raise MergeError(f"trim {trim} is outside [0, 0.5)", "pass a share of votes to drop at each end, e.g. 0.2")
        return _Coordinatewise("trimmed-mean", float(trim))
    return STRATEGIES[name]


@dataclass
class MergeOptions:
    strategy: str = WeightedMean.name     # one of STRATEGIES
    max_share: float = DEFAULT_MAX_SHARE  # cap on one device's share of the weight (weighted-mean, prototypes)
    trim: float | None = None             # trimmed-mean: share dropped at each end (None: DEFAULT_TRIM)


@dataclass
class MergeOutput:
    delta: Delta                                      # device_id "merge", same bundle/version as inputs
    overlap: dict[str, tuple[np.ndarray, np.ndarray]]  # tensor name -> (indices int32, counts int32)
    shared_elements: int                              # elements changed by more than one device
    devices: list[str] = field(default_factory=list)  # the devices counted, in input order
    superseded: int = 0                               # older deltas of a device dropped for its newest

    def overlap_bytes(self) -> bytes:
        return overlap_to_bytes(self.overlap)


def newest_per_device(items: Sequence[T], device_of: Callable[[T], str]) -> tuple[list[T], int]:
    """THE rule for "each device's newest delta": ``items`` in arrival order (oldest first), the
    last one of each device counts; the kept ones stay in arrival order; and how many were dropped.
    The server (rows by ``received_ns``) and ``merge_deltas`` (deltas in the order given) both call it."""
    last: dict[str, int] = {}
    for i, item in enumerate(items):
        last[device_of(item)] = i
    keep = sorted(last.values())
    return [items[i] for i in keep], len(items) - len(keep)


def latest_per_device(deltas: Sequence[Delta]) -> tuple[list[Delta], int]:
    """``newest_per_device`` over decoded deltas given in arrival order."""
    return newest_per_device(deltas, lambda d: d.device_id)


def check_consistent(d: Delta, first: Delta, k: int) -> None:
    """Validate before anything is merged: every delta of one bundle version, the mask's K, and a
    bounded merge weight (Flower's habit: consistency first). Shared by the in-memory and the
    streaming merge."""
    same = (d.bundle_id, d.bundle_version, d.base_sha256, d.mask_sha256)
    if same != (first.bundle_id, first.bundle_version, first.base_sha256, first.mask_sha256):
        raise MergeError(f"delta from {d.device_id} is for bundle {d.bundle_id} v{d.bundle_version}, "
                         f"not {first.bundle_id} v{first.bundle_version}", "merge the deltas of one bundle version")
    if d.delta_k != k:
        raise MergeError(f"delta from {d.device_id} has K={d.delta_k}, the mask selects {k}",
                         "merge with the mask of the bundle the deltas were made for")
    if d.samples_seen > MAX_SAMPLES_SEEN:
        raise MergeError(f"delta from {d.device_id} claims {d.samples_seen} samples (over {MAX_SAMPLES_SEEN})",
                         "exclude it (--exclude-delta) or make it again")


def merge_deltas(deltas: Sequence[Delta], mask: Mask, strategy: str = WeightedMean.name,
                 options: MergeOptions | None = None) -> MergeOutput:
    """Check the deltas belong together and to ``mask``, keep each device's newest, bound the
    weights, merge them, update the overlap counts.

    Deterministic: the merged delta's ``created_utc`` is the newest input's, so merging the same
    deltas twice gives byte-identical files (and one content address on the server).
    """
    options = options or MergeOptions(strategy=strategy)
    if not deltas:
        raise MergeError("nothing to merge", "push at least one delta for this bundle first")
    first = deltas[0]
    k = mask.total_selected
    for d in deltas:
        check_consistent(d, first, k)
    counted, superseded = latest_per_device(deltas)
    shares = capped_shares(np.array([max(d.samples_seen, 0) for d in counted], np.float64), options.max_share) \
        if all(d.samples_seen > 0 for d in counted) else np.zeros(len(counted))
    inputs = [MergeInput(d.changed_positions(), d.values[d.values != 0], float(s), d.prototypes)
              for d, s in zip(counted, shares, strict=True)]
    chosen = get_strategy(options.strategy, options.trim)
    result = chosen.merge(inputs, k)
    result.prototypes = merge_prototypes([x.prototypes for x in inputs], options.max_share)
    dense = np.zeros(k, np.float32)
    dense[result.positions] = result.values
    counts = mask.overlap_vector() + round_increment(dense)
    overlap = {name: (mask.indices[name], counts[sl]) for name, sl in mask.slices().items()}
    shared = int(np.count_nonzero(result.contributors > 1))
    merged = Delta(bundle_id=first.bundle_id, bundle_version=first.bundle_version, base_sha256=first.base_sha256,
                   mask_sha256=first.mask_sha256, device_id=MERGE_DEVICE_ID, delta_k=k,
                   positions=result.positions, values=result.values,
                   steps=sum(d.steps for d in counted), samples_seen=sum(d.samples_seen for d in counted),
                   metrics={"deltas": len(counted), "changed": int(result.positions.size), "shared": shared},
                   created_utc=max(d.created_utc for d in counted), prototypes=result.prototypes)
    return MergeOutput(merged, overlap, shared, [d.device_id for d in counted], superseded)
