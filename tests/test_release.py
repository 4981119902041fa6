"""The release gate's verdict (edgecl.release.gate): hand-made evaluations in, reasons out. The whole
merge -> apply -> evaluate -> publish path runs in tests/test_fleet_e2e.py."""

from __future__ import annotations

from edgecl.release import CALIBRATION, gate


def _eval(per_class: dict[str, tuple[float, int]]) -> dict:
    return {"per_class": {c: {"accuracy": a, "images": n} for c, (a, n) in per_class.items()}}


GROUPS = {CALIBRATION: ["bolt", "nut"], "device:line-a": ["gear"], "device:line-b": ["washer", "pin"]}


def test_passes_when_no_group_is_worse():
    candidate = _eval({"bolt": (1.0, 10), "nut": (0.8, 10), "gear": (0.9, 10), "washer": (1.0, 5), "pin": (0.6, 5)})
    baseline = _eval({"bolt": (1.0, 10), "nut": (0.8, 10), "gear": (0.5, 10), "washer": (0.8, 5), "pin": (0.6, 5)})
    current = _eval({"bolt": (0.9, 10), "nut": (0.9, 10)})           # knows only the calibration classes
    table, reasons = gate(GROUPS, candidate, baseline, current, tolerance=0.0)
    assert reasons == []
    assert table[CALIBRATION] == {"classes": ["bolt", "nut"], "images": 20, "candidate": 0.9, "baseline": 0.9,
                                  "current": 0.9}
    assert table["device:line-b"]["candidate"] == 0.8 and table["device:line-b"]["current"] is None


def test_refuses_a_group_worse_than_the_frozen_baseline_or_the_current_version():
    candidate = _eval({"bolt": (0.5, 10), "nut": (0.8, 10), "gear": (0.4, 10)})
    baseline = _eval({"bolt": (0.4, 10), "nut": (0.8, 10), "gear": (0.9, 10)})
    current = _eval({"bolt": (1.0, 10), "nut": (0.8, 10)})
    _, reasons = gate(GROUPS, candidate, baseline, current, tolerance=0.0)
    assert reasons == ["calibration: candidate 0.650 < current version 0.900 - 0",
                       "device:line-a: candidate 0.400 < frozen baseline 0.900 - 0"]
    # a tolerance lets small drops through, not large ones
    _, reasons = gate(GROUPS, candidate, baseline, current, tolerance=0.3)
    assert reasons == ["device:line-a: candidate 0.400 < frozen baseline 0.900 - 0.3"]


def test_groups_are_weighted_by_images_and_missing_groups_are_skipped():
    candidate = _eval({"bolt": (1.0, 30), "nut": (0.0, 10)})
    baseline = _eval({"bolt": (0.5, 30), "nut": (1.0, 10)})        # 0.625 vs the candidate's 0.75
    table, reasons = gate(GROUPS, candidate, baseline, None, 0.0)
    assert reasons == [] and table[CALIBRATION]["candidate"] == 0.75 and table[CALIBRATION]["baseline"] == 0.625
    assert table["device:line-a"]["images"] == 0 and table["device:line-a"]["candidate"] is None
    _, reasons = gate({"device:x": ["nothing"]}, candidate, baseline, None, 0.0)
    assert reasons == ["the held-out folder has no image of any class group"]


def test_the_current_version_is_shown_not_compared_when_the_candidate_adds_classes():
    """With new classes the candidate chooses among more of them: its calibration accuracy is not
    comparable with the current version's, and the frozen baseline (same classes) is the check."""
    candidate = _eval({"bolt": (0.7, 10), "nut": (0.7, 10), "gear": (0.9, 10)})
    baseline = _eval({"bolt": (0.6, 10), "nut": (0.7, 10), "gear": (0.8, 10)})
    current = _eval({"bolt": (0.9, 10), "nut": (0.9, 10)})
    table, reasons = gate(GROUPS, candidate, baseline, current, 0.0, compare_current=False)
    assert reasons == [] and table[CALIBRATION]["current"] == 0.9
    _, reasons = gate(GROUPS, candidate, baseline, current, 0.0)
    assert reasons == ["calibration: candidate 0.700 < current version 0.900 - 0"]
