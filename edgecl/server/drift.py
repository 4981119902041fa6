"""Devices' drift reports: what a heartbeat's ``drift`` may hold, and the history the dashboard plots.

``edgecl watch`` sends its rolling statistics (``edgecl/device/drift.py``) in ``POST /v1/heartbeat``
``{"event": "watch", ..., "drift": {...}}`` every few minutes and at exit. The server keeps the last
``DRIFT_POINTS_PER_DEVICE`` of them per device (``Store.add_drift_report`` drops older ones in the
same commit), so a chatty or broken device can fill at most that many rows, and the dashboard draws
each device's unknown rate, mean confidence and embedding shift over time.

A report's numbers are checked before anything is stored, each against what the device can
honestly send: rates and probabilities are shares in [0, 1]; the embedding shift is a distance in
units of the known images' spread (0 where they sit; a new product moves it by a few units), so one
over ``MAX_EMBEDDING_SHIFT`` is a bug or a lie that would flatten every other point of the chart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from edgecl.formats.delta import NAME_RE
from edgecl.server.service import Rejected

DRIFT_POINTS_PER_DEVICE = 2016   # a week of heartbeats at watch's default 5 minutes
MAX_EMBEDDING_SHIFT = 1e4        # spreads of the known images (honest values: 0 to a few tens)
MAX_WINDOW_IMAGES = 10**9        # watch's rolling window (default 500)
MAX_IMAGES_TOTAL = 10**15        # images served since the statistics began (a year at 30 million per second)


@dataclass(frozen=True)
class DriftPoint:
    """One heartbeat's drift statistics, checked."""

    state: str                       # the generation served ("bundle" = the bundle as shipped, "gen-000002")
    window_images: int               # images in the rolling window the rates are over
    images_total: int                # images served since the statistics began
    unknown_rate: float | None       # share flagged unknown (None: the state has no calibration)
    mean_confidence: float | None    # mean top probability
    embedding_shift: float | None    # the window's mean embedding's distance from the known classes'


def _invalid(problem: str) -> Rejected:
    return Rejected("drift_invalid", 422, f"heartbeat drift: {problem}",
                    "send the statistics `edgecl watch` keeps in state/watch.json (docs/device.md)")


def _number(body: dict, key: str, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(f"{key} is {str(value)[:40]!r}, not a number")
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value <= high:
        raise _invalid(f"{key} = {value:.6g} is outside [0, {high:g}]")
    return value


def _count(body: dict, key: str, high: int) -> int:
    value = body.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise _invalid(f"{key} = {str(value)[:40]} is not a whole number in [0, {high:g}]")
    return value


def parse_drift(body: Any) -> DriftPoint:
    """The heartbeat's ``drift`` object, checked; ``Rejected("drift_invalid")`` names the first bad
    field. Unknown keys are ignored (a newer device may send more)."""
    if not isinstance(body, dict):
        raise _invalid(f"expected an object, got {type(body).__name__}")
    state = body.get("state", "")
    if not isinstance(state, str) or (state and not NAME_RE.fullmatch(state)):
        raise _invalid(f"state {str(state)[:40]!r} is not a generation name")
    window, total = _count(body, "window_images", MAX_WINDOW_IMAGES), _count(body, "images_total", MAX_IMAGES_TOTAL)
    if window > total:
        raise _invalid(f"window_images = {window} is more than images_total = {total}")
    return DriftPoint(state=state, window_images=window, images_total=total,
                      unknown_rate=_number(body, "unknown_rate", 1.0),
                      mean_confidence=_number(body, "mean_confidence", 1.0),
                      embedding_shift=_number(body, "embedding_shift", MAX_EMBEDDING_SHIFT))
