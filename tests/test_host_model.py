"""Recipe -> model: preprocessing taken from timm's config, and factory import errors that say what to do."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import timm

from edgecl.errors import ConfigError
from edgecl.formats.config import Recipe, load_recipe
from edgecl.host.model import create_model, resolve_preprocessing


def _recipe(tmp_path: Path, body: str, name: str = "r.toml") -> Recipe:
    path = tmp_path / name
    path.write_text(body)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unknown .*keys ignored: preprocess")  # older Recipe
        return load_recipe(path)


# -- preprocessing -------------------------------------------------------------------------------------

def test_unset_fields_come_from_timm(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, 'name = "r"\ntimm_model = "test_resnet"\npreprocess = "timm"\n')
    model = create_model(recipe)
    expected = timm.data.resolve_data_config({}, model=model)
    resolved, sources = resolve_preprocessing(recipe, model)
    assert sources == {"input_size": "timm", "mean": "timm", "std": "timm", "interpolation": "timm"}
    assert resolved.input_size == list(expected["input_size"][1:])
    assert resolved.mean == list(expected["mean"]) and resolved.std == list(expected["std"])
    assert resolved.interpolation == expected["interpolation"]
    # test_resnet's pretrained config is not ImageNet's mean/std (the Recipe defaults): the value moved.
    assert resolved.mean != recipe.mean


def test_recipe_fields_override_timm(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, 'name = "r"\ntimm_model = "test_efficientnet"\npreprocess = "timm"\n'
                               'input_size = [32, 32]\nmean = [0.1, 0.2, 0.3]\n')
    model = create_model(recipe)
    resolved, sources = resolve_preprocessing(recipe, model)
    assert sources == {"input_size": "recipe", "mean": "recipe", "std": "timm", "interpolation": "timm"}
    assert resolved.input_size == [32, 32] and resolved.mean == [0.1, 0.2, 0.3]
    config = timm.data.resolve_data_config({}, model=model)
    assert resolved.std == list(config["std"]) and resolved.interpolation == config["interpolation"] == "bicubic"
    again, _ = resolve_preprocessing(resolved, model)
    assert (again.input_size, again.mean, again.std, again.interpolation) == (
        resolved.input_size, resolved.mean, resolved.std, resolved.interpolation)


def test_without_preprocess_timm_nothing_changes(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, 'name = "r"\ntimm_model = "test_resnet"\nmean = [0.5, 0.5, 0.5]\n')
    resolved, sources = resolve_preprocessing(recipe, create_model(recipe))
    assert resolved == recipe
    assert sources == {"input_size": "default", "mean": "recipe", "std": "default", "interpolation": "default"}


def test_explicit_fields_for_a_recipe_built_in_code() -> None:
    recipe = Recipe(name="r", timm_model="test_resnet", mean=[0.2, 0.2, 0.2])
    resolved, sources = resolve_preprocessing(recipe, create_model(recipe), explicit=["mean"])
    assert resolved == recipe
    assert sources == {"input_size": "default", "mean": "recipe", "std": "default", "interpolation": "default"}


def test_bad_preprocess_value_and_non_timm_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="preprocess must be one of recipe, timm"):  # refused on load
        _recipe(tmp_path, 'name = "r"\ntimm_model = "test_resnet"\npreprocess = "auto"\n')
    (tmp_path / "h5_plain_factory.py").write_text(
        "from torch import nn\n\ndef make():\n    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())\n")
    recipe = _recipe(tmp_path, 'name = "f"\nfactory = "h5_plain_factory:make"\npreprocess = "timm"\n', "f.toml")
    try:
        with pytest.raises(ConfigError, match="no timm pretrained config"):
            resolve_preprocessing(recipe, create_model(recipe))
    finally:
        sys.modules.pop("h5_plain_factory", None)


# -- factory import errors ----------------------------------------------------------------------------

def _one_line_error(recipe: Recipe) -> str:
    with pytest.raises(ConfigError) as info:
        create_model(recipe)
    text = str(info.value)
    assert "\n" not in text
    return text


def test_missing_factory_module_says_how_to_make_it_importable(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, 'name = "f"\nfactory = "h5_no_such_pkg.models:make"\n')
    text = _one_line_error(recipe)
    assert "no module named 'h5_no_such_pkg'" in text
    assert "pip install" in text and "PYTHONPATH" in text
    assert f"beside the recipe in {tmp_path.resolve()}" in text


def test_factory_module_beside_the_recipe_imports(tmp_path: Path) -> None:
    (tmp_path / "h5_beside_factory.py").write_text(
        "from torch import nn\n\ndef make(width=4):\n"
        "    return nn.Sequential(nn.Conv2d(3, width, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())\n")
    recipe = _recipe(tmp_path, 'name = "f"\nfactory = "h5_beside_factory:make"\nmodel_kwargs = { width = 6 }\n')
    path_before = list(sys.path)
    try:
        model = create_model(recipe)
        assert model[0].out_channels == 6
        assert sys.path == path_before  # the recipe's folder was on sys.path only for the import
    finally:
        sys.modules.pop("h5_beside_factory", None)


def test_factory_module_with_a_missing_dependency(tmp_path: Path) -> None:
    (tmp_path / "h5_dep_factory.py").write_text("import h5_not_installed_dep\n\ndef make():\n    return None\n")
    recipe = _recipe(tmp_path, 'name = "f"\nfactory = "h5_dep_factory:make"\n')
    try:
        text = _one_line_error(recipe)
    finally:
        sys.modules.pop("h5_dep_factory", None)
    assert "imports 'h5_not_installed_dep', which is not installed" in text
    assert "pip install the package that provides h5_not_installed_dep" in text


def test_factory_module_that_fails_to_import_or_lacks_the_function(tmp_path: Path) -> None:
    (tmp_path / "h5_broken_factory.py").write_text("def make(:\n    pass\n")
    text = _one_line_error(_recipe(tmp_path, 'name = "f"\nfactory = "h5_broken_factory:make"\n'))
    assert "SyntaxError" in text and "h5_broken_factory.py" in text
    (tmp_path / "h5_ok_factory.py").write_text("def make():\n    return None\n")
    try:
        text = _one_line_error(_recipe(tmp_path, 'name = "f"\nfactory = "h5_ok_factory:build"\n', "g.toml"))
        assert "has no attribute 'build'" in text
        text = _one_line_error(_recipe(tmp_path, 'name = "f"\nfactory = "h5_ok_factory:make"\n', "h.toml"))
        assert "returned NoneType, not a torch.nn.Module" in text
    finally:
        sys.modules.pop("h5_ok_factory", None)
    text = _one_line_error(Recipe(name="f", factory="h5_ok_factory"))
    assert "is not \"package.module:function\"" in text


def test_export_takes_unset_preprocessing_from_timm(tmp_path: Path) -> None:
    """`preprocess = "timm"`: the bundle's mean/std/interpolation are timm's, the recipe's input_size wins."""
    import json

    import timm
    from conftest import write_image_folder

    from edgecl.host.export import ExportOptions, export_bundle

    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "timm_pre"\ntimm_model = "test_resnet"\npreprocess = "timm"\ninput_size = [32, 32]\n'
                      "proj_dim = 16\n")
    calib = write_image_folder(tmp_path / "calib", classes=2, per_class=6)
    report = export_bundle(recipe, calib, tmp_path / "b", options=ExportOptions(batch_size=4, progress=False,
                                                                                exemplars_per_class=0))
    cfg = timm.data.resolve_data_config({}, model=timm.create_model("test_resnet", pretrained=False))
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["input_size"] == [32, 32] and report.preprocessing["input_size"] == "recipe"
    assert manifest["mean"] == pytest.approx(list(cfg["mean"])) and report.preprocessing["mean"] == "timm"
    assert manifest["interpolation"] == cfg["interpolation"] and report.preprocessing["std"] == "timm"
