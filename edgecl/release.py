"""`edgecl release`: the host-side release gate. Merge -> apply -> evaluate -> publish only if not worse.

An orchestrator (like ``edgecl.demo``), so it may use the host (``apply_deltas``, torch) and the
device (``evaluate``, onnxruntime) together; it talks to the fleet server over HTTP with an admin
token and never touches its store.

    1. current = the newest released version of the lineage (else the newest registered one);
       its files come from --bundle DIR or are downloaded from the server;
    2. merge its counted deltas on the server (each device's newest; strategy and exclusions as
       asked) and download the merged delta and the counted deltas;
    3. candidate = apply(current, the counted deltas); frozen baseline = apply(current, a delta with
       no weight change and the devices' prototypes as the current backbone places them (a device
       that adapted its backbone sends them in its delta's ``base_prototypes``)): what the fleet
       would have without adapting the backbone (SimpleCIL on the frozen model);
    4. evaluate candidate, baseline and current on the held-out image folder (ncm head);
    5. per class group (the calibration classes = those the current version knows; then each
       device's own new classes), the candidate must not be worse than the baseline, and, when it
       adds no class, on the calibration classes not worse than the current version (``tolerance``
       allowed, default 0);
    6. if it passes: upload the candidate's files, register it, and release it (the server signs
       it); with ``canary`` only the named devices can pull it. Otherwise nothing is published.
"""

from __future__ import annotations

import shutil
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecl.errors import DataError, EdgeclError
from edgecl.formats import delta as delta_format
from edgecl.formats import manifest as mf
from edgecl.formats.hashing import sha256_file
from edgecl.formats.merge import DEFAULT_MAX_SHARE, MergeOptions, merge_prototypes
from edgecl.formats.prototypes import Prototypes
from edgecl.http_client import RetryPolicy, api_json, download, upload

CALIBRATION = "calibration"


@dataclass
class ReleaseOptions:
    heldout: Path                                  # held-out image folder (one sub-folder per class)
    current_dir: Path | None = None                # local copy of the current version (else downloaded)
    bundle_version: int | None = None              # the version to merge (default: the current one)
    canary: list[str] = field(default_factory=list)  # release to these devices only
    strategy: str = "weighted-mean"                # merge strategy (formats.merge.STRATEGIES)
    trim: float | None = None
    max_share: float | None = None
    exclude_devices: list[str] = field(default_factory=list)
    exclude_deltas: list[str] = field(default_factory=list)
    tolerance: float = 0.0                         # allowed accuracy drop per group (0 = none)
    work_dir: Path | None = None                   # where the bundles are built (default: a temp folder, removed)
    policy: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass
class ReleaseReport:
    bundle_id: str
    current_version: int
    version: int                                   # the candidate's version
    passed: bool
    published: bool
    reasons: list[str]                             # why the gate refused (empty when it passed)
    groups: dict[str, dict[str, Any]]              # group -> classes, images, candidate/baseline/current accuracy
    candidate: dict[str, Any]                      # overall held-out accuracy and images of each bundle
    baseline: dict[str, Any]
    current: dict[str, Any]
    merge: dict[str, Any]
    canary: list[str]
    uploaded_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ReleaseRefused(EdgeclError):
    """The candidate is worse than the current version or the frozen baseline on some class group."""


def _group_accuracy(evaluation: dict[str, Any] | None, classes: list[str]) -> tuple[float | None, int]:
    if evaluation is None:
        return None, 0
    rows = [evaluation["per_class"][c] for c in classes if c in evaluation["per_class"]]
    images = sum(r["images"] for r in rows)
    if not images:
        return None, 0
    return sum(r["accuracy"] * r["images"] for r in rows) / images, images


def gate(groups: dict[str, list[str]], candidate: dict[str, Any], baseline: dict[str, Any],
         current: dict[str, Any] | None, tolerance: float, compare_current: bool = True
         ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Per group accuracies and the reasons to refuse (pure: evaluations in, verdict out).
    ``compare_current`` False: the current version's accuracy is shown, not compared (it knows fewer
    classes than the candidate, so its accuracy on the old classes is over fewer alternatives)."""
    table: dict[str, dict[str, Any]] = {}
    reasons: list[str] = []
    for name, classes in groups.items():
        cand, images = _group_accuracy(candidate, classes)
        base, _ = _group_accuracy(baseline, classes)
        cur, _ = _group_accuracy(current, classes) if name == CALIBRATION else (None, 0)
        table[name] = {"classes": classes, "images": images, "candidate": cand, "baseline": base, "current": cur}
        if cand is None:
            continue            # no held-out image of this group: nothing to compare
        if base is not None and cand < base - tolerance:
            reasons.append(f"{name}: candidate {cand:.3f} < frozen baseline {base:.3f} - {tolerance:g}")
        if compare_current and cur is not None and cand < cur - tolerance:
            reasons.append(f"{name}: candidate {cand:.3f} < current version {cur:.3f} - {tolerance:g}")
    if not any(row["images"] for row in table.values()):
        reasons.append("the held-out folder has no image of any class group")
    return table, reasons


def _evaluate(bundle_dir: Path, heldout: Path) -> dict[str, Any] | None:
    import warnings

    from edgecl.device.infer import evaluate

    with warnings.catch_warnings():
        # The current version does not know the devices' new classes: those images are skipped on purpose.
        warnings.filterwarnings("ignore", message=".*without a prototype not scored")
        try:
            return evaluate(bundle_dir, heldout, head="ncm", progress=False)
        except DataError:       # e.g. the current version knows none of the held-out classes
            return None


def _fetch_bundle(server: str, token: str, bundle: dict[str, Any], dest: Path, policy: RetryPolicy) -> Path:
    base = f"/v1/bundles/{bundle['bundle_id']}/{bundle['version']}/files/"
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


def _publish(server: str, token: str, bundle_dir: Path, canary: list[str], report: dict[str, Any],
             policy: RetryPolicy, current_dir: Path | None = None) -> int:
    if current_dir is not None:   # devices on the current version pull the weights as a small patch
        from edgecl.formats.weights_patch import attach_weights_patch

        attach_weights_patch(bundle_dir, current_dir / mf.WEIGHTS)
    bundle, sent = upload_bundle(server, token, bundle_dir, policy)
    api_json(server, token, "POST", "/v1/releases", {"bundle_id": bundle["bundle_id"], "version": bundle["version"],
                                                     "canary": canary, "report": report}, policy=policy)
    return sent


def release(bundle_id: str, server: str, token: str, options: ReleaseOptions) -> ReleaseReport:
    """Run the gate; publish when it passes. Raises nothing for a refusal: ``report.passed`` says."""
    from edgecl.host.apply import apply_deltas

    if not server or not token:
        raise EdgeclError("no server or admin token", "pass --server URL --token ADMIN_TOKEN")
    if not Path(options.heldout).is_dir():
        raise DataError(f"held-out folder {options.heldout} not found", "pass --heldout DIR (one folder per class)")
    policy = options.policy
    bundles = [b for b in api_json(server, token, "GET", "/v1/bundles", policy=policy)["bundles"]
               if b["bundle_id"] == bundle_id]
    if not bundles:
        raise EdgeclError(f"bundle {bundle_id} is not registered on {server}", "run `edgecl server bundle add` first")
    released = [r["version"] for r in api_json(server, token, "GET", f"/v1/releases?bundle_id={bundle_id}",
                                               policy=policy)["releases"]]
    version = options.bundle_version or (max(released) if released else max(b["version"] for b in bundles))
    current_row = next((b for b in bundles if b["version"] == version), None)
    if current_row is None:
        raise EdgeclError(f"bundle {bundle_id} v{version} is not registered", "pick a registered version")

    work = Path(options.work_dir) if options.work_dir else Path(tempfile.mkdtemp(prefix="edgecl-release-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if options.current_dir is not None:
            current_dir = Path(options.current_dir)
            m = mf.load_manifest(current_dir)
            if (m.bundle_id, m.version) != (bundle_id, version) or \
                    sha256_file(current_dir / mf.MANIFEST) != current_row["manifest_sha256"]:
                raise EdgeclError(f"{current_dir} is not the server's {bundle_id} v{version}",
                                  "pass the bundle folder of that version, or leave --bundle out to download it")
        else:
            current_dir = _fetch_bundle(server, token, current_row, work / "current", policy)

        query = urllib.parse.urlencode([("strategy", options.strategy)]
                                       + ([("trim", options.trim)] if options.trim is not None else [])
                                       + ([("max_share", options.max_share)] if options.max_share is not None else [])
                                       + [("exclude_device", d) for d in options.exclude_devices]
                                       + [("exclude_delta", d) for d in options.exclude_deltas])
        from edgecl.server.jobclient import merge_and_wait  # the merge runs as a server job; wait for it

        merge = merge_and_wait(lambda method, path: api_json(server, token, method, path, policy=policy),
                               bundle_id, version, query)
        merged_path = work / "merged.safetensors"
        download(server, token, f"/v1/deltas/{merge['sha256']}", merged_path, merge["sha256"], policy)
        merged = delta_format.load_file(merged_path)
        device_classes: dict[str, list[str]] = {}
        counted: list[Path] = []
        base_tables: list[Prototypes | None] = []
        for sha, device in zip(merge["deltas"], merge["devices"], strict=True):
            path = work / f"delta-{sha[:16]}.safetensors"
            download(server, token, f"/v1/deltas/{sha}", path, sha, policy)
            d = delta_format.load_file(path)
            device_classes[device] = list(d.prototypes.classes) if d.prototypes is not None else []
            counted.append(path)
            # The frozen baseline needs each device's classes as the current backbone places them: an
            # unchanged backbone sent them so; an adapted one sends them as base_prototypes (which only
            # the device, holding the images, can compute). Without them (a delta from an edgecl
            # before format 3) that device's classes have no baseline, and the table says so.
            base_tables.append(d.base_prototypes if np.any(d.values) else d.prototypes)

        # The candidate from the counted deltas themselves, merged on the host as the server merged them
        # (same function, same options): apply then moves each device's prototypes into the candidate's
        # embedding space, which the merged file alone cannot tell it how to do.
        merge_options = MergeOptions(strategy=options.strategy, trim=options.trim,
                                     max_share=DEFAULT_MAX_SHARE if options.max_share is None else options.max_share)
        candidate_dir = work / "candidate"
        apply_deltas(current_dir, counted or [merged_path], candidate_dir, progress=False, merge_options=merge_options)
        frozen = delta_format.Delta(
            bundle_id=merged.bundle_id, bundle_version=merged.bundle_version, base_sha256=merged.base_sha256,
            mask_sha256=merged.mask_sha256, device_id=delta_format.MERGE_DEVICE_ID, delta_k=merged.delta_k,
            positions=merged.positions[:0], values=merged.values[:0], samples_seen=merged.samples_seen,
            created_utc=merged.created_utc,
            prototypes=merge_prototypes(base_tables, merge_options.max_share) if counted else merged.prototypes)
        frozen_path = work / "frozen.safetensors"
        delta_format.save_file(frozen, frozen_path)
        baseline_dir = work / "baseline"
        apply_deltas(current_dir, [frozen_path], baseline_dir, progress=False)

        known = list(Prototypes.load_file(current_dir / mf.PROTOTYPES).classes)
        groups = {CALIBRATION: known}
        for device, classes in device_classes.items():
            own = [c for c in classes if c not in known]
            if own:
                groups[f"device:{device}"] = own
        heldout = Path(options.heldout)
        cand_eval = _evaluate(candidate_dir, heldout)
        if cand_eval is None:
            raise DataError(f"the candidate knows none of the classes in {heldout}",
                            "pass a held-out folder of the fleet's classes")
        base_eval = _evaluate(baseline_dir, heldout)
        cur_eval = _evaluate(current_dir, heldout)
        # The current version scores the calibration images among fewer classes when the candidate
        # adds some: then the like-for-like check of the old classes is the frozen baseline's alone.
        adds_classes = bool(set(Prototypes.load_file(candidate_dir / mf.PROTOTYPES).classes) - set(known))
        table, reasons = gate(groups, cand_eval, base_eval or {"per_class": {}}, cur_eval, options.tolerance,
                              compare_current=not adds_classes)

        def overall(e: dict[str, Any] | None) -> dict[str, Any]:
            return {"accuracy": e["accuracy"], "images": e["images"]} if e else {"accuracy": None, "images": 0}

        new_version = mf.load_manifest(candidate_dir).version
        report = ReleaseReport(bundle_id, version, new_version, not reasons, False, reasons, table,
                               overall(cand_eval), overall(base_eval), overall(cur_eval),
                               {k: merge[k] for k in ("sha256", "inputs", "strategy", "devices", "deltas")},
                               list(options.canary))
        if reasons:
            return report
        summary = {"candidate": report.candidate, "baseline": report.baseline, "current": report.current,
                   "groups": table, "merge": report.merge, "tolerance": options.tolerance,
                   "heldout": str(heldout.resolve())}
        report.uploaded_bytes = _publish(server, token, candidate_dir, list(options.canary), summary, policy,
                                         current_dir)
        report.published = True
        return report
    finally:
        if options.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
