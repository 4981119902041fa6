"""The statistics round's shared names: the candidate lineage and the statistics-only delta.

A class's statistics add up only under one backbone (docs/design-notes.md, "Class statistics and
backbones"). So a fleet round has two phases: `edgecl release` publishes the merged candidate as a
canary of its own lineage (``<bundle_id>.candidate``, same version number as the release it
prepares) to the devices whose deltas it merged; each runs `edgecl restat`, which re-embeds the
images it holds under the candidate and pushes a *statistics delta* against it (no weight change,
its classes' means, image counts and scatter under the candidate and under the version it runs:
``statistics_answer``); `edgecl release --finish` sums them (classstats.merge_by_counts)
and judges and publishes the real version. A separate lineage keeps `edgecl pull` from ever taking
an unjudged candidate, and lets the server check the statistics deltas like any other delta.

numpy + stdlib: host, device and server import this module.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgecl import classstats
from edgecl.formats.delta import Delta
from edgecl.formats.prototypes import Prototypes
from edgecl.formats.scatter import RANK_DEVICE, Scatter

CANDIDATE_SUFFIX = ".candidate"
STAGE = "statistics-candidate"      # the candidate release's report["stage"]


def candidate_id(bundle_id: str) -> str:
    """The lineage a release's statistics candidate is published under."""
    return bundle_id + CANDIDATE_SUFFIX


def is_candidate_report(report: Any) -> bool:
    return isinstance(report, dict) and report.get("stage") == STAGE


def statistics_delta(manifest: Any, device_id: str, table: Prototypes) -> Delta:
    """A delta that changes no weight and carries ``table`` (means and image counts computed under
    the candidate ``manifest``'s own backbone). samples_seen = the images it counts, so the server's
    bound (no class counts more images than the delta saw) holds exactly."""
    counts = np.asarray(table.counts, np.int64)
    return Delta(bundle_id=manifest.bundle_id, bundle_version=manifest.version, base_sha256=manifest.base_sha256,
                 mask_sha256=manifest.mask_sha256, device_id=device_id, delta_k=manifest.selected,
                 positions=np.zeros(0, np.int32), values=np.zeros(0, np.float32), steps=0,
                 samples_seen=int(counts.sum()), metrics={"statistics_only": 1.0},
                 prototypes=Prototypes(list(table.classes), np.asarray(table.means, np.float32), counts))


def statistics_answer(manifest: Any, device_id: str, classes: list[str], labels: np.ndarray,
                      embeddings: np.ndarray, base_embeddings: np.ndarray) -> Delta:
    """One device's answer to a statistics round, from the same images embedded under the candidate
    ``manifest``'s backbone (``embeddings``) and under the current version's (``base_embeddings``):
    per class its mean and count under both (the current backbone's means are the release's frozen
    baseline of the same images), and the within-class scatter under both, each a rank-16 factor
    (what the gate's LDA head needs; formats.scatter). `edgecl restat` builds it on the device from
    the images it holds; `edgecl release` on the host from a device's shared exemplars (mode 2)."""
    labels = np.asarray(labels, np.int64)
    sums = classstats.class_sums(embeddings, labels, classes)
    base_sums = classstats.class_sums(base_embeddings, labels, classes)
    names = [c for c in classes if c in sums]
    counts = np.asarray([sums[c][1] for c in names], np.int64)
    stats = statistics_delta(manifest, device_id, Prototypes(
        names, np.stack([sums[c][0] for c in names]).astype(np.float32), counts))
    stats.scatter = Scatter.of(embeddings, labels, RANK_DEVICE)
    stats.base_scatter = Scatter.of(base_embeddings, labels, RANK_DEVICE)
    stats.base_prototypes = Prototypes(names, np.stack([base_sums[c][0] for c in names]).astype(np.float32),
                                       counts.copy())
    return stats
