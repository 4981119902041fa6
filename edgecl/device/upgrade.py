"""`edgecl upgrade OLD NEW`: carry this device's local memory over to the next model version.

A device's state lives next to its bundle (``BUNDLE/state``). When the fleet ships the next version
(`edgecl apply` on the host), the new bundle folder starts from its own state, and what only this
device knew would be lost: the exemplar images it kept of its classes (replay and drift
compensation need them) and the prototypes of classes the new version does not know. This copies
them into the new bundle's state as its first generation:

- exemplars: the device's memory, plus the new bundle's calibration exemplars for classes the
  device has none of (pixels stay valid under any backbone);
- prototypes: the new bundle's (made by the fleet's merge, so they fit the new weights), except
  for the classes this device holds exemplars of and the new bundle ships none of: the host could
  move those (this device's new classes) only by the drift of other classes' exemplars, so they
  are the device's own prototypes moved by their own exemplars' drift, measured by embedding the
  device's exemplars with OLD (its delta) and with NEW: p + mean(new) - mean(old). A class NEW does
  not know at all is carried the same way (without exemplars: as it was);
- a device never loses by pulling: for its classes that NEW ships too (after a statistics round,
  computed under NEW's backbone from this device's own images), NEW's statistics and the device's
  carried ones are both scored on the images the device holds of them (``_judge_versions``) and the
  better is kept; the result says which (``chose``);
- the LDA head's statistics: when NEW ships the fleet's pooled within-class scatter
  (``fleet_scatter.safetensors``, the scatter the release gate judged NEW's LDA head with, every
  class's under NEW's backbone), the device serves with it and NEW's class means; otherwise its own
  (pooled covariance and class means), carried through the affine drift map fitted on the same
  exemplars (identity when the device holds none).

The new bundle must descend from the old one (its manifest's parent_sha256), take images of the
same size, and have no device state yet; nothing is written when a check fails, and the new state
is one atomic generation, so `edgecl rollback` on NEW undoes the upgrade.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from edgecl import classstats
from edgecl.errors import DeviceError
from edgecl.formats import manifest as mf
from edgecl.formats.exemplars import ExemplarMemory
from edgecl.formats.hashing import sha256_file
from edgecl.formats.prototypes import Prototypes
from edgecl.formats.scoring import score

from . import heads
from .heads import LdaHead
from .infer import create_runner, embed_and_score, embed_own_weights, resolve_profile
from .state import (
    EXEMPLARS,
    LDA,
    PROTOTYPES,
    DeviceState,
    OpenBundle,
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


def _upgrade(old: OpenBundle, new: OpenBundle, any_lineage: bool) -> dict[str, Any]:
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
    own = ExemplarMemory.load_file(current.exemplars_path) if current.exemplars_path else None
    memory = own if own is not None else ExemplarMemory.empty((int(old.manifest.input_size[0]), int(old.manifest.input_size[1])))
    shipped_classes: set[str] = set()
    if new.path(mf.EXEMPLARS).exists():
        shipped = ExemplarMemory.load_file(new.path(mf.EXEMPLARS))
        shipped_classes = set(shipped.classes)
        missing = [c for c in shipped.classes if c not in memory.classes]
        if missing:
            memory = memory.joined(shipped, missing)
    prototypes = bundle_prototypes(new)
    carried_protos = [c for c in current.prototypes.classes if c not in prototypes.classes
                      or (own is not None and c in own.classes and c not in shipped_classes)]
    before, after = embed_both(old, new, own, current.delta) if own is not None else ({}, {})
    moved = []
    released = prototypes.copy()
    for name in carried_protos:
        i = current.prototypes.classes.index(name)
        mean = current.prototypes.means[i].astype(np.float64)
        if name in before:
            mean = classstats.shift_by_exemplars(mean, before[name], after[name])
            moved.append(name)
        prototypes.upsert(name, mean, int(current.prototypes.counts[i]))
        prototypes.seen[name] = current.prototypes.seen.get(name, np.zeros(0, np.uint64)).copy()
    # The LDA head NEW was judged with (heads.fleet_head), when it ships one.
    scatter_file = new.path(mf.FLEET_SCATTER)
    fleet_head = heads.fleet_head(scatter_file, new.manifest.embedding_dim) if scatter_file.exists() else None
    # This device's classes whose exemplars NEW ships (it shared them: mode 2): NEW's statistics of
    # them come from those 20 images a class, and a consolidated release trained on them; the device
    # holds all the images it learned them from, so it judges NEW's against its own recomputed under NEW.
    added = set(current.prototypes.classes) - set(bundle_prototypes(old).classes)   # the classes it learned
    recompute = [c for c in (own.classes if own is not None else []) if c in added and c in shipped_classes
                 and c in released.classes and c not in carried_protos]
    choice = _judge_versions(old, new, current, released, prototypes,
                             [c for c in carried_protos if c in released.classes] + recompute,
                             fleet_head.covariance() if fleet_head is not None else None, recompute)
    recomputed = choice.pop("recomputed_means", {})
    if choice.get("kept") == "released":
        for name in choice["classes"]:
            i = released.classes.index(name)
            # its `seen` fingerprints stay: the released statistics count this device's images (its
            # `edgecl restat` sent them), so a later adapt on them replaces rather than adds them
            prototypes.upsert(name, released.means[i], int(released.counts[i]))
        moved = [c for c in moved if c not in choice["classes"]]
    elif choice.get("kept") == "device":
        for name, (mean, count) in recomputed.items():
            prototypes.upsert(name, mean, count)
            prototypes.seen[name] = current.prototypes.seen.get(name, np.zeros(0, np.uint64)).copy()
    lda = LdaHead.load_file(current.lda_path) if current.lda_path is not None else None
    if fleet_head is not None:
        # NEW's own head replaces the device's (no drift map to fit): the release's calibration of these
        # statistics wins; else the device's, marked
        if fleet_head.calibration is None and lda is not None and lda.calibration is not None:
            fleet_head.calibration = {**lda.calibration, "carried_by": "edgecl upgrade (fitted on this device's "
                                      "statistics before the release's; the next adapt refits it)"}
        lda = fleet_head
    elif lda is not None and before:
        carried = lda.calibration
        lda.move(classstats.fit_linear_drift(np.concatenate(list(before.values())), np.concatenate(list(after.values()))))
        if carried is not None:
            # move() drops the record (its threshold was fitted on the statistics before the map). The
            # device has no held-out images here to fit a new one; without any, the lda head's
            # probabilities fall back to softmax at temperature 1 (p = 1.000 for a wrong class). So the
            # record travels with the statistics it was fitted on, marked; the next adapt refits it.
            lda.calibration = {**carried, "carried_by": "edgecl upgrade (fitted before the drift map moved "
                                                         "these statistics; the next adapt refits it)"}

    def write(tmp: Path) -> None:
        prototypes.save_file(tmp / PROTOTYPES)
        if len(memory.classes):
            memory.save_file(tmp / EXEMPLARS)
        if lda is not None:
            lda.save_file(tmp / LDA)

    meta = {"upgraded_from": str(old.root), "upgraded_from_manifest_sha256": sha256_file(old.path(mf.MANIFEST)),
            "old_generation": current.generation, "exemplar_classes": list(memory.classes),
            "carried_prototypes": carried_protos, "moved_by_own_exemplars": moved,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    generation = commit_generation(new, write, meta)
    return {"state": generation, "exemplar_classes": list(memory.classes), "exemplars": int(len(memory.labels)),
            "exemplar_bytes": memory.nbytes, "carried_prototypes": carried_protos,
            "moved_by_own_exemplars": moved, "lda_moved": lda is not None and bool(before) and fleet_head is None,
            "lda_from_release": fleet_head is not None, "chose": choice,
            "classes": list(prototypes.classes)}


def _judge_versions(old: OpenBundle, new: OpenBundle, current: DeviceState, released: Prototypes, carried: Prototypes,
                    contested: list[str], covariance: np.ndarray | None = None,
                    recompute: list[str] | None = None) -> dict[str, Any]:
    """The do-no-harm rule applied to versions: for this device's classes that the new version
    ships, its statistics (the fleet's, computed under the new backbone) against the device's own
    carried over, each scored among all classes (LDA with NEW's fleet scatter when it ships one, else
    ncm) on the images this device holds of them (its task folder, its own exemplars), embedded once
    under NEW. The better one is kept (a tie keeps the
    released one, which the statistics round made exact); no image held: the released one.

    The classes in ``recompute`` (NEW made their statistics from the exemplars this device shared)
    are, on the device's side, the means of all the images it holds of them under NEW (what a
    statistics round would have sent); when the device's side wins they are returned in
    ``recomputed_means`` (class -> (mean, images))."""
    if not contested:
        return {}
    from .restat import held_images

    classes, pixels, labels = held_images(old, current)
    rows = np.flatnonzero(np.isin(labels, [classes.index(c) for c in contested if c in classes]))
    if not rows.size:
        return {"kept": "released", "classes": contested, "images": 0,
                "why": "no image of these classes held on the device to judge them"}
    embeddings = embed_own_weights(new, pixels[rows])
    truth = [classes[j] for j in labels[rows]]
    mine = carried.copy()
    recomputed: dict[str, tuple[np.ndarray, int]] = {}
    for name in recompute or []:
        held = np.asarray(truth) == name
        if held.any():
            recomputed[name] = (embeddings[held].astype(np.float64).mean(axis=0), int(held.sum()))
            mine.upsert(name, *recomputed[name])
    for name in [c for c in released.classes if c not in mine.classes]:
        i = released.classes.index(name)
        mine.upsert(name, released.means[i], int(released.counts[i]))
    accuracy = {k: (score(embeddings, truth, t, covariance) or {"accuracy": 0.0})["accuracy"]
                for k, t in (("released", released_with(released, carried)), ("device", mine))}
    kept = "released" if accuracy["released"] >= accuracy["device"] else "device"
    out = {"kept": kept, "classes": contested, "images": int(rows.size), "released_accuracy": accuracy["released"],
           "device_accuracy": accuracy["device"]}
    if recomputed:
        out["recomputed"] = sorted(recomputed)
        out["recomputed_means"] = recomputed
    return out


def released_with(released: Prototypes, carried: Prototypes) -> Prototypes:
    """The released table plus the classes only the device knows (scored among the same classes)."""
    out = released.copy()
    for i, name in enumerate(carried.classes):
        if name not in out.classes:
            out.upsert(name, carried.means[i], int(carried.counts[i]))
    return out


def embed_both(old: OpenBundle, new: OpenBundle, memory: ExemplarMemory, delta: np.ndarray
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The device's exemplars embedded by OLD (with its delta) and by NEW (its own weights), per class."""
    out = []
    for bundle, d in ((old, delta), (new, np.zeros(new.mask.total_selected, np.float32))):
        runner = create_runner(bundle, resolve_profile(None, bundle))
        try:
            out.append({c: embed_and_score(runner, bundle, memory.of_class(c), d)[0].astype(np.float64)
                        for c in memory.classes if len(memory.of_class(c))})
        finally:
            runner.release()
    return out[0], out[1]
