"""What the server does, without HTTP: check a pushed delta, store it, merge a bundle's deltas.

The HTTP layer (app.py) only moves bytes and turns ``Rejected`` into a JSON error; the CLI's admin
commands call the same functions on the same store.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecl.errors import EdgeclError
from edgecl.formats import delta as D
from edgecl.formats.merge import MAX_SAMPLES_SEEN
from edgecl.server.store import MAX_DB_INT, BundleRow, Device, Store, StoreError

MAX_STEPS = 10**12                  # optimizer steps a delta may claim (bounded before the database)

log = logging.getLogger("edgecl.server")

# Delta-format failures keep their code (edgecl.formats.delta); the HTTP status says who is at
# fault: 400 the bytes are malformed, 403 the sender may not do this, 422 well-formed but wrong
# for the bundle it names.
_STATUS_OF_DELTA_ERROR = {
    D.DeltaSignatureError: 403,
    D.DeltaShapeError: 422,
    D.DeltaValueError: 422,
}


class Rejected(EdgeclError):
    """A request the server refuses: ``code`` is stable (documented in docs/server.md)."""

    def __init__(self, code: str, status: int, problem: str, fix: str = "") -> None:
        super().__init__(problem, fix)
        self.code = code
        self.status = status

    @classmethod
    def from_delta_error(cls, exc: D.DeltaError) -> Rejected:
        return cls(exc.code, _STATUS_OF_DELTA_ERROR.get(type(exc), 400), exc.problem, exc.fix)

    def to_json(self) -> dict[str, str]:
        return {"error": self.code, "message": str(self)}


Canaries = dict[tuple[str, int], list[str]]      # (bundle, version) released to a canary only -> its devices


def bundle_open_to(store: Store, who: Device, bundle_id: str, version: int, canaries: Canaries | None = None) -> bool:
    """A version released to canary devices only is invisible and closed (no push) to every other
    device; an admin, an unreleased or a fully released version is open. ``canaries``: the canary
    releases as read with the device (Store.device_for_push) instead of a query now."""
    if who.role == "admin":
        return True
    canary = canaries.get((bundle_id, version)) if canaries is not None else store.release_canary(bundle_id, version)
    return not canary or who.name in canary


def visible_bundles(store: Store, who: Device) -> list[BundleRow]:
    """``GET /v1/bundles``: every registered version, less the canary versions not meant for ``who``."""
    bundles = store.list_bundles()
    if who.role == "admin":
        return bundles
    hidden = {(r["bundle_id"], r["version"]) for r in store.list_releases() if not visible(r, who)}
    return [b for b in bundles if (b.bundle_id, b.version) not in hidden]


def _bearer_token(authorization: str | None) -> str:
    if not authorization or not authorization.startswith("Bearer "):
        raise Rejected("auth_missing", 401, "no device token", "send 'Authorization: Bearer TOKEN' (edgecl push --token)")
    return authorization[len("Bearer "):].strip()


def authenticate(store: Store, authorization: str | None, admin: bool = False) -> Device:
    return _admitted(store.device_for_token(_bearer_token(authorization)), admin)


def authenticate_push(store: Store, authorization: str | None) -> tuple[Device, Canaries]:
    """``authenticate`` for a push, with the canary releases its check_header needs (one query)."""
    device, canaries = store.device_for_push(_bearer_token(authorization))
    return _admitted(device, False), canaries


def _admitted(device: Device | None, admin: bool) -> Device:
    if device is None or device.role == "merge":
        raise Rejected("auth_invalid", 401, "unknown device token",
                       "use the token printed by `edgecl server device add`")
    if device.revoked:
        raise Rejected("device_revoked", 403, f"device {device.name} has been revoked",
                       "ask the operator to re-provision it (`edgecl server device rotate NAME`)")
    if admin and device.role != "admin":
        raise Rejected("forbidden", 403, f"{device.name} is not an admin",
                       "use a token from `edgecl server device add NAME --admin`")
    return device


def check_header(store: Store, header: D.DeltaHeader, device: Device, max_upload_bytes: int,
                 canaries: Canaries | None = None, bundle: BundleRow | None = None) -> BundleRow:
    """Everything the header alone can tell, before the body is read. With ``canaries`` (read with
    the device) and ``bundle`` (the header's bundle row, Store.cached_bundle) it needs no database."""
    if header.total_bytes > max_upload_bytes:
        raise Rejected("too_large", 413, f"the delta is {header.total_bytes} bytes, over the {max_upload_bytes}-byte cap",
                       "push a smaller delta (--values int8) or raise the server's --max-upload-mb")
    if header.device_id != device.name:
        raise Rejected("device_mismatch", 403, f"the delta was made by {header.device_id!r}, the token is "
                       f"{device.name!r}'s", "push each delta with the token of the device that made it")
    if header.bundle_version > MAX_DB_INT:
        raise Rejected("metadata_invalid", 400, f"bundle_version {header.bundle_version} is out of range "
                       f"(at most {MAX_DB_INT})", "make the delta from a real bundle version")
    if bundle is None or (bundle.bundle_id, bundle.version) != (header.bundle_id, header.bundle_version):
        bundle = store.get_bundle(header.bundle_id, header.bundle_version)
    if bundle is None or not bundle_open_to(store, device, header.bundle_id, header.bundle_version, canaries):
        # a canary version is closed to the devices outside its canary, and answers as if unknown
        raise Rejected("bundle_unknown", 422, f"bundle {header.bundle_id} v{header.bundle_version} is not "
                       "registered on this server", "register it first: `edgecl server bundle add BUNDLE_DIR`")
    if header.base_sha256 != bundle.base_sha256:
        raise Rejected("base_mismatch", 422, "the delta's base weights sha256 differs from the registered bundle's",
                       "adapt the bundle this server knows (re-copy it to the device)")
    if header.mask_sha256 != bundle.mask_sha256:
        raise Rejected("mask_mismatch", 422, "the delta's mask sha256 differs from the registered bundle's",
                       "adapt the bundle this server knows (re-copy it to the device)")
    if header.delta_k != bundle.delta_k:
        raise Rejected("k_mismatch", 422, f"the delta has K={header.delta_k}, the bundle's mask selects "
                       f"{bundle.delta_k}", "make the delta from this bundle's mask")
    dim = header.prototype_dim
    if dim is not None and dim != bundle.embedding_dim:
        raise Rejected("prototype_shape", 422, f"prototypes have {dim} dims, the bundle's embeddings have "
                       f"{bundle.embedding_dim}", "recompute the prototypes with this bundle")
    shape = header.exemplar_shape
    size = _input_size(store, bundle) if shape is not None else None
    if shape is not None and size is not None and list(shape[1:3]) != size:
        raise Rejected("exemplar_shape", 422, f"the shared exemplars are {shape[1]}x{shape[2]} px, the bundle takes "
                       f"{size[0]}x{size[1]}", "share the exemplars this bundle's device stored (`edgecl delta`)")
    if header.samples_seen < 1:
        raise Rejected("no_samples", 422, "the delta says it saw 0 training images (samples_seen)",
                       "adapt on some images before pushing")
    # Counts are merge weights and database integers: bounded here, before either sees them.
    if header.samples_seen > MAX_SAMPLES_SEEN:
        raise Rejected("count_out_of_range", 422, f"samples_seen {header.samples_seen} is over {MAX_SAMPLES_SEEN} "
                       "(no device sees a billion images per round; a weight that large would decide the merge)",
                       "make the delta again with `edgecl delta`")
    if header.steps > MAX_STEPS:
        raise Rejected("count_out_of_range", 422, f"steps {header.steps} is over {MAX_STEPS}",
                       "make the delta again with `edgecl delta`")
    return bundle


def _input_size(store: Store, bundle: BundleRow) -> list[int] | None:
    """[H, W] from the bundle's stored manifest (None when the server holds no manifest of it)."""
    raw = store.get_blob(bundle.manifest_sha256) if bundle.manifest_sha256 else None
    try:
        size = json.loads(raw)["input_size"] if raw else None
    except (ValueError, KeyError, TypeError):
        return None
    return [int(v) for v in size] if isinstance(size, list) and len(size) == 2 else None


def shared_over_counted(delta: D.Delta) -> str | None:
    """A class sharing more exemplars than its prototype counts images (the images the device says it
    added): what is wrong, else None. With count_over_seen it bounds every image a delta may carry by
    what the device saw."""
    if delta.exemplars is None or delta.prototypes is None:
        return None
    for i, name in enumerate(delta.exemplars.classes):
        shared = int(np.sum(delta.exemplars.labels == i))
        counted = int(delta.prototypes.counts[delta.prototypes.classes.index(name)])
        if shared > counted:
            return f"class {name[:80]!r} shares {shared} exemplars, more than the {counted} images its prototype counts"
    return None


@dataclass
class Accepted:
    sha256: str
    new: bool                 # False: these exact bytes were already stored

    def to_json(self) -> dict[str, str]:
        return {"status": "stored" if self.new else "already_have_it", "sha256": self.sha256}


def accept_delta(store: Store, data: bytes, header: D.DeltaHeader, device: Device,
                 bundle: BundleRow | None = None) -> Accepted:
    """Full validation of the whole file, then a durable store. Nothing is written if any check fails."""
    from edgecl.server.bounds import out_of_range

    sha256 = hashlib.sha256(data).hexdigest()
    try:
        D.check_length(header, len(data))
        D.verify_body(header, memoryview(data)[8 + header.header_bytes:])
        D.verify_hmac(header, device.hmac_key)
        # No "already stored?" query first: a repeated push (a retry whose answer was lost) is
        # checked like a new one and the insert reports it (one database round trip per push).
        delta = D.decode(header, data)        # positions in range, finite values and prototypes
    except D.DeltaError as exc:
        raise Rejected.from_delta_error(exc) from exc
    bundle = bundle or store.get_bundle(header.bundle_id, header.bundle_version)
    assert bundle is not None                 # check_header found it
    protos = delta.prototypes
    if protos is not None and int(protos.counts.max()) > MAX_SAMPLES_SEEN:
        raise Rejected("count_out_of_range", 422, f"a prototype count is over {MAX_SAMPLES_SEEN}",
                       "make the delta again with `edgecl delta`")
    if protos is not None and int(protos.counts.max()) > header.samples_seen:
        # A device adds or updates only classes it saw images of, counted no more than it saw: a class
        # claiming more images than the delta's samples_seen (e.g. counts of 1e9 to outweigh the
        # fleet's statistics) is refused before any merge.
        worst = int(np.argmax(protos.counts))
        raise Rejected("count_over_seen", 422, f"class {protos.classes[worst][:80]!r} counts "
                       f"{int(protos.counts[worst])} images, more than the {header.samples_seen} the delta saw",
                       "a delta carries only classes the device saw images of: make it again with `edgecl delta`")
    shared = shared_over_counted(delta)
    if shared:
        raise Rejected("count_over_seen", 422, shared,
                       "a delta shares exemplars only of images the device counted: make it again with `edgecl delta`")
    try:
        problem = out_of_range(store.value_limits(bundle), delta.positions, delta.values,
                               protos.means if protos is not None else None,
                               {"scatter": delta.scatter, "base_scatter": delta.base_scatter})
    except StoreError as exc:
        raise Rejected("store_damaged", 500, exc.problem, exc.fix) from exc
    if problem:
        raise Rejected("values_out_of_range", 422, problem,
                       "the adaptation diverged: adapt again with a lower lr (docs/server.md, value bounds)")
    heldout = header.metadata.get("heldout", "")
    new = store.put_delta(data, sha256, {
        "bundle_id": header.bundle_id, "version": header.bundle_version, "device": device.name,
        "steps": header.steps, "samples_seen": header.samples_seen, "values_dtype": header.metadata["values_dtype"],
        "created_utc": header.created_utc, "heldout": heldout})
    return Accepted(sha256, new)


def push_bytes(store: Store, data: bytes, device: Device, max_upload_bytes: int) -> Accepted:
    """The whole check + store for a delta already in memory (used by tests and the benchmark)."""
    if len(data) > max_upload_bytes:
        raise Rejected("too_large", 413, f"the upload is {len(data)} bytes, over the {max_upload_bytes}-byte cap",
                       "push a smaller delta or raise --max-upload-mb")
    try:
        header = D.read_header(data)
    except D.DeltaError as exc:
        raise Rejected.from_delta_error(exc) from exc
    bundle = check_header(store, header, device, max_upload_bytes)
    return accept_delta(store, data, header, device, bundle)


def register_bundle_json(store: Store, manifest: Any, mask_bytes: bytes) -> tuple[BundleRow, bool]:
    """Register a bundle version from its manifest and mask only (devices may push for it; the
    server cannot serve it nor check values against its weights: see register_bundle_files)."""
    from edgecl.server.store import bundle_from_files

    try:
        manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        bundle = bundle_from_files(manifest_bytes, mask_bytes)
        return bundle, store.add_bundle(bundle, manifest_bytes, mask_bytes)
    except (StoreError, EdgeclError) as exc:
        raise Rejected("bundle_invalid", 422, exc.problem, exc.fix) from exc


def register_bundle_files(store: Store, files: Any) -> tuple[BundleRow, bool]:
    """Register a whole bundle version whose files were uploaded as blobs."""
    from edgecl.server.store import add_bundle_blobs

    if not isinstance(files, dict):
        raise Rejected("bundle_invalid", 400, "files is not an object {name: sha256}", "send {\"files\": {...}}")
    try:
        return add_bundle_blobs(store, files)
    except (StoreError, EdgeclError) as exc:
        raise Rejected("bundle_invalid", 422, exc.problem, exc.fix) from exc


@dataclass
class MergeRequest:
    strategy: str = "weighted-mean"          # formats.merge.STRATEGIES
    trim: float | None = None                # trimmed-mean only
    max_share: float | None = None           # None: formats.merge.DEFAULT_MAX_SHARE
    exclude_devices: tuple[str, ...] = ()    # their deltas do not count
    exclude_deltas: tuple[str, ...] = ()     # sha256s that do not count

    def options_json(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "trim": self.trim, "max_share": self.max_share,
                "exclude_devices": sorted(self.exclude_devices), "exclude_deltas": sorted(self.exclude_deltas)}


def newest_version(store: Store, bundle_id: str) -> int:
    versions = [b.version for b in store.list_bundles() if b.bundle_id == bundle_id]
    if not versions:
        raise Rejected("bundle_unknown", 404, f"bundle {bundle_id} is not registered",
                       "register it first: `edgecl server bundle add BUNDLE_DIR`")
    return max(versions)


def counted_rows(store: Store, bundle_id: str, version: int, request: MergeRequest) -> list[dict[str, Any]]:
    """The deltas a merge counts: device deltas of this version, minus the excluded ones, and of
    each device only the last one that arrived (``formats.merge.newest_per_device``)."""
    from edgecl.formats.merge import newest_per_device

    rows = [row for row in store.list_deltas(bundle_id, version)          # arrival order, oldest first
            if row["device"] != D.MERGE_DEVICE_ID and row["device"] not in request.exclude_devices
            and row["sha256"] not in request.exclude_deltas]
    return newest_per_device(rows, lambda row: row["device"])[0]


@dataclass
class MergePlan:
    """A merge checked and ready to run: what it counts, how, over which mask."""

    bundle_id: str
    version: int
    request: MergeRequest
    rows: list[dict[str, Any]]       # the counted deltas, arrival order
    mask_sha256: str


def plan_merge(store: Store, bundle_id: str, version: int | None = None,
               strategy: str | MergeRequest = "weighted-mean") -> MergePlan:
    """Everything a merge can be refused for before it runs (unknown bundle, nothing to merge,
    unknown strategy or trim): a 4xx at once, not a failed job later."""
    from edgecl.formats.merge import MergeError, get_strategy

    request = strategy if isinstance(strategy, MergeRequest) else MergeRequest(strategy=strategy)
    try:
        get_strategy(request.strategy, request.trim)
    except MergeError as exc:
        raise Rejected("merge_failed", 422, exc.problem, exc.fix) from exc
    if version is None:
        version = newest_version(store, bundle_id)
    bundle = store.get_bundle(bundle_id, version)
    if bundle is None:
        raise Rejected("bundle_unknown", 404, f"bundle {bundle_id} v{version} is not registered",
                       "register it first: `edgecl server bundle add BUNDLE_DIR`")
    rows = counted_rows(store, bundle_id, version, request)
    if not rows:
        raise Rejected("nothing_to_merge", 409, f"no device delta for bundle {bundle_id} v{version}"
                       + (" after the exclusions" if request.exclude_devices or request.exclude_deltas else ""),
                       "wait for devices to push (`edgecl push`)")
    return MergePlan(bundle_id, version, request, rows, bundle.mask_sha256)


def execute_merge(store: Store, plan: MergePlan, progress: Any = None) -> dict[str, Any]:
    """Run a planned merge, streaming over its deltas (formats/merge_stream.py: memory bounded
    whatever the number of devices), store the merged delta and the overlap counts; returns their
    sha256s. Idempotent: same deltas, same bytes. ``progress(phase, done, total)``."""
    from edgecl.formats.mask import Mask
    from edgecl.formats.merge import DEFAULT_MAX_SHARE, MergeError, MergeOptions
    from edgecl.formats.merge_stream import StreamInput, merge_stream

    mask_bytes = store.get_blob(plan.mask_sha256)
    if mask_bytes is None:
        raise Rejected("store_damaged", 500, f"the mask of bundle {plan.bundle_id} v{plan.version} is missing from "
                       "the store or damaged", "register the bundle again (`edgecl server bundle add`)")

    def loader(sha256: str) -> Any:
        def load() -> D.Delta:
            blob = store.get_blob(sha256)
            if blob is None:
                raise Rejected("store_damaged", 500, f"delta {sha256} is listed but its file is missing or damaged",
                               "restore the store folder from backup")
            return D.load(blob)
        return load

    request = plan.request
    inputs = [StreamInput(row["device"], int(row["samples_seen"]), loader(row["sha256"])) for row in plan.rows]
    options = MergeOptions(strategy=request.strategy, trim=request.trim,
                           max_share=DEFAULT_MAX_SHARE if request.max_share is None else request.max_share)
    spill = store.root / "tmp"
    spill.mkdir(parents=True, exist_ok=True)
    try:
        out = merge_stream(inputs, Mask.from_bytes(mask_bytes), options, spill_dir=spill, progress=progress)
    except MergeError as exc:
        raise Rejected("merge_failed", 422, exc.problem, exc.fix) from exc
    data = D.save(out.delta, store.merge_key())
    sha256 = hashlib.sha256(data).hexdigest()
    store.put_delta(data, sha256, {"bundle_id": plan.bundle_id, "version": plan.version, "device": D.MERGE_DEVICE_ID,
                                   "steps": out.delta.steps, "samples_seen": out.delta.samples_seen,
                                   "values_dtype": "fp32", "created_utc": out.delta.created_utc})
    overlap_sha256 = store.put_blob(out.overlap_bytes())
    store.record_merge(sha256, plan.bundle_id, plan.version, overlap_sha256, len(plan.rows), request.strategy,
                       out.devices, request.options_json())
    log.info("merged %d deltas of %s v%d -> %s", len(plan.rows), plan.bundle_id, plan.version, sha256)
    return {"sha256": sha256, "overlap_sha256": overlap_sha256, "bundle_id": plan.bundle_id, "version": plan.version,
            "inputs": len(plan.rows), "changed": int(out.delta.positions.size), "shared": out.shared_elements,
            "strategy": request.strategy, "devices": out.devices, "deltas": [r["sha256"] for r in plan.rows]}


def run_merge(store: Store, bundle_id: str, version: int | None = None,
              strategy: str | MergeRequest = "weighted-mean") -> dict[str, Any]:
    """Plan and run a merge in this thread (``edgecl merge``; the API runs it as a job: jobs.py)."""
    return execute_merge(store, plan_merge(store, bundle_id, version, strategy))


# -- releases (the downlink) -------------------------------------------------------------------------
def release_version(store: Store, bundle_id: str, version: int, canary: list[str] | None = None,
                    report: dict[str, Any] | None = None) -> dict[str, Any]:
    """Sign a stored bundle version's manifest with the server's key and make it pullable (by the
    ``canary`` devices only, when given). Releasing the same version again changes nothing."""
    from edgecl.formats.signing import manifest_object, sign_manifest

    bundle = store.get_bundle(bundle_id, version)
    files = store.bundle_files(bundle_id, version) if bundle is not None else {}
    if bundle is None or not files:
        raise Rejected("bundle_unknown", 404, f"bundle {bundle_id} v{version} is not stored whole on this server",
                       "store it first: `edgecl server bundle add BUNDLE_DIR` (or `edgecl release` uploads it)")
    for name in canary or []:
        if not D.NAME_RE.fullmatch(str(name)):
            raise Rejected("bad_request", 400, f"canary device {str(name)[:80]!r} is not a name", "name devices")
    manifest_bytes = store.get_blob(bundle.manifest_sha256)
    if manifest_bytes is None:
        raise Rejected("store_damaged", 500, "the bundle's manifest is missing", "store the bundle again")
    signature = sign_manifest(store.release_private_key(), manifest_object(manifest_bytes))
    new = store.add_release(bundle_id, version, bundle.manifest_sha256, signature, list(canary or []), report or {})
    row = next(r for r in store.list_releases(bundle_id) if r["version"] == version)
    log.info("release %s v%d %s%s", bundle_id, version, "signed" if new else "already released",
             f" (canary: {', '.join(row['canary'])})" if row["canary"] else "")
    return {"status": "released" if new else "already_released", **release_json(store, row)}


def release_json(store: Store, row: dict[str, Any]) -> dict[str, Any]:
    return {"bundle_id": row["bundle_id"], "version": row["version"], "manifest_sha256": row["manifest_sha256"],
            "signature": row["signature"], "canary": row["canary"], "released_utc": row["released_utc"],
            "public_key": store.release_public_key(), "report": row["report"],
            "files": store.bundle_files(row["bundle_id"], row["version"])}


def visible(row: dict[str, Any], who: Device) -> bool:
    return who.role == "admin" or not row["canary"] or who.name in row["canary"]


def latest_release(store: Store, who: Device, bundle_id: str) -> dict[str, Any]:
    """The newest release of a lineage this device may pull (a canary release only for its devices)."""
    rows = [r for r in store.list_releases(bundle_id) if visible(r, who)]
    if not rows:
        raise Rejected("not_found", 404, f"no release of bundle {bundle_id} for {who.name}",
                       "release a version first (`edgecl release` or `edgecl server bundle add`)")
    if who.role != "admin":
        store.touch_device(who.name, "check")
    return release_json(store, max(rows, key=lambda r: r["version"]))


def _allowed_file(store: Store, who: Device, bundle_id: str, version: int, name: str) -> str:
    """The sha256 of a file of a stored bundle version, if this caller may download it."""
    files = store.bundle_files(bundle_id, version)
    released = [r for r in store.list_releases(bundle_id) if r["version"] == version]
    allowed = who.role == "admin" or (released and visible(released[0], who))
    if name not in files or not allowed:
        raise Rejected("not_found", 404, f"no file {name[:80]} in a release of {bundle_id} v{version} for you",
                       "pull the version GET /v1/releases/latest names")
    return files[name]["sha256"]


def _verified_file(store: Store, sha256: str, what: str) -> Path:
    """The blob's local file, its bytes checked against its name now: a damaged blob is never served."""
    path = store.blob_file(sha256)
    if path is None:
        raise Rejected("store_damaged", 500, f"{what} ({sha256[:12]}) is missing from the store or damaged",
                       "restore the store from backup, or store the bundle again (`edgecl server bundle add`)")
    return path


def bundle_file_path(store: Store, who: Device, bundle_id: str, version: int, name: str) -> Path:
    """Where a file of a stored bundle version is, if this caller may download it (checked now)."""
    sha256 = _allowed_file(store, who, bundle_id, version, name)
    return _verified_file(store, sha256, f"{bundle_id} v{version} {name}")


ENCODINGS = ("identity", "zlib", "xor-zlib", "dict-zlib")
# zlib's window: a preset dictionary (RFC 1950 FDICT) is its last 32 KiB.
ZDICT_BYTES = 32 * 1024


def _cached_encoding(store: Store, kind: str, make: Any) -> Path:
    """An encoded copy in ``STORE/encoded/``, named ``{kind}-{sha256 of its own bytes}``-style so
    every use re-checks it: a damaged or truncated entry is removed and rebuilt, never served."""
    from edgecl.formats.atomic import atomic_write_bytes
    from edgecl.server.blobs import file_sha256

    folder = store.root / "encoded"
    for entry in sorted(folder.glob(f"{kind}-*")) if folder.exists() else []:
        if file_sha256(entry) == entry.name[len(kind) + 1:]:
            return entry
        log.warning("encoded cache entry %s is damaged: rebuilt", entry.name)
        entry.unlink(missing_ok=True)
    data = make()
    entry = folder / f"{kind}-{hashlib.sha256(data).hexdigest()}"
    atomic_write_bytes(entry, data)
    return entry


def encoded_file(store: Store, who: Device, bundle_id: str, version: int, name: str, encoding: str | None,
                 from_sha256: str | None) -> tuple[Path, str]:
    """(file to send, its encoding) for a download. ``from_sha256``: a file the device already has
    (of a release of this lineage it may pull) of the same size: the answer is zlib(old XOR new),
    mostly zeros when a version changed a few percent of the weights; of another size: zlib with the
    old file's last 32 KiB as preset dictionary (``dict-zlib``), when that is smaller than plain zlib.
    ``encoding=zlib``: the file zlib-compressed. Either is made once, from blobs whose bytes hash to their names (a damaged
    blob is a 500, never served nor encoded), and kept in ``STORE/encoded/`` under the sha256 of
    its own bytes, checked on every use; an encoding that is not smaller than the file is not used."""
    import zlib

    from edgecl.server.store import SHA_RE

    target = _allowed_file(store, who, bundle_id, version, name)
    path = _verified_file(store, target, f"{bundle_id} v{version} {name}")
    options: list[tuple[Path, str]] = []
    if from_sha256 is not None and not SHA_RE.fullmatch(from_sha256):
        raise Rejected("bad_id", 400, "from_sha256 is not a sha256", "name a file of the bundle you have")
    if from_sha256 and from_sha256 != target:
        # The patch reveals old XOR new to a caller who gets new: only files it may know may be the
        # base: those of the releases it may pull, and of the lineage's older versions (it upgrades
        # from one of them; a canary or unreleased newer version never leaks this way).
        allowed = {f["sha256"] for r in store.list_releases(bundle_id) if visible(r, who)
                   for f in store.bundle_files(bundle_id, r["version"]).values()}
        allowed |= {f["sha256"] for b in store.list_bundles() if b.bundle_id == bundle_id and b.version < version
                    for f in store.bundle_files(bundle_id, b.version).values()}
        old = store.blob_file(from_sha256) if from_sha256 in allowed else None
        if old is not None and old.stat().st_size == path.stat().st_size:
            def xor() -> bytes:
                a, b = np.frombuffer(old.read_bytes(), np.uint8), np.frombuffer(path.read_bytes(), np.uint8)
                return zlib.compress(np.bitwise_xor(a, b).tobytes(), 6)

            cached = _cached_encoding(store, f"xor-{from_sha256}-{target}", xor)
            if cached.stat().st_size < path.stat().st_size:
                return cached, "xor-zlib"
        elif old is not None:
            # Another size (a class table that gained classes): zlib with the old file's end as its
            # preset dictionary, so the rows both versions hold cost a back-reference each.
            def with_dictionary() -> bytes:
                z = zlib.compressobj(9, zdict=old.read_bytes()[-ZDICT_BYTES:])
                return z.compress(path.read_bytes()) + z.flush()

            options.append((_cached_encoding(store, f"dict-{from_sha256}-{target}", with_dictionary), "dict-zlib"))
    if encoding == "zlib":
        options.append((_cached_encoding(store, f"zlib-{target}", lambda: zlib.compress(path.read_bytes(), 6)),
                        "zlib"))
    best = min(options, key=lambda o: o[0].stat().st_size, default=None)
    if best is not None and best[0].stat().st_size < path.stat().st_size:
        return best
    return path, "identity"


def dashboard(store: Store) -> dict[str, Any]:
    """Everything the dashboard page shows, in one read-only answer."""
    deltas = [r for r in store.list_deltas() if r["device"] != D.MERGE_DEVICE_ID]
    bundles = []
    releases = {(r["bundle_id"], r["version"]): r for r in store.list_releases()}
    for b in store.list_bundles():
        rows = [r for r in deltas if (r["bundle_id"], r["version"]) == (b.bundle_id, b.version)]
        latest: dict[str, dict[str, Any]] = {}
        for r in rows:
            latest[r["device"]] = r
        after = [r["heldout"]["after"]["accuracy"] for r in latest.values() if r["heldout"] and "after" in r["heldout"]]
        before = [r["heldout"]["before"]["accuracy"] for r in latest.values()
                  if r["heldout"] and "before" in r["heldout"]]
        release = releases.get((b.bundle_id, b.version))
        gate = (release or {}).get("report", {}).get("candidate", {}) if release else {}
        bundles.append({"bundle_id": b.bundle_id, "version": b.version, "deltas": len(rows), "devices": len(latest),
                        "stored": bool(store.bundle_files(b.bundle_id, b.version)),
                        "released": release is not None, "canary": (release or {}).get("canary", []),
                        "device_accuracy_before": sum(before) / len(before) if before else None,
                        "device_accuracy_after": sum(after) / len(after) if after else None,
                        "release_accuracy": gate.get("accuracy") if isinstance(gate, dict) else None})
    return {"devices": store.list_devices(), "bundles": bundles,
            "merges": [{k: m[k] for k in ("sha256", "bundle_id", "version", "inputs", "strategy", "devices")}
                       for m in store.list_merges()],
            "releases": [{k: r[k] for k in ("bundle_id", "version", "canary", "released_utc", "report")}
                         for r in store.list_releases()],
            "deltas": len(deltas)}


def merge_to_files(store_dir: str | Path, db: str | None, bundle_id: str, version: int | None,
                   strategy: str | MergeRequest, out: str | Path, overlap_out: str | Path | None = None) -> dict[str, Any]:
    """``edgecl merge``: run the merge on the server's store and copy its two files out (atomically)."""
    from edgecl.formats.atomic import atomic_write_bytes
    from edgecl.server.store import Store

    store = Store(store_dir, db)
    try:
        summary = run_merge(store, bundle_id, version, strategy)
        out = Path(out)
        overlap_out = Path(overlap_out) if overlap_out else out.with_name(out.name.split(".")[0] + ".overlap.safetensors")
        atomic_write_bytes(out, store.get_blob(summary["sha256"]) or b"")
        atomic_write_bytes(overlap_out, store.get_blob(summary["overlap_sha256"]) or b"")
    finally:
        store.close()
    return {**summary, "out": str(out), "overlap_out": str(overlap_out)}
