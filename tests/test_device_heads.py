"""The second-stage heads (edgecl.device.heads) on hand-made embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from edgecl.device.heads import LdaHead


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


def test_bad_shapes_and_settings_are_errors():
    with pytest.raises(ValueError, match="shrinkage"):
        LdaHead(3, shrinkage=2.0)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        LdaHead(3).add(np.zeros(3), np.zeros(3))


def test_linear_drift_is_the_identity_without_drift_and_recovers_an_affine_map():
    from edgecl.classstats import fit_linear_drift

    rng = np.random.default_rng(6)
    before = rng.normal(size=(300, 4))
    w = fit_linear_drift(before, before)
    assert np.allclose(w, np.vstack([np.eye(4), np.zeros((1, 4))]))
    a = np.eye(4) + 0.3 * rng.normal(size=(4, 4))
    b = np.array([1.0, -2.0, 0.5, 3.0])
    w = fit_linear_drift(before, before @ a + b, ridge=1e-9)
    assert np.allclose(w[:4], a, atol=1e-6) and np.allclose(w[4], b, atol=1e-6)

    # the head's statistics, carried through the map, equal those computed in the new space
    y = rng.integers(0, 2, 300)
    head, moved = LdaHead(4, shrinkage=0.0), LdaHead(4, shrinkage=0.0)
    head.add(before, y)
    head.means = {"a": before[y == 0].mean(0), "b": before[y == 1].mean(0)}
    after = before @ a + b
    moved.add(after, y)
    head.move(w)
    assert np.allclose(head.scatter, moved.scatter, atol=1e-6)
    assert np.allclose(head.means["a"], after[y == 0].mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="drift map"):
        head.move(np.eye(3))


def test_lda_file_round_trip_and_fallback_means(tmp_path):
    x, y = _correlated_classes(30, 7)
    head = LdaHead(5)
    head.add(x, y)
    head.means = {"a": x[y == 0].mean(0)}
    head.save_file(tmp_path / "lda.safetensors")
    back = LdaHead.load_file(tmp_path / "lda.safetensors")
    assert back.count == 60 and back.groups == 2 and np.array_equal(back.scatter, head.scatter)
    assert list(back.means) == ["a"] and np.array_equal(back.means["a"], head.means["a"])
    fallback = np.stack([np.zeros(5), np.ones(5)])
    means = back.means_for(["a", "b"], fallback)
    assert np.array_equal(means[0], head.means["a"]) and np.array_equal(means[1], np.ones(5))
