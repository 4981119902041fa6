"""`edgecl release --consolidate` on the host (edgecl.device.consolidate): the devices' own training
rule (step graph on real onnxruntime, drop gate, sparse SGD with the per-step cap) run on exemplars of
every class from a given delta. Real tiny bundle and its real exemplars."""

from __future__ import annotations

import numpy as np
import pytest

from edgecl.device.consolidate import consolidate
from edgecl.errors import DataError
from edgecl.formats import manifest as mf
from edgecl.formats.exemplars import ExemplarMemory
from edgecl.formats.mask import Mask


def test_consolidation_trains_from_the_given_delta_within_the_mask_deterministically(tiny_bundle):
    memory = ExemplarMemory.load_file(tiny_bundle / mf.EXEMPLARS)
    k = Mask.load_file(tiny_bundle / mf.MASK).total_selected
    start = np.random.default_rng(1).normal(0, 1e-3, k).astype(np.float32)
    a = consolidate(tiny_bundle, start, memory, epochs=2, seed=5)
    b = consolidate(tiny_bundle, start, memory, epochs=2, seed=5)
    assert a.delta.shape == (k,) and np.all(np.isfinite(a.delta))
    assert np.array_equal(a.delta, b.delta)                          # the trainloop's seeded generators
    assert a.steps == b.steps > 0 and a.images == len(memory.labels) and a.classes == list(memory.classes)
    moved = a.delta != start
    assert moved.any() and not moved.all()                           # sparse: the drop gate leaves most untouched
    assert not np.array_equal(consolidate(tiny_bundle, start, memory, epochs=2, seed=6).delta, a.delta)


def test_consolidation_refuses_a_delta_of_another_mask_and_a_single_class(tiny_bundle):
    memory = ExemplarMemory.load_file(tiny_bundle / mf.EXEMPLARS)
    k = Mask.load_file(tiny_bundle / mf.MASK).total_selected
    with pytest.raises(DataError, match=f"the merged delta has {k + 1} values"):
        consolidate(tiny_bundle, np.zeros(k + 1, np.float32), memory, epochs=1)
    one = ExemplarMemory([memory.classes[0]], memory.of_class(memory.classes[0]),
                         np.zeros(len(memory.of_class(memory.classes[0])), np.int64))
    with pytest.raises(DataError, match="at least two classes"):
        consolidate(tiny_bundle, np.zeros(k, np.float32), one, epochs=1)
