"""`edgecl upgrade OLD NEW`: carry this device's local memory over to the next model version.

A device's state lives next to its bundle (``BUNDLE/state``). When the fleet ships the next version
(`edgecl apply` on the host), the new bundle folder starts from its own state, and what only this
device knew would be lost: the exemplar images it kept of its classes (replay and drift
compensation need them) and the prototypes of classes the new version does not know. This copies
them into the new bundle's state as its first generation:

- exemplars: the device's memory, plus the new bundle's calibration exemplars for classes the
  device has none of (pixels stay valid under any backbone);
- prototypes: the new bundle's (made by the fleet's merge, so they fit the new weights), plus the
  device's own for classes the new version lacks (computed with the old weights; the next
  `edgecl adapt` moves them by their exemplars' drift);
- the LDA head's statistics (pooled covariance and class means, computed with the old weights; for a
  version made from this device's own delta they are the new weights' too).

The new bundle must descend from the old one (its manifest's parent_sha256), take images of the
same size, and have no device state yet; nothing is written when a check fails, and the new state
is one atomic generation, so `edgecl rollback` on NEW undoes the upgrade.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgecl.errors import DeviceError
from edgecl.formats import manifest as mf
from edgecl.formats.exemplars import ExemplarMemory
from edgecl.formats.hashing import sha256_file

from .state import (
    EXEMPLARS,
    LDA,
    PROTOTYPES,
    Bundle,
    bundle_lock,
    bundle_prototypes,
    commit_generation,
    load_current,
    open_bundle,
    read_head,
)


def upgrade(old_dir: str | Path, new_dir: str | Path, any_lineage: bool = False) -> dict[str, Any]:
    old, new = open_bundle(old_dir), open_bundle(new_dir)
    if old.root.resolve() == new.root.resolve():
        raise DeviceError(f"OLD and NEW are the same folder ({old.root})",
                          "pass the bundle this device used, then the next version's folder")
    # OLD is locked too: an adapt committing to it meanwhile would be left out of what is carried.
    with bundle_lock(old, "upgrade"), bundle_lock(new, "upgrade"):
        return _upgrade(old, new, any_lineage)


def _upgrade(old: Bundle, new: Bundle, any_lineage: bool) -> dict[str, Any]:
    if not any_lineage and new.manifest.parent_sha256 != sha256_file(old.path(mf.MANIFEST)):
        raise DeviceError(f"{new.root} was not made from {old.root} (its parent_sha256 differs)",
                          "upgrade from the bundle this version was applied to, or pass --any-lineage")
    if list(old.manifest.input_size) != list(new.manifest.input_size):
        raise DeviceError(f"{old.root} takes {old.manifest.input_size} px images, {new.root} "
                          f"{new.manifest.input_size}", "exemplars cannot be carried across input sizes")
    if old.manifest.embedding_dim != new.manifest.embedding_dim:
        raise DeviceError(f"embedding sizes differ ({old.manifest.embedding_dim} vs {new.manifest.embedding_dim})",
                          "prototypes cannot be carried across backbones")
    if read_head(new.state_dir).get("current") is not None:
        raise DeviceError(f"{new.root} already has device state", "run `edgecl rollback` on it, or delete "
                          f"{new.state_dir}, then upgrade again")
    current = load_current(old)
    memory = (ExemplarMemory.load_file(current.exemplars_path) if current.exemplars_path
              else ExemplarMemory.empty((int(old.manifest.input_size[0]), int(old.manifest.input_size[1]))))
    if new.path(mf.EXEMPLARS).exists():
        shipped = ExemplarMemory.load_file(new.path(mf.EXEMPLARS))
        missing = [c for c in shipped.classes if c not in memory.classes]
        if missing:
            memory = _union(memory, shipped, missing)
    prototypes = bundle_prototypes(new)
    carried_protos = [c for c in current.prototypes.classes if c not in prototypes.classes]
    for name in carried_protos:
        i = current.prototypes.classes.index(name)
        prototypes.upsert(name, current.prototypes.means[i], int(current.prototypes.counts[i]))

    def write(tmp: Path) -> None:
        prototypes.save_file(tmp / PROTOTYPES)
        if len(memory.classes):
            memory.save_file(tmp / EXEMPLARS)
        if current.lda_path is not None:
            shutil.copyfile(current.lda_path, tmp / LDA)

    meta = {"upgraded_from": str(old.root), "upgraded_from_manifest_sha256": sha256_file(old.path(mf.MANIFEST)),
            "old_generation": current.generation, "exemplar_classes": list(memory.classes),
            "carried_prototypes": carried_protos,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    generation = commit_generation(new, write, meta)
    return {"state": generation, "exemplar_classes": list(memory.classes), "exemplars": int(len(memory.labels)),
            "exemplar_bytes": memory.nbytes, "carried_prototypes": carried_protos,
            "classes": list(prototypes.classes)}


def _union(a: ExemplarMemory, b: ExemplarMemory, take: list[str]) -> ExemplarMemory:
    pixels = [a.pixels] + [b.of_class(c) for c in take]
    labels = [a.labels] + [np.full(len(b.of_class(c)), len(a.classes) + j, np.int64) for j, c in enumerate(take)]
    return ExemplarMemory(list(a.classes) + take, np.concatenate(pixels).astype(np.uint8), np.concatenate(labels))
