"""The device path on a real tiny_bundle bundle (timm test_efficientnet): adapt, predict, eval, resume, rollback.

The bundle is tiny_bundle once per module by the host side (torch, in this process); every test works on
its own copy so device state never leaks between tests.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgecl.errors import BundleError, ConfigError, DataError, DeviceError, EdgeclError

REPO = Path(__file__).resolve().parents[1]
# Makes `import torch` raise ImportError in a child process: what a device without torch sees.
NO_TORCH = "import sys; sys.modules['torch'] = None\n"


def make_image_folder(root: Path, classes: dict[str, int], seed: int, size: int = 32) -> Path:
    """Class-coloured noisy images; class i has its own colour and stripe so it is learnable."""
    rng = np.random.default_rng(seed)
    for i, (name, count) in enumerate(classes.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(count):
            base = np.zeros((size, size, 3))
            base[..., i % 3] = 160 + 40 * (i // 3)
            base[:, : 3 + 4 * i] = 40 * i
            pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{j:03d}.png")
    return root


@pytest.fixture(scope="module")
def task_data(tmp_path_factory) -> Path:
    root = make_image_folder(tmp_path_factory.mktemp("task") / "data", {"cat": 12, "dog": 12, "class0": 6}, seed=2)
    (root / "cat" / "corrupt.png").write_bytes(b"not an image")
    return root


@pytest.fixture
def bundle(bundle_copy) -> Path:
    return bundle_copy  # conftest: a private copy of the session's tiny test_efficientnet bundle


def _adapt(bundle: Path, data: Path, **kw):
    from edgecl.device.adapt import AdaptOptions, adapt

    kw.setdefault("progress", False)
    kw.setdefault("gate", False)  # these tests check the loop on every image; the gate has its own tests
    profile = kw.pop("profile", None)
    with pytest.warns(UserWarning, match="unreadable"):  # the corrupt file is skipped and counted
        return adapt(bundle, data, AdaptOptions(**kw), profile=profile)


def _trainable(bundle: Path) -> dict[str, np.ndarray]:
    from edgecl.device.state import load_current, open_bundle

    b = open_bundle(bundle)
    return load_current(b).trainable


def _head(bundle: Path) -> dict:
    return json.loads((bundle / "state" / "HEAD.json").read_text())


# -- the whole loop in process -------------------------------------------------------------------

def test_adapt_eval_predict_rollback(bundle, task_data):
    from edgecl.device.infer import evaluate, predict
    from edgecl.device.state import rollback

    with pytest.warns(UserWarning, match="without a prototype"):
        frozen = evaluate(bundle, task_data)  # before any adapt: the bundle's prototypes, zero delta
    assert frozen["state"] == "bundle" and frozen["skipped_unknown_class"] == 24
    report = _adapt(bundle, task_data, epochs=2, seed=7, batch_size=16)
    assert report.skipped_unreadable == 1 and report.images == 30
    assert report.classes_added == ["cat", "dog"] and report.classes_updated == ["class0"]
    # every class with calibration exemplars is moved by its exemplars' drift (class0, seen again, before
    # its new images are merged in by counts)
    assert report.from_exemplars == ["class0", "class1", "class2"] and report.drift_compensated == []
    # replay: the bundle's 12 calibration exemplars of each of class1 and class2 join the 30 images, and
    # those of class0 too (seen again: its earlier camera), under class0's label
    assert report.replayed == 36
    assert report.steps == 2 * 5  # 66 images, batch 16
    assert report.peak_rss_mb > 0 and report.step_seconds_median > 0
    after = evaluate(bundle, task_data)
    assert after["state"] == report.state and set(after["per_class"]) == {"cat", "dog", "class0"}
    assert 0.0 <= after["accuracy"] <= 1.0 and after["images"] == 30
    preds = predict(bundle, [task_data / "dog" / "000.png", task_data / "cat" / "corrupt.png"], top_k=2)
    assert preds[0]["class"] in {"cat", "dog", "class0", "class1", "class2"} and len(preds[0]["top_k"]) == 2
    assert "error" in preds[1]
    log = [json.loads(x) for x in (bundle / "state" / report.state / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 11)) and {"loss", "changed_fraction", "seconds", "epoch"} <= set(log[0])
    assert rollback(bundle)["current"] == "bundle"
    with pytest.warns(UserWarning, match="without a prototype"):
        assert evaluate(bundle, task_data)["accuracy"] == frozen["accuracy"]
    with pytest.raises(DeviceError, match="roll back"):
        rollback(bundle)


def test_epochs_zero_only_computes_prototypes(bundle, task_data):
    from edgecl.device.state import bundle_prototypes, load_current, open_bundle

    report = _adapt(bundle, task_data, epochs=0)
    assert report.steps == 0 and report.drift_compensated == []
    b = open_bundle(bundle)
    state, original = load_current(b), bundle_prototypes(b)
    assert not state.delta.any()
    assert state.prototypes.classes == ["class0", "class1", "class2", "cat", "dog"]
    # class1 was not in the data: bit-identical; class0 was recomputed from the new images
    assert np.array_equal(state.prototypes.means[1], original.means[1])
    assert not np.array_equal(state.prototypes.means[0], original.means[0])


def test_drift_compensation_moves_only_old_prototypes_and_can_be_turned_off(bundle, task_data):
    from edgecl.device.state import bundle_prototypes, load_current, open_bundle

    original = bundle_prototypes(open_bundle(bundle)).means[1]
    _adapt(bundle, task_data, epochs=1, lr=0.05, drift_compensation=False, exemplars=False)
    assert np.array_equal(load_current(open_bundle(bundle)).prototypes.means[1], original)
    shutil.rmtree(bundle / "state")
    report = _adapt(bundle, task_data, epochs=1, lr=0.05, exemplars=False)
    assert report.drift_compensated == ["class0", "class1", "class2"]
    assert not np.array_equal(load_current(open_bundle(bundle)).prototypes.means[1], original)


def test_exemplars_refresh_old_classes_in_a_later_round(bundle, task_data, tmp_path):
    report = _adapt(bundle, task_data, epochs=1)
    assert report.exemplar_bytes > 0
    second = make_image_folder(tmp_path / "second", {"fox": 10}, seed=3)
    from edgecl.device.adapt import AdaptOptions, adapt
    report2 = adapt(bundle, second, AdaptOptions(epochs=1, lr=0.05, progress=False))
    # every old class has exemplars: the device's own (cat, dog, class0) and the bundle's (class1, class2)
    assert set(report2.from_exemplars) == {"cat", "dog", "class0", "class1", "class2"}
    assert report2.drift_compensated == []


def test_without_bundle_exemplars_old_classes_are_drift_compensated(bundle, task_data):
    # A bundle exported without exemplars (export --exemplars-per-class 0): no file, not in the manifest.
    (bundle / "exemplars.safetensors").unlink()
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["files"]["exemplars.safetensors"]
    manifest.get("sizes", {}).pop("exemplars.safetensors", None)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    report = _adapt(bundle, task_data, epochs=1, lr=0.05)
    assert report.from_exemplars == [] and report.drift_compensated == ["class0", "class1", "class2"]


def test_select_lr_logs_its_choice(bundle, task_data):
    report = _adapt(bundle, task_data, epochs=1, select_lr=True)
    chosen = report.selection["chosen"]
    assert len(report.selection["trials"]) == 1 + 3  # frozen + 3 lrs x 1 epoch
    assert chosen["accuracy"] == max(t["accuracy"] for t in report.selection["trials"])
    meta = json.loads((bundle / "state" / report.state / "meta.json").read_text())
    assert meta["config"]["selection"]["chosen"] == chosen and report.epochs == chosen["epochs"]


# -- sparsity properties -------------------------------------------------------------------------

def test_changed_fraction_per_step_at_default_rates(bundle, task_data):
    from edgecl.device.state import open_bundle

    b = open_bundle(bundle)
    assert (b.manifest.select_rate, b.manifest.drop_rate) == (0.05, 0.9)
    report = _adapt(bundle, task_data, epochs=8, batch_size=8, lr=0.01, seed=3)
    log = [json.loads(x) for x in (bundle / "state" / report.state / "steps.jsonl").read_text().splitlines()]
    fractions = np.array([r["changed_fraction"] for r in log])
    expected = b.mask.selected_fraction * (1 - b.manifest.drop_rate)
    assert len(fractions) == 8 * 9 and fractions.max() <= 0.005  # (30 images + 36 replayed) / 8 = 9 steps
    assert fractions.mean() == pytest.approx(expected, rel=0.05)


def test_drop_rate_zero_moves_every_selected_element_with_a_gradient_and_nothing_else(bundle, task_data):
    from edgecl.device.ort import StepSession, patched_weights
    from edgecl.device.state import open_bundle
    from edgecl.device.update import draw_gate, sparse_sgd_step
    from edgecl.formats.images import load_image_folder, two_views
    from edgecl.formats.weights import load_weights

    b = open_bundle(bundle)
    m = b.manifest
    session = StepSession(bundle / "train_step.onnx")
    head = load_weights(bundle / "head.safetensors")
    with pytest.warns(UserWarning):
        data = load_image_folder(task_data, m.input_size)
    rng, gate_rng = np.random.default_rng(0), np.random.default_rng(1)
    delta = np.zeros(b.mask.total_selected, np.float32)
    for _ in range(3):
        x = two_views(data.pixels[:8], rng, m.mean, m.std)
        out = session.step(x, np.concatenate([data.labels[:8]] * 2), delta, head["proj.weight"], head["proj.bias"])
        assert out.grad_delta.shape == delta.shape and np.count_nonzero(out.grad_delta) > 0
        result = sparse_sgd_step(delta, out.grad_delta, draw_gate(gate_rng, delta.size, 0.0), np.ones_like(delta),
                                 lr=0.1)
        assert np.array_equal(result.delta != delta, out.grad_delta != 0)  # drop 0: every element with a gradient
        delta = result.delta
    # The weights the device runs, W0 + scatter(delta), differ from W0 only at mask positions.
    base = load_weights(bundle / "weights.safetensors")
    for name, weight in patched_weights(b.mask, base, delta).items():
        moved = np.flatnonzero(weight.reshape(-1) != base[name].reshape(-1))
        assert moved.size and np.isin(moved, b.mask.indices[name]).all()


# -- crash safety ----------------------------------------------------------------------------------

_ADAPT_SCRIPT = NO_TORCH + """
from edgecl.device.adapt import AdaptOptions, adapt
adapt(sys.argv[1], sys.argv[2], AdaptOptions(epochs=6, batch_size=4, seed=11, checkpoint_every=3,
      resume="--resume" in sys.argv, progress=False, gate="--gate" in sys.argv))
assert sys.modules["torch"] is None
"""


def _run_adapt(bundle: Path, data: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-W", "ignore", "-c", _ADAPT_SCRIPT, str(bundle), str(data), *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("gate", [False, True], ids=["no-gate", "gate"])
def test_resume_after_kill_9_ends_in_the_same_state(tiny_bundle, task_data, tmp_path, gate):
    flags = ["--gate"] if gate else []
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    shutil.copytree(tiny_bundle, reference)
    shutil.copytree(tiny_bundle, crashed)
    assert _run_adapt(reference, task_data, *flags).wait(timeout=120) == 0
    ref_meta = json.loads((reference / "state" / _head(reference)["current"] / "meta.json").read_text())
    # (30 images + 36 replayed exemplars) / batch 4 = 17 steps per epoch without the gate's held-out share
    per_epoch = ref_meta["report"]["steps"] // 6
    assert gate or per_epoch == 17

    proc = _run_adapt(crashed, task_data, *flags)
    run = crashed / "state" / "run"
    killed_at = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        latest = run / "LATEST.json"
        log = run / "steps.jsonl"
        if latest.exists() and log.exists():
            ckpt_step = int(json.loads(latest.read_text())["ckpt"].split("-")[1])
            logged = log.read_text().count("\n")
            # Mid-epoch (checkpoints every 3 steps), after at least one epoch (the gate's saved candidates).
            if ckpt_step > per_epoch and logged > ckpt_step and ckpt_step % per_epoch:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = (ckpt_step, logged)
                break
        time.sleep(0.002)
    proc.wait(timeout=30)
    assert killed_at is not None, "the run ended before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    assert not (crashed / "state" / "HEAD.json").exists()  # nothing committed by the killed run

    assert _run_adapt(crashed, task_data, "--resume", *flags).wait(timeout=120) == 0
    ref, res = _trainable(reference), _trainable(crashed)
    for name in ref:
        assert np.array_equal(ref[name], res[name]), name
    meta = json.loads((crashed / "state" / _head(crashed)["current"] / "meta.json").read_text())
    assert meta["report"]["resumed_from_step"] == killed_at[0] and meta["report"]["steps"] == 6 * per_epoch
    # the gate judged the same six epochs and kept the same one
    assert meta["report"]["gate"] == ref_meta["report"]["gate"] and (meta["report"]["gate"] is not None) == gate
    assert not (crashed / "state" / "run").exists()


def test_full_disk_at_commit_leaves_the_previous_state_intact(bundle, task_data, monkeypatch):
    from edgecl.device.infer import evaluate

    first = _adapt(bundle, task_data, epochs=1)
    before = _trainable(bundle)
    real_replace = os.replace

    def full_disk(src, dst, *a, **kw):
        if "gen-" in Path(dst).name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(EdgeclError, match="no space left"):
        _adapt(bundle, task_data, epochs=1, lr=0.05)
    monkeypatch.setattr(os, "replace", real_replace)
    assert _head(bundle)["current"] == first.state
    after = _trainable(bundle)
    assert all(np.array_equal(before[n], after[n]) for n in before)
    assert not [p for p in (bundle / "state").iterdir() if p.name.startswith(".gen-")]  # no half generation
    evaluate(bundle, task_data)
    # the finished run's final checkpoint survived: --resume commits it without training again
    report = _adapt(bundle, task_data, epochs=1, lr=0.05, resume=True)
    # (30 images + 54 replayed: the memory now holds cat and dog too) / batch 16 (the bundle's) = 6 steps
    assert report.resumed_from_step == report.steps == 6 and _head(bundle)["previous"] == first.state


# -- bad input ---------------------------------------------------------------------------------------

def test_bad_inputs_are_named_errors_and_write_nothing(bundle, task_data, tmp_path):
    from edgecl.device.adapt import AdaptOptions, adapt

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError):
        adapt(bundle, tmp_path / "empty", AdaptOptions(progress=False))
    profile = tmp_path / "gpu.toml"
    profile.write_text('name = "gpu"\nexecution_provider = "TensorrtExecutionProvider"\n')
    with pytest.raises(DeviceError, match="TensorrtExecutionProvider is not available"):
        adapt(bundle, task_data, AdaptOptions(progress=False), profile=profile)
    with pytest.raises(ConfigError):
        adapt(bundle, task_data, AdaptOptions(progress=False), profile=tmp_path / "missing.toml")
    assert not (bundle / "state").exists()

    newer = json.loads((bundle / "manifest.json").read_text())
    newer["format_version"] = 99
    (bundle / "manifest.json").write_text(json.dumps(newer))
    with pytest.raises(BundleError, match="newer"):
        adapt(bundle, task_data, AdaptOptions(progress=False))
    newer["format_version"] = 1
    (bundle / "manifest.json").write_text(json.dumps(newer))
    with pytest.raises(BundleError, match="format version 1.*re-export"):
        adapt(bundle, task_data, AdaptOptions(progress=False))
    newer["format_version"] = 2
    (bundle / "manifest.json").write_text(json.dumps(newer))
    (bundle / "inference.onnx").unlink()
    with pytest.raises(BundleError, match="inference.onnx"):
        adapt(bundle, task_data, AdaptOptions(progress=False))


def test_resume_without_an_interrupted_run_is_an_error(bundle, task_data):
    from edgecl.device.adapt import AdaptOptions, adapt

    with pytest.raises(DeviceError, match="no interrupted adaptation"):
        adapt(bundle, task_data, AdaptOptions(progress=False, resume=True))
