"""The streaming merge (formats/merge_stream.py) gives today's in-memory merge's result to the bit, on
random inputs, for every strategy, whatever block of columns it holds at a time."""

from __future__ import annotations

import numpy as np
import pytest
from edgecl_test_deltas import make_delta, make_manifest, make_mask

from edgecl.formats import delta as D
from edgecl.formats.merge import STRATEGIES, MergeError, MergeOptions, get_strategy, merge_deltas
from edgecl.formats.merge_stream import StreamInput, block_columns, merge_stream


def _random_fleet(seed: int, devices: int):
    mask = make_mask()
    manifest = make_manifest(mask.to_bytes(), mask.total_selected)
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(devices):
        name = f"dev-{rng.integers(0, max(2, devices - 2))}"     # some devices pushed twice
        d = make_delta(manifest, name, seed=int(rng.integers(1 << 30)), samples_seen=int(rng.integers(1, 5000)))
        deltas.append(D.load(D.save(d, bytes(32), values=str(rng.choice(["fp32", "fp16", "int8"])))))
    return mask, deltas


def _inputs(deltas):
    return [StreamInput(d.device_id, d.samples_seen, lambda d=d: d) for d in deltas]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_stream_equals_in_memory_merge(strategy, seed, tmp_path, monkeypatch):
    mask, deltas = _random_fleet(seed, 9 + seed * 4)
    options = MergeOptions(strategy=strategy, trim=0.25 if strategy == "trimmed-mean" else None, max_share=0.3)
    want = merge_deltas(deltas, mask, options=options)
    import edgecl.formats.merge_stream as stream

    for memory, batch in ((1, 5), (40 * len(deltas) * 7, 1000), (1 << 30, 1 << 20)):   # 1 column, 7, every one
        monkeypatch.setattr(stream, "_BATCH_VALUES", batch)      # values split into blocks every `batch`
        got = merge_stream(_inputs(deltas), mask, options, memory_bytes=memory, spill_dir=tmp_path)
        assert got.devices == want.devices and got.superseded == want.superseded
        assert got.shared_elements == want.shared_elements
        np.testing.assert_array_equal(got.delta.positions, want.delta.positions)
        np.testing.assert_array_equal(got.delta.values, want.delta.values)
        assert D.save(got.delta, bytes(32)) == D.save(want.delta, bytes(32)), f"same bytes ({strategy}, {memory})"
        assert got.overlap_bytes() == want.overlap_bytes()
        assert list(tmp_path.iterdir()) == [], "spill files removed"
    assert block_columns(10_000, 167_505) * 10_000 * 40 <= 256 << 20


def test_stream_reads_each_delta_once_and_refuses_what_merge_refuses(tmp_path):
    mask, deltas = _random_fleet(5, 6)
    loads: list[str] = []

    def loader(d):
        def load():
            loads.append(d.device_id)
            return d
        return load

    inputs = [StreamInput(d.device_id, d.samples_seen, loader(d)) for d in deltas]
    out = merge_stream(inputs, mask, MergeOptions(strategy="median"), memory_bytes=64, spill_dir=tmp_path)
    assert sorted(loads) == sorted(out.devices) and len(loads) == len(set(loads)), "each counted delta decoded once"
    other = make_delta(make_manifest(mask.to_bytes(), mask.total_selected, bundle_id="other"), "dev-z", seed=3)
    with pytest.raises(MergeError, match="is for bundle other"):
        merge_stream(_inputs(deltas + [other]), mask, MergeOptions(), spill_dir=tmp_path)
    with pytest.raises(MergeError, match="nothing to merge"):
        merge_stream([], mask)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 33])
def test_sparse_reduce_equals_the_dense_definition(n):
    """reduce() sees only the nonzero votes; it must equal the statistic of the full vote matrix
    (zeros where a device changed nothing), computed the way the merge defined it before streaming:
    np.median, and the float64 mean of the sorted votes of ranks [cut, n - cut)."""
    rng = np.random.default_rng(n)
    width = 50
    votes = np.where(rng.random((n, width)) < 0.4, rng.normal(0, 1, (n, width)), 0).astype(np.float32)
    votes[:, 0] = 0                                                  # a column nobody changed
    votes[:, 1] = 1.5                                                # ties
    rows, cols = np.nonzero(votes)                                   # device order, as the merge sees them
    for strategy in ("median", "trimmed-mean"):
        reducer = STRATEGIES[strategy] if strategy == "median" else get_strategy("trimmed-mean", 0.25)
        got = reducer.reduce(cols, votes[rows, cols], n, width)
        if strategy == "median":
            want = np.median(votes, axis=0)
        else:
            cut = reducer.cut(n)
            ordered = np.sort(votes, axis=0).astype(np.float64)
            want = ordered[cut]
            for r in range(cut + 1, n - cut):
                want = want + ordered[r]
            want = want / (n - 2 * cut)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32), err_msg=strategy)
