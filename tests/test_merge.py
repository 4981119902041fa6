"""Merge (edgecl.formats.merge): weighted mean, trimmed mean and median per element on hand-made
arrays, bounded weights, one delta per device, prototypes, overlap counts."""

from __future__ import annotations

import numpy as np
import pytest
from edgecl_test_deltas import make_delta, make_manifest, make_mask

from edgecl.formats import delta as D
from edgecl.formats.mask import Mask, overlap_from_bytes
from edgecl.formats.merge import (
    MAX_SAMPLES_SEEN,
    STRATEGIES,
    MergeError,
    MergeInput,
    MergeOptions,
    WeightedMean,
    capped_shares,
    get_strategy,
    latest_per_device,
    merge_deltas,
    merge_prototypes,
    newest_per_device,
)
from edgecl.formats.overlap import OverlapHistory, round_increment
from edgecl.formats.prototypes import Prototypes


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
        get_strategy("mode")
    with pytest.raises(MergeError, match="trim"):
        get_strategy("trimmed-mean", trim=0.5)


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


def test_median_and_trimmed_mean_by_hand():
    # K = 4, five devices; every device votes on every element (0 where it changed nothing).
    rows = [([0, 1], [1.0, 5.0]), ([0, 1], [2.0, 6.0]), ([0], [3.0]), ([0, 3], [4.0, 1.0]), ([0, 1], [1000.0, 7.0])]
    inputs = [_input(p, v, 1) for p, v in rows]
    median = get_strategy("median").merge(inputs, 4)
    # element 0: votes 1,2,3,4,1000 -> 3; element 1: 5,6,0,0,7 -> 5; element 2: none -> 0; element 3: 0,0,0,1,0 -> 0
    assert median.positions.tolist() == [0, 1]
    np.testing.assert_array_equal(median.values, [3.0, 5.0])
    assert median.contributors.tolist() == [5, 3, 0, 1]
    trimmed = get_strategy("trimmed-mean", trim=0.2).merge(inputs, 4)   # drops 1 vote at each end
    assert trimmed.positions.tolist() == [0, 1]    # element 3: votes 0,0,0,1,0 -> 0,0,0
    np.testing.assert_allclose(trimmed.values, [(2 + 3 + 4) / 3, (0 + 5 + 6) / 3], rtol=1e-6)
    # The outlier (1000) moves the weighted mean a lot and the robust ones not at all.
    mean = WeightedMean().merge(inputs, 4)
    assert mean.values[0] > 200 and median.values[0] == 3.0
    # trim 0 is the plain (unweighted, zero-filled) mean
    plain = get_strategy("trimmed-mean", trim=0.0).merge(inputs, 4)
    np.testing.assert_allclose(plain.values[:2], [1010 / 5, 18 / 5], rtol=1e-6)


def test_ties_keeps_the_elected_side_whole_by_hand():
    # K = 4; weights 1, 1, 2. Element 0: +1, -3, +2 (w 2) -> sum 1 - 3 + 4 = 2 > 0: positive side
    # (1*1 + 2*2) / 3; element 1: +4, -4 (w 1 each) -> a tie keeps the positive side: 4; element 2:
    # -2 alone -> -2; element 3: nobody -> 0. The weighted mean cancels what ties keeps.
    inputs = [_input([0, 1], [1.0, 4.0], 1), _input([0, 1, 2], [-3.0, -4.0, -2.0], 1), _input([0], [2.0], 2)]
    ties = get_strategy("ties").merge(inputs, 4)
    assert ties.positions.tolist() == [0, 1, 2]
    np.testing.assert_allclose(ties.values, [5 / 3, 4.0, -2.0], rtol=1e-6)
    assert ties.contributors.tolist() == [3, 2, 1, 0]
    mean = WeightedMean().merge(inputs, 4)
    np.testing.assert_allclose(mean.values[:2], [(1 - 3 + 4) / 4, 0.0], atol=1e-6)


def test_robust_strategies_chunk_like_one_pass():
    rng = np.random.default_rng(3)
    k = 150_000                        # more than one column chunk
    inputs = []
    for _ in range(7):
        pos = np.sort(rng.choice(k, 40_000, replace=False))
        inputs.append(_input(pos, rng.normal(size=pos.size), 1))
    dense = np.zeros((7, k), np.float32)
    for row, x in enumerate(inputs):
        dense[row, x.positions] = x.values
    got = np.zeros(k, np.float32)
    result = get_strategy("median").merge(inputs, k)
    got[result.positions] = result.values
    np.testing.assert_array_equal(got, np.median(dense, axis=0).astype(np.float32))


def test_capped_shares():
    np.testing.assert_allclose(capped_shares(np.array([1.0, 1.0, 2.0]), 0.5), [0.25, 0.25, 0.5])
    # one device claims almost everything: it gets the cap, the others share the rest by their weights
    shares = capped_shares(np.array([9e18, 10.0, 30.0]), 0.5)
    np.testing.assert_allclose(shares, [0.5, 0.125, 0.375])
    assert abs(shares.sum() - 1) < 1e-12
    # two giants and two small ones: both giants capped
    np.testing.assert_allclose(capped_shares(np.array([1e9, 1e9, 1.0, 3.0]), 0.3), [0.3, 0.3, 0.1, 0.3])
    np.testing.assert_allclose(capped_shares(np.array([5.0, 1.0]), 0.5), [0.5, 0.5])   # cap forces equal
    np.testing.assert_allclose(capped_shares(np.array([5.0, 1.0]), 1.0), [5 / 6, 1 / 6])
    np.testing.assert_allclose(capped_shares(np.array([7.0]), 0.5), [1.0])


def test_huge_samples_seen_cannot_take_over_the_merge():
    mask, manifest, _ = _setup()
    honest = [make_delta(manifest, f"dev-{i}", seed=i, samples_seen=100) for i in range(3)]
    greedy = make_delta(manifest, "dev-x", seed=9, samples_seen=MAX_SAMPLES_SEEN)
    out = merge_deltas(honest + [greedy], mask)
    k = mask.total_selected
    g = greedy.to_dense(k)
    merged = out.delta.to_dense(k)
    shared = (g != 0) & np.stack([h.to_dense(k) != 0 for h in honest]).any(0)
    assert shared.any()
    # with the cap the greedy device holds half the weight where everyone changed the element
    assert not np.allclose(merged[shared], g[shared])
    with pytest.raises(MergeError, match="claims"):
        merge_deltas(honest + [make_delta(manifest, "dev-y", seed=8, samples_seen=MAX_SAMPLES_SEEN + 1)], mask)


def test_a_device_that_pushed_twice_counts_once():
    mask, manifest, _ = _setup()
    a_old = make_delta(manifest, "dev-0", seed=1)
    a_new = make_delta(manifest, "dev-0", seed=2)
    b = make_delta(manifest, "dev-1", seed=3)
    kept, dropped = latest_per_device([a_old, b, a_new])
    assert [d.device_id for d in kept] == ["dev-1", "dev-0"] and kept[1] is a_new and dropped == 1
    twice = merge_deltas([a_old, b, a_new], mask)
    once = merge_deltas([b, a_new], mask)
    assert twice.superseded == 1 and twice.devices == ["dev-1", "dev-0"]
    np.testing.assert_array_equal(twice.delta.to_dense(), once.delta.to_dense())


def test_newest_delta_is_the_last_arrival_not_the_device_clock(tmp_path):
    """One rule for the server's rows and the host's deltas: arrival order; a device's clock set
    ahead (or back) does not make an older delta count."""
    mask, manifest, _ = _setup()
    early = make_delta(manifest, "dev-0", seed=1)
    early.created_utc = "2099-01-01T00:00:00Z"          # a device clock far ahead, pushed first
    late = make_delta(manifest, "dev-0", seed=2)
    late.created_utc = "2000-01-01T00:00:00Z"
    kept, dropped = latest_per_device([early, late])
    assert kept == [late] and dropped == 1
    # the server's rows go through the same function
    from edgecl.server.service import MergeRequest, counted_rows
    from edgecl.server.store import Store

    store = Store(tmp_path / "store")
    try:
        for i, d in enumerate([early, late]):
            store.put_delta(D.save(d, bytes(32)), f"{i:064x}", {
                "bundle_id": d.bundle_id, "version": d.bundle_version, "device": d.device_id, "steps": 1,
                "samples_seen": 1, "values_dtype": "fp32", "created_utc": d.created_utc})
        rows = counted_rows(store, early.bundle_id, early.bundle_version, MergeRequest())
        assert [r["sha256"] for r in rows] == [f"{1:064x}"]
    finally:
        store.close()
    assert newest_per_device([("a", 1), ("b", 2), ("a", 3)], lambda x: x[0]) == ([("b", 2), ("a", 3)], 1)


def test_overlap_rule_is_one_rule_for_server_and_host():
    """The server's overlap file and the host's record_round agree under every strategy: +1 where
    the merged value is non-zero (an element one device of five changed has median 0: no +1)."""
    mask, manifest, deltas = _setup(5)
    for strategy in STRATEGIES:
        out = merge_deltas(deltas, mask, options=MergeOptions(strategy=strategy))
        dense = out.delta.to_dense(mask.total_selected)
        host = OverlapHistory.of_mask(mask).record_round(mask, dense).counts_for(mask)
        for name, (_, counts) in out.overlap.items():
            np.testing.assert_array_equal(counts, host[name], err_msg=strategy)
        server = np.concatenate([out.overlap[n][1] for n in mask.order]) - mask.overlap_vector()
        np.testing.assert_array_equal(server, round_increment(dense))
        if strategy == "median":    # the case the two old rules disagreed on
            changed_by_some = np.zeros(mask.total_selected, bool)
            for d in deltas:
                changed_by_some[d.changed_positions()] = True
            assert (changed_by_some & (dense == 0)).any(), "the test must cover an element the median zeroes"


def test_merge_deltas_robust_options():
    mask, _, deltas = _setup(5)
    med = merge_deltas(deltas, mask, options=MergeOptions(strategy="median"))
    k = mask.total_selected
    np.testing.assert_array_equal(med.delta.to_dense(k),
                                  np.median(np.stack([d.to_dense(k) for d in deltas]), 0).astype(np.float32))
    assert med.delta.prototypes is not None
