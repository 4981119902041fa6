"""`edgecl inspect`: what a bundle holds, read from its files alone (no torch, no onnxruntime)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgecl.errors import BundleError
from edgecl.formats import delta as delta_format
from edgecl.formats import manifest as mf
from edgecl.formats.hashing import sha256_file
from edgecl.formats.mask import Mask


def inspect_bundle(bundle_dir: str | Path, verify: bool = True) -> dict[str, Any]:
    """Summary of a bundle as plain data; ``verify`` re-hashes every file against the manifest."""
    bundle_dir = Path(bundle_dir)
    manifest = mf.load_manifest(bundle_dir)
    mf.check_bundle_files(bundle_dir)
    mask = Mask.load_file(bundle_dir / mf.MASK)
    files = {}
    missing = sorted(n for n in manifest.files if not (bundle_dir / n).is_file())
    if missing:
        raise BundleError(f"bundle file(s) {', '.join(missing)} listed in manifest.json are missing from {bundle_dir}",
                          "re-copy the whole bundle folder from the host")
    for path in sorted(bundle_dir.iterdir()):
        if path.is_file() and path.name != mf.MANIFEST:
            entry: dict[str, Any] = {"bytes": path.stat().st_size}
            listed = {**manifest.files, **manifest.server_files}   # server_files: the host's, signed too
            if verify and path.name in listed:
                entry["sha256"] = sha256_file(path)
                entry["ok"] = entry["sha256"] == listed[path.name]
            files[path.name] = entry
    bad = [n for n, e in files.items() if e.get("ok") is False]
    if bad:
        raise BundleError(f"bundle file(s) {', '.join(bad)} do not match the manifest's sha256",
                          "re-copy the bundle from the host")
    delta_bytes = worst_case_delta_bytes(manifest, mask.total_selected)
    base_fp32_bytes = manifest.total_params * 4
    layers = [{"name": n, "shape": list(mask.shapes[n]), "selected": c,
               "coverage": c / max(1, _numel(mask.shapes[n]))}
              for n, c in zip(mask.order, mask.counts, strict=False)]
    return {
        "bundle": str(bundle_dir),
        "bundle_id": manifest.bundle_id,
        "version": manifest.version,
        "model": manifest.model_name,
        "input_size": manifest.input_size,
        "parameters": manifest.total_params,
        "base_fp32_bytes": base_fp32_bytes,
        "selected": mask.total_selected,
        "selected_fraction": mask.selected_fraction,
        "select_rate": manifest.select_rate,
        "drop_rate": manifest.drop_rate,
        "expected_changed_fraction_per_step": mask.selected_fraction * (1 - manifest.drop_rate),
        "masked_tensors": len(mask.order),
        # A delta file of this bundle in which every selected element changed (the largest one a
        # device can send, without prototypes), per value encoding; a real delta holds only the
        # changed entries and is smaller (docs/delta-format.md).
        "delta_bytes": delta_bytes,
        "delta_fraction_of_base": {enc: n / max(1, base_fp32_bytes) for enc, n in delta_bytes.items()},
        "layers": layers,
        "classes": manifest.classes,
        "base_sha256": manifest.base_sha256,
        "mask_sha256": manifest.mask_sha256,
        "files": files,
        "device_profile": manifest.device_profile,   # the profile it was exported for (the device's default)
        "versions": manifest.versions,
        "created_utc": manifest.created_utc,
    }


# Fixed provenance for the size computation: the sizes do not depend on the time, and a signed file
# (HMAC present) is what a device sends; "device-0001" is a typical device name length.
_SIZE_DEVICE_ID = "device-0001"
_SIZE_TIME = "2000-01-01T00:00:00Z"


def worst_case_delta_bytes(manifest: mf.BundleManifest, k: int) -> dict[str, int]:
    """Exact byte size of a signed delta file with all ``k`` entries changed, no prototypes, per encoding
    (fp32, fp16, int8, int4), measured by serializing it with the reference writer."""
    worst = delta_format.Delta.from_dense(
        np.ones(k, np.float32), bundle_id=manifest.bundle_id, bundle_version=manifest.version,
        base_sha256=manifest.base_sha256, mask_sha256=manifest.mask_sha256, device_id=_SIZE_DEVICE_ID,
        steps=1, samples_seen=1, created_utc=_SIZE_TIME)
    key = bytes(32)
    return {enc: len(delta_format.save(worst, key, values=enc)) for enc in delta_format.VALUE_DTYPES}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
