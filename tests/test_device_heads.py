"""The second-stage heads (edgecl.device.heads) on hand-made embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from edgecl.device.heads import LdaHead, RanpacHead


def _correlated_classes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two classes whose means differ along a direction of low variance, with a strong shared nuisance
    direction: cosine/NCM is fooled by the nuisance, LDA is not."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n)
    x = rng.normal(size=(2 * n, 5)) * 0.2
    nuisance = rng.normal(size=2 * n) * 5.0           # shared by both classes, on two dimensions at once
    x[:, 0] += nuisance
    x[:, 1] += nuisance + np.where(y == 0, -0.5, 0.5)  # the class signal: small, across the nuisance
    x[:, 2:] += 3.0                                   # far from the origin, like ReLU'd features
    return x, y


def _means(x, y):
    return np.stack([x[y == c].mean(0) for c in (0, 1)])


def test_lda_separates_what_nearest_mean_cannot():
    x, y = _correlated_classes(400, 0)
    xt, yt = _correlated_classes(400, 1)
    head = LdaHead(5, shrinkage=0.01)
    head.add(x, y)
    lda = (head.logits(xt, _means(x, y)).argmax(1) == yt).mean()
    means = _means(x, y)
    ncm = (np.argmin(((xt[:, None] - means[None]) ** 2).sum(-1), axis=1) == yt).mean()
    assert lda > 0.95 and ncm < 0.7


def test_lda_covariance_ignores_a_shift_of_a_class():
    x, y = _correlated_classes(100, 2)
    a, b = LdaHead(5), LdaHead(5)
    a.add(x, y)
    shifted = x + np.where(y[:, None] == 1, np.array([1.0, -2.0, 0.5, 0.0, 3.0]), 0.0)
    b.add(shifted, y)
    assert np.allclose(a.covariance(), b.covariance())
    assert a.count == 200 and a.groups == 2


def test_lda_accumulates_over_calls_like_one_pooled_estimate():
    x, y = _correlated_classes(50, 3)
    whole, split = LdaHead(5, shrinkage=0.0), LdaHead(5, shrinkage=0.0)
    whole.add(x, y)
    split.add(x[y == 0], y[y == 0])
    split.add(x[y == 1], y[y == 1])
    assert np.allclose(whole.covariance(), split.covariance())


def test_ranpac_fits_and_is_reproducible_from_its_seed():
    x, y = _correlated_classes(200, 4)
    xt, yt = _correlated_classes(200, 5)
    head = RanpacHead(5, projection_dim=256, ridge=1.0, seed=7)
    head.add(x[y == 0], y[y == 0])
    head.add(x[y == 1], y[y == 1])
    acc = (head.logits(xt, [0, 1]).argmax(1) == yt).mean()
    assert acc > 0.95
    again = RanpacHead(5, projection_dim=256, ridge=1.0, seed=7)
    again.add(x, y)
    assert np.allclose(again.logits(xt, [0, 1]), head.logits(xt, [0, 1]))


def test_bad_shapes_and_settings_are_errors():
    with pytest.raises(ValueError, match="shrinkage"):
        LdaHead(3, shrinkage=2.0)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        LdaHead(3).add(np.zeros(3), np.zeros(3))
