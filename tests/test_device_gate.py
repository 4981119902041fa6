"""The do-no-harm check (device/noharm.py) and classes seen again (poststeps.merge_task_classes), on a real bundle."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("gate") / "task", classes=2, names=["cat", "dog"],
                              per_class=12, seed=2)


def test_harmful_training_is_refused_and_the_prototypes_only_state_committed(bundle_copy, task):
    from edgecl.device.adapt import AdaptOptions, adapt
    from edgecl.device.state import load_current, open_bundle

    # lr 100 wrecks the tiny backbone (held-out accuracy 0.4 vs 0.8 with prototypes only, measured).
    with pytest.warns(UserWarning, match="worse on 10 held-out images after every epoch"):
        report = adapt(bundle_copy, task, AdaptOptions(epochs=2, lr=100.0, seed=1, progress=False))
    assert report.kept == "prototypes-only" and report.steps > 0
    gate = report.gate
    assert gate["kept"] == "prototypes-only" and gate["held_out_images"] == 10
    assert [c["epochs"] for c in gate["epochs"]] == [1, 2] and report.kept_epochs == 0
    assert gate["adapted_accuracy"] < gate["prototypes_only_accuracy"]
    # per class, held out: the task's classes and the old classes' held-out exemplars; refused -> after == before
    assert {"cat", "dog", "class0"} <= set(gate["before_per_class"]) and gate["after_per_class"] == gate["before_per_class"]
    state = load_current(open_bundle(bundle_copy))
    assert not state.delta.any()  # the backbone was not moved
    assert {"cat", "dog"} <= set(state.prototypes.classes)  # the task's classes were still added
    meta = json.loads((bundle_copy / "state" / state.generation / "meta.json").read_text())
    # a refused run weighs in with the images its prototypes came from, not with training samples
    assert meta["samples_seen"] == 24 and meta["steps_total"] == 0 and meta["report"]["gate"] == gate


def test_choose_epoch_keeps_the_last_epoch_unless_it_is_worse():
    from edgecl.device.noharm import choose_epoch

    assert choose_epoch(0.80, {1: 0.90, 2: 0.85, 3: 0.81}) == 3        # last not worse: kept, however noisy
    assert choose_epoch(0.80, {1: 0.90, 2: 0.85, 3: 0.80}) == 3        # a tie keeps the adaptation
    assert choose_epoch(0.80, {1: 0.82, 2: 0.85, 3: 0.70}) == 2        # last worse: the best earlier one
    assert choose_epoch(0.80, {1: 0.85, 2: 0.85, 3: 0.70}) == 2        # ...ties: the later epoch
    assert choose_epoch(0.80, {1: 0.79, 2: 0.70, 3: 0.75}) is None     # all worse: prototypes only
    assert choose_epoch(0.80, {1: 0.70}) is None


def test_choose_epoch_honours_the_old_classes_guard():
    from edgecl.device.noharm import HeldOut, choose_epoch, old_accuracy

    # the last epoch is better overall but lost too much on the old classes: the best guarded earlier one
    assert choose_epoch(0.80, {1: 0.82, 2: 0.90}, {1: True, 2: False}) == 1
    assert choose_epoch(0.80, {1: 0.82, 2: 0.90}, {1: False, 2: False}) is None
    held = HeldOut(lambda d: d, ["cat", "cat", "old", "old", "old", "older"],
                   np.array([False, False, True, True, True, True]))
    # old images: 3 of class "old" (accuracy 2/3), 1 of "older" (accuracy 0): weighted by images
    assert old_accuracy({"cat": 1.0, "old": 2 / 3, "older": 0.0}, held) == pytest.approx(0.5)
    assert old_accuracy({"cat": 1.0}, HeldOut(lambda d: d, ["cat"], np.array([False]))) is None


def test_the_old_classes_drop_is_bounded_not_observed():
    """--max-old-drop judges a 95% upper bound on the old classes' drop: losing none of a few images
    proves little (B1: 4 held-out exemplars per old class while the first task lost 4.5 test points)."""
    from edgecl.device.noharm import old_drop_upper, old_images_needed, rate_lower, rate_upper

    alpha = 0.025  # each side of the union bound
    # Clopper-Pearson: zero seen in n has the closed form 1 - alpha ** (1 / n); scipy's beta quantile
    # (measured) for 3 of 100: 0.0851761 upper, 0.0062300 lower
    assert rate_upper(0, 32, alpha) == pytest.approx(1 - alpha ** (1 / 32), abs=1e-7)
    assert rate_lower(32, 32, alpha) == pytest.approx(alpha ** (1 / 32), abs=1e-7)
    assert rate_upper(3, 100, alpha) == pytest.approx(0.0851761, abs=1e-6)
    assert rate_lower(3, 100, alpha) == pytest.approx(0.0062300, abs=1e-6)
    right = np.ones(32, bool)
    # B1's last task: 32 held-out old images, none lost: the drop may still be ~11 points
    assert old_drop_upper(right, right) == pytest.approx(100 * 0 + 1 - alpha ** (1 / 32), abs=1e-7)
    lost_two = right.copy()
    lost_two[:2] = False
    assert old_drop_upper(right, lost_two) > old_drop_upper(right, right)
    gained = np.zeros(32, bool)
    gained[:16] = True  # before: half wrong; after: those all right and none lost
    assert old_drop_upper(gained, right) < 0
    # how many images a run that loses none needs before the bound reaches the points asked for
    assert old_images_needed(1) == 368 and old_images_needed(10) == 36 and old_images_needed(0) is None
    assert old_drop_upper(np.ones(368, bool), np.ones(368, bool)) <= 0.01 < \
        old_drop_upper(np.ones(367, bool), np.ones(367, bool))


def test_max_old_drop_too_strict_for_the_held_out_images_trains_nothing(bundle_copy, task):
    """A few held-out old exemplars cannot show a 1-point loss: the run is refused before training,
    the backbone stays, the task's classes are added from it, and the report says how many it takes."""
    from edgecl.device.adapt import AdaptOptions, adapt
    from edgecl.device.state import load_current, open_bundle

    with pytest.warns(UserWarning, match="cannot show a loss under 1 points at 95% confidence"):
        report = adapt(bundle_copy, task, AdaptOptions(epochs=3, lr=0.05, seed=1, progress=False, max_old_drop=1.0))
    gate = report.gate
    assert report.kept == "prototypes-only" and report.steps == 0 and report.kept_epochs == 0
    assert gate["kept"] == "prototypes-only" and gate["epochs"] == [] and gate["old_images_needed"] == 368
    assert 0 < gate["old_held_out_images"] < 368 and gate["old_drop_upper_best_case"] > 1.0
    assert gate["max_old_drop"] == 1.0 and gate["prototypes_only_old_accuracy"] is not None
    state = load_current(open_bundle(bundle_copy))
    assert not state.delta.any() and {"cat", "dog"} <= set(state.prototypes.classes)


def test_max_old_drop_keeps_only_epochs_whose_bound_is_within_it(bundle_copy, task):
    """With points the held-out old images can show (60 on ~5 images: losing none bounds the drop at
    ~52), training runs and every kept epoch's bound is within them; an epoch that lost an old image
    is refused (the same check, on a real bundle)."""
    from edgecl.device.adapt import AdaptOptions, adapt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a refusal warns; either outcome is checked below
        report = adapt(bundle_copy, task, AdaptOptions(epochs=3, lr=2.0, seed=1, progress=False, max_old_drop=60.0))
    gate = report.gate
    assert report.steps > 0 and gate["old_held_out_images"] <= 6 and gate["epochs"]
    assert all("old_drop_upper" in e for e in gate["epochs"])
    by_epoch = {e["epochs"]: e for e in gate["epochs"]}
    if report.kept == "adapted":
        assert by_epoch[report.kept_epochs]["old_drop_upper"] <= 60.0
    else:
        assert all(e["old_drop_upper"] > 60.0 or e["accuracy"] < gate["prototypes_only_accuracy"]
                   for e in gate["epochs"])
    # an epoch that lost an old image (old accuracy below prototypes only) is over 60 points here
    # (measured: epochs 2 and 3 lost one and two of 6, bounds 64 and 78; epoch 1 lost none, 46)
    assert any(e["old_accuracy"] < gate["prototypes_only_old_accuracy"] for e in gate["epochs"])
    for e in gate["epochs"]:
        if e["old_accuracy"] < gate["prototypes_only_old_accuracy"]:
            assert e["old_drop_upper"] > 60.0


def test_max_old_drop_must_be_a_number_of_points(bundle_copy, task):
    from edgecl.device.adapt import AdaptOptions, adapt
    from edgecl.errors import DeviceError

    with pytest.raises(DeviceError, match="max-old-drop"):
        adapt(bundle_copy, task, AdaptOptions(epochs=1, progress=False, max_old_drop=-1.0))


def test_the_gate_keeps_the_last_epoch_when_it_is_not_worse(bundle_copy, task):
    from edgecl.device.adapt import AdaptOptions, adapt
    from edgecl.device.state import load_current, open_bundle

    report = adapt(bundle_copy, task, AdaptOptions(epochs=3, lr=0.05, seed=1, progress=False))
    gate = report.gate
    assert report.kept == "adapted" and report.kept_epochs == 3 and gate["adapted_epochs"] == 3, gate
    assert gate["adapted_accuracy"] >= gate["prototypes_only_accuracy"]
    assert [c["epochs"] for c in gate["epochs"]] == [3]  # the earlier epochs are judged only when it is worse
    meta = json.loads((bundle_copy / "state" / load_current(open_bundle(bundle_copy)).generation / "meta.json").read_text())
    assert meta["steps_total"] == report.steps


def test_the_gate_can_be_turned_off(bundle_copy, task):
    from edgecl.device.adapt import AdaptOptions, adapt
    from edgecl.device.state import load_current, open_bundle

    report = adapt(bundle_copy, task, AdaptOptions(epochs=2, lr=100.0, seed=1, gate=False, progress=False))
    assert report.kept == "adapted" and report.gate is None
    assert load_current(open_bundle(bundle_copy)).delta.any()


def test_cli_reports_both_accuracies_as_json(bundle_copy, task):
    out = subprocess.run([sys.executable, "-W", "ignore", "-m", "edgecl.cli.main", "adapt", str(bundle_copy),
                          "--data", str(task), "--epochs", "1", "--lr", "100", "--seed", "1", "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert set(report["gate"]) >= {"adapted_accuracy", "prototypes_only_accuracy", "kept", "head"}
    assert report["kept"] == report["gate"]["kept"]


def test_cli_says_why_the_old_classes_guard_trained_nothing(bundle_copy, task):
    out = subprocess.run([sys.executable, "-W", "ignore", "-m", "edgecl.cli.main", "adapt", str(bundle_copy),
                          "--data", str(task), "--epochs", "2", "--max-old-drop", "1", "--quiet"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "cannot bound the drop under that" in out.stdout and "it takes 368 images" in out.stdout
    assert "kept the UNCHANGED backbone" in out.stdout, out.stdout


def test_a_class_seen_again_is_merged_by_counts_not_replaced():
    from edgecl.device.heads import LdaHead
    from edgecl.device.poststeps import Heads, Moved, run_post_steps
    from edgecl.formats.exemplars import ExemplarMemory
    from edgecl.formats.prototypes import Prototypes

    # "shirt" was learned from 30 images of camera A (mean [1, 0]); 10 images of camera B arrive (mean [0, 1]).
    old = Prototypes(["shirt", "shoe"], np.array([[1.0, 0.0], [-1.0, 0.0]], np.float32), np.array([30, 5]))
    new = np.tile(np.array([[0.0, 1.0]], np.float32), (10, 1))
    moved = Moved(trained=False, task_pixels=np.zeros((10, 2, 2, 3), np.uint8), task_labels=np.zeros(10, np.int64),
                  task_classes=["shirt"], before=new, after=new, use_exemplars=False)
    heads = run_post_steps(Heads(old, LdaHead(2), ExemplarMemory.empty((2, 2))), moved)
    row = heads.prototypes.classes.index("shirt")
    np.testing.assert_allclose(heads.prototypes.means[row], [0.75, 0.25])  # (30 x A + 10 x B) / 40
    assert heads.prototypes.counts[row] == 40
    np.testing.assert_allclose(heads.lda.means["shirt"], [0.75, 0.25])
    np.testing.assert_array_equal(heads.prototypes.means[1], [-1.0, 0.0])  # other classes untouched
    # a new class is added with its own mean
    moved.task_classes = ["sock"]
    heads = run_post_steps(heads, moved)
    np.testing.assert_allclose(heads.prototypes.means[heads.prototypes.classes.index("sock")], [0.0, 1.0])


def test_lda_means_of_old_classes_are_moved_once():
    """A class the LDA head has no mean of starts from its prototype as it was, then moves with the
    drift map once: after a pure translation t, both its prototype and its LDA mean are p + t."""
    from edgecl.device.heads import LdaHead
    from edgecl.device.poststeps import Heads, Moved, run_post_steps
    from edgecl.formats.exemplars import ExemplarMemory
    from edgecl.formats.prototypes import Prototypes

    rng = np.random.default_rng(0)
    t = np.array([3.0, -2.0, 1.0, 0.5], np.float32)
    old = Prototypes(["shirt"], np.array([[1.0, 0.0, 0.0, 0.0]], np.float32), np.array([30]))
    before = rng.normal(0, 1, (40, 4)).astype(np.float32)
    ex_before = rng.normal(0, 1, (20, 4)).astype(np.float32) + old.means[0]
    moved = Moved(trained=True, task_pixels=np.zeros((40, 2, 2, 3), np.uint8),
                  task_labels=np.repeat([0, 1], 20), task_classes=["sock", "shoe"], before=before,
                  after=before + t, exemplars_before={"shirt": ex_before}, exemplars_after={"shirt": ex_before + t},
                  use_exemplars=False)
    heads = run_post_steps(Heads(old, LdaHead(4), ExemplarMemory.empty((2, 2))), moved)
    shirt = heads.prototypes.means[heads.prototypes.classes.index("shirt")]
    np.testing.assert_allclose(shirt, old.means[0] + t, atol=1e-5)               # the exemplars' drift
    np.testing.assert_allclose(heads.lda.means["shirt"], old.means[0] + t, atol=0.05 * np.linalg.norm(t))


def test_an_image_shown_again_is_counted_once():
    """The mean of a class counts each image once: 10 images it already counts come back (with 10 new
    ones) after the backbone moved by t; the class's mean is the new mean of the 20, count 20."""
    from edgecl.device.heads import LdaHead
    from edgecl.device.poststeps import Heads, Moved, run_post_steps
    from edgecl.formats.exemplars import ExemplarMemory
    from edgecl.formats.prototypes import Prototypes, image_fingerprints

    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (20, 4, 4, 3), dtype=np.uint8)
    before = rng.normal(0, 1, (20, 3)).astype(np.float32)
    t = np.array([2.0, 0.0, -1.0], np.float32)
    old = Prototypes(["shirt"], before[:10].mean(0, keepdims=True), np.array([10]))
    old.mark_seen("shirt", image_fingerprints(pixels[:10]))
    ex = before[:5]
    moved = Moved(trained=True, task_pixels=pixels, task_labels=np.zeros(20, np.int64), task_classes=["shirt"],
                  before=before, after=before + t, exemplars_before={"shirt": ex}, exemplars_after={"shirt": ex + t},
                  use_exemplars=False)
    heads = run_post_steps(Heads(old, LdaHead(3), ExemplarMemory.empty((4, 4))), moved)
    np.testing.assert_allclose(heads.prototypes.means[0], (before + t).mean(0), atol=1e-5)
    assert heads.prototypes.counts[0] == 20 and len(heads.prototypes.seen["shirt"]) == 20
    np.testing.assert_allclose(heads.lda.means["shirt"], (before + t).mean(0), atol=1e-5)
    # the record survives the file
    again = Prototypes.from_bytes(heads.prototypes.to_bytes())
    np.testing.assert_array_equal(again.seen["shirt"], heads.prototypes.seen["shirt"])


def test_export_then_adapt_on_the_same_images_counts_them_once(bundle_copy, calib_dir):
    """export --data X, then adapt --data X (twice): each class still counts its 12 images, at their mean."""
    from edgecl.device.adapt import AdaptOptions, adapt
    from edgecl.device.state import bundle_prototypes, load_current, open_bundle

    exported = bundle_prototypes(open_bundle(bundle_copy))
    assert exported.counts.tolist() == [12, 12, 12] and all(len(v) == 12 for v in exported.seen.values())
    for _ in range(2):
        adapt(bundle_copy, calib_dir, AdaptOptions(epochs=0, progress=False))
        state = load_current(open_bundle(bundle_copy))
        assert state.prototypes.counts.tolist() == [12, 12, 12]
        np.testing.assert_allclose(state.prototypes.means, exported.means, rtol=1e-4, atol=1e-4)


def test_the_gate_judges_only_on_images_no_statistics_count(bundle_copy, task):
    """After `adapt --epochs 0` on a folder, its images are in the prototypes and LDA means: held out,
    they would favour the state that holds them. They train; the gate judges on uncounted images only,
    and with none left it is off, saying so."""
    from edgecl.device.adapt import AdaptOptions, adapt
    from edgecl.device.episode import _split
    from edgecl.device.infer import resolve_profile
    from edgecl.device.plan import resolve_plan
    from edgecl.device.state import open_bundle
    from edgecl.formats.exemplars import ExemplarMemory
    from edgecl.formats.images import load_image_folder
    from edgecl.formats.prototypes import Prototypes, image_fingerprints

    b = open_bundle(bundle_copy)
    images = load_image_folder(task, b.manifest.input_size, b.manifest.interpolation)
    plan = resolve_plan(AdaptOptions(progress=False), resolve_profile(None, b), b.manifest, b.mask.total_selected)
    counted = Prototypes.empty(4)
    cat = np.flatnonzero(images.labels == images.classes.index("cat"))
    counted.mark_seen("cat", image_fingerprints(images.pixels[cat[:8]]))  # 8 of the 12 cats already counted
    split = _split(images, ExemplarMemory.empty((2, 2)), [], plan, True, counted, image_fingerprints(images.pixels))
    assert set(split.task_held).isdisjoint(cat[:8]) and set(cat[:8]) <= set(split.task_train)
    assert len(split.task_held) + len(split.task_train) == len(images.labels)
    assert {images.labels[r] for r in split.task_held} == {0, 1}  # both classes still judged

    adapt(bundle_copy, task, AdaptOptions(epochs=0, progress=False))
    with pytest.warns(UserWarning, match="check is off"):
        report = adapt(bundle_copy, task, AdaptOptions(epochs=1, seed=1, progress=False))
    assert report.gate is None and report.kept == "adapted"
