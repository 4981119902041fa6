"""Semantic drift compensation on hand-made embeddings (issue 6)."""

from __future__ import annotations

import numpy as np
import pytest

from edgecl.classstats import compensate_drift as compensate
from edgecl.classstats import default_sigma, estimate_drift


def _cloud(seed=0, n=50, d=8):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(3, d)).astype(np.float32)


def test_pure_shift_is_recovered_exactly():
    before, prototypes = _cloud()
    shift = np.linspace(-1, 1, before.shape[1]).astype(np.float32)
    shifts = estimate_drift(before, before + shift, prototypes, sigma=0.7)
    np.testing.assert_allclose(shifts, np.tile(shift, (3, 1)), atol=1e-5)
    np.testing.assert_allclose(compensate(prototypes, before, before + shift, 0.7), prototypes + shift, atol=1e-5)


def test_zero_drift_changes_nothing():
    before, prototypes = _cloud(1)
    assert np.array_equal(compensate(prototypes, before, before.copy(), 1.0), prototypes)


def test_nearby_samples_dominate():
    # Two groups drift in opposite directions; each prototype follows the group it sits in.
    before = np.array([[0, 0], [0.1, 0], [10, 0], [10.1, 0]], np.float32)
    after = before + np.array([[1, 0], [1, 0], [0, -1], [0, -1]], np.float32)
    shifts = estimate_drift(before, after, np.array([[0.05, 0], [10.05, 0]], np.float32), sigma=1.0)
    np.testing.assert_allclose(shifts, [[1, 0], [0, -1]], atol=1e-6)


def test_far_prototype_does_not_underflow():
    before, _ = _cloud(2)
    shifts = estimate_drift(before, before + 1.0, np.full((1, before.shape[1]), 1e4, np.float32), sigma=0.1)
    assert np.all(np.isfinite(shifts)) and np.allclose(shifts, 1.0)


def test_default_sigma_is_the_within_class_spread():
    before = np.array([[0, 0], [2, 0], [10, 0], [10, 4]], np.float32)
    assert default_sigma(before, np.array([0, 0, 1, 1])) == pytest.approx(1.5)
    with pytest.raises(ValueError):
        estimate_drift(before, before, before[:1], sigma=0.0)
