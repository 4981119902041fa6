"""The one owner of the rules that merge and move class statistics (edgecl.classstats)."""

from __future__ import annotations

import numpy as np
import pytest

from edgecl import classstats


def test_merge_by_counts_equals_the_mean_of_the_union_whatever_the_split() -> None:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(37, 6))
    cuts = [0, 5, 19, 37]
    parts = [images[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    mean, count = classstats.merge_by_counts([p.mean(0) for p in parts], [len(p) for p in parts])
    assert count == 37
    np.testing.assert_allclose(mean, images.mean(0), rtol=1e-12, atol=1e-12)


def test_merge_by_counts_refuses_nothing_to_merge_and_honours_shares() -> None:
    with pytest.raises(ValueError):
        classstats.merge_by_counts([np.zeros(3)], [0])
    mean, count = classstats.merge_by_counts([np.zeros(2), np.ones(2)], [1, 99], shares=np.array([0.5, 0.5]))
    np.testing.assert_allclose(mean, [0.5, 0.5])
    assert count == 100


def test_remove_from_mean_takes_counted_images_out_exactly() -> None:
    rng = np.random.default_rng(1)
    images = rng.normal(size=(10, 4))
    rest_sum, rest = classstats.remove_from_mean(images.mean(0), 10, images[:3])
    assert rest == 7
    np.testing.assert_allclose(rest_sum / rest, images[3:].mean(0), atol=1e-12)
    # never more than the mean counts
    _, none_left = classstats.remove_from_mean(images.mean(0), 2, images[:5])
    assert none_left == 0


def test_shift_by_exemplars_follows_a_pure_shift_and_swapping_moves_back() -> None:
    rng = np.random.default_rng(2)
    before = rng.normal(size=(8, 5))
    shift = np.arange(5.0)
    mean = rng.normal(size=5)
    moved = classstats.shift_by_exemplars(mean, before, before + shift)
    np.testing.assert_allclose(moved, mean + shift)
    np.testing.assert_allclose(classstats.shift_by_exemplars(moved, before + shift, before), mean)


def test_class_sums_per_class() -> None:
    x = np.array([[0.0, 0.0], [2.0, 2.0], [5.0, 1.0]])
    sums = classstats.class_sums(x, np.array([0, 0, 2]), ["a", "b", "c"])
    assert set(sums) == {"a", "c"}
    np.testing.assert_allclose(sums["a"][0], [1.0, 1.0])
    assert sums["a"][1] == 2 and sums["c"][1] == 1
