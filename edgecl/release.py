"""`edgecl release`: the host-side release round. The server merges; the host applies, gathers class
statistics under the candidate's own backbone, judges, and publishes only what is not worse.

An orchestrator (like ``edgecl.demo``): it uses the host (``apply_delta``, torch) and the device's
inference (onnxruntime) together, and talks to the fleet server over HTTP with an admin token.

Why two phases (docs/design-notes.md, "Class statistics and backbones"): a class's mean, count and
scatter add up only under one backbone, and the devices' new classes were computed under each
device's own. Only a device holding the images can compute them under the merged backbone.

Phase 1, ``release()`` (`edgecl release`):
    1. current = the newest released version of the lineage (or --bundle-version);
    2. the server merges its counted deltas (each device's newest; strategy and exclusions as
       asked); the merged delta and the counted ones are downloaded and decoded once each;
    3. candidate = apply(current, the released step: ``scale`` x the merged delta in the devices'
       int4, ``released_step``): its weights, and the current classes' statistics moved by their
       exemplars' drift (those classes never take a device's numbers). ``scale`` (the server's
       step size, 1 = the merged step whole) damps what one device's step costs the classes it
       never saw (docs/server.md, "Interference"). Current classes the host holds no image of (added
       by devices in earlier rounds, edgecl.placement) take the host's drift estimate until the
       devices that hold their images answer in phase 2. With ``consolidate_epochs`` (mode 2: the
       host holds exemplars of every class) the step is first trained that many epochs by the
       devices' own rule on those exemplars (edgecl.device.consolidate; docs/server.md#consolidate);
    4. judged now on what is already final: the candidate scored among the current classes only vs
       the current version on those classes (like with like); the devices' classes are estimates
       until phase 2, so nothing that depends on them is judged yet;
    5. published as a canary of the lineage ``<id>.candidate`` to the contributing devices, which
       run `edgecl restat` (re-embed what they hold under it, push a statistics-only delta).
Phase 2, ``finish()`` (`edgecl release --finish`):
    6. the statistics deltas of the candidate are summed exactly (classstats.merge_by_counts); a
       class no device answered for is left out of the released version (its device keeps it:
       pull carries the classes a version lacks; it is sent again next round) and its group is
       reported as *not judged*; the release check judges without it;
    7. the release check (``verdict``): every judged group >= the frozen baseline (same classes, the current backbone,
       every class's statistics under it); the current classes, candidate restricted to them, >=
       the current version; ``tolerance`` allowed (default 0). Scored with the head the devices
       serve, LDA, when every class's scatter is known under both backbones (``edgecl.gatehead``:
       --class-data and the devices' restat answers), else with ncm on every side;
    8. if it passes: the released version (the candidate's files with the summed statistics, and
       the pooled scatter the LDA head was judged with, ``fleet_scatter.safetensors``) is uploaded,
       registered and released to every device (or ``canary``).
``statistics_round=False`` runs 1-3, uses the host's estimates for every device class (its
base-space statistics moved by semantic drift compensation on the bundle's exemplars), and judges
and publishes in one go (no device has to answer).

Held-out images are embedded once per backbone (current, candidate); every accuracy is a table of
class statistics scored on those embeddings (the frozen baseline is never written as a bundle).

Mode 2, exemplars shared (a device profile's ``share_exemplars``; ``edgecl.shared_exemplars``): a
counted delta's images of its own classes are embedded under the candidate and the current version by
the host, so those classes are exact in phase 1; when every contributing device shared all its
classes, phase 1 judges (with the LDA head when every scatter is known) and publishes at once (no
restat). A device's restat answer wins over its shared images. The released version ships the fleet's
exemplars.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgecl import classstats, gatehead, placement
from edgecl import shared_exemplars as se
from edgecl.errors import DataError, EdgeclError
from edgecl.formats import delta as delta_format
from edgecl.formats import manifest as mf
from edgecl.formats import scatter as sc
from edgecl.formats.candidate import STAGE, candidate_id, is_candidate_report
from edgecl.formats.exemplars import ExemplarMemory
from edgecl.formats.hashing import sha256_file
from edgecl.formats.mask import Mask
from edgecl.formats.merge import merge_prototypes
from edgecl.formats.prototypes import Prototypes
from edgecl.formats.scoring import restrict
from edgecl.formats.weights_patch import ReleasedStep, attach_weights_patch, quantize_step, released_delta
from edgecl.http_client import RetryPolicy, ServerRejected, api_json, download, upload
from edgecl.progress import phase

if TYPE_CHECKING:                                  # the device side is imported where it runs
    from edgecl.device.consolidate import Consolidated

CALIBRATION = "calibration"
# B7 (benchmarks/b7_fleet/interference.py, round 1): sign election cost the devices' own classes
# 0.8 points on average against the weighted mean's 2.3, at the same overall accuracy (76.5).
DEFAULT_STRATEGY = "ties"
PHASE1_HEAD = gatehead.GateHead("ncm", "phase 1: the devices' classes are estimates until they answer")
HEADS = ("auto", "ncm")                            # the gate's head: auto = LDA when every scatter is known
DEFAULT_SCALE = 1.0                                # the server's step: candidate = current + scale x merged
MAX_SCALE = 2.0
MAX_CONSOLIDATE_EPOCHS = 50
# B7, mode 2, full size, 3 seeds (docs/server.md#consolidate): 10 epochs on the fleet's exemplars gave round 1
# 81.4 overall against 80.2 unconsolidated (frozen 80.1), round 2 level (81.2 vs 81.4); interference cost
# 3.3 -> 0.8 points.
DEFAULT_CONSOLIDATE_EPOCHS = 10


@dataclass
class ReleaseOptions:
    heldout: Path                                  # held-out image folder (one sub-folder per class)
    current_dir: Path | None = None                # local copy of the current version (else downloaded)
    bundle_version: int | None = None              # the version to merge (default: the current one)
    canary: list[str] = field(default_factory=list)  # release the final version to these devices only
    strategy: str = DEFAULT_STRATEGY               # merge strategy (formats.merge.STRATEGIES)
    scale: float = DEFAULT_SCALE                   # candidate = current + scale x merged delta
    trim: float | None = None
    max_share: float | None = None
    exclude_devices: list[str] = field(default_factory=list)
    exclude_deltas: list[str] = field(default_factory=list)
    class_data: Path | None = None                 # images of the current classes: their statistics recomputed
                                                   # exactly under the candidate (else moved by drift)
    tolerance: float = 0.0                         # allowed accuracy drop per group (0 = none)
    head: str = "auto"                             # finish: auto = LDA when every scatter is known, else ncm
    # finish: the devices' images of the current version's classes join those classes' statistics. Off
    # by default: B7 (devices seeing classes 0-1 through their own cameras) measured the clean images of
    # those classes 15 points lower with LDA (5 with ncm) with them in (benchmarks/RESULTS.md#b7).
    update_known: bool = False
    statistics_round: bool = True                  # False: one phase, the host's estimates for device classes
    # True: the devices that shared exemplars are asked too (`edgecl restat`: the statistics of every
    # image they hold, not of 20 a class), so their round has two phases; a consolidated one as well
    ask_shared: bool = False
    # epochs of the devices' training rule on the fleet's exemplars of every class, from the merged delta
    # (edgecl.device.consolidate; every class needs exemplars: mode 2); 0 = none; None = auto:
    # DEFAULT_CONSOLIDATE_EPOCHS in a round where the host holds exemplars of every class, else none
    consolidate_epochs: int | None = None
    wait_s: float = 0.0                            # finish: wait this long for every contributor's statistics
    publish: bool = True                           # finish: False judges and reports only (B7 scores options)
    work_dir: Path | None = None                   # where the bundles are built (default: a temp folder, removed)
    policy: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass
class ReleaseReport:
    bundle_id: str
    current_version: int
    version: int                                   # the candidate's (and released version's) number
    passed: bool
    published: bool
    reasons: list[str]                             # why the gate refused (empty when it passed)
    groups: dict[str, dict[str, Any]]              # group -> classes, images, candidate/baseline/current accuracy
    candidate: dict[str, Any]                      # overall held-out accuracy and images of each table
    baseline: dict[str, Any]
    current: dict[str, Any]
    merge: dict[str, Any]
    canary: list[str]
    uploaded_bytes: int = 0
    stage: str = "released"                        # "candidate" (phase 1 published it), "released", "refused"
    statistics: dict[str, Any] = field(default_factory=dict)  # device -> answered, classes, images
    not_judged: list[str] = field(default_factory=list)       # groups whose device sent no statistics
    # current classes placed by the devices that hold their images (edgecl.placement) that no device
    # answered for: the host's drift estimate under the candidate
    estimated: list[str] = field(default_factory=list)
    asked: list[str] = field(default_factory=list)            # phase 1: the devices the candidate went to
    head: dict[str, Any] = field(default_factory=lambda: {"name": "ncm", "why": ""})  # what the gate scored with
    consolidation: dict[str, Any] | None = None              # --consolidate: what it trained on, its losses

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


# -- the gate (pure: evaluations in, verdict out) ----------------------------------------------------
def _group_accuracy(evaluation: dict[str, Any] | None, classes: list[str]) -> tuple[float | None, int]:
    if evaluation is None:
        return None, 0
    rows = [evaluation["per_class"][c] for c in classes if c in evaluation["per_class"]]
    images = sum(r["images"] for r in rows)
    if not images:
        return None, 0
    return sum(r["accuracy"] * r["images"] for r in rows) / images, images


def verdict(groups: dict[str, list[str]], candidate: dict[str, Any], baseline: dict[str, Any],
         current: dict[str, Any] | None, tolerance: float, restricted: dict[str, Any] | None = None,
         not_judged: tuple[str, ...] | list[str] = (), provisional: bool = False
         ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Per group accuracies and the reasons to refuse.

    Every judged group: candidate >= frozen baseline - tolerance (same classes, same images). The
    calibration group (the classes the current version knows) also: ``restricted`` (the candidate
    scored among those classes only; default ``candidate``) >= the current version - tolerance: the
    same choice among the same classes, so adding classes never turns this comparison off. A group
    in ``not_judged`` is shown, not compared (its device sent no statistics under the candidate).
    ``provisional`` (phase 1: the devices' classes are still estimates, which compete with the
    calibration images): the calibration group is judged by the same-classes comparison alone."""
    table: dict[str, dict[str, Any]] = {}
    reasons: list[str] = []
    same_classes = restricted if restricted is not None else candidate
    for name, classes in groups.items():
        cand, images = _group_accuracy(candidate, classes)
        base, _ = _group_accuracy(baseline, classes)
        cur, _ = _group_accuracy(current, classes) if name == CALIBRATION else (None, 0)
        same, _ = _group_accuracy(same_classes, classes) if name == CALIBRATION else (None, 0)
        judged = name not in not_judged
        table[name] = {"classes": classes, "images": images, "candidate": cand, "baseline": base, "current": cur,
                       "candidate_current_classes": same, "judged": judged}
        if cand is None or not judged:
            continue            # no held-out image of this group, or nothing final to judge
        if base is not None and cand < base - tolerance and not (provisional and name == CALIBRATION):
            reasons.append(f"{name}: candidate {cand:.3f} < frozen baseline {base:.3f} - {tolerance:g}")
        if cur is not None and same is not None and same < cur - tolerance:
            reasons.append(f"{name}: candidate on the current classes {same:.3f} < current version {cur:.3f} "
                           f"- {tolerance:g}")
    if not any(row["images"] for row in table.values()):
        reasons.append("the held-out folder has no image of any class group")
    return table, reasons


def union(*tables: Prototypes | None) -> Prototypes:
    """The classes of every table, a later table's row replacing an earlier one's."""
    present = [t for t in tables if t is not None]
    out = Prototypes.empty(int(present[0].means.shape[1]))
    for t in present:
        for i, name in enumerate(t.classes):
            out.upsert(name, t.means[i], int(t.counts[i]))
    return out


# -- the server ----------------------------------------------------------------------------------
def _fetch_bundle(server: str, token: str, bundle: dict[str, Any], dest: Path, policy: RetryPolicy) -> Path:
    base = f"/v1/bundles/{bundle['bundle_id']}/{bundle['version']}/files/"
    shutil.rmtree(dest, ignore_errors=True)     # a folder of ours (--work): phase 2 may reuse phase 1's
    dest.mkdir(parents=True)
    download(server, token, base + mf.MANIFEST, dest / mf.MANIFEST, bundle["manifest_sha256"], policy)
    manifest = mf.load_manifest(dest)
    # The device's files, and of the server-only ones what `apply` reads (the overlap history).
    wanted = {**manifest.files, **{n: s for n, s in manifest.server_files.items() if n == mf.OVERLAP}}
    for name, sha in sorted(wanted.items()):
        download(server, token, base + name, dest / name, sha, policy, size=manifest.sizes.get(name))
    return dest


def upload_bundle(server: str, token: str, bundle_dir: str | Path, policy: RetryPolicy | None = None
                  ) -> tuple[dict[str, Any], int]:
    """Store a whole bundle version on the server over HTTP (admin token): only the files it lacks
    are sent (each checked by its sha256 there), then the version is registered. Returns the
    server's bundle row and the bytes sent. ``edgecl server bundle add DIR --server URL``."""
    policy = policy or RetryPolicy()
    bundle_dir = Path(bundle_dir)
    manifest = mf.load_manifest(bundle_dir)
    # The device's files and the server-only ones (recipe_weights.safetensors, weights patches).
    files = {mf.MANIFEST: sha256_file(bundle_dir / mf.MANIFEST), **manifest.files, **manifest.server_files}
    missing = set(api_json(server, token, "POST", "/v1/blobs/missing", {"sha256": sorted(set(files.values()))},
                           policy=policy)["missing"])
    sent = 0
    for name, sha in sorted(files.items()):
        if sha in missing:
            if sha256_file(bundle_dir / name) != sha:
                raise EdgeclError(f"{bundle_dir / name} does not match its manifest's sha256",
                                  "the bundle folder was changed after export: export it again")
            upload(server, token, f"/v1/blobs/{sha}", bundle_dir / name, policy)
            sent += (bundle_dir / name).stat().st_size
            missing.discard(sha)
    answer = api_json(server, token, "POST", "/v1/bundles", {"files": files}, policy=policy)
    return answer["bundle"], sent


def released_step(rnd: Round) -> ReleasedStep:
    """The weight change this round releases: the server's merged delta in the devices' int4
    quantization (formats/weights_patch.py). The candidate is built from it and devices on the
    current version pull it as a patch of a few bytes per value (new = float32(old + value) on both
    sides: the patched file is byte-identical). Deterministic: phase 2 recomputes it from the merge
    and the scale phase 1 recorded with it."""
    k = Mask.load_file(rnd.current_dir / mf.MASK).total_selected
    return quantize_step(scaled_step(rnd.merged.to_dense(k), float(rnd.merge.get("scale", 1.0))))


def consolidate_step(rnd: Round, step: ReleasedStep, epochs: int | None) -> Consolidated | None:
    """The released step after ``epochs`` of the devices' training rule on the fleet's exemplars of
    every class (edgecl.device.consolidate), from the step as merged; None when not consolidated.
    Only in a round where the host holds exemplars of every class (mode 2): asked for explicitly
    otherwise, a DataError naming the classes that have none; ``epochs=None`` (auto) then skips it."""
    if epochs == 0 or (epochs is None and not DEFAULT_CONSOLIDATE_EPOCHS):
        return None
    size = tuple(int(v) for v in mf.load_manifest(rnd.current_dir).input_size)
    memory, missing = se.fleet_memory(rnd.current_dir / mf.EXEMPLARS, rnd.known, rnd.own, rnd.shared, size)
    if missing and epochs is None:
        return None                     # the default mode: images stay on the devices, nothing to train on
    if missing:
        raise DataError(f"--consolidate needs exemplars of every class; none of {', '.join(missing)[:200]}",
                        "set share_exemplars = true in those devices' profiles (docs/server.md#exemplars-shared), "
                        "or pass --consolidate 0")
    epochs = DEFAULT_CONSOLIDATE_EPOCHS if epochs is None else epochs
    phase(f"consolidating the merged delta: {epochs} epochs on the fleet's exemplars of {len(memory.classes)} classes")
    from edgecl.device.consolidate import consolidate

    return consolidate(rnd.current_dir, step.values(), memory, epochs)


def phase1_step(rnd: Round, consolidation: dict[str, Any] | None) -> ReleasedStep:
    """The step phase 1 built the statistics candidate from, again: the merge's, consolidated as
    phase 1 recorded (``--ask-shared``). The consolidation is deterministic (the devices' rule at the
    bundle's seed, on the same exemplars in the same order), so its patch is the step's own (a few
    bytes a value); the published weights are the candidate's either way."""
    step = released_step(rnd)
    epochs = int((consolidation or {}).get("epochs") or 0)
    if epochs:
        again = consolidate_step(rnd, step, epochs)
        if again is not None:
            step = quantize_step(again.delta)
    return step


def scaled_step(vector: np.ndarray, scale: float) -> np.ndarray:
    """``scale`` x the merged K-vector, float32 (scale 1: the vector itself)."""
    return vector if scale == 1.0 else (np.asarray(vector, np.float64) * scale).astype(np.float32)


def _publish(server: str, token: str, bundle_dir: Path, canary: list[str], report: dict[str, Any],
             policy: RetryPolicy, current_dir: Path | None = None, step: ReleasedStep | None = None) -> int:
    if current_dir is not None:   # devices on the current version pull the weights as a small patch
        attach_weights_patch(bundle_dir, current_dir / mf.WEIGHTS, step, current_dir / mf.MASK)
    bundle, sent = upload_bundle(server, token, bundle_dir, policy)
    api_json(server, token, "POST", "/v1/releases", {"bundle_id": bundle["bundle_id"], "version": bundle["version"],
                                                     "canary": canary, "report": report}, policy=policy)
    return sent


def _get_delta(server: str, token: str, sha: str, work: Path, policy: RetryPolicy) -> delta_format.Delta:
    """Download one delta and decode it: the only decode of these bytes in this process."""
    path = work / f"delta-{sha[:16]}.safetensors"
    download(server, token, f"/v1/deltas/{sha}", path, sha, policy)
    return delta_format.load(path.read_bytes())


def write_version(src: Path, dst: Path, bundle_id: str, version: int, prototypes: Prototypes,
                  parent_sha256: str) -> Path:
    """A bundle version that is ``src`` (same graphs and weights: nothing re-exported) with another
    lineage id, version, parent and class statistics; the manifest lists the new file's sha256."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    Prototypes(list(prototypes.classes), prototypes.means.astype(np.float32),
               prototypes.counts.astype(np.int64)).save_file(dst / mf.PROTOTYPES)
    manifest = mf.load_manifest(dst)
    manifest.bundle_id, manifest.version, manifest.parent_sha256 = bundle_id, version, parent_sha256
    manifest.classes = list(prototypes.classes)
    manifest.files[mf.PROTOTYPES] = sha256_file(dst / mf.PROTOTYPES)
    if mf.PROTOTYPES in manifest.sizes:
        manifest.sizes[mf.PROTOTYPES] = (dst / mf.PROTOTYPES).stat().st_size
    manifest.created_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest.save(dst)
    return dst


# -- one round's inputs --------------------------------------------------------------------------
@dataclass
class Round:
    """What both phases know: the current version, the server's merge, each device's own classes
    (those the current version does not know) and their base-space statistics."""
    bundle_id: str
    current_dir: Path
    current_row: dict[str, Any]
    merge: dict[str, Any]
    merged: delta_format.Delta
    own: dict[str, list[str]]                      # device -> its classes the current version lacks
    base_tables: dict[str, Prototypes]             # device -> those classes under the current backbone
    known: list[str]                               # the current version's classes
    shared: dict[str, ExemplarMemory] = field(default_factory=dict)  # device -> its shared exemplars of `own`
    reported: dict[str, list[str]] = field(default_factory=dict)     # device -> current classes it saw images of

    @property
    def version(self) -> int:
        return int(self.current_row["version"])

    def baseline_devices(self) -> Prototypes | None:
        """Every device class under the current backbone, merged by counts across devices (exact)."""
        return merge_prototypes(list(self.base_tables.values()))

    def groups(self) -> dict[str, list[str]]:
        out = {CALIBRATION: list(self.known)}
        for device, classes in self.own.items():
            if classes:
                out[f"device:{device}"] = classes
        return out


def _device_tables(d: delta_format.Delta, known: set[str]) -> tuple[list[str], Prototypes | None]:
    """A counted delta's own classes and their statistics under the current backbone. A device that
    adapted its backbone sends those as ``base_prototypes``; one that did not sent them so already.
    A device never supplies the statistics of a class the current version knows: those rows are
    never read (a delta carrying them, e.g. rolled by one class, changes nothing)."""
    if d.prototypes is None:
        return [], None
    own = [c for c in d.prototypes.classes if c not in known]
    table = d.base_prototypes if len(d.changed_positions()) else d.prototypes
    if table is None:       # a delta from an edgecl before format 3: its classes have no baseline
        return own, None
    return own, restrict(table, own)


def _resolve_current(bundle_id: str, server: str, token: str, options: ReleaseOptions, work: Path,
                     version: int | None = None) -> tuple[dict[str, Any], Path]:
    policy = options.policy
    bundles = [b for b in api_json(server, token, "GET", "/v1/bundles", policy=policy)["bundles"]
               if b["bundle_id"] == bundle_id]
    if not bundles:
        raise EdgeclError(f"bundle {bundle_id} is not registered on {server}", "run `edgecl server bundle add` first")
    if version is None:
        released = [r["version"] for r in api_json(server, token, "GET", f"/v1/releases?bundle_id={bundle_id}",
                                                   policy=policy)["releases"]]
        version = options.bundle_version or (max(released) if released else max(b["version"] for b in bundles))
    row = next((b for b in bundles if b["version"] == version), None)
    if row is None:
        raise EdgeclError(f"bundle {bundle_id} v{version} is not registered", "pick a registered version")
    if options.current_dir is not None:
        current_dir = Path(options.current_dir)
        m = mf.load_manifest(current_dir)
        if (m.bundle_id, m.version) != (bundle_id, version) or \
                sha256_file(current_dir / mf.MANIFEST) != row["manifest_sha256"]:
            raise EdgeclError(f"{current_dir} is not the server's {bundle_id} v{version}",
                              "pass the bundle folder of that version, or leave --bundle out to download it")
        return row, current_dir
    return row, _fetch_bundle(server, token, row, work / "current", policy)


def _load_round(bundle_id: str, server: str, token: str, options: ReleaseOptions, work: Path,
                merge: dict[str, Any] | None = None, version: int | None = None) -> Round:
    current_row, current_dir = _resolve_current(bundle_id, server, token, options, work, version)
    policy = options.policy
    if merge is None:
        query = urllib.parse.urlencode([("strategy", options.strategy)]
                                       + ([("trim", options.trim)] if options.trim is not None else [])
                                       + ([("max_share", options.max_share)] if options.max_share is not None else [])
                                       + [("exclude_device", d) for d in options.exclude_devices]
                                       + [("exclude_delta", d) for d in options.exclude_deltas])
        from edgecl.server.jobclient import merge_and_wait  # the merge runs as a server job; wait for it

        merge = merge_and_wait(lambda method, path: api_json(server, token, method, path, policy=policy),
                               bundle_id, int(current_row["version"]), query)
        merge = {**{k: merge[k] for k in ("sha256", "inputs", "strategy", "devices", "deltas")}, "scale": options.scale}
    merged = _get_delta(server, token, merge["sha256"], work, policy)
    known = list(Prototypes.load_file(current_dir / mf.PROTOTYPES).classes)
    own: dict[str, list[str]] = {}
    base_tables: dict[str, Prototypes] = {}
    shared: dict[str, ExemplarMemory] = {}
    reported: dict[str, list[str]] = {}
    size = tuple(int(v) for v in mf.load_manifest(current_dir).input_size)
    for sha, device in zip(merge["deltas"], merge["devices"], strict=True):
        d = _get_delta(server, token, sha, work, policy)
        classes, table = _device_tables(d, set(known))
        own[device] = classes
        if table is not None and len(table):
            base_tables[device] = table
        memory = se.own_exemplars(d, classes, size)
        if memory is not None:
            shared[device] = memory
        if d.prototypes is not None:
            reported[device] = [c for c, n in zip(d.prototypes.classes, d.prototypes.counts.tolist(), strict=True)
                                if c in known and n > 0]
    return Round(bundle_id, current_dir, current_row, merge, merged, own, base_tables, known, shared, reported)


def _counted(server: str, token: str, bundle_id: str, version: int, known: list[str], policy: RetryPolicy
             ) -> dict[str, list[str]]:
    """device -> the current classes the release of ``version`` counted from it (placement)."""
    try:
        row = api_json(server, token, "GET", f"/v1/releases/latest?bundle_id={bundle_id}", policy=policy)
    except ServerRejected as exc:
        if exc.code != "not_found":
            raise
        return {}
    return placement.counted_by_release(row.get("report") or {}, known) if int(row.get("version", -1)) == version \
        else {}


# -- embeddings: once per backbone ---------------------------------------------------------------
@dataclass
class Embedded:
    truth: list[str]                   # held-out image classes
    heldout: dict[str, np.ndarray]     # backbone ("current" / "candidate") -> held-out embeddings
    exemplars: dict[str, np.ndarray]   # backbone -> the current version's exemplars' embeddings
    exemplar_labels: np.ndarray
    exemplar_classes: list[str] = field(default_factory=list)


def _embed(bundle_dir: Path, pixels: np.ndarray) -> np.ndarray:
    from edgecl.device.infer import embed_own_weights
    from edgecl.device.state import open_bundle

    return embed_own_weights(open_bundle(bundle_dir), pixels)


def _embed_all(current_dir: Path, candidate_dir: Path, heldout: Path) -> Embedded:
    from edgecl.formats.images import load_image_folder

    m = mf.load_manifest(current_dir)
    images = load_image_folder(heldout, m.input_size, m.interpolation, progress=False)
    truth = [images.classes[i] for i in images.labels]
    path = current_dir / mf.EXEMPLARS
    memory = ExemplarMemory.load_file(path) if path.exists() else ExemplarMemory.empty((int(m.input_size[0]), int(m.input_size[1])))
    dirs = {"current": current_dir, "candidate": candidate_dir}
    return Embedded(truth, {k: _embed(d, images.pixels) for k, d in dirs.items()},
                    {k: _embed(d, memory.pixels) for k, d in dirs.items()} if len(memory.pixels) else {},
                    memory.labels, list(memory.classes))


def recompute_current_classes(candidate_dir: Path, folder: Path) -> list[str]:
    """The statistics of the current version's classes that ``folder`` has images of, recomputed
    exactly under the candidate's backbone (mean and count of those images), in place of their
    exemplars' drift estimate: the host that exported the bundle holds the images its classes were
    made from. The candidate's prototypes file and manifest are rewritten (temp + rename)."""
    from edgecl.formats.images import load_image_folder

    m = mf.load_manifest(candidate_dir)
    table = Prototypes.load_file(candidate_dir / mf.PROTOTYPES)
    images = load_image_folder(folder, m.input_size, m.interpolation, progress=False)
    known = [c for c in images.classes if c in table.classes]
    if not known:
        raise DataError(f"--class-data {folder} has no images of the current version's classes "
                        f"({', '.join(table.classes)})", "pass the folder the bundle was exported from")
    sums = classstats.class_sums(_embed(candidate_dir, images.pixels), images.labels, images.classes)
    for name in known:
        table.upsert(name, *sums[name])
    table.save_file(candidate_dir / mf.PROTOTYPES)          # formats: temp + rename
    m.files[mf.PROTOTYPES] = sha256_file(candidate_dir / mf.PROTOTYPES)
    if mf.PROTOTYPES in m.sizes:
        m.sizes[mf.PROTOTYPES] = (candidate_dir / mf.PROTOTYPES).stat().st_size
    m.save(candidate_dir)
    return known


def estimate_in_candidate(base: Prototypes | None, embedded: Embedded) -> Prototypes | None:
    """Classes under the current backbone moved into the candidate's by semantic drift compensation
    on the bundle's exemplars (classstats): the host's estimate for a class whose device sent no
    statistics under the candidate. Without exemplars they stay as they are."""
    if base is None or not len(base) or not embedded.exemplars:
        return base
    before, after = embedded.exemplars["current"], embedded.exemplars["candidate"]
    sigma = classstats.default_sigma(before, embedded.exemplar_labels)
    return Prototypes(list(base.classes), classstats.compensate_drift(base.means, before, after, sigma), base.counts)


def _judge(rnd: Round, embedded: Embedded, candidate: Prototypes, tolerance: float, not_judged: list[str],
           provisional: bool = False, head: gatehead.GateHead = PHASE1_HEAD, baseline: Prototypes | None = None,
           estimated: list[str] | None = None) -> tuple[dict[str, dict[str, Any]], list[str], dict[str, Any]]:
    """``estimated``: current classes the candidate holds as the host's estimate until the devices answer
    (phase 1): their images are scored, their accuracy is not judged yet."""
    current = Prototypes.load_file(rnd.current_dir / mf.PROTOTYPES)
    devices = rnd.baseline_devices()
    # Like for like: the baseline holds the classes the candidate holds (not those left out of it),
    # from the same images where the devices' answers give them under the current backbone.
    baseline = (restrict(baseline, list(candidate.classes)) if baseline is not None else
                union(current, restrict(devices, list(candidate.classes)) if devices is not None else None))
    under_candidate, under_current, truth = embedded.heldout["candidate"], embedded.heldout["current"], embedded.truth
    # The candidate among the current classes is served with the candidate's covariance too.
    evals = {"candidate": head.score("candidate", under_candidate, truth, candidate),
             "restricted": head.score("candidate", under_candidate, truth, restrict(candidate, rnd.known)),
             "baseline": head.score("baseline", under_current, truth, baseline),
             "current": head.score("current", under_current, truth, current)}
    if evals["candidate"] is None:
        raise DataError("the candidate knows none of the classes in the held-out folder",
                        "pass a held-out folder of the fleet's classes")
    groups = rnd.groups()
    if estimated:
        groups[CALIBRATION] = [c for c in groups[CALIBRATION] if c not in estimated]
    table, reasons = verdict(groups, evals["candidate"], evals["baseline"] or {"per_class": {}}, evals["current"],
                          tolerance, restricted=evals["restricted"], not_judged=not_judged, provisional=provisional)
    return table, reasons, evals


def _overall(e: dict[str, Any] | None) -> dict[str, Any]:
    return {"accuracy": e["accuracy"], "images": e["images"]} if e else {"accuracy": None, "images": 0}


def _report(rnd: Round, version: int, reasons: list[str], table: dict[str, Any], evals: dict[str, Any],
            canary: list[str], stage: str, not_judged: list[str], statistics: dict[str, Any],
            head: gatehead.GateHead = PHASE1_HEAD) -> ReleaseReport:
    return ReleaseReport(rnd.bundle_id, rnd.version, version, not reasons, False, reasons, table,
                         _overall(evals["candidate"]), _overall(evals["baseline"]), _overall(evals["current"]),
                         dict(rnd.merge), list(canary), stage=stage if not reasons else "refused",
                         statistics=statistics, not_judged=not_judged, head=head.to_json())


def _work(options: ReleaseOptions) -> tuple[Path, bool]:
    if options.work_dir is not None:
        Path(options.work_dir).mkdir(parents=True, exist_ok=True)
        return Path(options.work_dir), False
    return Path(tempfile.mkdtemp(prefix="edgecl-release-")), True


def _check_args(server: str, token: str, options: ReleaseOptions) -> None:
    if not server or not token:
        raise EdgeclError("no server or admin token", "pass --server URL --token ADMIN_TOKEN")
    if not (np.isfinite(options.scale) and 0 < options.scale <= MAX_SCALE):
        raise EdgeclError(f"scale {options.scale} is outside (0, {MAX_SCALE}]",
                          "pass --scale between 0 and 2 (1: the merged step whole; 0.5: half of it)")
    if not Path(options.heldout).is_dir():
        raise DataError(f"held-out folder {options.heldout} not found", "pass --heldout DIR (one folder per class)")
    if options.head not in HEADS:
        raise EdgeclError(f"unknown gate head {options.head!r}", f"pass --head {' or '.join(HEADS)}")
    if options.consolidate_epochs is not None and not 0 <= int(options.consolidate_epochs) <= MAX_CONSOLIDATE_EPOCHS:
        raise EdgeclError(f"--consolidate {options.consolidate_epochs} is outside 0..{MAX_CONSOLIDATE_EPOCHS}",
                          "pass a few epochs (docs/server.md#consolidate), or 0 for none")


# -- phase 1 -------------------------------------------------------------------------------------
def release(bundle_id: str, server: str, token: str, options: ReleaseOptions) -> ReleaseReport:
    """Phase 1 (or the whole round with ``statistics_round=False``). Raises nothing for a refusal:
    ``report.passed`` says."""
    from edgecl.host.apply import apply_delta

    _check_args(server, token, options)
    work, temporary = _work(options)
    try:
        phase("merging the fleet's deltas on the server")
        rnd = _load_round(bundle_id, server, token, options, work)
        phase("building the candidate (the merged delta applied)")
        candidate_dir = work / "candidate"
        shutil.rmtree(candidate_dir, ignore_errors=True)
        # The candidate ships the current classes only (moved by their exemplars' drift on the host);
        # the devices' classes are added from statistics computed under it.
        step = released_step(rnd)
        consolidation = consolidate_step(rnd, step, options.consolidate_epochs)
        if consolidation is not None:
            step = quantize_step(consolidation.delta)
        apply_delta(rnd.current_dir, released_delta(rnd.merged, step), candidate_dir, progress=False,
                    classes=Prototypes.empty(mf.load_manifest(rnd.current_dir).embedding_dim))
        recomputed: list[str] = []
        if options.class_data is not None:
            phase("recomputing the current classes' statistics under the candidate (--class-data)")
            recomputed = recompute_current_classes(candidate_dir, Path(options.class_data))
        phase("embedding the held-out images under the current and the candidate backbone")
        embedded = _embed_all(rnd.current_dir, candidate_dir, Path(options.heldout))
        estimates = estimate_in_candidate(rnd.baseline_devices(), embedded)
        # Current classes the host holds no image of (added by devices in earlier rounds, default mode):
        # the host's drift estimate now; the devices that hold their images answer for them in phase 2.
        counted = _counted(server, token, bundle_id, rnd.version, rnd.known, options.policy)
        orphans = placement.placed_by_devices(rnd.known, set(recomputed) | set(embedded.exemplar_classes),
                                              counted, rnd.reported)
        holders = sorted({d for devices in orphans.values() for d in devices})
        moved = estimate_in_candidate(restrict(Prototypes.load_file(rnd.current_dir / mf.PROTOTYPES),
                                               list(orphans)), embedded) if orphans else None
        current_classes = union(Prototypes.load_file(candidate_dir / mf.PROTOTYPES), moved)
        # Shared exemplars (mode 2): their classes' statistics are exact under the candidate already, so
        # a round whose every device shared them needs no `edgecl restat` and publishes now.
        shared = se.shared_statistics(rnd.shared, candidate_dir, rnd.current_dir, _embed)
        exact = se.covered(rnd.own, rnd.shared)
        candidate = union(current_classes, estimates, shared.table if shared is not None else None)
        version = mf.load_manifest(candidate_dir).version
        devices = [g for g in rnd.groups() if g != CALIBRATION]
        waiting = [g for g in devices if options.ask_shared or g.removeprefix("device:") not in exact]
        statistics_round = options.statistics_round and bool(waiting or holders)
        if consolidation is not None and (waiting or holders) and not options.ask_shared:
            # consolidate_step checked every class's exemplars, so only placed classes' devices can wait here
            raise EdgeclError(f"a consolidated round waits for {waiting + holders}", "pass --ask-shared to ask "
                              "them in a second phase, or drop --consolidate")
        not_judged = waiting if statistics_round else []
        head, frozen = PHASE1_HEAD, None
        if not statistics_round and not waiting:
            # Judged for good now: the covered devices answer from their shared images as they would in
            # phase 2, so the gate scores with the LDA head when every class's scatter is known.
            received: dict[str, delta_format.Delta] = {}
            se.answer_from_shared(received, shared, exact)
            head = _gate_head(options, rnd, candidate_dir, candidate, received, embedded)
            frozen = same_images_baseline(rnd, received, options.update_known)
        elif not statistics_round:
            # --no-statistics-round with devices that shared nothing: their classes are the host's
            # estimates, which carry no scatter, so ncm; known before --class-data is embedded twice.
            head = gatehead.NCM if options.head == "ncm" else gatehead.GateHead(
                "ncm", f"no scatter of {', '.join(w.removeprefix('device:') for w in waiting)[:200]}'s classes "
                       "(the host's estimates: --no-statistics-round)")
        table, reasons, evals = _judge(rnd, embedded, candidate, options.tolerance, not_judged,
                                       provisional=statistics_round, head=head, baseline=frozen,
                                       estimated=list(orphans) if statistics_round else [])
        stage = "candidate" if statistics_round else "released"
        report = _report(rnd, version, reasons, table, evals, options.canary, stage, not_judged,
                         placement.held_note(orphans, {d: {"answered": False, "classes": c} for d, c in rnd.own.items()}
                                   | se.shared_note(shared, exact)), head)
        report.estimated = list(orphans)
        report.consolidation = consolidation.to_json() if consolidation is not None else None
        if reasons:
            return report
        if statistics_round:
            phase("publishing the candidate to the contributing devices")
            # Its own version number in the candidate lineage: a refused round's candidate stays
            # registered there, and the next try (other exclusions, other deltas) is another one.
            taken = [b["version"] for b in api_json(server, token, "GET", "/v1/bundles", policy=options.policy)
                     ["bundles"] if b["bundle_id"] == candidate_id(bundle_id)]
            probe = write_version(candidate_dir, work / "statistics-candidate", candidate_id(bundle_id),
                                  max(taken, default=0) + 1, current_classes, "")
            summary = {"stage": STAGE, "bundle_id": bundle_id, "current_version": rnd.version,
                       "version": version, "merge": rnd.merge, "devices": rnd.own,
                       # devices --finish need not wait for (their shared exemplars answer for them)
                       "shared": [] if options.ask_shared else exact,
                       "consolidation": report.consolidation,   # --finish repeats it for the released step
                       "placed_by_devices": orphans, "asked": holders,
                       "options": {"tolerance": options.tolerance, "scale": options.scale}}
            report.asked = sorted(set(rnd.merge["devices"]) | set(holders))
            report.uploaded_bytes = _publish(server, token, probe, report.asked, summary,
                                             options.policy, rnd.current_dir, step)
            report.published = True
            return report
        if options.publish:
            publish_version(server, token, candidate_dir, work, rnd, step, candidate, shared, head, embedded,
                            options, report)
        return report
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)


def _summary(report: ReleaseReport, options: ReleaseOptions) -> dict[str, Any]:
    return {"candidate": report.candidate, "baseline": report.baseline, "current": report.current,
            "groups": report.groups, "merge": report.merge, "tolerance": options.tolerance,
            "statistics": report.statistics, "not_judged": report.not_judged, "head": report.head,
            "heldout": str(Path(options.heldout).resolve())}


# -- phase 2 -------------------------------------------------------------------------------------
def open_candidate(bundle_id: str, server: str, token: str, policy: RetryPolicy) -> dict[str, Any]:
    """The newest statistics candidate of the lineage that is not released yet (its release row)."""
    try:
        row = api_json(server, token, "GET", f"/v1/releases/latest?bundle_id={candidate_id(bundle_id)}",
                       policy=policy)
    except ServerRejected as exc:
        if exc.code != "not_found":
            raise
        row = {}
    report: dict[str, Any] = row.get("report") or {}
    released = [r["version"] for r in api_json(server, token, "GET", f"/v1/releases?bundle_id={bundle_id}",
                                               policy=policy)["releases"]]
    if not is_candidate_report(report) or int(report["version"]) in released:
        raise EdgeclError(f"no open statistics candidate of {bundle_id}",
                          "run `edgecl release` first (phase 1), then `edgecl release --finish`")
    return row


def answers(server: str, token: str, row: dict[str, Any], policy: RetryPolicy) -> dict[str, str]:
    """device -> sha256 of its newest statistics delta against the candidate (contributors only)."""
    report = row["report"]
    rows = api_json(server, token, "GET", f"/v1/deltas?bundle_id={urllib.parse.quote(row['bundle_id'])}"
                    f"&version={row['version']}", policy=policy)["deltas"]
    newest: dict[str, str] = {}
    asked = set(report["devices"]) | set(report.get("asked", []))
    for r in rows:                     # oldest first: the last one of a device wins
        if r["device"] in asked:
            newest[r["device"]] = r["sha256"]
    return newest


def summed_statistics(rnd: Round, current: Prototypes, received: dict[str, delta_format.Delta],
                      base: bool = False, update_known: bool = True, replace: dict[str, list[str]] | None = None
                      ) -> tuple[Prototypes, dict[str, Any]]:
    """Class statistics under the candidate, summed exactly over the devices that answered
    (classstats.merge_by_counts). A device's rows count only for classes it reports images for
    under the candidate (counts bounded at push by what it saw); a class the current version knows
    adds the devices' images to the current statistics (moved to the candidate) by counts, unless
    ``update_known`` is False (then those rows are not read). A class in ``replace`` (class -> the
    devices that place it, ``placement.placed_by_devices``) takes the sum of those devices' answers alone (any
    device's with ``update_known``): its current statistics were computed under another backbone;
    with no answer it keeps them.
    ``base``: the same sum under the current backbone (the answers' ``base_prototypes``, ``current``
    the current version's table): the frozen baseline of the same images."""
    replace = replace or {}
    sources: dict[str, list[tuple[np.ndarray, int]]] = {}
    statistics: dict[str, Any] = {}
    for device, d in received.items():
        table = (d.base_prototypes if base else d.prototypes) or Prototypes.empty(int(current.means.shape[1]))
        read = [i for i, name in enumerate(table.classes)
                if update_known or name not in current.classes or device in replace.get(name, ())]
        statistics[device] = {"answered": True, "classes": [table.classes[i] for i in read],
                              "images": int(table.counts[read].sum())}
        if len(read) < len(table.classes):
            statistics[device]["not_read"] = [c for i, c in enumerate(table.classes) if i not in read]
        for i in read:
            sources.setdefault(table.classes[i], []).append((table.means[i], int(table.counts[i])))
    out = current.copy()
    for name, rows in sources.items():
        if name in current.classes and name not in replace:
            j = current.classes.index(name)
            rows = [(current.means[j], int(current.counts[j])), *rows]
        mean, count = classstats.merge_by_counts([m for m, _ in rows], [c for _, c in rows])
        out.upsert(name, mean, count)
    return out, statistics


def _gate_head(options: ReleaseOptions, rnd: Round, probe: Path, candidate: Prototypes,
               received: dict[str, delta_format.Delta], embedded: Embedded) -> gatehead.GateHead:
    if options.head == "ncm":
        return gatehead.NCM
    host = None
    if options.class_data is not None:
        phase("the current classes' scatter under both backbones (--class-data), for the LDA head")
        host = gatehead.host_pieces(Path(options.class_data), rnd.known,
                                    {"current": rnd.current_dir, "candidate": probe}, _embed)
        # Classes devices added in earlier rounds: from the exemplars the current version ships of them.
        host = gatehead.exemplar_pieces(host, rnd.known, embedded.exemplar_classes, embedded.exemplar_labels,
                                        embedded.exemplars)
    return gatehead.choose(candidate, rnd.known, received, host, rnd.current_dir)


def attach_fleet_scatter(bundle_dir: Path, head: gatehead.GateHead, table: Prototypes, embedded: Embedded) -> None:
    """The released bundle ships the pooled scatter its LDA head was judged with (rank 128), listed
    and hashed in the manifest: a device that pulls it serves what the gate judged. With it, the LDA
    head's calibration (unknown threshold at the default false-unknown rate, temperatures) fitted on
    the held-out images under the released backbone, as `edgecl adapt` fits a device's; without one
    a device's probabilities would be a softmax at temperature 1 (p = 1.000 for wrong classes)."""
    if head.shipped is None:
        return
    from edgecl.device.heads import scatter_head
    from edgecl.device.unknown import calibrate_held_out

    lda = scatter_head(head.shipped)
    calibration = calibrate_held_out(table, lda, embedded.heldout["candidate"], embedded.truth)
    path = bundle_dir / mf.FLEET_SCATTER
    sc.save_file(path, head.shipped, head.shipped_classes,
                 {**calibration, "fitted_by": "edgecl release (its held-out images)"} if calibration else None)
    m = mf.load_manifest(bundle_dir)
    m.files[mf.FLEET_SCATTER] = sha256_file(path)
    m.sizes[mf.FLEET_SCATTER] = path.stat().st_size
    m.save(bundle_dir)


def same_images_baseline(rnd: Round, received: dict[str, delta_format.Delta], update_known: bool,
                         replace: dict[str, list[str]] | None = None) -> Prototypes | None:
    """The frozen baseline of the images the candidate's statistics count: the current version's table
    plus the answers' means under the current backbone. None when an answer lacks them (an edgecl
    before delta format 5): the gate then takes the devices' own classes from their pushed deltas."""
    if not received or any(d.base_prototypes is None for d in received.values()):
        return None
    current = Prototypes.load_file(rnd.current_dir / mf.PROTOTYPES)
    return summed_statistics(rnd, current, received, base=True, update_known=update_known, replace=replace)[0]


def publish_version(server: str, token: str, source: Path, work: Path, rnd: Round, step: ReleasedStep,
                    table: Prototypes, shared: se.SharedStatistics | None, head: gatehead.GateHead,
                    embedded: Embedded, options: ReleaseOptions, report: ReleaseReport) -> None:
    """The judged version, released: ``source``'s files with ``table``, the fleet's shared exemplars
    and the scatter its LDA head was judged with; uploaded, signed and released by the server."""
    phase("publishing the next version")
    final = write_version(source, work / "release", rnd.bundle_id, report.version, table,
                          sha256_file(rnd.current_dir / mf.MANIFEST))
    se.attach_fleet_exemplars(final, shared, list(table.classes))
    attach_fleet_scatter(final, head, table, embedded)
    report.uploaded_bytes = _publish(server, token, final, list(options.canary), _summary(report, options),
                                     options.policy, rnd.current_dir, step)
    report.published = True


def finish(bundle_id: str, server: str, token: str, options: ReleaseOptions) -> ReleaseReport:
    """Phase 2: sum the statistics the devices sent under the candidate, judge, publish."""
    _check_args(server, token, options)
    if options.consolidate_epochs:
        raise EdgeclError("--consolidate applies to phase 1, not to --finish",
                          "drop --consolidate (--finish repeats the consolidation phase 1 recorded, if any)")
    policy = options.policy
    row = open_candidate(bundle_id, server, token, policy)
    report_in: dict[str, Any] = row["report"]
    # Devices that shared exemplars of all their classes need not answer (their statistics come from them).
    expected = (set(report_in["devices"]) | set(report_in.get("asked", []))) - set(report_in.get("shared", []))
    deadline = time.monotonic() + max(options.wait_s, 0.0)
    phase("collecting the devices' statistics under the candidate")
    got = answers(server, token, row, policy)
    while set(got) < expected and time.monotonic() < deadline:
        time.sleep(min(2.0, max(deadline - time.monotonic(), 0.0)))
        got = answers(server, token, row, policy)
    work, temporary = _work(options)
    try:
        rnd = _load_round(bundle_id, server, token, options, work, merge=report_in["merge"],
                          version=int(report_in["current_version"]))
        candidate_row = {"bundle_id": row["bundle_id"], "version": row["version"],
                         "manifest_sha256": row["manifest_sha256"]}
        probe = _fetch_bundle(server, token, candidate_row, work / "statistics-candidate", policy)
        received = {d: _get_delta(server, token, sha, work, policy) for d, sha in sorted(got.items())}
        phase("embedding the held-out images under the current and the candidate backbone")
        embedded = _embed_all(rnd.current_dir, probe, Path(options.heldout))
        # A device that shared exemplars of all its classes and did not answer: its statistics from them
        # (exact under the candidate). One that answered: its answer wins (it embedded every image it
        # holds, the shared ones among them: adding both would count those twice).
        shared = se.shared_statistics(rnd.shared, probe, rnd.current_dir, _embed)
        from_shared = se.answer_from_shared(received, shared, se.covered(rnd.own, rnd.shared))
        orphans = {str(c): [str(d) for d in devices] for c, devices in (report_in.get("placed_by_devices") or {}).items()}
        summed, statistics = summed_statistics(rnd, Prototypes.load_file(probe / mf.PROTOTYPES), received,
                                               update_known=options.update_known, replace=orphans)
        statistics.update(se.shared_note(shared, from_shared))
        # A class no answering device reports is left out of this version: its device keeps it (pull
        # carries the classes a version lacks) and sends it next round; its group is not judged.
        candidate = summed
        not_judged = [f"device:{d}" for d, classes in rnd.own.items() if d not in received and classes]
        for device in rnd.own:
            statistics.setdefault(device, {"answered": False, "classes": rnd.own[device]})
        placement.held_note(orphans, statistics)
        version = int(report_in["version"])
        head = _gate_head(options, rnd, probe, candidate, received, embedded)
        # The frozen baseline of the same images (every answer carries its classes' means under the
        # current backbone too since delta format 5; else the devices' own classes from their deltas).
        frozen = same_images_baseline(rnd, received, options.update_known, orphans)
        table, reasons, evals = _judge(rnd, embedded, candidate, options.tolerance, not_judged, head=head,
                                       baseline=frozen)
        report = _report(rnd, version, reasons, table, evals, options.canary, "released", not_judged, statistics,
                         head)
        report.estimated = [c for c, devices in orphans.items()
                            if not any(c in statistics.get(d, {}).get("classes", []) and statistics[d].get("answered")
                                       for d in devices)]
        report.consolidation = report_in.get("consolidation")
        if not reasons and options.publish:
            publish_version(server, token, probe, work, rnd, phase1_step(rnd, report.consolidation), candidate,
                            shared, head, embedded, options, report)
        return report
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
