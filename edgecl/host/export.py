"""`edgecl export`: MI-Fisher mask + sparse trainable onnxruntime-training bundle.

Recipe, calibration images -> folded embedding model -> MI-Fisher scores -> mask -> sparse
reparameterisation -> ONNX (TorchScript exporter, opset 17) -> onnxruntime-training artifacts,
plus an inference graph, the calibration classes' prototypes and the manifest. Everything is
written in a temp folder and renamed into place at the end (never a half-written bundle).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import sys
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from safetensors.numpy import save as st_save
from torch import nn

from edgecl import __version__
from edgecl.errors import ConfigError, DataError, ExportError
from edgecl.formats import manifest as mf
from edgecl.formats.atomic import atomic_dir
from edgecl.formats.config import DeviceProfile, Recipe, load_profile, load_recipe
from edgecl.formats.exemplars import ExemplarMemory
from edgecl.formats.hashing import sha256_bytes, sha256_file
from edgecl.formats.images import load_image_folder, normalize, scan_image_folder
from edgecl.formats.mask import Mask, overlap_from_bytes, overlap_to_bytes
from edgecl.formats.prototypes import Prototypes
from edgecl.host.loss import l2_normalize, supcon_loss
from edgecl.host.masking import select_mask
from edgecl.host.model import build_embedding_model
from edgecl.host.scoring import mi_fisher_scores
from edgecl.host.sparse import DeltaSource, attach_sparse_delta, original_name

OPSET = 17
ORT_MAX_IR_VERSION = 10
WEIGHTS = "weights.safetensors"  # patched base weights, written by `edgecl apply`  # onnxruntime(-training) 1.19.2 refuses newer IR versions


@dataclass
class ExportOptions:
    select_rate: float = 0.05            # share of all parameters made trainable
    drop_rate: float = 0.9               # per-step probability that a selected gradient is dropped
    seed: int = 1993                     # shuffling, augmentation, projection head init
    batch_size: int = 32                 # images per scoring batch (two views each)
    temperature: float = 0.07            # SupCon temperature
    lr_backbone: float = 1e-3            # device default lr on the delta
    lr_head: float = 1e-2                # device default lr on the projection head
    epochs: int = 5                      # device default epochs
    overwrite: bool = False              # replace an existing output folder
    overlap_path: str | None = None      # overlap counts from earlier rounds (edgecl merge)
    exemplars_per_class: int = 20        # calibration images shipped per class (herding); 0 = ship no images
    progress: bool = True


@dataclass
class ExportReport:
    bundle_dir: str
    model_name: str
    total_params: int
    selected: int
    selected_fraction: float
    classes: list[str]
    images_used: int
    images_skipped: int
    files: dict[str, int] = field(default_factory=dict)  # name -> bytes


class _TrainGraph(nn.Module):
    """images [2B,3,H,W], labels [2B] -> SupCon loss; trainable: edgecl_delta, proj.*"""

    def __init__(self, backbone: nn.Module, source: DeltaSource, proj: nn.Linear, temperature: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.proj = proj
        self.edgecl_delta = nn.Parameter(torch.zeros(source.current.shape[0]))
        self._source = [source]
        self.temperature = temperature

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self._source[0].current = self.edgecl_delta
        z = l2_normalize(self.proj(self.backbone(images)))
        return supcon_loss(z, labels, self.temperature)


class _InferenceGraph(nn.Module):
    """images, delta, prototypes -> raw embeddings, cosine logits."""

    def __init__(self, backbone: nn.Module, source: DeltaSource) -> None:
        super().__init__()
        self.backbone = backbone
        self._source = [source]

    def forward(self, images: torch.Tensor, delta: torch.Tensor, prototypes: torch.Tensor):  # noqa: ANN201
        self._source[0].current = delta
        emb = self.backbone(images)
        return emb, l2_normalize(emb) @ l2_normalize(prototypes).t()


def _onnx_export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
                 dynamic_axes: dict) -> onnx.ModelProto:
    # TorchScript exporter (dynamo=False): the dynamo exporter renames/folds weights so the mask
    # cannot be mapped, and emits CastLike, which has no gradient in ORT 1.19.2 (DESIGN.md).
    # keep_initializers_as_inputs=True stops the exporter from merging initializers with equal
    # values (e.g. all LayerNorm weights at init) and from constant-folding them; we drop the
    # inputs again below.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSET,
                          input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                          keep_initializers_as_inputs=True, do_constant_folding=False,
                          export_params=True)
    model = onnx.load(str(path))
    init_names = {i.name for i in model.graph.initializer}
    kept = [i for i in model.graph.input if i.name not in init_names]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    _declare_layernorm_outputs(model)
    if model.ir_version > ORT_MAX_IR_VERSION:
        model.ir_version = ORT_MAX_IR_VERSION
    return model


def _declare_layernorm_outputs(model: onnx.ModelProto) -> None:
    """Give LayerNormalization its optional Mean/InvStdDev outputs (onnxruntime issue 19427):
    without them the gradient builder asserts."""
    for i, node in enumerate(model.graph.node):
        if node.op_type == "LayerNormalization" and len(node.output) == 1:
            base = node.name or f"layernorm_{i}"
            node.output.extend([f"{base}_mean", f"{base}_inv_std_dev"])


def base_weights(model: nn.Module) -> dict[str, np.ndarray]:
    return {n: p.detach().cpu().numpy().astype(np.float32) for n, p in model.named_parameters()}


def base_weights_sha256(weights: dict[str, np.ndarray]) -> str:
    """sha256 of the canonical safetensors bytes of the base weights (keys sorted by safetensors)."""
    return sha256_bytes(st_save({k: np.ascontiguousarray(v) for k, v in weights.items()}))


def _library_versions() -> dict[str, str]:
    import onnxruntime
    versions = {"edgecl": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}
    try:
        import timm
        versions["timm"] = timm.__version__
    except ImportError:
        pass
    return versions


def _write_artifacts(train_model: onnx.ModelProto, trainable: list[str], out: Path) -> None:
    # Imported here: onnxruntime.training pulls in torch, which only the host has.
    from onnxruntime.training import artifacts
    frozen = [i.name for i in train_model.graph.initializer
              if i.name not in trainable and i.data_type == onnx.TensorProto.FLOAT
]
    # The gradient builder logs every graph transformation at INFO level from C++, straight to
    # fd 2; keep it out of the user's terminal and show it only if generation fails.
    with warnings.catch_warnings(), _captured_stderr() as log:
        warnings.simplefilter("ignore")
        try:
            artifacts.generate_artifacts(train_model, requires_grad=trainable, frozen_params=frozen,
                                         loss=None, optimizer=None, artifact_directory=str(out))
        except Exception as exc:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise ExportError(f"onnxruntime-training could not build the gradient graph ({exc})",
                              f"report this with the recipe; log tail: {tail!r}") from exc
    for name in ("training_model.onnx", "eval_model.onnx", "checkpoint"):
        if not (out / name).exists():
            raise ExportError(f"onnxruntime-training did not write {name}", "report this with the recipe")


@contextlib.contextmanager
def _captured_stderr() -> Iterator[Path]:
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.NamedTemporaryFile(prefix="edgecl-ort-", suffix=".log", delete=False) as f:
        log = Path(f.name)
    fd = os.open(log, os.O_WRONLY)
    try:
        os.dup2(fd, 2)
        yield log
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(fd)
        os.close(saved)
        log.unlink(missing_ok=True)


def _embed_with_onnx(path: Path, pixels: np.ndarray, mean: list[float], std: list[float], k: int,
                     dim: int, batch: int = 64) -> np.ndarray:
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    delta = np.zeros(k, np.float32)
    dummy = np.ones((1, dim), np.float32)
    out = [sess.run(["embeddings"], {"images": normalize(pixels[i:i + batch], mean, std), "delta": delta,
                                     "prototypes": dummy})[0] for i in range(0, len(pixels), batch)]
    return np.concatenate(out)


def _refresh_from_exemplars(prototypes: Prototypes, exemplars: ExemplarMemory, inference: Path, recipe: Recipe,
                            k: int, dim: int) -> Prototypes:
    out = Prototypes(list(prototypes.classes), prototypes.means.copy(), prototypes.counts.copy())
    emb = _embed_with_onnx(inference, exemplars.pixels, recipe.mean, recipe.std, k, dim)
    for i, name in enumerate(exemplars.classes):
        rows = emb[exemplars.labels == i]
        if len(rows):
            count = int(out.counts[out.classes.index(name)]) if name in out.classes else len(rows)
            out.upsert(name, rows.mean(0), count)
    return out


def class_prototypes(embeddings: np.ndarray, labels: np.ndarray, classes: list[str]) -> Prototypes:
    protos = Prototypes.empty(embeddings.shape[1])
    for i, name in enumerate(classes):
        rows = embeddings[labels == i]
        if len(rows):
            protos.upsert(name, rows.mean(0), len(rows))
    return protos


def export_bundle(recipe: Recipe | str | Path, data_dir: str | Path | None, out_dir: str | Path,
                  profile: DeviceProfile | str | Path | None = None, options: ExportOptions | None = None,
                  weights_override: dict[str, np.ndarray] | None = None, bundle_id: str | None = None,
                  version: int = 1, parent_sha256: str = "", mask: Mask | None = None,
                  prototypes: Prototypes | None = None, exemplars: ExemplarMemory | None = None) -> ExportReport:
    """Export a bundle.

    `edgecl apply` passes ``weights_override`` (the patched base weights), and either calibration
    data (a fresh MI-Fisher mask) or ``mask`` + ``prototypes`` (keep the mask; no data needed).
    """
    opts = options or ExportOptions()
    if not 0.0 < opts.select_rate <= 1.0:
        raise ConfigError(f"select rate {opts.select_rate} is outside (0, 1]", "pass e.g. --select-rate 0.05")
    if not 0.0 <= opts.drop_rate < 1.0:
        raise ConfigError(f"drop rate {opts.drop_rate} is outside [0, 1)", "pass e.g. --drop-rate 0.9")
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if profile is not None and not isinstance(profile, DeviceProfile):
        profile = load_profile(profile)
    if profile is not None and profile.image_size:
        recipe.input_size = list(profile.image_size)
    out_dir = Path(out_dir)
    if out_dir.exists() and not opts.overwrite:
        raise ExportError(f"{out_dir} already exists", "pass --overwrite or choose another output folder")

    if data_dir is None and (mask is None or prototypes is None):
        raise ConfigError("no calibration data given", "pass --data DIR (an image folder with a sub-folder per class)")
    # Cheap checks first (folder layout, recipe, weights), then the slow decode.
    if data_dir is not None:
        scan_image_folder(data_dir)
    torch.manual_seed(opts.seed)
    model = build_embedding_model(recipe)
    images = None
    if data_dir is not None:
        images = load_image_folder(data_dir, recipe.input_size, recipe.interpolation, progress=opts.progress,
                                   desc="decode calibration images")
    if images is not None and len(images.classes) < 2:
        raise DataError(f"calibration folder {data_dir} has {len(images.classes)} class(es) with images",
                        "the MI loss needs at least two classes: add a sub-folder per class")
    if weights_override is not None:
        current = dict(model.named_parameters())
        missing = sorted(set(current) - set(weights_override))
        if missing:
            raise ExportError(f"patched weights lack {missing[0]}", "apply deltas to a bundle of this recipe")
        with torch.no_grad():
            for n, p in current.items():
                p.copy_(torch.from_numpy(np.asarray(weights_override[n], np.float32)).reshape(p.shape))
    weights = base_weights(model)
    dim = int(model(torch.zeros(1, 3, *recipe.input_size)).shape[1])
    head = nn.Linear(dim, recipe.proj_dim)  # seeded above: the same head init for a given seed

    from edgecl.host.loss import ProjectionHead
    scorer = ProjectionHead(dim, recipe.proj_dim)
    scorer.proj.load_state_dict(head.state_dict())
    overlap = None
    if opts.overlap_path:
        try:
            overlap = overlap_from_bytes(Path(opts.overlap_path).read_bytes())
        except Exception as exc:
            raise ConfigError(f"cannot read overlap counts {opts.overlap_path} ({exc})",
                              "pass the overlap file written by `edgecl merge`") from exc
    if mask is None:
        assert images is not None
        scores = mi_fisher_scores(model, scorer, images.pixels, images.labels, recipe.mean, recipe.std,
                                  batch_size=opts.batch_size, temperature=opts.temperature, seed=opts.seed,
                                  interpolation=recipe.interpolation, progress=opts.progress)
        mask = select_mask(scores, opts.select_rate, overlap)
    elif set(mask.order) - set(weights) or mask.total_params != sum(w.size for w in weights.values()):
        raise ExportError("the mask does not fit this model", "apply deltas to a bundle of the same recipe")

    with atomic_dir(out_dir, overwrite=opts.overwrite) as tmp, tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        source = attach_sparse_delta(model, mask)
        h, w = recipe.input_size
        n = 4
        example_images = torch.randn(n, 3, h, w)
        example_labels = torch.tensor([0, 1, 0, 1], dtype=torch.int64)
        train_graph = _TrainGraph(model, source, head, opts.temperature).eval()
        train_model = _onnx_export(train_graph, (example_images, example_labels), work_dir / "train_full.onnx",
                                   ["images", "labels"], ["loss"],
                                   {"images": {0: "batch"}, "labels": {0: "batch"}})
        trainable = [mf.DELTA_PARAM, mf.PROJ_WEIGHT, mf.PROJ_BIAS]
        present = {i.name for i in train_model.graph.initializer}
        if not set(trainable) <= present:
            raise ExportError(f"trainable tensors {sorted(set(trainable) - present)} are missing from the graph",
                              "report this with the recipe")
        _write_artifacts(train_model, trainable, tmp)

        infer_graph = _InferenceGraph(model, source).eval()
        infer_model = _onnx_export(
            infer_graph, (example_images, torch.zeros(mask.total_selected), torch.randn(3, dim)),
            work_dir / "inference.onnx", ["images", "delta", "prototypes"], ["embeddings", "logits"],
            {"images": {0: "batch"}, "prototypes": {0: "classes"}, "embeddings": {0: "batch"},
             "logits": {0: "batch", 1: "classes"}})
        onnx.save(infer_model, str(tmp / mf.INFERENCE_MODEL))
        _check_inference_names(infer_model, mask, weights)

        mask.save_file(tmp / mf.MASK)
        check_pixels = (images.pixels if images is not None else
                        np.random.default_rng(opts.seed).integers(0, 256, (8, h, w, 3)).astype(np.uint8))
        emb = _embed_with_onnx(tmp / mf.INFERENCE_MODEL, check_pixels, recipe.mean, recipe.std,
                               mask.total_selected, dim)
        with torch.no_grad():
            ref = model(torch.from_numpy(normalize(check_pixels[:8], recipe.mean, recipe.std))).numpy()
        if not np.allclose(emb[:8], ref, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(ref).max()))):
            raise ExportError("the exported inference graph disagrees with the torch model",
                              "report this with the recipe")
        if exemplars is None and images is not None and opts.exemplars_per_class > 0:
            # A few calibration images per class (herding on the embeddings) let the device
            # recompute these classes' prototypes after it moves the backbone (issue 6).
            exemplars = ExemplarMemory.empty(tuple(recipe.input_size)).update(
                {name: (images.pixels[images.labels == i], emb[images.labels == i])
                 for i, name in enumerate(images.classes)},
                budget_bytes=1 << 62, max_per_class=opts.exemplars_per_class)
        if prototypes is None:
            assert images is not None
            prototypes = class_prototypes(emb, images.labels, images.classes)
        elif exemplars is not None and len(exemplars.classes):
            # `edgecl apply`: the devices computed these classes' prototypes under their own
            # backbones; the host holds their exemplars, so re-embed them under the patched one.
            prototypes = _refresh_from_exemplars(prototypes, exemplars, tmp / mf.INFERENCE_MODEL, recipe,
                                                 mask.total_selected, dim)
        prototypes.save_file(tmp / mf.PROTOTYPES)
        if exemplars is not None and len(exemplars.classes):
            exemplars.save_file(tmp / mf.EXEMPLARS)
        if overlap:
            # The whole history, not only the new mask's elements: a later mask may pick them again.
            (tmp / mf.OVERLAP).write_bytes(overlap_to_bytes(overlap))
        if weights_override is not None:
            # `edgecl apply` output: the patched weights by parameter name, for any other runtime.
            (tmp / WEIGHTS).write_bytes(st_save({k: np.ascontiguousarray(v) for k, v in weights.items()}))

        manifest = mf.BundleManifest(
            bundle_id=bundle_id or uuid.uuid4().hex, version=version, model_name=recipe.name,
            input_size=list(recipe.input_size), mean=list(recipe.mean), std=list(recipe.std),
            embedding_dim=dim, proj_dim=recipe.proj_dim, total_params=mask.total_params,
            selected=mask.total_selected, select_rate=opts.select_rate, drop_rate=opts.drop_rate,
            base_sha256=base_weights_sha256(weights), mask_sha256=sha256_file(tmp / mf.MASK),
            loss_temperature=opts.temperature, lr_backbone=opts.lr_backbone, lr_head=opts.lr_head,
            batch_size=profile.batch_size if profile else opts.batch_size, epochs=opts.epochs, seed=opts.seed,
            interpolation=recipe.interpolation, classes=list(prototypes.classes),
            recipe={k: v for k, v in asdict(recipe).items() if k != "source"},
            device_profile=asdict(profile) if profile else {},
            files={p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()},
            versions=_library_versions(),
            created_utc=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            parent_sha256=parent_sha256,
        )
        manifest.save(tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
    return ExportReport(bundle_dir=str(out_dir), model_name=recipe.name, total_params=mask.total_params,
                        selected=mask.total_selected, selected_fraction=mask.selected_fraction,
                        classes=list(prototypes.classes), images_used=len(images.labels) if images else 0,
                        images_skipped=len(images.skipped) if images else 0, files=files)


def _check_inference_names(model: onnx.ModelProto, mask: Mask, weights: dict[str, np.ndarray]) -> None:
    """`apply` reads the base weights back from the inference graph by name: make sure it can."""
    names = {i.name for i in model.graph.initializer}
    missing = [n for n in weights if graph_weight_name(n, mask) not in names]
    if missing:
        raise ExportError(f"the inference graph lost the name of weight {missing[0]}", "report this with the recipe")


def read_base_weights(inference_path: str | Path, mask: Mask, names: list[str]) -> dict[str, np.ndarray]:
    """The base weights W0 stored in a bundle's inference graph, by parameter name."""
    from onnx import numpy_helper

    model = onnx.load(str(inference_path))
    inits = {i.name: i for i in model.graph.initializer}
    return {n: numpy_helper.to_array(inits[graph_weight_name(n, mask)]).astype(np.float32) for n in names}


def graph_weight_name(name: str, mask: Mask) -> str:
    """Initializer name of parameter ``name`` in the exported graphs (the backbone sits under `backbone.`)."""
    return "backbone." + (original_name(name) if name in mask.indices else name)


__all__ = ["ExportOptions", "ExportReport", "export_bundle", "read_base_weights", "base_weights_sha256",
           "class_prototypes"]
