"""`edgecl apply`: bake deltas into the base weights and write the next bundle version.

The output folder is a complete bundle (same bundle id, version + 1) whose base weights are
W0 + delta, plus ``weights.safetensors`` (the patched weights by parameter name, for any runtime).
Its inference graph run with a zero delta gives the device's adapted model (checked here).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecl.errors import BundleError, ConfigError
from edgecl.formats import delta as delta_format
from edgecl.formats import manifest as mf
from edgecl.formats.config import Recipe, load_recipe
from edgecl.formats.exemplars import ExemplarMemory
from edgecl.formats.hashing import sha256_file
from edgecl.formats.images import normalize
from edgecl.formats.mask import (
    Mask,
    Overlap,
    overlap_add,
    overlap_from_bytes,
    overlap_of_mask,
    overlap_to_bytes,
)
from edgecl.formats.prototypes import Prototypes
from edgecl.host.export import ExportOptions, base_weights_sha256, export_bundle, read_base_weights
from edgecl.host.model import build_embedding_model


@dataclass
class ApplyReport:
    bundle_dir: str
    version: int
    deltas: int
    changed_elements: int
    classes: list[str]
    max_abs_output_diff: float       # new bundle (zero delta) vs old bundle + delta, on check images
    remasked: bool                   # a fresh MI-Fisher mask was scored on --data


def _recipe_from_manifest(manifest: mf.BundleManifest) -> Recipe:
    fields = {f.name for f in dataclasses.fields(Recipe)}
    return Recipe(**{k: v for k, v in manifest.recipe.items() if k in fields})


def _merged(deltas: list[delta_format.Delta], mask: Mask) -> delta_format.Delta:
    if len(deltas) == 1:
        return deltas[0]
    # Several deltas: the same pure weighted-mean merge the fleet server runs (numpy only).
    from edgecl.server.merge import merge_deltas

    return merge_deltas(deltas, mask).delta


def _overlap_history(bundle_dir: Path, mask: Mask, vector: np.ndarray) -> Overlap:
    """Every element updated in any round so far, with its count, including this delta's elements."""
    path = bundle_dir / mf.OVERLAP
    history = overlap_from_bytes(path.read_bytes()) if path.exists() else overlap_of_mask(mask)
    changed = vector != 0
    this_round = {n: (mask.indices[n][changed[sl]], np.ones(int(changed[sl].sum()), np.int32))
                  for n, sl in mask.slices().items() if changed[sl].any()}
    return overlap_add(history, this_round)


def apply_deltas(bundle_dir: str | Path, delta_paths: list[str | Path], out_dir: str | Path,
                 data_dir: str | Path | None = None, recipe_path: str | Path | None = None,
                 overwrite: bool = False, progress: bool = True) -> ApplyReport:
    bundle_dir = Path(bundle_dir)
    manifest = mf.load_manifest(bundle_dir)
    mf.check_bundle_files(bundle_dir)
    mask = Mask.load_file(bundle_dir / mf.MASK)
    if not delta_paths:
        raise ConfigError("no delta given", "pass one or more delta files (from `edgecl delta` or `edgecl merge`)")
    deltas = [delta_format.load_file(p) for p in delta_paths]
    for path, d in zip(delta_paths, deltas, strict=False):
        if (d.bundle_id, d.base_sha256, d.mask_sha256) != (manifest.bundle_id, manifest.base_sha256,
                                                          manifest.mask_sha256):
            raise BundleError(f"delta {path} was made for another bundle (id {d.bundle_id[:12]}, version "
                              f"{d.bundle_version}) than {bundle_dir} (id {manifest.bundle_id[:12]}, version "
                              f"{manifest.version})", "apply it to the bundle the device adapted")
    merged = _merged(deltas, mask)
    vector = merged.to_dense(mask.total_selected)
    history = _overlap_history(bundle_dir, mask, vector)

    recipe = load_recipe(recipe_path) if recipe_path else _recipe_from_manifest(manifest)
    names = [n for n, _ in build_embedding_model(recipe).named_parameters()]
    base = read_base_weights(bundle_dir / mf.INFERENCE_MODEL, mask, names)
    if base_weights_sha256(base) != manifest.base_sha256:
        raise BundleError(f"the base weights in {bundle_dir / mf.INFERENCE_MODEL} do not match the manifest",
                          "re-copy the bundle from the host")
    patched = dict(base)
    patched.update(mask.scatter(vector, base))

    prototypes = Prototypes.load_file(bundle_dir / mf.PROTOTYPES)
    if merged.prototypes is not None:
        for i, name in enumerate(merged.prototypes.classes):
            prototypes.upsert(name, merged.prototypes.means[i], int(merged.prototypes.counts[i]))

    # The calibration exemplars are pixels: they stay valid under the patched backbone.
    exemplars = (ExemplarMemory.load_file(bundle_dir / mf.EXEMPLARS) if (bundle_dir / mf.EXEMPLARS).exists()
                 else None)
    options = ExportOptions(select_rate=manifest.select_rate, drop_rate=manifest.drop_rate, seed=manifest.seed,
                            batch_size=manifest.batch_size, temperature=manifest.loss_temperature,
                            lr_backbone=manifest.lr_backbone, lr_head=manifest.lr_head, epochs=manifest.epochs,
                            overwrite=overwrite, progress=progress)
    next_mask = None
    out_dir = Path(out_dir)
    if data_dir is None:
        # Keep the mask; its overlap counts now include this round (METHOD.md step 2).
        next_mask = Mask(order=list(mask.order), shapes=dict(mask.shapes),
                         indices={n: mask.indices[n] for n in mask.order}, total_params=mask.total_params,
                         overlap=_aligned(history, mask))
    overlap_file = out_dir.parent / f".{out_dir.name}.overlap.safetensors"
    overlap_file.write_bytes(overlap_to_bytes(history))
    options.overlap_path = str(overlap_file)
    try:
        export_bundle(recipe, data_dir, out_dir, options=options, weights_override=patched,
                      bundle_id=manifest.bundle_id, version=manifest.version + 1,
                      parent_sha256=sha256_file(bundle_dir / mf.MANIFEST), mask=next_mask, prototypes=prototypes,
                      exemplars=exemplars)
    finally:
        overlap_file.unlink(missing_ok=True)
    diff = _output_diff(bundle_dir, out_dir, vector, manifest)
    return ApplyReport(bundle_dir=str(out_dir), version=manifest.version + 1, deltas=len(deltas),
                       changed_elements=int(np.count_nonzero(vector)), classes=list(prototypes.classes),
                       max_abs_output_diff=diff, remasked=data_dir is not None)


def _aligned(history: Overlap, mask: Mask) -> dict[str, np.ndarray]:
    """History counts at the mask's selected elements (0 where an element was never updated)."""
    out = {}
    for name in mask.order:
        counts = np.zeros(mask.indices[name].size, np.int32)
        if name in history:
            idx, cnt = history[name]
            pos = np.searchsorted(mask.indices[name], idx)
            hit = (pos < counts.size) & (mask.indices[name][np.minimum(pos, counts.size - 1)] == idx)
            counts[pos[hit]] = cnt[hit]
        out[name] = counts
    return out


def _output_diff(old_dir: Path, new_dir: Path, vector: np.ndarray, manifest: mf.BundleManifest) -> float:
    """Max |embedding(old bundle, delta) - embedding(new bundle, zero delta)| on seeded check images."""
    import onnxruntime as ort

    h, w = manifest.input_size
    pixels = np.random.default_rng(0).integers(0, 256, (8, h, w, 3)).astype(np.uint8)
    images = normalize(pixels, manifest.mean, manifest.std)
    protos = np.ones((1, manifest.embedding_dim), np.float32)
    new_k = mf.load_manifest(new_dir).selected

    def embed(path: Path, delta: np.ndarray) -> np.ndarray:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return sess.run(["embeddings"], {"images": images, "delta": delta, "prototypes": protos})[0]

    old = embed(old_dir / mf.INFERENCE_MODEL, vector.astype(np.float32))
    new = embed(new_dir / mf.INFERENCE_MODEL, np.zeros(new_k, np.float32))
    return float(np.abs(old - new).max())
