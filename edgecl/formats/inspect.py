"""`edgecl inspect`: what a bundle holds, read from its files alone (no torch, no onnxruntime)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgecl.errors import BundleError
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
    for path in sorted(bundle_dir.iterdir()):
        if path.is_file() and path.name != mf.MANIFEST:
            entry: dict[str, Any] = {"bytes": path.stat().st_size}
            if verify and path.name in manifest.files:
                entry["sha256"] = sha256_file(path)
                entry["ok"] = entry["sha256"] == manifest.files[path.name]
            files[path.name] = entry
    bad = [n for n, e in files.items() if e.get("ok") is False]
    if bad:
        raise BundleError(f"bundle file(s) {', '.join(bad)} do not match the manifest's sha256",
                          "re-copy the bundle from the host")
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
        "base_fp32_bytes": manifest.total_params * 4,
        "selected": mask.total_selected,
        "selected_fraction": mask.selected_fraction,
        "select_rate": manifest.select_rate,
        "drop_rate": manifest.drop_rate,
        "expected_changed_fraction_per_step": mask.selected_fraction * (1 - manifest.drop_rate),
        "masked_tensors": len(mask.order),
        "layers": layers,
        "classes": manifest.classes,
        "base_sha256": manifest.base_sha256,
        "mask_sha256": manifest.mask_sha256,
        "files": files,
        "versions": manifest.versions,
        "created_utc": manifest.created_utc,
    }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
