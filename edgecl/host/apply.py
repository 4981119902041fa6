"""`edgecl apply`: bake deltas into the base weights and write the next bundle version.

load -> scatter -> class statistics -> write_bundle, for ONE delta: a device's, or the fleet server's
merged one (the fleet merges once, on the server; `edgecl apply` with several files merges them with
the same pure function first). The output folder is a complete bundle (same bundle id, version + 1)
whose base weights (weights.safetensors) are W0 + delta, plus ``recipe_weights.safetensors``: the
same weights in the recipe's own timm layout (host/unfold.py: each BatchNorm keeps the recipe's
statistics, the change goes into the conv weight and the BN shift),
loadable with ``load_state_dict(strict=True)`` by anything that runs the stock model.
Its inference graph gives the device's adapted model (checked here on seeded images).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgecl import classstats
from edgecl.errors import BundleError, ConfigError
from edgecl.formats import delta as delta_format
from edgecl.formats import manifest as mf
from edgecl.formats.config import Recipe, load_recipe
from edgecl.formats.exemplars import ExemplarMemory
from edgecl.formats.hashing import sha256_file
from edgecl.formats.images import load_image_folder
from edgecl.formats.mask import Mask
from edgecl.formats.merge import MergeOptions, merge_deltas
from edgecl.formats.overlap import OverlapHistory
from edgecl.formats.prototypes import Prototypes
from edgecl.formats.weights import load_weights, weights_sha256
from edgecl.host.export import (
    RECIPE_WEIGHTS,
    BundleSpec,
    ExportOptions,
    embed_with_onnx,
    select_for_policy,
    write_bundle,
)
from edgecl.host.model import build_embedding_model


@dataclass
class ApplyReport:
    bundle_dir: str
    version: int
    deltas: int
    changed_elements: int
    classes: list[str]
    max_abs_output_diff: float       # new bundle vs torch model with the patched weights, on check images
    remasked: bool                   # a fresh MI-Fisher mask was scored on --data
    recipe_weights: str = ""         # the stock-layout weights file ("" when the recipe has no timm model)


def _recipe_from_manifest(manifest: mf.BundleManifest) -> Recipe:
    fields = {f.name for f in dataclasses.fields(Recipe)}
    return Recipe(**{k: v for k, v in manifest.recipe.items() if k in fields})


def load_delta(bundle_dir: Path, manifest: mf.BundleManifest, path: str | Path) -> delta_format.Delta:
    """Read a delta file (decoded once) and check it was made for this bundle."""
    d = delta_format.load_file(path)
    check_delta_fits(bundle_dir, manifest, d, str(path))
    return d


def check_delta_fits(bundle_dir: Path, manifest: mf.BundleManifest, d: delta_format.Delta, where: str) -> None:
    if (d.bundle_id, d.base_sha256, d.mask_sha256) != (manifest.bundle_id, manifest.base_sha256, manifest.mask_sha256):
        raise BundleError(f"delta {where} was made for another bundle (id {d.bundle_id[:12]}, version "
                          f"{d.bundle_version}) than {bundle_dir} (id {manifest.bundle_id[:12]}, version "
                          f"{manifest.version})", "apply it to the bundle the device adapted")


def merge_files(bundle_dir: str | Path, delta_paths: Sequence[str | Path],
                options: MergeOptions | None = None) -> delta_format.Delta:
    """`edgecl apply BUNDLE D1 D2 ...` without a server: the deltas merged once by the same pure
    function the fleet server runs (formats.merge). The fleet's release never calls this: it applies
    the server's merged delta as it is (one merge, on the server)."""
    bundle_dir = Path(bundle_dir)
    if not delta_paths:
        raise ConfigError("no delta given", "pass one or more delta files (from `edgecl delta` or `edgecl merge`)")
    manifest = mf.load_manifest(bundle_dir)
    deltas = [load_delta(bundle_dir, manifest, p) for p in delta_paths]
    if len(deltas) == 1:
        return deltas[0]
    return merge_deltas(deltas, Mask.load_file(bundle_dir / mf.MASK), options=options).delta


def _with_classes(prototypes: Prototypes, table: Prototypes | None) -> Prototypes:
    """The bundle's table with ``table``'s classes added or replaced (their statistics, counts)."""
    out = prototypes.copy()
    if table is not None:
        for i, name in enumerate(table.classes):
            out.upsert(name, table.means[i], int(table.counts[i]))
            out.seen.pop(name, None)  # the fleet's mean: which images it counts is not known here
    return out


def _embed_torch(model: torch.nn.Module, pixels: np.ndarray, manifest: mf.BundleManifest) -> np.ndarray:
    from edgecl.formats.images import normalize
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(normalize(pixels[i:i + 64], manifest.mean, manifest.std))).numpy()
                               for i in range(0, len(pixels), 64)])


def _model_with(recipe: Recipe, weights: dict[str, np.ndarray]) -> torch.nn.Module:
    """The recipe's embedding model holding ``weights`` (the bundle's layout: BN folded)."""
    model = build_embedding_model(recipe)
    params = dict(model.named_parameters())
    if set(params) != set(weights):
        raise BundleError(f"the bundle's weights do not fit recipe {recipe.name}",
                          "apply deltas with the recipe the bundle was exported from")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.from_numpy(np.asarray(weights[name], np.float32)).reshape(p.shape))
    return model


def _shift_by_exemplars(prototypes: Prototypes, exemplars: ExemplarMemory, before: torch.nn.Module,
                        after: torch.nn.Module, manifest: mf.BundleManifest) -> Prototypes:
    """The device's rule (device/poststeps.py shift_old_classes, on classstats.shift_by_exemplars), on the host, for the bundle's own
    classes (a device never supplies those): each class the bundle holds exemplars of moves its prototype by
    its exemplars' drift from the old to the patched backbone, p += mean(after) - mean(before). A
    prototype computed from all of a class's images stays that (a mean over 20 exemplars alone is
    noisier); a zero merged delta moves nothing."""
    out = prototypes.copy()
    emb_before = _embed_torch(before, exemplars.pixels, manifest)
    emb_after = _embed_torch(after, exemplars.pixels, manifest)
    for i, name in enumerate(exemplars.classes):
        rows = exemplars.labels == i
        if rows.any() and name in out.classes:
            j = out.classes.index(name)
            out.means[j] = classstats.shift_by_exemplars(out.means[j], emb_before[rows], emb_after[rows])
    return out


def apply_delta(bundle_dir: str | Path, delta: delta_format.Delta, out_dir: str | Path,
                data_dir: str | Path | None = None, recipe_path: str | Path | None = None,
                overwrite: bool = False, progress: bool = True,
                classes: Prototypes | None = None) -> ApplyReport:
    """Bake one delta (a device's, or the fleet server's merged one) into the next bundle version.

    Class statistics of the new version: the bundle's own classes moved by their exemplars' drift
    (edgecl.classstats; a zero delta moves nothing); then ``classes`` (statistics the caller computed
    under the new backbone: the release's statistics round) added or replacing, else the delta's own
    table: the classes the bundle does not ship, and for one device's delta also the shipped classes
    it counted new images of (exact for one device's delta: it computed them under its own backbone,
    which the new version is; an estimate for a merged one)."""
    # 1. load
    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    manifest = mf.load_manifest(bundle_dir)
    mf.check_bundle_files(bundle_dir)
    mask = Mask.load_file(bundle_dir / mf.MASK)
    check_delta_fits(bundle_dir, manifest, delta, "given")
    base = load_weights(bundle_dir / mf.WEIGHTS)
    if weights_sha256(base) != manifest.base_sha256:
        raise BundleError(f"{bundle_dir / mf.WEIGHTS} does not match the manifest's base_sha256",
                          "re-copy the bundle from the host")
    head = load_weights(bundle_dir / mf.HEAD_INIT, [mf.PROJ_WEIGHT, mf.PROJ_BIAS])

    # 2. the delta as a K-vector, and this round in the overlap history
    vector = delta.to_dense(mask.total_selected)
    overlap_path = bundle_dir / mf.OVERLAP
    history = (OverlapHistory.from_bytes(overlap_path.read_bytes()) if overlap_path.exists()
               else OverlapHistory.of_mask(mask)).record_round(mask, vector)

    # 3. scatter: the patched weights become the next version's base
    patched = dict(base)
    patched.update(mask.scatter(vector, base))
    recipe = load_recipe(recipe_path) if recipe_path else _recipe_from_manifest(manifest)
    model = _model_with(recipe, patched)

    options = ExportOptions(select_rate=manifest.select_rate, drop_rate=manifest.drop_rate,
                            mask_policy=manifest.mask_policy, seed=manifest.seed, batch_size=manifest.batch_size,
                            temperature=manifest.loss_temperature, lr_backbone=manifest.lr_backbone,
                            lr_head=manifest.lr_head, epochs=manifest.epochs, overwrite=overwrite, progress=progress)
    if data_dir is None:
        next_mask = history.with_counts(mask)  # keep the mask; its counts now include this round
    else:
        # A fresh MI-Fisher mask scored on the new data under the patched backbone.
        from edgecl.host.loss import ProjectionHead
        from edgecl.host.scoring import mi_fisher_scores
        images = load_image_folder(data_dir, recipe.input_size, recipe.interpolation, progress=progress,
                                   desc="decode calibration images")
        scorer = ProjectionHead(manifest.embedding_dim, manifest.proj_dim)
        scorer.proj.weight.data = torch.from_numpy(head[mf.PROJ_WEIGHT].copy())
        scorer.proj.bias.data = torch.from_numpy(head[mf.PROJ_BIAS].copy())
        scores = mi_fisher_scores(model, scorer, images.pixels, images.labels, recipe.mean, recipe.std,
                                  batch_size=options.batch_size, temperature=options.temperature, seed=options.seed,
                                  interpolation=recipe.interpolation, progress=progress)
        next_mask = select_for_policy(model, scores, options, history.counts)
        next_mask = history.with_counts(next_mask)

    proj = torch.nn.Linear(manifest.embedding_dim, manifest.proj_dim)
    with torch.no_grad():
        proj.weight.copy_(torch.from_numpy(head[mf.PROJ_WEIGHT].copy()))
        proj.bias.copy_(torch.from_numpy(head[mf.PROJ_BIAS].copy()))
    exemplars = (ExemplarMemory.load_file(bundle_dir / mf.EXEMPLARS) if (bundle_dir / mf.EXEMPLARS).exists()
                 else None)
    prototypes = Prototypes.load_file(bundle_dir / mf.PROTOTYPES)
    if exemplars is not None and len(exemplars.pixels) and np.any(vector):
        # The bundle's classes were computed under the old backbone; their exemplars (pixels stay
        # valid) measure how the delta moved them.
        prototypes = _shift_by_exemplars(prototypes, exemplars, _model_with(recipe, base), model, manifest)
    if classes is None and delta.prototypes is not None:
        shipped = set(prototypes.classes)
        # One device's delta: a class the bundle ships that the device counted new images of (its
        # camera) takes the device's mean, computed under the device's backbone = this version's; its
        # count is the bundle's plus the images the device added. A merged delta's rows for shipped
        # classes mix backbones: those keep the host's estimate (the release round recomputes them).
        # A row claiming more images than the delta saw (the server's count_over_seen bound) is not
        # believed for a shipped class: such a class keeps the host's estimate.
        single = delta.device_id != delta_format.MERGE_DEVICE_ID
        own = [i for i, c in enumerate(delta.prototypes.classes)
               if c not in shipped or (single and int(delta.prototypes.counts[i]) <= int(delta.samples_seen))]
        classes = Prototypes([delta.prototypes.classes[i] for i in own], delta.prototypes.means[own],
                             np.asarray([int(delta.prototypes.counts[i])
                                         + (int(prototypes.counts[prototypes.classes.index(c)]) if c in shipped else 0)
                                         for i, c in ((i, delta.prototypes.classes[i]) for i in own)], np.int64))
    prototypes = _with_classes(prototypes, classes)

    # 4. write_bundle
    spec = BundleSpec(recipe=recipe, model=model, mask=next_mask, head=proj, prototypes=prototypes, options=options,
                      profile=None, exemplars=exemplars, overlap=history.counts, bundle_id=manifest.bundle_id,
                      version=manifest.version + 1, parent_sha256=sha256_file(bundle_dir / mf.MANIFEST),
                      recipe_weights=True)
    if manifest.device_profile:
        from edgecl.formats.config import DeviceProfile
        known = {f.name for f in dataclasses.fields(DeviceProfile)}
        spec.profile = DeviceProfile(**{k: v for k, v in manifest.device_profile.items() if k in known})
    write_bundle(spec, out_dir)
    recipe_weights = str(out_dir / RECIPE_WEIGHTS) if (out_dir / RECIPE_WEIGHTS).exists() else ""
    diff = _output_diff(out_dir, model, manifest)
    return ApplyReport(bundle_dir=str(out_dir), version=manifest.version + 1, deltas=1,
                       changed_elements=int(np.count_nonzero(vector)), classes=list(prototypes.classes),
                       max_abs_output_diff=diff, remasked=data_dir is not None, recipe_weights=recipe_weights)


def _output_diff(new_dir: Path, model: torch.nn.Module, manifest: mf.BundleManifest) -> float:
    """Max |embedding(new bundle's graph) - embedding(torch model with the patched weights)|."""
    from edgecl.formats.images import normalize
    h, w = manifest.input_size
    pixels = np.random.default_rng(0).integers(0, 256, (8, h, w, 3)).astype(np.uint8)
    new = embed_with_onnx(new_dir / mf.INFERENCE_MODEL, pixels, manifest.mean, manifest.std, manifest.embedding_dim)
    with torch.no_grad():
        ref = model(torch.from_numpy(normalize(pixels, manifest.mean, manifest.std))).numpy()
    return float(np.abs(new - ref).max())
