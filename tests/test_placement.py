"""Who places a class a released version already knows, in the next round (edgecl.placement).
The whole round runs in tests/test_fleet_e2e.py (line-b, which sends no delta, is asked)."""

from __future__ import annotations

from edgecl.placement import counted_by_release, held_note, placed_by_devices

KNOWN = ["bolt", "nut", "gear"]          # v2: the calibration classes bolt, nut and gear, added in round 1


def test_the_classes_the_host_holds_no_image_of_are_placed_by_the_devices_that_reported_them():
    """A version registered by hand (no release report): the contributors whose deltas report images of a
    class place it; the host places what its class data and the version's exemplars cover."""
    reported = {"line-a": ["gear"], "line-b": ["bolt"]}
    assert placed_by_devices(KNOWN, {"bolt", "nut"}, {}, reported) == {"gear": ["line-a"]}
    assert placed_by_devices(KNOWN, {"bolt", "nut", "gear"}, {}, reported) == {}   # mode 2: gear's exemplars ship
    assert placed_by_devices(KNOWN, set(), {}, reported) == {"bolt": ["line-b"], "nut": [], "gear": ["line-a"]}


def test_a_class_a_release_counted_is_placed_only_by_the_devices_it_was_counted_from():
    """v2's release counted gear from line-c, which sends no delta this round: line-c places it, alone;
    line-a's images of gear (another camera's view) are not read for it."""
    report = {"statistics": {"line-c": {"answered": True, "classes": ["gear"], "images": 40},
                             "line-a": {"answered": True, "classes": ["cog"], "images": 9},   # not a v2 class
                             "../etc": {"classes": ["gear"]}, "line-d": "garbage"}}
    counted = counted_by_release(report, KNOWN)
    assert counted == {"line-c": ["gear"]}
    assert placed_by_devices(KNOWN, {"bolt", "nut"}, counted, {"line-a": ["gear"]}) == {"gear": ["line-c"]}
    assert counted_by_release({}, KNOWN) == {}


def test_who_did_not_answer_stays_listed_so_the_next_round_asks_it_again():
    said = held_note({"gear": ["line-c"], "nut": ["line-a"]},
                     {"line-a": {"answered": True, "classes": ["nut"], "images": 5},
                      "line-b": {"answered": False, "classes": []}})
    assert said == {"line-a": {"answered": True, "classes": ["nut"], "images": 5},
                    "line-b": {"answered": False, "classes": []},
                    "line-c": {"answered": False, "classes": ["gear"]}}
    # the round after this one reads the same report: line-c still places gear
    assert counted_by_release({"statistics": said}, KNOWN)["line-c"] == ["gear"]
