"""`edgecl export`: MI-Fisher mask + the two graphs a device runs on plain onnxruntime.

Three parts, each usable alone (`edgecl apply` reuses the last two):

1. ``export_bundle``: recipe + calibration images -> folded embedding model -> MI-Fisher scores ->
   mask -> a ``BundleSpec`` (all values) -> ``write_bundle``.
2. ``build_graphs(model, mask, head, ...)``: `train_step.onnx` (the whole training step as standard
   ONNX, host/stepgraph.py) and `inference.onnx` (embeddings + cosine logits, the base weights as
   initializers named by parameter, so the device can override the masked ones), checked against
   torch.
3. ``write_bundle(spec, out_dir)``: graphs, weights, head, mask, prototypes, exemplars, overlap and
   the manifest, written in a temp folder and renamed into place (never a half-written bundle).
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import platform
import tempfile
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgecl import __version__
from edgecl.errors import ConfigError, DataError, ExportError
from edgecl.formats import manifest as mf
from edgecl.formats.atomic import atomic_dir
from edgecl.formats.calibration import CALIBRATION_FILE, calibrate_leave_one_out
from edgecl.formats.config import Check, DeviceProfile, Recipe, load_profile, load_recipe
from edgecl.formats.exemplars import ExemplarMemory
from edgecl.formats.hashing import sha256_file
from edgecl.formats.images import load_image_folder, normalize, scan_image_folder
from edgecl.formats.mask import Mask, Overlap, overlap_to_bytes
from edgecl.formats.prototypes import Prototypes, image_fingerprints
from edgecl.formats.weights import save_weights, weights_sha256
from edgecl.host.loss import l2_normalize
from edgecl.host.masking import depthwise_weight_names, select_mask
from edgecl.host.model import build_embedding_model
from edgecl.host.scoring import mi_fisher_scores
from edgecl.progress import phase, phases

INFERENCE_OPSET = 17
ORT_MAX_IR_VERSION = 10              # onnxruntime 1.19 refuses newer IR versions
EXPORT_PHASES = 7                    # the phases export_bundle announces (edgecl.progress.phase calls)
MASK_POLICIES = ("no-depthwise", "all")


@dataclass
class ExportOptions:
    """The device defaults come from manifest.py (DEFAULT_*), held there once for host and device."""
    select_rate: float = 0.05            # share of all parameters made trainable
    drop_rate: float = 0.9               # per-step probability that a selected gradient is dropped
    mask_policy: str = mf.DEFAULT_MASK_POLICY  # "all" tensors, or depthwise conv weights kept constant (faster step)
    seed: int = mf.DEFAULT_SEED          # shuffling, augmentation, projection head init
    batch_size: int = mf.DEFAULT_BATCH_SIZE  # images per scoring batch and per device step (two views each)
    temperature: float = mf.DEFAULT_LOSS_TEMPERATURE  # SupCon temperature
    lr_backbone: float = mf.DEFAULT_LR_BACKBONE  # device default lr on the delta (validated on B1, docs/benchmarks.md)
    lr_head: float = mf.DEFAULT_LR_HEAD  # device default lr on the projection head
    epochs: int = mf.DEFAULT_EPOCHS      # device default epochs (validated on B1 + B6, docs/benchmarks.md)
    overwrite: bool = False              # replace an existing output folder
    overlap_path: str | None = None      # overlap history from earlier rounds (overlap.safetensors / `edgecl merge`)
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
    preprocessing: dict[str, str] = field(default_factory=dict)  # input_size/mean/std/interpolation -> recipe|timm|default


@dataclass
class BundleSpec:
    """Everything a bundle holds, as values. ``write_bundle`` turns it into files."""
    recipe: Recipe
    model: nn.Module                     # folded embedding model holding the base weights W0
    mask: Mask
    head: nn.Linear                      # initial projection head of the MI loss
    prototypes: Prototypes
    options: ExportOptions               # the device defaults stamped into the manifest
    profile: DeviceProfile | None = None
    exemplars: ExemplarMemory | None = None
    overlap: Overlap | None = None       # the whole update history (apply), not only the mask's elements
    bundle_id: str = ""
    version: int = 1
    parent_sha256: str = ""
    recipe_weights: bool = False         # also write recipe_weights.safetensors (stock timm layout; `apply`)
    calibration: dict | None = None      # unknown threshold + ncm temperature of the prototypes (calibration.json)


RECIPE_WEIGHTS = mf.RECIPE_WEIGHTS
# Written into the bundle and kept on the server, never sent to devices: the stock-layout weights,
# and the overlap history, which only the next `edgecl apply` reads (the device scales its
# gradients by the counts the mask carries).
SERVER_ONLY = (mf.RECIPE_WEIGHTS, mf.OVERLAP)


# -- graphs ----------------------------------------------------------------------------------------

class _InferenceGraph(nn.Module):
    """images, prototypes -> raw embeddings, cosine logits."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor, prototypes: torch.Tensor):  # noqa: ANN201
        emb = self.backbone(images)
        return emb, l2_normalize(emb) @ l2_normalize(prototypes).t()


def _export_inference(model: nn.Module, input_size: list[int], dim: int, path: Path) -> None:
    """TorchScript export (names survive it); the parameters become external data in weights.safetensors.

    The file beside ``path`` named weights.safetensors must already hold the model's weights
    (formats/weights.py). Each parameter initializer points into it at its tensor's offset, so the
    bundle holds W0 once and the device patches the masked tensors in memory: onnxruntime's
    ``add_external_initializers_from_files_in_memory`` then feeds the patched bytes to every
    optimizer, NCHWc included (overriding initializers with ``add_initializer`` is ignored by the
    x86 NCHWc transformer: measured, most patched convolutions silently ran W0).
    """
    from onnx import TensorProto

    from edgecl.formats.weights import tensor_offsets
    from edgecl.host.stepgraph import point_to_external  # the train step's graph points the same way

    h, w = input_size
    work = path.with_name(path.name + ".raw")
    # keep_initializers_as_inputs + no constant folding: every parameter stays its own named
    # initializer (the exporter would otherwise merge equal-valued ones, e.g. LayerNorm weights at init).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_InferenceGraph(model).eval(), (torch.randn(2, 3, h, w), torch.randn(3, dim)), str(work),
                          dynamo=False, opset_version=INFERENCE_OPSET, input_names=["images", "prototypes"],
                          output_names=["embeddings", "logits"], keep_initializers_as_inputs=True,
                          do_constant_folding=False, export_params=True,
                          dynamic_axes={"images": {0: "batch"}, "prototypes": {0: "classes"},
                                        "embeddings": {0: "batch"}, "logits": {0: "batch", 1: "classes"}})
    graph_model = onnx.load(str(work))
    work.unlink()
    renames = {i.name: i.name[len("backbone."):] for i in graph_model.graph.initializer
               if i.name.startswith("backbone.")}
    for node in graph_model.graph.node:
        node.input[:] = [renames.get(x, x) for x in node.input]
    kept = [i for i in graph_model.graph.input if i.name in ("images", "prototypes")]
    del graph_model.graph.input[:]
    graph_model.graph.input.extend(kept)
    graph_model.ir_version = min(graph_model.ir_version, ORT_MAX_IR_VERSION)
    params = dict(model.named_parameters())
    offsets = tensor_offsets((path.parent / mf.WEIGHTS).read_bytes())
    seen = set()
    for init in graph_model.graph.initializer:
        init.name = renames.get(init.name, init.name)
        if init.name not in params:
            continue  # buffers and constants stay inside the graph
        if init.data_type != TensorProto.FLOAT or tuple(init.dims) != tuple(params[init.name].shape):
            raise ExportError(f"the inference graph's {init.name} is not the float32 parameter it names",
                              "report this with the recipe")
        point_to_external(init, mf.WEIGHTS, *offsets[init.name])
        seen.add(init.name)
    missing = [n for n in params if n not in seen]
    if missing:
        raise ExportError(f"the inference graph lost the name of weight {missing[0]}", "report this with the recipe")
    onnx.save(graph_model, str(path))


def embed_with_onnx(path: Path, pixels: np.ndarray, mean: list[float], std: list[float], dim: int,
                    batch: int = 64) -> np.ndarray:
    """Embeddings from an exported inference graph (what the device computes at a zero delta)."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    dummy = np.ones((1, dim), np.float32)
    out = [sess.run(["embeddings"], {"images": normalize(pixels[i:i + batch], mean, std), "prototypes": dummy})[0]
           for i in range(0, len(pixels), batch)]
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


def build_graphs(model: nn.Module, mask: Mask, head: nn.Linear, temperature: float, rows: int,
                 recipe: Recipe, out: Path, progress: bool = True) -> None:
    """Write `train_step.onnx` and `inference.onnx` into ``out``, each checked against torch."""
    from edgecl.host.stepgraph import export_train_step  # the dynamo exporter loads slowly: only here
    from edgecl.progress import progress_bar

    dim = int(head.in_features)
    bar = progress_bar(2, "export graphs", enabled=progress)
    try:
        h, w = recipe.input_size
        phase("building the training step graph (forward + backward)", progress)
        # weights.safetensors is written first: both graphs read W0 from it (external data).
        export_train_step(model, mask, head, temperature, rows, (int(h), int(w)), out / mf.TRAIN_STEP,
                          weights=out / mf.WEIGHTS)
        bar.update(1)
        phase("building the inference graph and checking it against torch", progress)
        _export_inference(model, list(recipe.input_size), dim, out / mf.INFERENCE_MODEL)
        bar.update(1)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ExportError(f"the disk is full while writing the bundle graphs to {out}",
                              "free disk space (a bundle needs about 3x the model's fp32 size) and export again") from exc
        raise
    finally:
        bar.close()
    h, w = recipe.input_size
    pixels = np.random.default_rng(0).integers(0, 256, (8, h, w, 3)).astype(np.uint8)
    emb = embed_with_onnx(out / mf.INFERENCE_MODEL, pixels, recipe.mean, recipe.std, dim)
    with torch.no_grad():
        ref = model(torch.from_numpy(normalize(pixels, recipe.mean, recipe.std))).numpy()
    if not np.allclose(emb, ref, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(ref).max()))):
        raise ExportError("the exported inference graph disagrees with the torch model", "report this with the recipe")


# -- the bundle ------------------------------------------------------------------------------------

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


def base_weights(model: nn.Module) -> dict[str, np.ndarray]:
    return {n: p.detach().cpu().numpy().astype(np.float32) for n, p in model.named_parameters()}


def write_bundle(spec: BundleSpec, out_dir: str | Path) -> ExportReport:
    """Write the bundle ``spec`` describes, atomically (temp folder + rename)."""
    out_dir = Path(out_dir)
    opts, recipe, mask = spec.options, spec.recipe, spec.mask
    if out_dir.exists() and not opts.overwrite:
        raise ExportError(f"{out_dir} already exists", "pass --overwrite or choose another output folder")
    weights = base_weights(spec.model)
    batch = spec.profile.batch_size if spec.profile else opts.batch_size
    with atomic_dir(out_dir, overwrite=opts.overwrite) as tmp:
        save_weights(tmp / mf.WEIGHTS, weights)  # first: inference.onnx points into it
        build_graphs(spec.model, mask, spec.head, opts.temperature, 2 * batch, recipe, tmp, opts.progress)
        save_weights(tmp / mf.HEAD_INIT, {mf.PROJ_WEIGHT: spec.head.weight.detach().numpy(),
                                   mf.PROJ_BIAS: spec.head.bias.detach().numpy()})
        phase("writing the mask, prototypes, exemplars and manifest", opts.progress)
        mask.save_file(tmp / mf.MASK)
        spec.prototypes.save_file(tmp / mf.PROTOTYPES)
        if spec.exemplars is not None and len(spec.exemplars.classes):
            spec.exemplars.save_file(tmp / mf.EXEMPLARS)
        if spec.overlap:
            (tmp / mf.OVERLAP).write_bytes(overlap_to_bytes(spec.overlap))
        if spec.calibration is not None:
            (tmp / CALIBRATION_FILE).write_text(json.dumps(spec.calibration, indent=2, sort_keys=True) + "\n")
        if spec.recipe_weights and recipe.timm_model:
            # Before the manifest: listed (signed) in `server_files`, so the server keeps it for the
            # host and devices never download it (they run weights.safetensors).
            from edgecl.host.unfold import write_recipe_weights
            write_recipe_weights(weights, recipe, tmp / RECIPE_WEIGHTS)
        stored = {p.name: (sha256_file(p), p.stat().st_size) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = mf.BundleManifest(
            bundle_id=spec.bundle_id or uuid.uuid4().hex, version=spec.version, model_name=recipe.name,
            input_size=list(recipe.input_size), mean=list(recipe.mean), std=list(recipe.std),
            embedding_dim=int(spec.head.in_features), proj_dim=int(spec.head.out_features),
            total_params=mask.total_params, selected=mask.total_selected, select_rate=opts.select_rate,
            drop_rate=opts.drop_rate, base_sha256=weights_sha256(weights), mask_sha256=sha256_file(tmp / mf.MASK),
            loss_temperature=opts.temperature, lr_backbone=opts.lr_backbone, lr_head=opts.lr_head,
            batch_size=batch, epochs=opts.epochs, seed=opts.seed, mask_policy=opts.mask_policy,
            interpolation=recipe.interpolation, classes=list(spec.prototypes.classes),
            recipe={k: v for k, v in asdict(recipe).items() if k != "source"},
            device_profile=asdict(spec.profile) if spec.profile else {},
            files={n: sha for n, (sha, _) in stored.items() if n not in SERVER_ONLY},
            server_files={n: sha for n, (sha, _) in stored.items() if n in SERVER_ONLY},
            sizes={n: size for n, (_, size) in stored.items()},
            versions=_library_versions(),
            created_utc=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            parent_sha256=spec.parent_sha256,
        )
        manifest.save(tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
    return ExportReport(bundle_dir=str(out_dir), model_name=recipe.name, total_params=mask.total_params,
                        selected=mask.total_selected, selected_fraction=mask.selected_fraction,
                        classes=list(spec.prototypes.classes), images_used=0, images_skipped=0, files=files)


def class_prototypes(embeddings: np.ndarray, labels: np.ndarray, classes: list[str],
                     pixels: np.ndarray | None = None) -> Prototypes:
    """Mean embedding per class; with ``pixels``, the images are also recorded as counted (seen)."""
    protos = Prototypes.empty(embeddings.shape[1])
    for i, name in enumerate(classes):
        rows = embeddings[labels == i]
        if len(rows):
            protos.upsert(name, rows.mean(0), len(rows))
            if pixels is not None:
                protos.mark_seen(name, image_fingerprints(pixels[labels == i]))
    return protos


# ExportOptions field -> (the manifest field it is stamped into, the `edgecl export` flag that sets it).
_STAMPED = {"select_rate": ("select_rate", "--select-rate"), "drop_rate": ("drop_rate", "--drop-rate"),
            "mask_policy": ("mask_policy", "--mask-policy"), "seed": ("seed", "--seed"),
            "batch_size": ("batch_size", "batch_size"), "temperature": ("loss_temperature", "temperature"),
            "lr_backbone": ("lr_backbone", "--lr"), "lr_head": ("lr_head", "lr_head"), "epochs": ("epochs", "--epochs")}
_HOST_ONLY = {"exemplars_per_class": (Check(low=0), "--exemplars-per-class")}


def check_options(opts: ExportOptions) -> None:
    """Refuse, before anything is written, an option the device would refuse in the manifest.

    The ranges are the device's own (manifest.MANIFEST_CHECKS via value_problems): a bundle that
    every device refuses (`--lr nan`, `--epochs -1`) is never written."""
    problems = []
    for name, (key, flag) in _STAMPED.items():
        value = getattr(opts, name)
        problems += [f"{flag}{p.removeprefix(key)}" for p in mf.value_problems({key: value})]
    for name, (check, flag) in _HOST_ONLY.items():
        problem = check.problem(getattr(opts, name))
        if problem:
            problems.append(f"{flag} {problem}")
    if problems:
        defaults = ExportOptions()
        examples = [f"{flag} {getattr(defaults, name)}" for name, (_, flag) in (*_STAMPED.items(), *_HOST_ONLY.items())
                    if any(p.startswith(f"{flag} ") for p in problems) and flag.startswith("--")]
        raise ConfigError(f"export option {'; '.join(problems)}",
                          f"pass values a device accepts{' (e.g. ' + ', '.join(examples) + ')' if examples else ''}")


def select_for_policy(model: nn.Module, scores: dict[str, np.ndarray], opts: ExportOptions,
                      overlap: Overlap | None = None) -> Mask:
    exclude = depthwise_weight_names(model) if opts.mask_policy == "no-depthwise" else set()
    return select_mask(scores, opts.select_rate, overlap, exclude=frozenset(exclude))


def export_bundle(recipe: Recipe | str | Path, data_dir: str | Path, out_dir: str | Path,
                  profile: DeviceProfile | str | Path | None = None,
                  options: ExportOptions | None = None) -> ExportReport:
    """Score, mask and write a new bundle (version 1 of a new lineage) from calibration images."""
    opts = options or ExportOptions()
    check_options(opts)
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if profile is not None and not isinstance(profile, DeviceProfile):
        profile = load_profile(profile)
    sources: dict[str, str] = {}
    if recipe.preprocess == "timm":
        from edgecl.host.model import create_model, resolve_preprocessing
        recipe, sources = resolve_preprocessing(recipe, create_model(recipe))
    if profile is not None and profile.image_size:
        recipe.input_size = list(profile.image_size)
        sources["input_size"] = "device profile"
    if Path(out_dir).exists() and not opts.overwrite:
        raise ExportError(f"{out_dir} already exists", "pass --overwrite or choose another output folder")
    scan_image_folder(data_dir)  # cheap layout checks before the slow decode
    with phases(EXPORT_PHASES, "export", enabled=opts.progress) as phase_:
        phase_("decoding the calibration images")
        torch.manual_seed(opts.seed)
        model = build_embedding_model(recipe)
        images = load_image_folder(data_dir, recipe.input_size, recipe.interpolation, progress=opts.progress,
                                   desc="decode calibration images")
        if len(images.classes) < 2:
            raise DataError(f"calibration folder {data_dir} has {len(images.classes)} class(es) with images",
                            "the MI loss needs at least two classes: add a sub-folder per class")
        dim = int(model(torch.zeros(1, 3, *recipe.input_size)).shape[1])
        head = nn.Linear(dim, recipe.proj_dim)  # seeded above: the same head init for a given seed

        from edgecl.host.loss import ProjectionHead
        scorer = ProjectionHead(dim, recipe.proj_dim)
        scorer.proj.load_state_dict(head.state_dict())
        phase_("scoring every weight (MI-Fisher)")
        scores = mi_fisher_scores(model, scorer, images.pixels, images.labels, recipe.mean, recipe.std,
                                  batch_size=opts.batch_size, temperature=opts.temperature, seed=opts.seed,
                                  interpolation=recipe.interpolation, progress=opts.progress)
        phase_("choosing the mask")
        history = None
        if opts.overlap_path:
            from edgecl.formats.overlap import OverlapHistory
            try:
                history = OverlapHistory.from_bytes(Path(opts.overlap_path).read_bytes())
            except Exception as exc:
                raise ConfigError(f"cannot read overlap counts {opts.overlap_path} ({type(exc).__name__}: {exc})",
                                  "pass the overlap file written by `edgecl merge` or a bundle's overlap.safetensors") from exc
        mask = select_for_policy(model, scores, opts, history.counts if history else None)
        if history:
            mask = history.with_counts(mask)

        # Prototypes and exemplars from the embeddings the device will compute (the exported graph).
        phase_("embedding the calibration images (prototypes, exemplars)")
        with tempfile.TemporaryDirectory() as work:
            infer = Path(work) / mf.INFERENCE_MODEL
            save_weights(Path(work) / mf.WEIGHTS, base_weights(model))
            _export_inference(model, list(recipe.input_size), dim, infer)
            emb = embed_with_onnx(infer, images.pixels, recipe.mean, recipe.std, dim)
        prototypes = class_prototypes(emb, images.labels, images.classes, images.pixels)
        ship_images = opts.exemplars_per_class > 0 and (profile is None or profile.store_images)
        exemplars = None
        if ship_images:
            # A few calibration images per class (herding on the embeddings) let the device replay the
            # old classes and move their prototypes when it moves the backbone (docs/device.md).
            exemplars = ExemplarMemory.empty((int(recipe.input_size[0]), int(recipe.input_size[1]))).update(
                {name: (images.pixels[images.labels == i], emb[images.labels == i])
                 for i, name in enumerate(images.classes)},
                budget_bytes=1 << 62, max_per_class=opts.exemplars_per_class)
        # Each image scored as if held out of its class's prototype (exact, costs no image): the device's
        # unknown threshold and ncm temperature until its first adapt calibrates the LDA statistics.
        calibration = calibrate_leave_one_out(emb, images.labels) if np.bincount(images.labels).min() >= 2 else None
        spec = BundleSpec(recipe=recipe, model=model, mask=mask, head=head, prototypes=prototypes, options=opts,
                          profile=profile, exemplars=exemplars, overlap=history.counts if history else None,
                          calibration=calibration)
        report = write_bundle(spec, out_dir)
        report.images_used, report.images_skipped = len(images.labels), len(images.skipped)
        report.preprocessing = sources
        return report


__all__ = ["BundleSpec", "ExportOptions", "ExportReport", "build_graphs", "class_prototypes", "embed_with_onnx",
           "export_bundle", "select_for_policy", "write_bundle"]
