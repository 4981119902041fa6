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

from edgecl.errors import EdgeclError
from edgecl.formats import delta as D
from edgecl.server.store import Bundle, Device, Store, StoreError

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


def authenticate(store: Store, authorization: str | None, admin: bool = False) -> Device:
    if not authorization or not authorization.startswith("Bearer "):
        raise Rejected("auth_missing", 401, "no device token", "send 'Authorization: Bearer TOKEN' (edgecl push --token)")
    device = store.device_for_token(authorization[len("Bearer "):].strip())
    if device is None or device.role == "merge":
        raise Rejected("auth_invalid", 401, "unknown device token",
                       "use the token printed by `edgecl serve register-device`")
    if admin and device.role != "admin":
        raise Rejected("forbidden", 403, f"{device.name} is not an admin",
                       "use a token from `edgecl serve register-device NAME --admin`")
    return device


def check_header(store: Store, header: D.DeltaHeader, device: Device, max_upload_bytes: int) -> Bundle:
    """Everything the header alone can tell, before the body is read."""
    if header.total_bytes > max_upload_bytes:
        raise Rejected("too_large", 413, f"the delta is {header.total_bytes} bytes, over the {max_upload_bytes}-byte cap",
                       "push a smaller delta (--values int8) or raise the server's --max-upload-mb")
    if header.device_id != device.name:
        raise Rejected("device_mismatch", 403, f"the delta was made by {header.device_id!r}, the token is "
                       f"{device.name!r}'s", "push each delta with the token of the device that made it")
    bundle = store.get_bundle(header.bundle_id, header.bundle_version)
    if bundle is None:
        raise Rejected("bundle_unknown", 422, f"bundle {header.bundle_id} v{header.bundle_version} is not "
                       "registered on this server", "register it first: `edgecl serve add-bundle BUNDLE_DIR`")
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
    if header.samples_seen < 1:
        raise Rejected("no_samples", 422, "the delta says it saw 0 training images (samples_seen)",
                       "adapt on some images before pushing")
    return bundle


@dataclass
class Accepted:
    sha256: str
    new: bool                 # False: these exact bytes were already stored

    def to_json(self) -> dict[str, str]:
        return {"status": "stored" if self.new else "already_have_it", "sha256": self.sha256}


def accept_delta(store: Store, data: bytes, header: D.DeltaHeader, device: Device) -> Accepted:
    """Full validation of the whole file, then a durable store. Nothing is written if any check fails."""
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        D.check_length(header, len(data))
        D.verify_body(header, memoryview(data)[8 + header.header_bytes:])
        D.verify_hmac(header, device.hmac_key)
        if store.has_delta(sha256):
            return Accepted(sha256, False)
        D.decode(header, data)                # positions in range, finite values and prototypes
    except D.DeltaError as exc:
        raise Rejected.from_delta_error(exc) from exc
    new = store.put_delta(data, sha256, {
        "bundle_id": header.bundle_id, "version": header.bundle_version, "device": device.name,
        "steps": header.steps, "samples_seen": header.samples_seen, "values_dtype": header.metadata["values_dtype"],
        "created_utc": header.created_utc})
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
    check_header(store, header, device, max_upload_bytes)
    return accept_delta(store, data, header, device)


def register_bundle_json(store: Store, manifest: Any, mask_bytes: bytes) -> tuple[Bundle, bool]:
    from edgecl.server.store import bundle_from_files

    try:
        manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        bundle = bundle_from_files(manifest_bytes, mask_bytes)
        return bundle, store.add_bundle(bundle, manifest_bytes, mask_bytes)
    except (StoreError, EdgeclError) as exc:
        raise Rejected("bundle_invalid", 422, exc.problem, exc.fix) from exc


def run_merge(store: Store, bundle_id: str, version: int | None = None,
              strategy: str = "weighted-mean") -> dict[str, Any]:
    """Merge every device delta of a bundle version into one delta (device "merge"), store it and
    the updated overlap counts; returns their sha256s. Idempotent: same deltas, same bytes."""
    from edgecl.formats.mask import Mask
    from edgecl.server.merge import MergeError, merge_deltas

    if version is None:
        versions = [b.version for b in store.list_bundles() if b.bundle_id == bundle_id]
        if not versions:
            raise Rejected("bundle_unknown", 404, f"bundle {bundle_id} is not registered",
                           "register it first: `edgecl serve add-bundle BUNDLE_DIR`")
        version = max(versions)
    bundle = store.get_bundle(bundle_id, version)
    if bundle is None:
        raise Rejected("bundle_unknown", 404, f"bundle {bundle_id} v{version} is not registered",
                       "register it first: `edgecl serve add-bundle BUNDLE_DIR`")
    rows = [r for r in store.list_deltas(bundle_id, version) if r["device"] != D.MERGE_DEVICE_ID]
    if not rows:
        raise Rejected("nothing_to_merge", 409, f"no device delta for bundle {bundle_id} v{version}",
                       "wait for devices to push (`edgecl push`)")
    mask_bytes = store.get_blob(bundle.mask_sha256)
    if mask_bytes is None:
        raise Rejected("store_damaged", 500, f"the mask of bundle {bundle_id} v{version} is missing from the store",
                       "register the bundle again (`edgecl serve add-bundle`)")
    deltas = []
    for row in rows:
        blob = store.get_blob(row["sha256"])
        if blob is None:
            raise Rejected("store_damaged", 500, f"delta {row['sha256']} is listed but its file is missing",
                           "restore the store folder from backup")
        deltas.append(D.load(blob))
    try:
        out = merge_deltas(deltas, Mask.from_bytes(mask_bytes), strategy)
    except MergeError as exc:
        raise Rejected("merge_failed", 422, exc.problem, exc.fix) from exc
    data = D.save(out.delta, store.merge_key())
    sha256 = hashlib.sha256(data).hexdigest()
    store.put_delta(data, sha256, {"bundle_id": bundle_id, "version": version, "device": D.MERGE_DEVICE_ID,
                                   "steps": out.delta.steps, "samples_seen": out.delta.samples_seen,
                                   "values_dtype": "fp32", "created_utc": out.delta.created_utc})
    overlap_sha256 = store.put_blob(out.overlap_bytes())
    store.record_merge(sha256, bundle_id, version, overlap_sha256, len(deltas), strategy)
    log.info("merged %d deltas of %s v%d -> %s", len(deltas), bundle_id, version, sha256)
    return {"sha256": sha256, "overlap_sha256": overlap_sha256, "bundle_id": bundle_id, "version": version,
            "inputs": len(deltas), "changed": int(out.delta.positions.size), "shared": out.shared_elements,
            "strategy": strategy}


def merge_to_files(store_dir: str | Path, db: str | None, bundle_id: str, version: int | None, strategy: str,
                   out: str | Path, overlap_out: str | Path | None = None) -> dict[str, Any]:
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
