"""The release check's verdict (edgecl.release.verdict) and its scoring of class-statistic tables: hand-made
evaluations and embeddings in, reasons out. The whole round (merge on the server -> apply -> the
devices' statistics under the candidate -> judge -> publish -> pull) runs in tests/test_fleet_e2e.py."""

from __future__ import annotations

import numpy as np

from edgecl.formats.prototypes import Prototypes
from edgecl.formats.scoring import restrict, score
from edgecl.release import CALIBRATION, verdict


def _eval(per_class: dict[str, tuple[float, int]]) -> dict:
    return {"per_class": {c: {"accuracy": a, "images": n} for c, (a, n) in per_class.items()}}


GROUPS = {CALIBRATION: ["bolt", "nut"], "device:line-a": ["gear"], "device:line-b": ["washer", "pin"]}


def test_passes_when_no_group_is_worse():
    candidate = _eval({"bolt": (1.0, 10), "nut": (0.8, 10), "gear": (0.9, 10), "washer": (1.0, 5), "pin": (0.6, 5)})
    baseline = _eval({"bolt": (1.0, 10), "nut": (0.8, 10), "gear": (0.5, 10), "washer": (0.8, 5), "pin": (0.6, 5)})
    current = _eval({"bolt": (0.9, 10), "nut": (0.9, 10)})           # knows only the calibration classes
    table, reasons = verdict(GROUPS, candidate, baseline, current, tolerance=0.0)
    assert reasons == []
    assert table[CALIBRATION] == {"classes": ["bolt", "nut"], "images": 20, "candidate": 0.9, "baseline": 0.9,
                                  "current": 0.9, "candidate_current_classes": 0.9, "judged": True}
    assert table["device:line-b"]["candidate"] == 0.8 and table["device:line-b"]["current"] is None


def test_refuses_a_group_worse_than_the_frozen_baseline_or_the_current_version():
    candidate = _eval({"bolt": (0.5, 10), "nut": (0.8, 10), "gear": (0.4, 10)})
    baseline = _eval({"bolt": (0.4, 10), "nut": (0.8, 10), "gear": (0.9, 10)})
    current = _eval({"bolt": (1.0, 10), "nut": (0.8, 10)})
    _, reasons = verdict(GROUPS, candidate, baseline, current, tolerance=0.0)
    assert reasons == ["calibration: candidate on the current classes 0.650 < current version 0.900 - 0",
                       "device:line-a: candidate 0.400 < frozen baseline 0.900 - 0"]
    # a tolerance lets small drops through, not large ones
    _, reasons = verdict(GROUPS, candidate, baseline, current, tolerance=0.3)
    assert reasons == ["device:line-a: candidate 0.400 < frozen baseline 0.900 - 0.3"]


def test_groups_are_weighted_by_images_and_missing_groups_are_skipped():
    candidate = _eval({"bolt": (1.0, 30), "nut": (0.0, 10)})
    baseline = _eval({"bolt": (0.5, 30), "nut": (1.0, 10)})        # 0.625 vs the candidate's 0.75
    table, reasons = verdict(GROUPS, candidate, baseline, None, 0.0)
    assert reasons == [] and table[CALIBRATION]["candidate"] == 0.75 and table[CALIBRATION]["baseline"] == 0.625
    assert table["device:line-a"]["images"] == 0 and table["device:line-a"]["candidate"] is None
    _, reasons = verdict({"device:x": ["nothing"]}, candidate, baseline, None, 0.0)
    assert reasons == ["the held-out folder has no image of any class group"]


def test_the_current_classes_are_compared_like_for_like_also_when_the_candidate_adds_classes():
    """The candidate scored among the current classes only is compared with the current version on
    them, whatever it adds: adding a class never turns the comparison off (issue 21's poisoning)."""
    candidate = _eval({"bolt": (0.7, 10), "nut": (0.7, 10), "gear": (0.9, 10)})
    restricted = _eval({"bolt": (0.6, 10), "nut": (0.6, 10)})
    baseline = _eval({"bolt": (0.6, 10), "nut": (0.7, 10), "gear": (0.8, 10)})
    current = _eval({"bolt": (0.9, 10), "nut": (0.9, 10)})
    table, reasons = verdict(GROUPS, candidate, baseline, current, 0.0, restricted=restricted)
    assert reasons == ["calibration: candidate on the current classes 0.600 < current version 0.900 - 0"]
    assert table[CALIBRATION]["candidate"] == 0.7 and table[CALIBRATION]["candidate_current_classes"] == 0.6
    _, reasons = verdict(GROUPS, candidate, baseline, current, 0.0, restricted=current)
    assert reasons == []


def test_a_group_without_statistics_under_the_candidate_is_shown_not_judged():
    candidate = _eval({"bolt": (1.0, 10), "nut": (1.0, 10), "gear": (0.1, 10)})
    baseline = _eval({"bolt": (1.0, 10), "nut": (1.0, 10), "gear": (0.9, 10)})
    table, reasons = verdict(GROUPS, candidate, baseline, None, 0.0, not_judged=["device:line-a"])
    assert reasons == [] and table["device:line-a"]["judged"] is False and table["device:line-a"]["candidate"] == 0.1
    _, reasons = verdict(GROUPS, candidate, baseline, None, 0.0)
    assert reasons == ["device:line-a: candidate 0.100 < frozen baseline 0.900 - 0"]


def test_score_is_the_ncm_heads_cosine_choice_among_the_tables_classes():
    table = Prototypes(["a", "b", "c"], np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], np.float32),
                       np.array([1, 1, 1]))
    embeddings = np.array([[5.0, 0.1], [0.2, 3.0], [-2.0, 0.3], [-1.0, 0.9]])   # cosine ignores the norm
    truth = ["a", "b", "c", "b"]
    got = score(embeddings, truth, table)
    assert got["images"] == 4 and got["accuracy"] == 0.75
    assert got["per_class"]["b"] == {"accuracy": 0.5, "images": 2}
    # restricted to a and b: the c image is not scored, the last b image is now right
    got = score(embeddings, truth, restrict(table, ["a", "b"]))
    assert got["images"] == 3 and got["accuracy"] == 1.0
    assert score(embeddings, truth, restrict(table, ["zzz"])) is None


def test_statistics_sent_under_the_candidate_add_up_to_the_centralized_ones():
    """AFCL's fact, on the release's own sum: class means computed on disjoint image sets under one
    backbone, summed by counts, equal the mean over all the images; a class the current version knows
    adds the devices' images to its own statistics."""
    from pathlib import Path

    from edgecl.formats import delta as delta_format
    from edgecl.formats.candidate import statistics_delta
    from edgecl.release import Round, summed_statistics

    rng = np.random.default_rng(0)
    images = {"gear": rng.normal(size=(30, 4)), "bolt": rng.normal(size=(9, 4))}

    class Manifest:
        bundle_id, version, base_sha256, mask_sha256, selected = "line.candidate", 1, "a" * 64, "b" * 64, 8

    def sent(device: str, rows: dict[str, slice]) -> delta_format.Delta:
        names = list(rows)
        table = Prototypes(names, np.stack([images[c][rows[c]].mean(0) for c in names]).astype(np.float32),
                           np.array([len(images[c][rows[c]]) for c in names]))
        return delta_format.load(delta_format.save(statistics_delta(Manifest, device, table)))

    received = {"line-a": sent("line-a", {"gear": slice(0, 10), "bolt": slice(0, 4)}),
                "line-b": sent("line-b", {"gear": slice(10, 30)})}
    assert received["line-a"].samples_seen == 14 and not received["line-a"].positions.size
    current = Prototypes(["bolt"], images["bolt"][4:].mean(0, keepdims=True).astype(np.float32), np.array([5]))
    rnd = Round("line", Path("."), {"version": 1}, {}, received["line-a"], {"line-a": ["gear"], "line-b": ["gear"]},
                {}, ["bolt"])
    summed, statistics = summed_statistics(rnd, current, received)
    for name in ("gear", "bolt"):
        i = summed.classes.index(name)
        np.testing.assert_allclose(summed.means[i], images[name].mean(0), rtol=1e-5, atol=1e-6)
        assert int(summed.counts[i]) == len(images[name])
    assert statistics["line-b"] == {"answered": True, "classes": ["gear"], "images": 20}


def test_the_frozen_baseline_counts_the_same_images_as_the_candidate():
    """A device's answer carries its classes' means under the candidate and under the current backbone;
    its images of a class the current version knows join that class on both sides, by counts."""
    from edgecl.formats.delta import Delta
    from edgecl.release import summed_statistics

    current = Prototypes(["bolt"], np.array([[1.0, 0.0]], np.float32), np.array([30]))
    answer = Delta(bundle_id="b", bundle_version=2, base_sha256="0" * 64, mask_sha256="f" * 64, device_id="cam",
                   delta_k=1, positions=np.zeros(0, np.int32), values=np.zeros(0, np.float32),
                   prototypes=Prototypes(["bolt", "gear"], np.array([[0.0, 1.0], [5.0, 5.0]], np.float32),
                                         np.array([10, 4])),
                   base_prototypes=Prototypes(["bolt", "gear"], np.array([[0.0, 2.0], [6.0, 6.0]], np.float32),
                                              np.array([10, 4])))
    candidate, statistics = summed_statistics(None, current, {"cam": answer})   # type: ignore[arg-type]
    frozen, _ = summed_statistics(None, current, {"cam": answer}, base=True)  # type: ignore[arg-type]
    assert statistics["cam"] == {"answered": True, "classes": ["bolt", "gear"], "images": 14}
    np.testing.assert_allclose(candidate.means[candidate.classes.index("bolt")], [0.75, 0.25])
    np.testing.assert_allclose(frozen.means[frozen.classes.index("bolt")], [0.75, 0.5])
    np.testing.assert_allclose(frozen.means[frozen.classes.index("gear")], [6.0, 6.0])
    assert frozen.counts.tolist() == candidate.counts.tolist() == [40, 4]
    # --update-known off (the release's default): the device's row of the known class is not read
    mine, said = summed_statistics(None, current, {"cam": answer}, update_known=False)  # type: ignore[arg-type]
    np.testing.assert_allclose(mine.means[mine.classes.index("bolt")], [1.0, 0.0])
    assert mine.counts.tolist() == [30, 4]
    assert said["cam"] == {"answered": True, "classes": ["gear"], "images": 4, "not_read": ["bolt"]}
    # A current class the host holds no image of (added by a device in an earlier round) is placed by the
    # devices that hold its images: their answers replace its statistics on both sides, whatever
    # --update-known says (the current row was computed under the current backbone, from the same kind
    # of images: adding it would count them twice and mix backbones).
    placed, said = summed_statistics(None, current, {"cam": answer}, update_known=False,  # type: ignore[arg-type]
                                     replace={"bolt": ["cam"]})
    frozen, _ = summed_statistics(None, current, {"cam": answer}, base=True, update_known=False,  # type: ignore[arg-type]
                                  replace={"bolt": ["cam"]})
    np.testing.assert_allclose(placed.means[placed.classes.index("bolt")], [0.0, 1.0])
    np.testing.assert_allclose(frozen.means[frozen.classes.index("bolt")], [0.0, 2.0])
    assert placed.counts.tolist() == frozen.counts.tolist() == [10, 4]
    assert said["cam"] == {"answered": True, "classes": ["bolt", "gear"], "images": 14}
    # with no answer, it keeps what it had; a device that does not place it is not read for it
    kept, _ = summed_statistics(None, current, {}, update_known=False, replace={"bolt": ["cam"]})  # type: ignore[arg-type]
    np.testing.assert_allclose(kept.means, current.means)
    other, said = summed_statistics(None, current, {"cam": answer}, update_known=False,  # type: ignore[arg-type]
                                    replace={"bolt": ["line-a"]})
    np.testing.assert_allclose(other.means[other.classes.index("bolt")], [1.0, 0.0])
    assert said["cam"]["not_read"] == ["bolt"]
