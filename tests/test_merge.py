"""Merge: weighted mean per element on hand-made arrays, prototypes, overlap counts."""

from __future__ import annotations

import numpy as np
import pytest
from edgecl_test_deltas import make_delta, make_manifest, make_mask

from edgecl.formats import delta as D
from edgecl.formats.mask import Mask, overlap_from_bytes
from edgecl.formats.prototypes import Prototypes
from edgecl.server.merge import (
    MergeError,
    MergeInput,
    WeightedMean,
    get_strategy,
    merge_deltas,
    merge_prototypes,
)


def _input(positions, values, weight, protos=None):
    return MergeInput(np.array(positions), np.array(values, np.float32), weight, protos)


def test_weighted_mean_by_hand():
    # K = 6. Device A (weight 1) changed 0, 2, 3; B (weight 3) changed 2, 3, 5; C (weight 4) changed 3.
    result = WeightedMean().merge([_input([0, 2, 3], [1.0, 2.0, 4.0], 1),
                                   _input([2, 3, 5], [6.0, -4.0, 0.5], 3),
                                   _input([3], [8.0], 4)], k=6)
    assert result.positions.tolist() == [0, 2, 3, 5]
    np.testing.assert_allclose(result.values, [
        1.0,                                  # only A: its value
        (1 * 2.0 + 3 * 6.0) / 4,              # A and B
        (1 * 4.0 + 3 * -4.0 + 4 * 8.0) / 8,   # all three
        0.5,                                  # only B
    ], rtol=1e-7)
    assert result.contributors.tolist() == [1, 0, 2, 3, 0, 1]
    assert result.values.dtype == np.float32 and result.positions.dtype == np.int32


def test_single_device_is_identity_and_order_does_not_matter():
    rng = np.random.default_rng(0)
    items = []
    for weight in (5, 17, 2):
        positions = np.sort(rng.choice(1000, 300, replace=False))
        items.append(_input(positions, rng.normal(size=300), weight))
    alone = WeightedMean().merge(items[:1], 1000)
    np.testing.assert_array_equal(alone.positions, items[0].positions)
    np.testing.assert_array_equal(alone.values, items[0].values)
    forward, backward = WeightedMean().merge(items, 1000), WeightedMean().merge(items[::-1], 1000)
    np.testing.assert_array_equal(forward.positions, backward.positions)
    np.testing.assert_allclose(forward.values, backward.values, rtol=1e-6)
    # Equal weights and equal values: the mean is that value.
    same = WeightedMean().merge([_input([1, 2], [0.25, -0.5], 1), _input([1, 2], [0.25, -0.5], 1)], 4)
    np.testing.assert_array_equal(same.values, [0.25, -0.5])


def test_bad_inputs():
    with pytest.raises(MergeError, match="nothing"):
        WeightedMean().merge([], 3)
    with pytest.raises(MergeError, match="weight"):
        WeightedMean().merge([_input([0], [1.0], 0)], 3)
    with pytest.raises(MergeError, match="outside"):
        WeightedMean().merge([_input([3], [1.0], 1)], 3)
    with pytest.raises(MergeError, match="strategy"):
        get_strategy("median")


def test_prototypes_weighted_by_counts():
    a = Prototypes(["bolt", "nut"], np.array([[1.0, 0.0], [0.0, 2.0]], np.float32), np.array([1, 4]))
    b = Prototypes(["nut", "washer"], np.array([[4.0, 2.0], [1.0, 1.0]], np.float32), np.array([4, 2]))
    merged = merge_prototypes([a, None, b])
    assert merged is not None and merged.classes == ["bolt", "nut", "washer"]
    np.testing.assert_allclose(merged.means, [[1.0, 0.0], [2.0, 2.0], [1.0, 1.0]])
    assert merged.counts.tolist() == [1, 8, 2]
    assert merge_prototypes([None]) is None
    with pytest.raises(MergeError, match="sizes"):
        merge_prototypes([a, Prototypes(["x"], np.zeros((1, 3), np.float32), np.array([1]))])


def _setup(n_devices=3):
    mask = make_mask()
    manifest = make_manifest(mask.to_bytes(), mask.total_selected)
    deltas = [D.load(D.save(make_delta(manifest, f"dev-{i}", seed=i, samples_seen=10 * (i + 1))))
              for i in range(n_devices)]
    return mask, manifest, deltas


def test_merge_deltas_end_to_end_and_overlap():
    mask, _, deltas = _setup()
    mask.overlap[mask.order[0]][:] = 2          # earlier rounds updated the first tensor's elements twice
    out = merge_deltas(deltas, mask)
    k = mask.total_selected
    dense = np.stack([d.to_dense(k) for d in deltas])
    weights = np.array([d.samples_seen for d in deltas], np.float64)[:, None]
    changed = dense != 0
    expected = np.where(changed.any(0), (dense * weights).sum(0) / np.maximum((changed * weights).sum(0), 1e-30), 0)
    np.testing.assert_allclose(out.delta.to_dense(k), expected.astype(np.float32), rtol=1e-6, atol=1e-9)
    assert out.delta.device_id == "merge" and out.delta.samples_seen == sum(d.samples_seen for d in deltas)
    assert out.shared_elements == int((changed.sum(0) > 1).sum())
    # Overlap: +1 where any device changed, same per-tensor layout as the mask (indices + counts).
    counts = np.concatenate([out.overlap[n][1] for n in mask.order])
    np.testing.assert_array_equal(counts, mask.overlap_vector() + changed.any(0))
    parsed = overlap_from_bytes(out.overlap_bytes())
    for name in mask.order:
        np.testing.assert_array_equal(parsed[name][0], mask.indices[name])
        np.testing.assert_array_equal(parsed[name][1], out.overlap[name][1])
    # Deterministic: the same inputs give the same merged bytes (one content address on the server).
    assert D.save(out.delta) == D.save(merge_deltas(deltas, mask).delta)
    # A mask whose overlap took the merged counts is what the next round uses.
    Mask(order=mask.order, shapes=mask.shapes, indices=mask.indices, total_params=mask.total_params,
         overlap={n: c for n, (_, c) in out.overlap.items()})


def test_merge_deltas_refuses_mixed_bundles_and_wrong_k():
    mask, manifest, deltas = _setup(2)
    other = make_delta({**manifest, "version": 2}, "dev-9", seed=9)
    with pytest.raises(MergeError, match="bundle"):
        merge_deltas([deltas[0], other], mask)
    with pytest.raises(MergeError, match="K="):
        merge_deltas(deltas, make_mask(sizes=(40, 24), select=(8, 7)))
    with pytest.raises(MergeError, match="nothing"):
        merge_deltas([], mask)
