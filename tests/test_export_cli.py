"""`edgecl export` / `edgecl inspect` as a user runs them: real files, one-line errors, nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgecl.cli.main import app
from edgecl.formats import manifest as mf

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
runner = CliRunner()


def run(*args: str):  # noqa: ANN201
    return runner.invoke(app, list(args))


def test_inspect_reports_selected_fraction_and_verifies_hashes(tiny_bundle: Path) -> None:
    result = run("inspect", str(tiny_bundle), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert abs(info["selected_fraction"] - 0.05) < 0.005
    assert info["selected"] > 0 and info["parameters"] > info["selected"]
    assert all(entry["ok"] for entry in info["files"].values() if "ok" in entry)
    assert set(mf.REQUIRED_FILES) - {mf.MANIFEST} <= set(info["files"])
    assert all("sha256" in info["files"][name] for name in mf.load_manifest(tiny_bundle).files)
    text = run("inspect", str(tiny_bundle))
    assert text.exit_code == 0 and "selected" in text.output and "sha256 ok" in text.output


def test_inspect_detects_tampered_file(bundle_copy: Path) -> None:
    path = bundle_copy / "inference.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    result = run("inspect", str(bundle_copy))
    assert result.exit_code == 1
    assert "do not match the manifest" in result.output


def test_inspect_detects_a_listed_file_that_is_missing(bundle_copy: Path) -> None:
    (bundle_copy / mf.HEAD_INIT).unlink()
    result = run("inspect", str(bundle_copy))
    assert result.exit_code == 1
    assert "head.safetensors" in result.output and "missing" in result.output


def test_export_json_and_flag_choices(calib_dir: Path, tmp_path: Path) -> None:
    from edgecl.cli.options import MaskPolicy
    from edgecl.host.export import MASK_POLICIES, ExportOptions

    assert sorted(p.value for p in MaskPolicy) == sorted(MASK_POLICIES)
    out = tmp_path / "b"
    result = run("export", str(MODELS / "test_vit.toml"), "--data", str(calib_dir), "-o", str(out),
                 "--mask-policy", "all", "--select-rate", "0.1", "--json", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    manifest = mf.load_manifest(out)
    assert report["bundle_dir"] == str(out) and report["selected"] == manifest.selected
    assert manifest.mask_policy == "all" and manifest.select_rate == 0.1
    assert manifest.lr_backbone == ExportOptions().lr_backbone, "an unset flag keeps the library's default"
    assert sorted(report["files"]) == sorted(p.name for p in out.iterdir() if p.is_file())


@pytest.mark.parametrize("rate", ["0", "1.5", "-0.1"])
def test_select_rate_out_of_range(calib_dir: Path, tmp_path: Path, rate: str) -> None:
    out = tmp_path / "b"
    result = run("export", str(MODELS / "test_efficientnet.toml"), "--data", str(calib_dir), "-o", str(out),
                 "--select-rate", rate)
    assert result.exit_code == 1
    assert "--select-rate must be" in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("flag,value,problem", [
    ("--lr", "nan", "--lr must be a finite number (got nan)"),
    ("--lr", "-0.1", "--lr must be >= 0 (got -0.1)"),
    ("--epochs", "-1", "--epochs must be >= 0 (got -1)"),
    ("--exemplars-per-class", "-1", "--exemplars-per-class must be >= 0 (got -1)"),
    ("--seed", "-5", "--seed must be >= 0 (got -5)"),
    ("--drop-rate", "1", "--drop-rate must be < 1 (got 1.0)"),
])
def test_export_refuses_what_a_device_would_refuse(calib_dir: Path, tmp_path: Path, flag: str, value: str,
                                                    problem: str) -> None:
    """The device's own manifest ranges (manifest.value_problems) decide: a bundle every device would
    refuse is never written. One line naming the flag and a value that works, exit 1, nothing written."""
    out = tmp_path / "b"
    result = run("export", str(MODELS / "test_efficientnet.toml"), "--data", str(calib_dir), "-o", str(out),
                 flag, value)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: export option {problem}: pass values a device accepts"), lines
    assert f"(e.g. {flag} " in lines[0], lines
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_device_defaults_are_held_once() -> None:
    """lr_backbone was 1e-2 in ExportOptions and 1e-3 in BundleManifest; every shipped bundle and
    benchmark stamped ExportOptions' 1e-2. Both now read manifest.DEFAULT_*."""
    import dataclasses

    from edgecl.host.export import ExportOptions

    opts = ExportOptions()
    defaults = {f.name: f.default for f in dataclasses.fields(mf.BundleManifest)}
    assert opts.lr_backbone == defaults["lr_backbone"] == mf.DEFAULT_LR_BACKBONE == 1e-2
    assert opts.lr_head == defaults["lr_head"] and opts.epochs == defaults["epochs"]
    assert opts.batch_size == defaults["batch_size"] and opts.seed == defaults["seed"]
    assert opts.temperature == defaults["loss_temperature"] and opts.mask_policy == defaults["mask_policy"]


def _recipe(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "r.toml"
    path.write_text(body)
    return path


@pytest.mark.parametrize("case,expect", [
    ("unknown_model", "unknown timm model"),
    ("missing_weights", "not found"),
    ("mismatched_weights", "the model needs"),
    ("no_class_folders", "no class sub-folders"),
    ("one_class", "at least two classes"),
    ("only_non_images", "no image files"),
])
def test_bad_input_is_one_line_and_writes_nothing(case: str, expect: str, calib_dir: Path, tmp_path: Path) -> None:
    recipe = MODELS / "test_efficientnet.toml"
    data = calib_dir
    if case == "unknown_model":
        recipe = _recipe(tmp_path, 'name = "x"\ntimm_model = "no_such_net"\n')
    elif case == "missing_weights":
        recipe = _recipe(tmp_path, 'name = "x"\ntimm_model = "test_vit"\nweights = "nowhere.safetensors"\n')
    elif case == "mismatched_weights":
        import numpy as np
        from safetensors.numpy import save_file
        save_file({"patch_embed.proj.weight": np.zeros((1, 1), np.float32)}, str(tmp_path / "w.safetensors"))
        recipe = _recipe(tmp_path, 'name = "x"\ntimm_model = "test_efficientnet"\nweights = "w.safetensors"\n'
                                   'weights_mapping = "ordered"\ninput_size = [32, 32]\n')
    elif case == "no_class_folders":
        data = tmp_path / "flat"
        data.mkdir()
        (data / "a.png").write_bytes((calib_dir / "class0" / "000.png").read_bytes())
    elif case == "one_class":
        data = tmp_path / "one"
        (data / "only").mkdir(parents=True)
        for p in sorted((calib_dir / "class0").iterdir())[:4]:
            (data / "only" / p.name).write_bytes(p.read_bytes())
    elif case == "only_non_images":
        data = tmp_path / "txt"
        (data / "a").mkdir(parents=True)
        (data / "a" / "readme.txt").write_text("hello")
    out = tmp_path / "bundle"
    result = run("export", str(recipe), "--data", str(data), "-o", str(out))
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expect in lines[0], result.output
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")], "temp folder left behind"


def test_unwritable_output_folder(calib_dir: Path, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root ignores permission bits: use a path below a regular file instead.
        parent = tmp_path / "file"
        parent.write_text("x")
        out = parent / "bundle"
    else:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o500)
        out = parent / "bundle"
    result = run("export", str(MODELS / "test_efficientnet.toml"), "--data", str(calib_dir), "-o", str(out))
    assert result.exit_code == 1
    assert "cannot write" in result.output


def test_existing_output_needs_overwrite(tiny_bundle: Path, calib_dir: Path) -> None:
    before = sorted(p.name for p in tiny_bundle.iterdir())
    result = run("export", str(MODELS / "test_efficientnet.toml"), "--data", str(calib_dir), "-o", str(tiny_bundle))
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert sorted(p.name for p in tiny_bundle.iterdir()) == before


def test_corrupt_calibration_images_are_skipped_and_counted(calib_dir: Path, tmp_path: Path) -> None:
    import shutil
    data = tmp_path / "calib"
    shutil.copytree(calib_dir, data)
    (data / "class1" / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "b"
    result = subprocess.run([sys.executable, "-m", "edgecl.cli.main", "export", str(MODELS / "test_vit.toml"),
                             "--data", str(data), "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "1 unreadable skipped" in result.stdout
    assert "skipped 1 unreadable image" in result.stderr


@pytest.mark.slow
def test_real_efficientnet_lite0_export(tmp_path: Path) -> None:
    """The real ImageNet-pretrained model on real Fashion-MNIST images (docs/design-notes.md#real-model-and-data), on this CPU."""
    from edgecl.datasets import FASHION_MNIST_DIR, write_fashion_groups

    if not (Path(FASHION_MNIST_DIR) / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST missing: `make test` installs dataset-fashion-mnist")
    data = write_fashion_groups(tmp_path / "fm", {"calib": [0, 1, 2, 3]}, train_per_class=40, test_per_class=1)
    out = tmp_path / "lite0"
    result = run("export", str(MODELS / "efficientnet_lite0.toml"), "--data", str(data / "calib" / "train"),
                 "-o", str(out), "--select-rate", "0.05")
    assert result.exit_code == 0, result.output
    info = json.loads(run("inspect", str(out), "--json").output)
    assert info["model"] == "efficientnet_lite0" and info["parameters"] == 3_350_000
    assert abs(info["selected_fraction"] - 0.05) <= 0.005
    assert len(info["classes"]) == 4
