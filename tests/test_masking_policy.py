"""Mask policy: tensors kept out of the mask (``exclude``) and the "no-depthwise" name set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from torch import nn

from edgecl.errors import ConfigError
from edgecl.formats.config import load_recipe
from edgecl.host.masking import depthwise_weight_names, select_mask
from edgecl.host.model import build_embedding_model

MODELS = Path(__file__).resolve().parents[1] / "models"


def random_scores(model: nn.Module, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.random(p.shape).astype(np.float32) for n, p in model.named_parameters()}


def test_excluded_tensors_get_nothing_and_the_budget_holds() -> None:
    model = build_embedding_model(load_recipe(MODELS / "test_efficientnet.toml"))
    scores = random_scores(model)
    excluded = depthwise_weight_names(model)
    assert excluded
    rate = 0.05
    plain = select_mask(scores, rate)
    mask = select_mask(scores, rate, exclude=excluded)
    assert not set(mask.order) & excluded, "an excluded tensor got elements"
    assert set(plain.order) & excluded, "without exclude the depthwise weights are ranked like the rest"
    # The depthwise biases stay in the mask (the policy freezes only the weights).
    biases = [name[: -len("weight")] + "bias" for name in excluded]
    assert biases and all(b in mask.order and mask.indices[b].size >= plain.indices[b].size for b in biases)
    # The budget is still `rate` of ALL parameters, spread over the tensors left: each ranked
    # tensor rounds its own share (at least one element), so the total is within one per tensor.
    budget = rate * mask.total_params
    ranked = [n for n in scores if n not in excluded and scores[n].ndim > 1]
    assert abs(mask.total_selected - budget) <= len(ranked)
    assert abs(plain.total_selected - budget) <= len(ranked) + len(excluded)
    assert mask.total_params == plain.total_params == sum(s.size for s in scores.values())
    # The rest ranks at a higher rate, so tensors that are not excluded keep more elements.
    for name in ranked:
        assert mask.indices[name].size >= plain.indices[name].size
    top = np.sort(np.argsort(-scores[ranked[0]].reshape(-1), kind="stable")[: mask.indices[ranked[0]].size])
    assert np.array_equal(mask.indices[ranked[0]], top), "the kept elements are still the top-scored ones"


def test_exclude_keeps_the_rules_when_the_rest_is_too_small() -> None:
    rng = np.random.default_rng(0)
    scores = {"big": rng.random((100, 100)).astype(np.float32), "small": rng.random((10, 10)).astype(np.float32),
              "b": rng.random(10).astype(np.float32)}
    mask = select_mask(scores, 0.5, exclude={"big"})
    assert "big" not in mask.order
    # Half of everything does not fit in what is left: each tensor is capped at its size.
    assert mask.indices["small"].size == 100 and mask.indices["b"].size == 10
    mask = select_mask(scores, 0.01, exclude=["small"], small_tensors="ranked")
    assert "small" not in mask.order and mask.indices["b"].size == 1


def test_exclude_rejects_unknown_and_everything() -> None:
    scores = {"w": np.ones((4, 4), np.float32), "b": np.ones(4, np.float32)}
    with pytest.raises(ConfigError, match="no such parameter"):
        select_mask(scores, 0.1, exclude={"w", "typo.weight"})
    with pytest.raises(ConfigError, match="every parameter"):
        select_mask(scores, 0.1, exclude={"w", "b"})


def test_depthwise_weight_names() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),                    # ordinary
        nn.Conv2d(8, 8, 3, groups=8),          # depthwise
        nn.Conv2d(8, 16, 3, groups=8),         # depthwise with a channel multiplier
        nn.Conv2d(16, 16, 1, groups=4),        # grouped, not depthwise
        nn.Conv2d(1, 4, 3, groups=1),          # one input channel: groups == in_channels == 1
    )
    assert depthwise_weight_names(model) == {"1.weight", "2.weight"}
    lite = build_embedding_model(load_recipe(MODELS / "test_efficientnet.toml"))
    names = depthwise_weight_names(lite)
    params = dict(lite.named_parameters())
    assert names and names <= set(params)
    for name in names:
        conv = lite.get_submodule(name.rsplit(".", 1)[0])
        assert conv.groups == conv.in_channels > 1
    assert all(params[n].shape[1] == 1 for n in names)
