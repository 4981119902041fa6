"""Exemplar memory: herding choice, byte budget, round trip."""

from __future__ import annotations

import numpy as np

from edgecl.formats.exemplars import ExemplarMemory, herding_order, per_class_quota


def test_herding_first_pick_is_nearest_the_mean_and_means_converge():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4))
    order = herding_order(x, 20)
    assert order[0] == np.argmin(np.linalg.norm(x - x.mean(0), axis=1))
    assert len(set(order.tolist())) == 20
    err = [np.linalg.norm(x[order[:k]].mean(0) - x.mean(0)) for k in (1, 5, 20)]
    random_err = np.linalg.norm(x[:20].mean(0) - x.mean(0))
    assert err[-1] < random_err


def test_budget_is_split_over_classes_and_old_classes_shrink(tmp_path):
    size = (4, 4)
    per_image = 4 * 4 * 3
    memory = ExemplarMemory.empty(size)
    pix = lambda n, v: np.full((n, *size, 3), v, np.uint8)  # noqa: E731
    memory = memory.update({"a": (pix(10, 1), np.arange(10.0)[:, None])}, budget_bytes=8 * per_image,
                           max_per_class=20)
    assert len(memory.of_class("a")) == 8 and memory.nbytes <= 8 * per_image
    memory = memory.update({"b": (pix(10, 2), np.arange(10.0)[:, None])}, budget_bytes=8 * per_image,
                           max_per_class=20)
    assert len(memory.of_class("a")) == 4 and len(memory.of_class("b")) == 4
    assert memory.nbytes <= 8 * per_image
    memory.save_file(tmp_path / "ex.safetensors")
    loaded = ExemplarMemory.load_file(tmp_path / "ex.safetensors")
    assert loaded.classes == ["a", "b"] and np.array_equal(loaded.pixels, memory.pixels)
    assert per_class_quota(100, 10, 3, 2) == 2 and per_class_quota(100, 10, 0, 2) == 0


def test_joined_appends_the_classes_taken_and_keeps_one_label_per_name():
    from edgecl.formats.exemplars import ExemplarMemory

    rng = np.random.default_rng(3)
    px = lambda n: rng.integers(0, 255, (n, 4, 4, 3), np.uint8)  # noqa: E731
    a = ExemplarMemory(["x", "y"], px(3), np.array([0, 1, 0], np.int64))
    b = ExemplarMemory(["y", "z", "w"], px(4), np.array([0, 1, 1, 0], np.int64))
    out = a.joined(b, ["z", "y", "v"])
    assert out.classes == ["x", "y", "z", "v"]              # "v": named, no image in b
    assert np.array_equal(out.of_class("x"), a.of_class("x"))
    assert np.array_equal(out.of_class("y"), np.concatenate([a.of_class("y"), b.of_class("y")]))
    assert np.array_equal(out.of_class("z"), b.of_class("z")) and len(out.of_class("v")) == 0
    assert "w" not in out.classes and len(out.labels) == 3 + 4
