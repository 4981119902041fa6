"""``manifest.json``: everything a device needs to use a bundle without the host's code.

A bundle is a folder (see docs/bundle-format.md). The manifest pins the exact base weights and mask
by sha256 so deltas made on devices can be matched to the bundle they came from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecl.errors import BundleError, ConfigError
from edgecl.formats.atomic import atomic_write_json
from edgecl.formats.config import INTERPOLATIONS, Check, check_values, profile_from_dict, required_fields

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
FLEET_SCATTER = "fleet_scatter.safetensors"  # optional: the released classes' pooled within-class scatter (LDA head)
OVERLAP = "overlap.safetensors"         # optional: how often each element was updated in earlier rounds (all of them)
REQUIRED_FILES = (MANIFEST, TRAIN_STEP, INFERENCE_MODEL, WEIGHTS, HEAD_INIT, MASK, PROTOTYPES)
# Stored with a version on the server for the host, never downloaded by a device (`server_files`).
RECIPE_WEIGHTS = "recipe_weights.safetensors"   # the weights in the recipe's own timm layout (`edgecl apply`)

# Names of the trainable tensors (device state files, the step graph's inputs map onto them).
DELTA_PARAM = "edgecl_delta"
PROJ_WEIGHT = "proj.weight"
PROJ_BIAS = "proj.bias"

# train_step.onnx I/O (docs/bundle-format.md)
STEP_INPUTS = ("images", "labels", "row_weight", "delta", "proj_weight", "proj_bias")
STEP_OUTPUTS = ("loss", "grad_delta", "grad_proj_weight", "grad_proj_bias")

# The device defaults a bundle carries, held once: ExportOptions (host/export.py) stamps them into
# every bundle, BundleManifest falls back to them, so host and device cannot disagree. lr_backbone
# 1e-2 is what every shipped bundle and benchmark used (B1 validated it, docs/benchmarks.md).
DEFAULT_LR_BACKBONE = 1e-2
DEFAULT_LR_HEAD = 1e-2
DEFAULT_EPOCHS = 10
DEFAULT_BATCH_SIZE = 32
DEFAULT_SEED = 1993
DEFAULT_LOSS_TEMPERATURE = 0.07
DEFAULT_MASK_POLICY = "no-depthwise"


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
    loss_temperature: float = DEFAULT_LOSS_TEMPERATURE  # SupCon temperature (docs/method.md#step-1)
    lr_backbone: float = DEFAULT_LR_BACKBONE  # SGD lr on the delta (truly sparse: no momentum)
    lr_head: float = DEFAULT_LR_HEAD     # SGD lr on the projection head
    weight_decay: float = 0.0            # applied only to gated elements (never moves others)
    overlap_decay: float = 0.9           # gradient scale 0.9 ** overlap (docs/method.md#overlap)
    batch_size: int = DEFAULT_BATCH_SIZE  # images per step (each gives two views); the step graph's
                                         # fixed row count is 2 * batch_size, a smaller batch is padded
    epochs: int = DEFAULT_EPOCHS         # default epochs for `edgecl adapt`
    seed: int = DEFAULT_SEED
    mask_policy: str = DEFAULT_MASK_POLICY  # which tensors the mask may select: "all" or "no-depthwise"
    interpolation: str = "bilinear"
    classes: list[str] = field(default_factory=list)   # classes with prototypes at export time
    recipe: dict[str, Any] = field(default_factory=dict)
    device_profile: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # what a device downloads, keeps and checks: name -> sha256
    server_files: dict[str, str] = field(default_factory=dict)  # stored and served with this version, never
                                         # kept by a device: the host's (recipe_weights.safetensors) and
                                         # download patches; name -> sha256
    sizes: dict[str, int] = field(default_factory=dict)  # bytes of each file in files and server_files
                                         # (signed: a download stops there)
    weights_patches: dict[str, str] = field(default_factory=dict)  # sha256 of an earlier weights.safetensors
                                         # -> the server_files patch that makes this version's from it
    versions: dict[str, str] = field(default_factory=dict)  # library versions used to export
    created_utc: str = ""
    parent_sha256: str = ""              # manifest sha256 of the bundle this version was made from
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str = MANIFEST) -> BundleManifest:
        """Check every field's type and range (``manifest_problems``); one BundleError lists them all."""
        if not isinstance(obj, dict):
            raise BundleError(f"{where} is not a JSON object", "re-copy the bundle from the host")
        version = obj.get("format_version", 0)
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise BundleError(f"bundle format version {version} is newer than this edgecl supports ({FORMAT_VERSION})",
                              "upgrade edgecl on this device")
        missing = [name for name in required_fields(cls) if name not in obj]
        if missing:
            raise BundleError(f"{where} lacks {', '.join(missing)}", "re-export the bundle")
        values, problems = check_values(cls, obj, MANIFEST_CHECKS)
        if not problems:
            problems = manifest_problems(values)
        if problems:
            raise BundleError(f"{where}: {'; '.join(problems)}", "re-export the bundle (or re-copy it from the host)")
        return cls(**values)

    def save(self, bundle_dir: str | Path) -> None:
        atomic_write_json(Path(bundle_dir) / MANIFEST, self.to_json())


_SHA256 = re.compile(r"[0-9a-f]{64}")
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")   # a plain file name (what the server stores)
_UNIT = Check(low=0, high=1)

# Ranges of the manifest's values (types come from the dataclass): what a device may rely on.
MANIFEST_CHECKS: dict[str, Check] = {
    "bundle_id": Check(nonempty=True),
    "version": Check(low=1),
    "model_name": Check(nonempty=True),
    "input_size": Check(low=1, high=8192, length=2),
    "mean": Check(length=3),
    "std": Check(low=0, low_open=True, length=3),
    "embedding_dim": Check(low=1),
    "proj_dim": Check(low=1),
    "total_params": Check(low=1),
    "selected": Check(low=0),
    "select_rate": Check(low=0, high=1, low_open=True),
    "drop_rate": Check(low=0, high=1, high_open=True),   # 1 would never update anything
    "loss_temperature": Check(low=0, low_open=True),
    "lr_backbone": Check(low=0),
    "lr_head": Check(low=0),
    "weight_decay": Check(low=0),
    "overlap_decay": _UNIT,
    "batch_size": Check(low=1, high=4096),
    "epochs": Check(low=0),
    "seed": Check(low=0),                                 # numpy's Generators take no negative seed
    "mask_policy": Check(choices=("all", "no-depthwise")),
    "interpolation": Check(choices=INTERPOLATIONS),
    "format_version": Check(low=1),
}


def manifest_problems(values: dict[str, Any]) -> list[str]:
    """Checks across fields and inside the tables, on type-checked values."""
    problems = []
    for key in ("base_sha256", "mask_sha256"):
        if not _SHA256.fullmatch(values[key]):
            problems.append(f"{key} must be 64 lowercase hex digits (got {values[key]!r})")
    if values.get("parent_sha256") and not _SHA256.fullmatch(values["parent_sha256"]):
        problems.append(f"parent_sha256 must be \"\" or 64 lowercase hex digits (got {values['parent_sha256']!r})")
    for key in ("files", "server_files"):
        bad_files = [name for name, digest in values.get(key, {}).items()
                     if not _SHA256.fullmatch(digest) or not _FILE_NAME.fullmatch(name)]
        if bad_files:
            problems.append(f"{key} must map plain file names to sha256 hex digests (bad: {', '.join(bad_files)})")
    both = sorted(set(values.get("files", {})) & set(values.get("server_files", {})))
    if both:
        problems.append(f"a file is listed in files and in server_files ({', '.join(both)})")
    stored = {**values.get("files", {}), **values.get("server_files", {})}
    bad_sizes = [name for name, size in values.get("sizes", {}).items() if name not in stored or size < 0]
    if bad_sizes:
        problems.append(f"sizes must give a non-negative size of a listed file (bad: {', '.join(bad_sizes)})")
    bad_patches = [f"{base[:12]}" for base, name in values.get("weights_patches", {}).items()
                   if not _SHA256.fullmatch(base) or name not in values.get("server_files", {})]
    if bad_patches:
        problems.append("weights_patches must map a sha256 to a file of server_files "
                        f"(bad: {', '.join(bad_patches)})")
    listed_mask = values.get("files", {}).get(MASK)
    if listed_mask and listed_mask != values["mask_sha256"]:
        problems.append(f"files lists {MASK} with another sha256 than mask_sha256")
    if values["selected"] > values["total_params"]:
        problems.append(f"selected ({values['selected']}) must not exceed total_params ({values['total_params']})")
    if values.get("device_profile"):
        try:
            profile_from_dict(values["device_profile"], "device_profile")
        except ConfigError as exc:
            problems.append(exc.problem)
    return problems


def value_problems(values: dict[str, Any]) -> list[str]:
    """``key must be ... (got ...)`` for each manifest value outside what a device accepts.

    The one range check shared by the device (BundleManifest.from_json) and `edgecl export`
    (host/export.py check_options), so export refuses what every device would refuse."""
    return [f"{key} {problem}" for key, value in values.items()
            if key in MANIFEST_CHECKS and (problem := MANIFEST_CHECKS[key].problem(value))]


def read_manifest(bundle_dir: str | Path) -> tuple[BundleManifest, str]:
    """(the checked manifest, the sha256 of the very bytes it was parsed from)."""
    path = Path(bundle_dir) / MANIFEST
    if not Path(bundle_dir).is_dir():
        raise BundleError(f"{bundle_dir} is not a bundle folder", "pass the folder written by `edgecl export`")
    try:
        data = path.read_bytes()
        obj = json.loads(data)
    except FileNotFoundError as exc:
        raise BundleError(f"{path} is missing", "pass the folder written by `edgecl export`") from exc
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path} is unreadable ({exc})", "re-copy the bundle from the host") from exc
    return BundleManifest.from_json(obj, where=str(path)), hashlib.sha256(data).hexdigest()


def load_manifest(bundle_dir: str | Path) -> BundleManifest:
    return read_manifest(bundle_dir)[0]


# Files a device reads when they are present: each must be listed (with its sha256) in `files`.
READ_IF_PRESENT = (EXEMPLARS, FLEET_SCATTER)   # overlap.safetensors is a server file: the device never reads it


def unlisted_files(bundle_dir: str | Path, manifest: BundleManifest) -> list[str]:
    """Files the device would read without a sha256 to check them against (docs/bundle-format.md).

    Every required file but the manifest must be listed, and so must an optional one that is there:
    a manifest without `files` (or with a name taken out) must not turn the check off."""
    root = Path(bundle_dir)
    return [name for name in (*REQUIRED_FILES[1:], *READ_IF_PRESENT)
            if name not in manifest.files and (name in REQUIRED_FILES or (root / name).exists())]


def check_bundle_files(bundle_dir: str | Path, names: tuple[str, ...] = REQUIRED_FILES) -> None:
    missing = [n for n in names if not (Path(bundle_dir) / n).exists()]
    if missing:
        raise BundleError(f"bundle {bundle_dir} is missing {', '.join(missing)}",
                          "re-copy the whole bundle folder from the host")


def stored_files(manifest: dict[str, Any]) -> dict[str, str]:
    """Every file stored with a version besides the manifest, name -> sha256: the device's
    (``files``) and the server-only ones (``server_files``). What the server registers and serves;
    takes the raw JSON object (the server does not build a BundleManifest)."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    extra = manifest.get("server_files") if isinstance(manifest, dict) else None
    return {**(files if isinstance(files, dict) else {}), **(extra if isinstance(extra, dict) else {})}
