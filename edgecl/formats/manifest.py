"""``manifest.json``: everything a device needs to use a bundle without the host's code.

A bundle is a folder (see docs/bundle-format.md). The manifest pins the exact base weights and mask
by sha256 so deltas made on devices can be matched to the bundle they came from.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecl.errors import BundleError
from edgecl.formats.atomic import atomic_write_json

# 2: one standard-ONNX training-step graph for plain onnxruntime (train_step.onnx) replaced the
#    onnxruntime-training artifacts (training_model.onnx, eval_model.onnx, checkpoint).
FORMAT_VERSION = 2

MANIFEST = "manifest.json"
TRAIN_STEP = "train_step.onnx"          # (images, labels, row_weight, delta, proj_weight, proj_bias) -> loss, grads
INFERENCE_MODEL = "inference.onnx"      # (images, prototypes) -> embeddings, logits; weights are initializers
WEIGHTS = "weights.safetensors"         # base weights W0 by parameter name (the device patches masked ones)
HEAD_INIT = "head.safetensors"          # initial projection head: proj.weight [P, D], proj.bias [P]
MASK = "mask.safetensors"
PROTOTYPES = "prototypes.safetensors"
EXEMPLARS = "exemplars.safetensors"     # optional: a few images per calibration class (export --exemplars-per-class)
OVERLAP = "overlap.safetensors"         # optional: how often each element was updated in earlier rounds (all of them)
REQUIRED_FILES = (MANIFEST, TRAIN_STEP, INFERENCE_MODEL, WEIGHTS, HEAD_INIT, MASK, PROTOTYPES)

# Names of the trainable tensors (device state files, the step graph's inputs map onto them).
DELTA_PARAM = "edgecl_delta"
PROJ_WEIGHT = "proj.weight"
PROJ_BIAS = "proj.bias"

# train_step.onnx I/O (docs/bundle-format.md)
STEP_INPUTS = ("images", "labels", "row_weight", "delta", "proj_weight", "proj_bias")
STEP_OUTPUTS = ("loss", "grad_delta", "grad_proj_weight", "grad_proj_bias")


@dataclass
class BundleManifest:
    bundle_id: str                       # stable id of this bundle lineage (same across versions)
    version: int                         # 1 at export; +1 for each merged/applied version
    model_name: str                      # recipe name, e.g. "efficientnet_lite0"
    input_size: list[int]                # [H, W] the device resizes to
    mean: list[float]                    # per-channel normalisation mean (RGB)
    std: list[float]                     # per-channel normalisation std (RGB)
    embedding_dim: int                   # D: pooled feature size
    proj_dim: int                        # P: projection head size for the MI loss (128)
    total_params: int                    # parameters of the exported embedding model
    selected: int                        # K: trainable elements (length of the delta vector)
    select_rate: float                   # requested share of all parameters
    drop_rate: float                     # probability that a selected element's gradient is dropped per step
    base_sha256: str                     # sha256 of the base weights (canonical safetensors bytes)
    mask_sha256: str                     # sha256 of mask.safetensors
    loss_temperature: float = 0.07       # SupCon temperature (METHOD.md step 1)
    lr_backbone: float = 1e-3            # SGD lr on the delta (truly sparse: no momentum)
    lr_head: float = 1e-2                # SGD lr on the projection head
    weight_decay: float = 0.0            # applied only to gated elements (never moves others)
    overlap_decay: float = 0.9           # gradient scale 0.9 ** overlap (METHOD.md step 2)
    batch_size: int = 32                 # images per step (each gives two views); the step graph's
                                         # fixed row count is 2 * batch_size, a smaller batch is padded
    epochs: int = 5                      # default epochs for `edgecl adapt`
    seed: int = 1993
    mask_policy: str = "no-depthwise"    # which tensors the mask may select: "all" or "no-depthwise"
    interpolation: str = "bilinear"
    classes: list[str] = field(default_factory=list)   # classes with prototypes at export time
    recipe: dict[str, Any] = field(default_factory=dict)
    device_profile: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    versions: dict[str, str] = field(default_factory=dict)  # library versions used to export
    created_utc: str = ""
    parent_sha256: str = ""              # manifest sha256 of the bundle this version was made from
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> BundleManifest:
        version = int(obj.get("format_version", 0))
        if version > FORMAT_VERSION:
            raise BundleError(f"bundle format version {version} is newer than this edgecl supports ({FORMAT_VERSION})",
                              "upgrade edgecl on this device")
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
                   and f.name not in obj]
        if missing:
            raise BundleError(f"manifest.json lacks {', '.join(missing)}", "re-export the bundle")
        return cls(**{k: v for k, v in obj.items() if k in known})

    def save(self, bundle_dir: str | Path) -> None:
        atomic_write_json(Path(bundle_dir) / MANIFEST, self.to_json())


def load_manifest(bundle_dir: str | Path) -> BundleManifest:
    path = Path(bundle_dir) / MANIFEST
    if not Path(bundle_dir).is_dir():
        raise BundleError(f"{bundle_dir} is not a bundle folder", "pass the folder written by `edgecl export`")
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise BundleError(f"{path} is missing", "pass the folder written by `edgecl export`") from exc
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path} is unreadable ({exc})", "re-copy the bundle from the host") from exc
    return BundleManifest.from_json(obj)


def check_bundle_files(bundle_dir: str | Path, names: tuple[str, ...] = REQUIRED_FILES) -> None:
    missing = [n for n in names if not (Path(bundle_dir) / n).exists()]
    if missing:
        raise BundleError(f"bundle {bundle_dir} is missing {', '.join(missing)}",
                          "re-copy the whole bundle folder from the host")
