"""What adapt and release print, from their reports: counts named for what they are, ties and per-class
drops in the plain summary, every accuracy with its head and images, the release rule and columns said."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from edgecl.cli.adapt import summary_lines
from edgecl.cli.release import release_lines, small_groups
from edgecl.device.state import STATE_DIR, STEP_LOG


def _adapt_report(**changes) -> SimpleNamespace:
    gate = {"head": "lda", "held_out_images": 40, "adapted_accuracy": 0.925, "prototypes_only_accuracy": 0.925,
            "adapted_epochs": 10, "kept": "adapted",
            "epochs": [{"epochs": 10, "accuracy": 0.925}],
            "before_per_class": {"bolt": 0.75, "nut": 1.0, "class0": 0.9},
            "after_per_class": {"bolt": 0.50, "nut": 1.0, "class0": 1.0}}
    report = dict(state="gen-000002", steps=40, epochs=10, images=120, skipped_unreadable=0,
                  classes_updated=["class0"], classes_added=["bolt", "nut"], lr=0.01, final_loss=9.9,
                  changed_fraction_mean=0.0049, changed_fraction_max=0.005, step_seconds_median=0.2,
                  peak_rss_mb=470.0, memory_budget_mb=0, drift_compensated=["class2"], from_exemplars=["class1"],
                  replayed=128, selection=None, gate=gate, kept="adapted", kept_epochs=10)
    report.update(changes)
    return SimpleNamespace(**report)


def _step_log(bundle: Path, state: str, losses: dict[int, float]) -> None:
    folder = bundle / STATE_DIR / state
    folder.mkdir(parents=True)
    (folder / STEP_LOG).write_text("".join(json.dumps({"step": i, "epoch": e, "loss": loss}) + "\n"
                                           for i, (e, loss) in enumerate(losses.items())))


def test_a_tie_and_a_class_that_fell_are_said_in_plain_words(tmp_path: Path) -> None:
    _step_log(tmp_path, "gen-000002", {9: 1.5, 10: 1.25})
    text = "\n".join(summary_lines(_adapt_report(), tmp_path, Path("new_images")))
    assert "on 120 images of 3 classes from new_images" in text
    assert "replayed the old classes' stored images 128 times" in text, "a replay count, not a number of exemplars"
    assert ("do-no-harm check on 40 held-out images (not trained on), lda head: adapted backbone 92.5% (after "
            "epoch 10) vs unchanged backbone 92.5%") in text
    assert "-> kept the adapted backbone, as it was after epoch 10 of 10 (a tie, and a tie keeps it)" in text
    assert "classes that fell on the held-out images: bolt 75% -> 50%" in text
    assert "loss at the end of the kept epoch 10: 1.2500" in text
    assert "class1 by how their stored images moved; class2 by an estimate from the new images" in text
    assert "drift" not in text and "9.9" not in text


def test_an_earlier_epoch_kept_reports_its_own_loss(tmp_path: Path) -> None:
    gate = dict(_adapt_report().gate, adapted_accuracy=0.95, adapted_epochs=4, before_per_class={},
                after_per_class={}, epochs=[{"epochs": 4, "accuracy": 0.95}, {"epochs": 10, "accuracy": 0.85}])
    _step_log(tmp_path, "gen-000002", {4: 2.0, 10: 1.0})
    text = "\n".join(summary_lines(_adapt_report(gate=gate, kept_epochs=4), tmp_path, Path("d")))
    assert "as it was after epoch 4 of 10 (better than unchanged)" in text
    assert "(after epoch 10 it scored 85.0%, below unchanged)" in text
    assert "loss at the end of the kept epoch 4: 2.0000" in text and "1.0000" not in text


def test_a_refused_adaptation_says_the_backbone_is_unchanged(tmp_path: Path) -> None:
    gate = dict(_adapt_report().gate, adapted_accuracy=0.80, kept="prototypes-only")
    text = "\n".join(summary_lines(_adapt_report(gate=gate, kept="prototypes-only", kept_epochs=0), tmp_path,
                                   Path("d")))
    assert "-> kept the UNCHANGED backbone (the adapted one was worse)" in text and "loss at" not in text


def test_the_old_classes_guard_says_its_bound(tmp_path: Path) -> None:
    gate = dict(_adapt_report().gate, max_old_drop=60.0, old_held_out_images=6, prototypes_only_old_accuracy=0.8333,
                old_confidence=0.95, old_images_needed=5,
                epochs=[{"epochs": 10, "accuracy": 0.925, "old_accuracy": 0.8333, "old_drop_upper": 45.9}])
    _step_log(tmp_path, "gen-000002", {10: 1.0})
    text = "\n".join(summary_lines(_adapt_report(gate=gate), tmp_path, Path("d")))
    assert ("old classes guarded (--max-old-drop 60 points): unchanged backbone 83.3% on their 6 held-out "
            "stored images; the kept epoch's 95% bound on their drop 45.9 points") in text


def test_the_release_table_names_head_images_columns_and_rule() -> None:
    report = SimpleNamespace(
        bundle_id="f9d0d87c4390425b9db9e7b8ea725ca5", current_version=1, version=2,
        merge={"inputs": 1, "strategy": "weighted-mean", "devices": ["cam1"]},
        groups={"calibration": {"images": 60, "candidate": 0.8, "baseline": 0.8, "current": 0.867},
                "device:cam1": {"images": 40, "candidate": 0.65, "baseline": 0.6, "current": None}},
        candidate={"accuracy": 0.74, "images": 100}, baseline={"accuracy": 0.72, "images": 100},
        current={"accuracy": 0.867, "images": 60})
    lines = release_lines(report, "efficientnet_lite0", Path("heldout"), 0.0)
    text = "\n".join(lines)
    assert lines[0] == "efficientnet_lite0 (f9d0d87c): v1 + 1 delta (weighted-mean merge; devices: cam1) -> candidate v2"
    assert "held-out images in heldout (never trained on), ncm head, per class group" in lines[1]
    assert lines[3].split() == ["v1's", "own", "classes", "60", "80.0%", "80.0%", "86.7%"]
    assert lines[4].split() == ["new", "classes", "of", "cam1", "40", "65.0%", "60.0%", "-"]
    assert lines[5].split() == ["all", "held-out", "images", "100", "74.0%", "72.0%", "-"], "current over fewer images"
    assert "candidate = v2, the merged deltas applied to v1; baseline = v1's backbone unchanged" in text
    assert "rule: publish v2 only if no group's candidate is below its baseline" in text
    report.merge["inputs"] = 3
    assert "v1 + 3 deltas (" in release_lines(report, "", Path("h"), 0.01)[0]
    assert "below its baseline by more than 1 point, " in "\n".join(release_lines(report, "", Path("h"), 0.01))
    assert "by more than 2.5 points" in "\n".join(release_lines(report, "", Path("h"), 0.025))


def test_release_names_groups_judged_on_too_few_images() -> None:
    """B7 (seed 7) published a version on 40 check images per device group that its test images put
    below the frozen baseline: the release says which groups were judged on fewer than 100."""

    groups = {"calibration": {"images": 300, "judged": True}, "device:dev-a": {"images": 40, "judged": True},
              "device:dev-b": {"images": 0, "judged": False}, "device:dev-c": {"images": 99, "judged": True}}
    assert small_groups(groups) == "dev-a (40), dev-c (99)"
    assert small_groups({"calibration": {"images": 100, "judged": True}}) == ""
