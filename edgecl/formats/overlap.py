"""The overlap history: how many adaptation rounds changed each weight element (one owner for the rule).

The rule (docs/method.md#step-2), ``round_increment``: after a round, every element whose value the
round changed (its entry of the merged delta is non-zero) gets +1. The server's merge (the overlap
file it writes beside a merged delta) and the host's ``apply`` both call it, so they agree under every
merge strategy: an element one device of five changed has a median of 0, the next version's weight
there did not move, and its count stays. Selected-but-unchanged elements do not count: the
drop gate and the per-step cap leave many selected elements untouched, and an element that never
moved carries no earlier task's knowledge to protect. The device scales an element's gradient by
``overlap_decay ** count`` (device/update.py overlap_scale).

The history covers every element ever changed, not only the current mask's: a later mask may pick
an element again, and its count must still be there (bundles carry ``overlap.safetensors``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgecl.formats.mask import (
    Mask,
    Overlap,
    overlap_add,
    overlap_from_bytes,
    overlap_of_mask,
    overlap_to_bytes,
)


def round_increment(merged: np.ndarray) -> np.ndarray:
    """THE overlap rule: 1 where the round's merged delta [K] changed the element (value != 0), else 0."""
    return (np.asarray(merged) != 0).astype(np.int32)


@dataclass
class OverlapHistory:
    counts: Overlap = field(default_factory=dict)   # tensor name -> (flat indices int32 sorted, counts int32)

    @classmethod
    def of_mask(cls, mask: Mask) -> OverlapHistory:
        """The counts a mask carries (a bundle without overlap.safetensors)."""
        return cls(overlap_of_mask(mask))

    @classmethod
    def from_bytes(cls, data: bytes) -> OverlapHistory:
        return cls(overlap_from_bytes(data))

    def to_bytes(self) -> bytes:
        return overlap_to_bytes(self.counts)

    def record_round(self, mask: Mask, delta: np.ndarray) -> OverlapHistory:
        """A new history: +1 for every element that ``delta`` (over ``mask``) changed."""
        changed = round_increment(delta).astype(bool)
        this_round = {n: (mask.indices[n][changed[sl]].astype(np.int32), np.ones(int(changed[sl].sum()), np.int32))
                      for n, sl in mask.slices().items() if changed[sl].any()}
        return OverlapHistory(overlap_add(self.counts, this_round))

    def counts_for(self, mask: Mask) -> dict[str, np.ndarray]:
        """Counts at ``mask``'s selected elements, in its order (0 where never changed)."""
        out = {}
        for name in mask.order:
            selected = mask.indices[name]
            counts = np.zeros(selected.size, np.int32)
            if name in self.counts and selected.size:
                idx, cnt = self.counts[name]
                pos = np.searchsorted(selected, idx)
                hit = (pos < selected.size) & (selected[np.minimum(pos, selected.size - 1)] == idx)
                counts[pos[hit]] = cnt[hit]
            out[name] = counts
        return out

    def with_counts(self, mask: Mask) -> Mask:
        """``mask`` carrying this history's counts at its elements."""
        return Mask(order=list(mask.order), shapes=dict(mask.shapes), indices={n: mask.indices[n] for n in mask.order},
                    total_params=mask.total_params, overlap=self.counts_for(mask))

    def __bool__(self) -> bool:
        return bool(self.counts)
