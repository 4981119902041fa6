"""Drift statistics of what `edgecl watch` serves, over a rolling window of the last images.

- ``unknown_rate``: the share flagged unknown (None without a calibration). Near the calibration's
  false-unknown rate (5%) on the products the state knows; well above it, something new is on
  the line.
- ``mean_confidence``: the mean top probability (calibrated when the state is).
- ``embedding_shift``: the distance of the window's mean embedding from the known classes' mean
  (the prototypes' count-weighted mean), in units of the known images' spread (with the LDA
  statistics: the root of the total variance, within-class plus between class means; without: the
  root mean squared distance of the prototypes from their mean). 0 = the window sits where the
  known images do; a camera that moved, a new light or a new product raises it.

Kept in ``state/watch.json`` (written by watch every few seconds, atomically; never part of a
generation), read by ``heartbeat_drift`` for the device's heartbeat.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgecl.formats.atomic import atomic_write_json

if TYPE_CHECKING:
    from .infer import Scored, ServingState
    from .watch import StateFollower

STATS_FILE = "watch.json"


@dataclass
class DriftMonitor:
    window: int = 500                                  # images in the rolling window
    images_total: int = 0                              # served since the statistics began (kept across restarts)
    unknown: deque = field(default_factory=deque)      # 1.0 / 0.0 per image (NaN: no calibration)
    confidence: deque = field(default_factory=deque)   # top probability per image
    embeddings: deque = field(default_factory=deque)   # float32 [D] per image (bounded by the window)
    _reference: tuple[np.ndarray, float] | None = None  # (centre, scale) of the state served

    @classmethod
    def load(cls, state_dir: Path, window: int = 500) -> DriftMonitor:
        monitor = cls(window=max(int(window), 1))
        try:
            monitor.images_total = int(json.loads((Path(state_dir) / STATS_FILE).read_text()).get("images_total", 0))
        except (OSError, ValueError, AttributeError, TypeError):
            pass
        return monitor

    def reset_reference(self) -> None:
        """A new state was committed: its classes' mean is the new reference (the window stays)."""
        self._reference = None

    def add(self, scored: Scored, serving: ServingState) -> None:
        if self._reference is None:
            self._reference = reference(serving)
        flags = scored.unknown if scored.unknown is not None else np.full(len(scored.scores), np.nan)
        top = np.nanmax(np.where(np.isfinite(scored.probabilities), scored.probabilities, np.nan), axis=1) \
            if len(scored.probabilities) else np.zeros(0)
        for flag, p, z in zip(flags, top, scored.embeddings, strict=True):
            self.unknown.append(float(flag))
            self.confidence.append(float(p))
            self.embeddings.append(np.asarray(z, np.float32))
            self.images_total += 1
        for q in (self.unknown, self.confidence, self.embeddings):
            while len(q) > self.window:
                q.popleft()

    def stats(self) -> dict[str, Any]:
        flags = np.asarray(self.unknown, np.float64)
        conf = np.asarray(self.confidence, np.float64)
        shift = None
        if self.embeddings and self._reference is not None:
            centre, scale = self._reference
            shift = float(np.linalg.norm(np.mean(np.stack(self.embeddings), axis=0) - centre) / scale)
        return {"window_images": int(len(conf)), "images_total": self.images_total,
                "unknown_rate": _mean_or_none(flags), "mean_confidence": _mean_or_none(conf),
                "embedding_shift": shift}

    def save(self, state_dir: Path, follower: StateFollower) -> None:
        body = {**self.stats(), "bundle_id": follower.bundle.manifest.bundle_id,
                "bundle_version": follower.bundle.manifest.version, "state": follower.generation,
                "updated_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(state_dir) / STATS_FILE, body)


def reference(serving: ServingState) -> tuple[np.ndarray, float]:
    """(centre [D], scale) the embedding shift is measured against."""
    protos = serving.state.prototypes
    counts = np.maximum(np.asarray(protos.counts, np.float64), 1.0)
    means = np.asarray(protos.means, np.float64)
    centre = (counts[:, None] * means).sum(axis=0) / counts.sum()
    if serving.lda is not None and serving.lda_means is not None:
        lda = serving.lda
        within = float(np.trace(lda.scatter)) / max(lda.count - lda.groups, 1)
        between = float(np.mean(np.sum((serving.lda_means - serving.lda_means.mean(axis=0)) ** 2, axis=1)))
        scale = np.sqrt(within + between)
    else:
        scale = float(np.sqrt(np.mean(np.sum((means - centre) ** 2, axis=1))))
    return centre, max(float(scale), 1e-12)


def _mean_or_none(values: np.ndarray) -> float | None:
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else None


def heartbeat_drift(state_dir: str | Path) -> dict[str, Any] | None:
    """The last drift statistics watch saved (for the heartbeat), or None."""
    try:
        body = json.loads((Path(state_dir) / STATS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) else None
