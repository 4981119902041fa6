"""`pip install 'edgecl[device]'` in a fresh virtualenv is a working device: no torch, no onnxruntime-training.

What a device really gets: a venv without system site packages, the device extra installed from this
source tree (pip's cache and the local index make it quick), and the device loop run through that
venv's own `edgecl` script on a bundle exported by the host fixture: adapt (1 epoch) -> predict ->
eval -> delta. A device module that imported torch anywhere on these paths fails here for real.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What `pip install .` needs of the tree (copied, so the build writes no build/ or egg-info into the repo).
SOURCE = ("pyproject.toml", "README.md", "edgecl", "cli")


@pytest.fixture(scope="module")
def device_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("device-venv")
    src = root / "src"
    for name in SOURCE:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False, clear=True).create(env_dir)
    installed = subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", f"{src}[device]"],
                               capture_output=True, text=True, timeout=900)
    if installed.returncode != 0:
        pytest.fail(f"pip install .[device] failed:\n{installed.stderr[-3000:]}")
    return env_dir


def _run(env_dir: Path, *args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(env_dir / "bin" / "edgecl"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=env_dir)


@pytest.mark.slow
def test_the_device_extra_has_no_torch_and_no_onnxruntime_training(device_venv: Path) -> None:
    python = str(device_venv / "bin" / "python")
    probe = ("import importlib.util as u, json; print(json.dumps({m: u.find_spec(m) is not None for m in "
             "('torch', 'timm', 'onnx', 'onnxruntime', 'numpy', 'PIL', 'edgecl.device.infer')}))")
    found = json.loads(subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True,
                                      cwd=device_venv).stdout)
    assert found == {"torch": False, "timm": False, "onnx": False, "onnxruntime": True, "numpy": True,
                     "PIL": True, "edgecl.device.infer": True}
    training = subprocess.run([python, "-c", "import onnxruntime.training"], capture_output=True, text=True,
                              cwd=device_venv)
    assert training.returncode != 0 and "No module named 'onnxruntime.training'" in training.stderr


@pytest.mark.slow
def test_the_device_loop_runs_in_the_device_venv(device_venv: Path, bundle_copy: Path, tmp_path: Path) -> None:
    from conftest import write_image_folder

    data = write_image_folder(tmp_path / "task", classes=4, per_class=6, seed=21,
                              names=["class0", "class1", "washer", "bolt"])
    adapted = _run(device_venv, "adapt", bundle_copy, "--data", data, "--epochs", 1, "-q", "--json")
    assert adapted.returncode == 0, adapted.stderr
    report = json.loads(adapted.stdout)
    assert report["state"] == "gen-000001" and report["epochs"] == 1 and report["images"] == 24
    assert sorted(report["classes_added"]) == ["bolt", "washer"]

    image = data / "washer" / "000.png"
    predicted = _run(device_venv, "predict", bundle_copy, image, "--json")
    assert predicted.returncode == 0, predicted.stderr
    (result,) = json.loads(predicted.stdout)
    assert result["state"] == "gen-000001" and len(result["top_k"]) == 3

    evaluated = _run(device_venv, "eval", bundle_copy, "--data", data, "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    ev = json.loads(evaluated.stdout)
    assert ev["images"] == 24 and ev["state"] == "gen-000001" and set(ev["per_class"]) == {
        "class0", "class1", "washer", "bolt"}
    assert ev["correct"] == round(ev["accuracy"] * 24)

    out = tmp_path / "d.safetensors"
    delta = _run(device_venv, "delta", bundle_copy, "-o", out)
    assert delta.returncode == 0, delta.stderr
    assert out.stat().st_size > 0 and f"wrote {out}" in delta.stdout
