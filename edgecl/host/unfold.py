"""Adapted weights back in the recipe's own layout: BatchNorm unfolded, loadable by a stock model.

A bundle's weights belong to the *folded* embedding model (model.py: every BatchNorm folded into
the convolution before it, each such convolution gaining a bias). ``recipe_state_dict`` maps them
back onto the state dict of the model the recipe itself builds (``timm.create_model(name,
num_classes=0, **model_kwargs)`` or the factory's), so that ``load_state_dict(strict=True)``
works and the model gives the same embeddings in eval mode, the way PEFT's merge gives back a
stock model.

Choice: each BatchNorm keeps the recipe's statistics and scale (gamma, running mean and variance)
and the change is pushed into the convolution and the BN shift. For a BN with per-channel factor
``s = gamma / sqrt(var + eps)``, the folded conv computes ``W_f = W * s`` and ``b_f = (b - mean) * s
+ beta``; unfolding sets ``W = W_f / s`` and ``beta = b_f - (b - mean) * s``. Why not set every BN to
identity: the result then stays a normal BN model (fine-tuning it in train mode behaves like
fine-tuning the recipe's model), and every element the adaptation did not touch keeps the recipe's
exact bytes (checked against a fresh fold of the recipe's weights), so a diff against the original
checkpoint shows only what moved.

Where ``s`` is 0 (a zero-initialised gamma, as timm's ResNets have) or so small that ``W_f / s`` is
not finite, a channel the adaptation changed cannot be expressed with that BN. That channel alone
is set to an exact identity BN instead: gamma 1, running_mean 0, running_var ``1 - eps`` (so that
``sqrt(var + eps) = 1``), beta the folded bias, and the conv weight the folded weight.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgecl.errors import ExportError
from edgecl.formats.atomic import atomic_write_bytes
from edgecl.formats.config import Recipe
from edgecl.host.model import (
    batchnorm_pairs,
    batchnorm_scale,
    fold_batchnorm,
    fold_example,
    load_recipe_model,
    replace_avgpools,
)


def _check_weights(weights: dict[str, np.ndarray], folded: dict[str, torch.Tensor], recipe: Recipe) -> None:
    missing = sorted(set(folded) - set(weights))
    extra = sorted(set(weights) - set(folded))
    if missing or extra:
        example = (missing or extra)[0]
        raise ExportError(f"the weights do not belong to recipe {recipe.name}: {len(missing)} parameter(s) missing, "
                          f"{len(extra)} unknown (e.g. {example})", "give the recipe the bundle was exported with")
    for name, tensor in folded.items():
        if tuple(weights[name].shape) != tuple(tensor.shape):
            raise ExportError(f"weights of recipe {recipe.name}: {name} has shape {tuple(weights[name].shape)}, the "
                              f"model needs {tuple(tensor.shape)}", "give the recipe the bundle was exported with")
        if not np.all(np.isfinite(weights[name])):
            raise ExportError(f"weights of recipe {recipe.name}: {name} holds NaN or infinite values",
                              "apply a valid delta")


def _unfold_pair(conv: str, bn: str, own: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                 new: dict[str, torch.Tensor], scale32: torch.Tensor, eps: float) -> dict[str, torch.Tensor]:
    """The recipe-layout tensors of one conv + BN from the folded weights ``new``.

    ``own``: the recipe model's state dict; ``base``: a fresh fold of it (what export folded);
    ``scale32``: the BN's factor exactly as fold_batchnorm computed it, so unfolding inverts it."""
    w0, w_f = base[f"{conv}.weight"].double(), new[f"{conv}.weight"].double()
    b0, b_f = base[f"{conv}.bias"].double(), new[f"{conv}.bias"].double()
    weight, gamma = own[f"{conv}.weight"].double(), own[f"{bn}.weight"].double()
    beta, mean, var = own[f"{bn}.bias"].double(), own[f"{bn}.running_mean"].double(), own[f"{bn}.running_var"].double()
    conv_bias = own[f"{conv}.bias"].double() if f"{conv}.bias" in own else torch.zeros_like(mean)
    scale = scale32.double()
    shape = (-1,) + (1,) * (w_f.ndim - 1)
    s = scale.reshape(shape)
    touched = w_f != w0
    out_w = torch.where(touched, w_f / torch.where(s == 0, torch.ones_like(s), s), weight)
    out_beta = torch.where(b_f != b0, b_f - (conv_bias - mean) * scale, beta)
    out_gamma, out_mean, out_var = gamma.clone(), mean.clone(), var.clone()
    # Channels the BN's own scale cannot carry: a zero (or vanishing) s under a changed weight.
    flat = touched.reshape(touched.shape[0], -1).any(dim=1)
    bad = (flat & (scale == 0)) | ~torch.isfinite(out_w.float().reshape(out_w.shape[0], -1)).all(dim=1)
    if bad.any():
        out_w[bad] = w_f[bad]
        out_gamma[bad] = 1.0
        out_mean[bad] = 0.0
        out_var[bad] = 1.0 - eps
        out_beta[bad] = b_f[bad] - conv_bias[bad]
    dtype = own[f"{conv}.weight"].dtype
    out = {f"{conv}.weight": out_w.to(dtype), f"{bn}.weight": out_gamma.to(dtype), f"{bn}.bias": out_beta.to(dtype),
           f"{bn}.running_mean": out_mean.to(dtype), f"{bn}.running_var": out_var.to(dtype)}
    if f"{conv}.bias" in own:
        out[f"{conv}.bias"] = own[f"{conv}.bias"].clone()
    return out


@torch.no_grad()
def recipe_state_dict(weights: dict[str, np.ndarray], recipe: Recipe) -> dict[str, torch.Tensor]:
    """The folded (bundle) weights as a state dict of the recipe's own model, BatchNorm unfolded.

    ``weights``: every parameter of ``build_embedding_model(recipe)`` by name (a bundle's
    weights.safetensors, base or patched). The result loads with ``strict=True`` into the model
    the recipe builds (for timm: ``timm.create_model(recipe.timm_model, num_classes=0,
    **recipe.model_kwargs)``); buffers the folded model lacks (BN statistics, batch counters) come
    from the recipe's own weights, or its init when it has none.
    """
    model = load_recipe_model(recipe)
    own = {k: v.detach().clone() for k, v in model.state_dict().items()}
    example = fold_example(recipe)
    pairs = batchnorm_pairs(model, example)
    folded_model = fold_batchnorm(copy.deepcopy(model), example)
    replace_avgpools(folded_model, example)
    base = {k: p.detach().clone() for k, p in folded_model.named_parameters()}
    _check_weights(weights, base, recipe)
    new = {k: torch.from_numpy(np.ascontiguousarray(v)).to(base[k].dtype) for k, v in weights.items()}

    out = dict(own)
    folded_keys: set[str] = set()
    for bn_name, conv_name in pairs.items():
        bn = model.get_submodule(bn_name)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.weight is None:
            raise ExportError(f"cannot unfold BatchNorm {bn_name} of recipe {recipe.name} (no affine weight)",
                              "use plain affine BatchNorm layers")
        out.update(_unfold_pair(conv_name, bn_name, own, base, new, batchnorm_scale(bn), float(bn.eps)))
        folded_keys |= {f"{conv_name}.weight", f"{conv_name}.bias"}
    for name, tensor in new.items():
        if name in folded_keys:
            continue
        if name not in own:
            raise ExportError(f"folded parameter {name} has no place in recipe {recipe.name}'s own layout",
                              "report this with the recipe")
        out[name] = tensor.to(own[name].dtype).clone()
    return out


def write_recipe_weights(weights: dict[str, np.ndarray], recipe: Recipe, path: str | Path) -> Path:
    """Write ``recipe_state_dict(weights, recipe)`` as a safetensors file (atomically); returns the path."""
    from safetensors.torch import save

    state = {k: v.contiguous() for k, v in recipe_state_dict(weights, recipe).items()}
    metadata = {"format": "pt", "recipe": recipe.name, "layout": "recipe (BatchNorm unfolded)",
                "model": recipe.timm_model or recipe.factory}
    target = Path(path)
    atomic_write_bytes(target, save(state, metadata=metadata))
    return target
