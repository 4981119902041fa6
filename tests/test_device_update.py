"""The drop-gated sparse update in numpy: property tests in the style of timm's test_layers_drop.py."""

from __future__ import annotations

import numpy as np
import pytest

from edgecl.device.update import cap_gate, draw_gate, overlap_scale, sgd_step, sparse_sgd_step


def test_drop_rate_zero_moves_every_element_with_a_gradient():
    rng = np.random.default_rng(0)
    delta = rng.normal(size=1000).astype(np.float32)
    grad = rng.normal(size=1000).astype(np.float32)
    grad[::7] = 0.0
    gate = draw_gate(rng, delta.size, drop_rate=0.0)
    assert gate.all()
    result = sparse_sgd_step(delta, grad, gate, np.ones_like(delta), lr=0.1)
    assert np.array_equal(result.delta != delta, grad != 0)
    assert result.changed == int(np.count_nonzero(grad))


def test_drop_rate_one_moves_nothing():
    rng = np.random.default_rng(0)
    delta = rng.normal(size=500).astype(np.float32)
    gate = draw_gate(rng, delta.size, drop_rate=1.0)
    result = sparse_sgd_step(delta, np.ones_like(delta), gate, np.ones_like(delta), lr=0.1, weight_decay=0.5)
    assert result.changed == 0 and np.array_equal(result.delta.view(np.uint32), delta.view(np.uint32))


@pytest.mark.parametrize("drop_rate", [0.5, 0.9, 0.99])
def test_measured_keep_rate_within_tolerance(drop_rate):
    rng = np.random.default_rng(1993)
    keep = np.mean([draw_gate(rng, 20_000, drop_rate).mean() for _ in range(20)])
    assert keep == pytest.approx(1 - drop_rate, abs=0.005)


def test_gate_is_fresh_every_step():
    rng = np.random.default_rng(3)
    a, b = draw_gate(rng, 10_000, 0.9), draw_gate(rng, 10_000, 0.9)
    overlap = np.mean(a & b) / 0.1
    assert overlap == pytest.approx(0.1, abs=0.03)  # independent draws: P(both) = 0.1 * 0.1


def test_ungated_elements_keep_their_exact_bits_even_with_weight_decay():
    rng = np.random.default_rng(5)
    delta = rng.normal(size=2000).astype(np.float32)
    grad = rng.normal(size=2000).astype(np.float32)
    gate = draw_gate(rng, delta.size, 0.9)
    result = sparse_sgd_step(delta, grad, gate, np.ones_like(delta), lr=0.01, weight_decay=5e-4)
    assert np.array_equal(result.delta[~gate].view(np.uint32), delta[~gate].view(np.uint32))
    assert np.all(result.delta[gate] != delta[gate])
    assert result.gated == int(gate.sum())


def test_sgd_matches_the_formula_with_overlap_scale():
    delta = np.array([1.0, 2.0, 3.0], np.float32)
    grad = np.array([0.5, 0.5, 0.5], np.float32)
    scale = overlap_scale(np.array([0, 1, 2]), 0.9)
    np.testing.assert_allclose(scale, [1.0, 0.9, 0.81], rtol=1e-6)
    result = sparse_sgd_step(delta, grad, np.array([True, True, False]), scale, lr=0.1, weight_decay=0.1)
    np.testing.assert_allclose(result.delta, [1 - 0.1 * (0.5 + 0.1), 2 - 0.1 * (0.45 + 0.2), 3.0], rtol=1e-6)
    np.testing.assert_allclose(sgd_step(delta, grad, 0.1), delta - 0.05, rtol=1e-6)


def test_cap_keeps_a_random_subset_of_open_gates():
    rng = np.random.default_rng(0)
    gate = draw_gate(rng, 10_000, 0.5)
    capped = cap_gate(gate, 100, rng)
    assert capped.sum() == 100 and not np.any(capped & ~gate)
    assert cap_gate(gate, 10**6, rng) is gate and cap_gate(gate, -1, rng) is gate


def test_default_rates_never_exceed_half_a_percent_of_all_weights():
    # 5% of 100k weights selected, 90% dropped: the Bernoulli count straddles 0.5%; the cap holds it.
    total, selected = 100_000, 5_000
    rng = np.random.default_rng(1993)
    cap = int(0.005 * total)
    counts = [cap_gate(draw_gate(rng, selected, 0.9), cap, rng).sum() for _ in range(300)]
    assert max(counts) <= cap
    assert np.mean(counts) / total == pytest.approx(0.05 * 0.1, rel=0.03)
