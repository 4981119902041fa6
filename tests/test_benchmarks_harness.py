"""The benchmarks' own code (benchmarks/b1_b6_accuracy/: harness, domains, experiments, streams, digits,
ranpac), fast, no model; and that the product never imports it.

The learner here is a numpy embedding with a known shift after each adaptation, so the expected
prototypes, merges and metrics can be computed by hand; the head statistics go through the device's
real code (edgecl.device.heads, drift, exemplars), as in the benchmark runs.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# The benchmarks are a package at the checkout's root (benchmarks/__init__.py), not installed with edgecl.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.b1_b6_accuracy import digits, domains, experiments, harness
from benchmarks.b1_b6_accuracy.ranpac import RanpacHead
from benchmarks.b1_b6_accuracy.streams import (
    Split,
    Stream,
    Task,
    class_incremental_tasks,
    fashion_task_groups,
)
from edgecl.errors import DataError

REPO = Path(__file__).resolve().parents[1]


class ShiftLearner:
    """embed = mean colour of the image (3 dims, scaled) + a per-adaptation offset."""

    name = "shift"

    def __init__(self, shift: np.ndarray) -> None:
        self.offset = np.zeros(3)
        self.shift = shift
        self.inputs: list[harness.AdaptInput] = []

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        return pixels.reshape(len(pixels), -1, 3).mean(axis=1) / 255.0 + self.offset

    def adapt(self, inp: harness.AdaptInput) -> harness.AdaptLog:
        self.inputs.append(inp)
        self.offset = self.offset + self.shift
        return harness.AdaptLog(steps=1)

    def heads(self) -> None:
        return None


def _split(rng: np.random.Generator, classes: list[int], n: int, colour_of) -> Split:  # noqa: ANN001
    labels = np.repeat(np.asarray(classes, np.int64), n)
    base = np.stack([colour_of(c) for c in labels]).astype(np.float64)
    pixels = np.clip(base[:, None, None, :] + rng.normal(0, 8, (len(labels), 2, 2, 3)), 0, 255).astype(np.uint8)
    return Split(pixels, labels)


def _stream(kind: str) -> Stream:
    rng = np.random.default_rng(0)
    colours = {c: np.array([40 + 50 * c, 200 - 40 * c, 100 + 30 * (c % 2)]) for c in range(4)}
    tasks = []
    for t in range(2):
        classes = [2 * t, 2 * t + 1] if kind == "class" else [0, 1, 2, 3]
        def colour(c: int, t: int = t) -> np.ndarray:
            return colours[c] + 10 * t  # a new "camera" brightens domain 2
        tasks.append(Task(f"t{t}", classes, *[_split(rng, classes, n, colour) for n in (12, 6, 6)], Path(".")))
    digits = _split(rng, [0, 1], 5, lambda c: colours[c])
    return Stream(kind, tasks, digits, digits)


def test_merge_mean_weights_by_counts() -> None:
    assert np.allclose(harness.merge_mean(None, 0, np.array([1.0, 2.0]), 5), [1.0, 2.0])
    assert np.allclose(harness.merge_mean(np.array([0.0, 0.0]), 30, np.array([4.0, 8.0]), 10), [1.0, 2.0])


def test_domain_stream_merges_a_class_over_cameras() -> None:
    stream = _stream("domain")
    learner = ShiftLearner(np.zeros(3))  # never moves: merged prototype = mean over both cameras' images
    rules = harness.StreamRules(exemplars=0, heads=("ncm", "lda"))
    record = harness.run_stream(learner, stream, rules, "frozen")
    keeper = harness.HeadKeeper(rules)
    for task in stream.tasks:
        keeper.snapshot_before(learner, task)
        emb = learner.embed(task.train.pixels)
        keeper.update(learner, task, emb, emb, {})
    both = np.concatenate([learner.embed(t.train.pixels) for t in stream.tasks])
    labels = np.concatenate([t.train.labels for t in stream.tasks])
    for c in range(4):
        assert np.allclose(keeper.protos[c], both[labels == c].mean(axis=0))
        assert keeper.counts[c] == 24
    # every camera is scored after every step, seen or not; A_t pools the cameras seen so far
    ncm = record["heads"]["ncm"]
    assert [len(row) for row in ncm["acc_test"]] == [2, 2]
    assert ncm["A_test"][0] == pytest.approx(ncm["acc_test"][0][0])


def test_class_stream_shifts_old_prototypes_by_their_exemplars_drift() -> None:
    stream = _stream("class")
    shift = np.array([0.5, -0.25, 0.1])
    learner = ShiftLearner(shift)
    rules = harness.StreamRules(exemplars=4, replay_share=0.5, old_update="shift", heads=("ncm", "lda-map"))
    keeper = harness.HeadKeeper(rules)
    first = None
    for t, task in enumerate(stream.tasks):
        ex_before = keeper.snapshot_before(learner, task)
        before = learner.embed(task.train.pixels)
        inp = keeper.adapt_input(t, task, before)
        learner.adapt(inp)
        after = learner.embed(task.train.pixels)
        keeper.update(learner, task, before, after, ex_before)
        if t == 0:
            first = {c: keeper.protos[c].copy() for c in task.classes}
            assert len(inp.labels) == len(task.train.labels)  # nothing to replay yet
        else:
            # replay: 4 exemplars x 2 old classes, repeated to about half of the training data
            from edgecl.device.adapt import replay_repeats
            k = replay_repeats(len(task.train.labels), 8, 0.5)
            assert len(inp.labels) == len(task.train.labels) + 8 * k
            assert set(inp.labels[len(task.train.labels):].tolist()) == {0, 1}
            assert set(inp.targets) == {0, 1, 2, 3}  # the prototype loss sees every class the head holds
    for c in (0, 1):  # a pure shift moves the exemplars exactly as it moves the class
        assert np.allclose(keeper.protos[c], first[c] + shift)
    # the drift map fitted on (before, after) carries the lda-map head's means the same way
    for c in (0, 1):
        assert np.allclose(keeper.lda_map.means[c], first[c] + shift, atol=1e-6)


def test_derived_metrics_by_hand() -> None:
    h = {f"A_{s}": [90.0, 80.0, 70.0] for s in ("val", "test")}
    acc = [[90.0], [85.0, 75.0], [60.0, 70.0, 80.0]]
    h |= {f"acc_{s}": acc for s in ("val", "test")}
    d = harness.derived(h)
    assert d["last_test"] == 70.0 and d["mean_test"] == pytest.approx(80.0)
    assert d["forgetting_test"] == pytest.approx(((90 - 60) + (75 - 70)) / 2)
    assert d["first_group_test"] == 60.0 and d["last_group_test"] == 80.0


def test_choose_uses_validation_and_prefers_the_smaller_lr_on_ties() -> None:
    def run(lr: float, val: float, test: float) -> dict:
        return {"lr": lr, "heads": {"ncm": {"mean_val": val, "mean_test": test}}}
    runs = [run(1e-3, 80.0, 99.0), run(1e-2, 82.0, 70.0)]
    assert harness.choose(runs, "ncm") == (1e-2, "ncm")  # test numbers never choose
    assert harness.choose([run(1e-3, 80.0, 0.0), run(1e-2, 80.0, 0.0)], "ncm") == (1e-3, "ncm")


def test_cameras_are_fixed_and_differ() -> None:
    gray = (np.arange(28 * 28, dtype=np.int64).reshape(1, 28, 28) % 256).astype(np.uint8)
    clean = domains.render("clean", gray, [0], seed=1)
    assert clean.shape == (1, 64, 64, 3) and np.array_equal(clean[..., 0], clean[..., 2])
    for name in domains.DOMAINS[1:]:
        a = domains.render(name, gray, [0], seed=1)
        assert np.array_equal(a, domains.render(name, gray, [0], seed=1))  # seeded: same pixels every time
        assert np.abs(a.astype(int) - clean.astype(int)).mean() > 5, name  # a visible camera change
    noisy = [domains.render("blur-noise", gray, [0], seed=s) for s in (1, 2)]
    assert not np.array_equal(*noisy)  # sensor noise is drawn per seed
    inv = domains.render("inverted", gray, [0], seed=1).astype(int)
    assert np.corrcoef(inv[0, ..., 0].ravel(), clean[0, ..., 0].ravel())[0, 1] < -0.9


def test_every_experiment_names_known_methods_and_settings() -> None:
    from benchmarks.b1_b6_accuracy.torch_methods import TrainConfig
    fields = set(TrainConfig.__dataclass_fields__)
    rule_fields = set(harness.StreamRules.__dataclass_fields__)
    for name, exp in experiments.EXPERIMENTS.items():
        labels = [a.label for a in exp.arms]
        assert len(labels) == len(set(labels)), name
        for arm in exp.arms:
            assert arm.method in ("frozen", "full_ft", "mist", "edgecl", "edgecl-nogate"), (name, arm.label)
            assert set(arm.train) | set(exp.train) <= fields, (name, arm.label)
            assert set(arm.rules) | set(exp.rules) <= rule_fields, (name, arm.label)
            assert arm.lr_from is None or arm.lr_from in labels, (name, arm.label)


def test_the_experiments_head_list_is_the_harness_families() -> None:
    assert experiments.ALL_HEADS == harness.FAMILIES
    assert harness.StreamRules().heads == harness.FAMILIES


def test_task_split_is_order_0_to_9_in_pairs() -> None:
    assert class_incremental_tasks() == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert fashion_task_groups()["task-3"] == [4, 5]
    with pytest.raises(DataError):
        class_incremental_tasks(10, 3)


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn not installed")
def test_digits_proxy(tmp_path: Path) -> None:
    images, labels = digits.load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert images.max() == 255 and sorted(set(labels.tolist())) == list(range(10))
    out = digits.write_digits_proxy(tmp_path / "digits")
    train = {p.stem for p in (out / "train").rglob("*.png")}
    test = {p.stem for p in (out / "test").rglob("*.png")}
    assert len(train) + len(test) == 1797 and not train & test
    assert sorted(p.name for p in (out / "test").iterdir()) == list(digits.DIGIT_CLASSES)
    png = next((out / "test" / "digit-3").glob("*.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(png)), images[int(png.stem)])


def test_ranpac_fits_and_is_reproducible_from_its_seed() -> None:
    def two_classes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        # Class means differ across a strong shared nuisance direction, far from the origin.
        rng = np.random.default_rng(seed)
        y = np.repeat([0, 1], n)
        x = rng.normal(size=(2 * n, 5)) * 0.2
        nuisance = rng.normal(size=2 * n) * 5.0
        x[:, 0] += nuisance
        x[:, 1] += nuisance + np.where(y == 0, -0.5, 0.5)
        x[:, 2:] += 3.0
        return x, y

    x, y = two_classes(200, 4)
    xt, yt = two_classes(200, 5)
    head = RanpacHead(5, projection_dim=256, ridge=1.0, seed=7)
    head.add(x[y == 0], y[y == 0])
    head.add(x[y == 1], y[y == 1])
    assert (head.logits(xt, [0, 1]).argmax(1) == yt).mean() > 0.95
    again = RanpacHead(5, projection_dim=256, ridge=1.0, seed=7)
    again.add(x, y)
    assert np.allclose(again.logits(xt, [0, 1]), head.logits(xt, [0, 1]))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        head.add(np.zeros(5), np.zeros(5))


def test_the_product_never_imports_the_benchmarks_or_the_tests() -> None:
    """Test-only helpers (the torch sparse reference, RanPAC, the digits proxy) live in benchmarks/ or
    tests/; nothing under edgecl/ or cli/ may import them, at module level or inside a function."""
    offenders = []
    for path in sorted([*(REPO / "edgecl").rglob("*.py"), *(REPO / "cli").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names
                          if n.split(".")[0] in ("benchmarks", "tests", "conftest")]
    assert not offenders


def test_b7_merge_options_rules_by_hand() -> None:
    """benchmarks/b7_fleet/merge_options.py: the product's rules come from edgecl.formats.merge; the
    ones it writes itself (sum, ties-trim, ties-sum, max-magnitude) on three small deltas by hand."""
    from benchmarks.b7_fleet.merge_options import merge

    d1 = np.array([0.4, -0.1, 0.0, 0.2], np.float32)
    d2 = np.array([-0.2, -0.3, 0.5, 0.1], np.float32)
    d3 = np.array([0.1, 0.2, 0.0, -0.9], np.float32)
    w = np.array([0.5, 0.25, 0.25])
    dense = [d1, d2, d3]
    # ties: sign of the weighted sum; weighted mean of the agreeing values
    np.testing.assert_allclose(merge("ties", dense, w), [(0.5 * 0.4 + 0.25 * 0.1) / 0.75, (0.5 * -0.1 + 0.25 * -0.3) / 0.75,
                                                          0.5, -0.9], rtol=1e-6)
    np.testing.assert_allclose(merge("sum@0.5", dense, w), 0.5 * (d1 + d2 + d3), rtol=1e-6)
    np.testing.assert_allclose(merge("max-magnitude", dense, w), [0.4, -0.3, 0.5, -0.9])
    np.testing.assert_allclose(merge("ties-sum@1", dense, w), [0.5, -0.4, 0.5, -0.9], rtol=1e-6)
    # keeping every value, the trim is ties itself; keeping one of three, each device keeps its largest
    np.testing.assert_allclose(merge("ties-trim@1.0", dense, w), merge("ties", dense, w), rtol=1e-6)
    np.testing.assert_allclose(merge("ties-trim@0.34", dense, w), [0.4, -0.3, 0.5, -0.9], rtol=1e-6)
