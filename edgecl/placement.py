"""Who places a class a released version already knows, in the next round (docs/server.md, step 3).

A class's statistics add up only under one backbone. After a release, the next round's candidate
moves the backbone again, and every class the current version knows needs its statistics under the
candidate. The host places those it holds images of (``--class-data``; the exemplars the version
ships, in mode 2 the fleet's). The classes devices added in earlier rounds of the default mode have
no image on the host: their images stayed on the devices. Those are *placed by devices*: the devices
the current version's release counted them from are asked (`edgecl restat`), like a device adding a
class, and their answers replace the old statistics (computed under the current backbone).

Pure functions: the release round (edgecl/release.py) fetches the report and the deltas.
"""

from __future__ import annotations

from typing import Any

from edgecl.formats import delta as delta_format


def counted_by_release(report: dict[str, Any], known: list[str]) -> dict[str, list[str]]:
    """device -> the current classes a release counted from that device: its report's ``statistics``
    (``classes`` per device; a device asked that did not answer is listed with the classes it places,
    ``held_note``). Device names that are not names are skipped (the report is the server's JSON)."""
    out: dict[str, list[str]] = {}
    for device, entry in ((report or {}).get("statistics") or {}).items():
        classes = entry.get("classes") if isinstance(entry, dict) else None
        if isinstance(classes, list) and delta_format.NAME_RE.fullmatch(str(device)):
            held = [c for c in classes if c in known]
            if held:
                out[str(device)] = held
    return out


def placed_by_devices(known: list[str], host_placed: set[str], counted: dict[str, list[str]],
                      reported: dict[str, list[str]]) -> dict[str, list[str]]:
    """class -> the devices that place it: each current class the host holds no image of
    (``host_placed``: what --class-data and the version's exemplars cover), with the devices the
    current version's release counted it from (``counted``; also when they send no delta this round),
    like the device that added it. Another device that reports images of it (``reported``: a camera
    seeing it from its own angle) does not, as it does not update a calibration class
    (``--update-known`` lets it): its view would move the class away from the images it was made
    from, and a device never speaks for a class it was not counted for. A class no release counted
    (a version registered by hand) is placed by the contributors that report it."""
    out: dict[str, list[str]] = {}
    for name in (c for c in known if c not in host_placed):
        owners = sorted(d for d, held in counted.items() if name in held)
        out[name] = owners or sorted(d for d, held in reported.items() if name in held)
    return out


def held_note(placed: dict[str, list[str]], statistics: dict[str, Any]) -> dict[str, Any]:
    """``statistics`` (device -> answered, classes) with each device that places classes of ``placed``
    (class -> devices) and did not answer listed with those classes, so the next round's release
    reads who holds them from this report (``counted_by_release``)."""
    for device in sorted({d for devices in placed.values() for d in devices}):
        held = [c for c, devices in placed.items() if device in devices]
        entry = statistics.setdefault(device, {"answered": False, "classes": []})
        if not entry.get("answered"):
            entry["classes"] = list(dict.fromkeys([*entry.get("classes", []), *held]))
    return statistics
