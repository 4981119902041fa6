"""`edgecl delta` + `edgecl apply`: the new bundle version is the device's adapted model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image_folder
from typer.testing import CliRunner

from edgecl.cli.main import app
from edgecl.errors import DataError
from edgecl.formats import delta as delta_format
from edgecl.formats import manifest as mf
from edgecl.formats.images import load_image_folder, normalize
from edgecl.formats.mask import Mask

runner = CliRunner()


def _embed(bundle: Path, delta: np.ndarray, images: np.ndarray) -> np.ndarray:
    """What the device computes: inference.onnx with the masked weights patched to W0 + scatter(delta)."""
    from edgecl.device.ort import InferenceRunner

    runner = InferenceRunner(bundle / mf.INFERENCE_MODEL, bundle / mf.WEIGHTS, Mask.load_file(bundle / mf.MASK))
    dim = mf.load_manifest(bundle).embedding_dim
    return runner.run(images, delta.astype(np.float32), np.ones((1, dim), np.float32))[0]


@pytest.fixture(scope="module")
def adapted(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path, calib_dir: Path) -> Path:
    import shutil

    bundle = tmp_path_factory.mktemp("adapted") / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    result = runner.invoke(app, ["adapt", str(bundle), "--data", str(calib_dir), "--epochs", "2", "--no-gate"])
    assert result.exit_code == 0, result.output
    return bundle


@pytest.mark.parametrize("values,tol", [("fp32", 1e-5), ("fp16", 1e-2), ("int8", 5e-2), ("int4", 2e-1)])
def test_apply_reproduces_the_device_model(adapted: Path, calib_dir: Path, tmp_path: Path, values: str,
                                           tol: float) -> None:
    delta_path = tmp_path / f"d-{values}.safetensors"
    key = "ab" * 32
    result = runner.invoke(app, ["delta", str(adapted), "-o", str(delta_path), "--values", values,
                                 "--device-id", "dev-1", "--key", key])
    assert result.exit_code == 0, result.output
    d = delta_format.load_file(delta_path, delta_format.parse_key(key))
    manifest = mf.load_manifest(adapted)
    assert d.bundle_id == manifest.bundle_id and d.device_id == "dev-1" and d.steps > 0

    out = tmp_path / "v2"
    result = runner.invoke(app, ["apply", str(adapted), str(delta_path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    new = mf.load_manifest(out)
    assert new.version == manifest.version + 1 and new.bundle_id == manifest.bundle_id
    assert new.base_sha256 != manifest.base_sha256
    assert (out / "weights.safetensors").exists()
    new_mask = Mask.load_file(out / mf.MASK)
    changed = d.to_dense(manifest.selected) != 0
    assert (new_mask.overlap_vector() == changed.astype(np.int32)).all(), "overlap counts must record this round"

    pixels = load_image_folder(calib_dir, manifest.input_size).pixels[:10]
    images = normalize(pixels, manifest.mean, manifest.std)
    device_state = json.loads(runner.invoke(app, ["inspect", str(adapted), "--json"]).output)
    assert device_state["selected"] == manifest.selected
    from edgecl.device.state import load_current, open_bundle
    device_delta = load_current(open_bundle(adapted)).delta
    on_device = _embed(adapted, device_delta, images)
    patched = _embed(out, np.zeros(new.selected, np.float32), images)
    scale = float(np.abs(on_device).max())
    assert np.abs(patched - on_device).max() <= tol * max(scale, 1.0)

    # the new version keeps classifying like the device did
    ev_dev = json.loads(runner.invoke(app, ["eval", str(adapted), "--data", str(calib_dir), "--json"]).output)
    ev_new = json.loads(runner.invoke(app, ["eval", str(out), "--data", str(calib_dir), "--json"]).output)
    assert ev_new["accuracy"] >= ev_dev["accuracy"] - (0.0 if values == "fp32" else 0.05)


def test_apply_rejects_a_delta_for_another_bundle(adapted: Path, calib_dir: Path, tmp_path: Path) -> None:
    delta_path = tmp_path / "d.safetensors"
    assert runner.invoke(app, ["delta", str(adapted), "-o", str(delta_path)]).exit_code == 0
    d = delta_format.load_file(delta_path)
    d.bundle_id = "0" * 32
    delta_format.save_file(d, delta_path)
    result = runner.invoke(app, ["apply", str(adapted), str(delta_path), "-o", str(tmp_path / "v2")])
    assert result.exit_code == 1 and "another bundle" in result.output
    assert not (tmp_path / "v2").exists()


def test_delta_before_any_adaptation_is_a_clear_error(bundle_copy: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["delta", str(bundle_copy), "-o", str(tmp_path / "d.safetensors")])
    assert result.exit_code == 1 and "edgecl adapt" in result.output
    assert not (tmp_path / "d.safetensors").exists()


def test_overlap_history_accumulates_over_rounds(adapted: Path, calib_dir: Path, tmp_path: Path) -> None:
    """docs/method.md#overlap: each element's count of rounds that updated it survives every apply."""
    from edgecl.formats.mask import overlap_from_bytes

    d1 = tmp_path / "d1.safetensors"
    assert runner.invoke(app, ["delta", str(adapted), "-o", str(d1)]).exit_code == 0
    v2 = tmp_path / "v2"
    assert runner.invoke(app, ["apply", str(adapted), str(d1), "-o", str(v2)]).exit_code == 0
    changed1 = delta_format.load_file(d1).to_dense() != 0
    assert runner.invoke(app, ["adapt", str(v2), "--data", str(calib_dir), "--epochs", "1", "--no-gate"]).exit_code == 0
    d2 = tmp_path / "d2.safetensors"
    assert runner.invoke(app, ["delta", str(v2), "-o", str(d2)]).exit_code == 0
    changed2 = delta_format.load_file(d2).to_dense() != 0
    v3 = tmp_path / "v3"
    result = runner.invoke(app, ["apply", str(v2), str(d2), "-o", str(v3), "--data", str(calib_dir)])
    assert result.exit_code == 0, result.output

    mask = Mask.load_file(adapted / mf.MASK)  # rounds 1 and 2 share this mask (v2 kept it)
    expected = changed1.astype(np.int32) + changed2.astype(np.int32)
    history = overlap_from_bytes((v3 / "overlap.safetensors").read_bytes())
    # the history names only elements of rounds 1-2's mask, each with its count of rounds that changed it
    got = np.zeros(mask.total_selected, np.int32)
    for name, sl in mask.slices().items():
        idx, cnt = history.get(name, (np.zeros(0, np.int32), np.zeros(0, np.int32)))
        assert np.isin(idx, mask.indices[name]).all(), "history names elements outside round 1-2's mask"
        lookup = dict(zip(idx.tolist(), cnt.tolist(), strict=True))
        got[sl] = [lookup.get(i, 0) for i in mask.indices[name].tolist()]
    assert np.array_equal(got, expected) and expected.max() == 2
    # the re-scored mask of v3 carries the history's counts at its own elements
    v3_mask = Mask.load_file(v3 / mf.MASK)
    for name in v3_mask.order:
        idx, cnt = history.get(name, (np.zeros(0, np.int32), np.zeros(0, np.int32)))
        lookup = dict(zip(idx.tolist(), cnt.tolist(), strict=True))
        assert v3_mask.overlap[name].tolist() == [lookup.get(i, 0) for i in v3_mask.indices[name].tolist()]


def test_one_devices_update_of_a_shipped_class_is_kept_within_what_it_saw(adapted: Path, tmp_path: Path) -> None:
    """The same product under a device's camera (B6): one device's delta carries a class the bundle
    ships with the images it added; `edgecl apply` of that delta keeps the device's mean (computed
    under the device's backbone, which the new version is) and counts the bundle's images plus its."""
    from edgecl.formats.prototypes import Prototypes

    d = tmp_path / "d.safetensors"
    assert runner.invoke(app, ["delta", str(adapted), "-o", str(d)]).exit_code == 0
    delta = delta_format.load_file(d)
    bundle = Prototypes.load_file(adapted / mf.PROTOTYPES)
    name = bundle.classes[0]
    mine = bundle.means[0] + 0.25
    delta.prototypes = Prototypes([name], mine[None, :], np.array([min(5, delta.samples_seen)]))
    assert delta.samples_seen >= 1
    delta_format.save_file(delta, d)
    out = tmp_path / "v2"
    assert runner.invoke(app, ["apply", str(adapted), str(d), "-o", str(out)]).exit_code == 0
    protos = Prototypes.load_file(out / mf.PROTOTYPES)
    np.testing.assert_allclose(protos.means[protos.classes.index(name)], mine, rtol=1e-6)
    assert int(protos.counts[protos.classes.index(name)]) == int(bundle.counts[0]) + min(5, delta.samples_seen)


def test_the_bundles_classes_move_by_their_exemplars_drift_never_by_a_delta(adapted: Path, tmp_path: Path) -> None:
    """A class the bundle ships moves by its exemplars' drift, p += mean(new) - mean(old), whatever a
    delta says about it: a delta carrying the bundle's classes (here rolled by one, a poisoning) is
    not believed for them. Its own new class ("bolt") is added as it carries it."""
    from edgecl.formats.exemplars import ExemplarMemory
    from edgecl.formats.prototypes import Prototypes

    d = tmp_path / "d.safetensors"
    assert runner.invoke(app, ["delta", str(adapted), "-o", str(d)]).exit_code == 0
    delta = delta_format.load_file(d)
    bundle = Prototypes.load_file(adapted / mf.PROTOTYPES)
    rolled = np.roll(bundle.means, 1, axis=0)
    delta.prototypes = Prototypes([*bundle.classes, "bolt"], np.concatenate([rolled, rolled[:1] + 1]),
                                  np.array([10**9] * len(bundle.classes) + [7]))
    delta_format.save_file(delta, d)
    out = tmp_path / "v2"
    assert runner.invoke(app, ["apply", str(adapted), str(d), "-o", str(out)]).exit_code == 0
    manifest = mf.load_manifest(out)
    protos = Prototypes.load_file(out / mf.PROTOTYPES)
    assert protos.classes == [*bundle.classes, "bolt"] and int(protos.counts[-1]) == 7
    exemplars = ExemplarMemory.load_file(adapted / "exemplars.safetensors")
    vector = delta.to_dense(manifest.selected)
    assert np.abs(vector).max() > 0  # the backbone moved: the test means something
    for name in bundle.classes:
        pixels = normalize(exemplars.pixels[exemplars.labels == exemplars.classes.index(name)],
                           manifest.mean, manifest.std)
        drift = _embed(adapted, vector, pixels).mean(0) - _embed(adapted, np.zeros_like(vector), pixels).mean(0)
        expected = bundle.means[bundle.classes.index(name)] + drift
        got = protos.means[protos.classes.index(name)]
        assert int(protos.counts[protos.classes.index(name)]) == int(bundle.counts[bundle.classes.index(name)])
        # torch (host) vs onnxruntime (device) embeddings differ by float rounding only, far below the drift
        assert np.abs(got - expected).max() < 0.05 * max(np.abs(drift).max(), 1e-6)


def test_apply_writes_stock_timm_weights_that_load_strict(adapted: Path, calib_dir: Path, tmp_path: Path) -> None:
    """recipe_weights.safetensors loads into the recipe's own timm model (strict) and embeds like the bundle."""
    import timm
    import torch
    from safetensors.torch import load_file

    d = tmp_path / "d.safetensors"
    assert runner.invoke(app, ["delta", str(adapted), "-o", str(d)]).exit_code == 0
    out = tmp_path / "v2"
    assert runner.invoke(app, ["apply", str(adapted), str(d), "-o", str(out)]).exit_code == 0
    manifest = mf.load_manifest(out)
    # signed like the rest, but server-only: devices never download it (they run weights.safetensors)
    assert "recipe_weights.safetensors" in manifest.server_files and "recipe_weights.safetensors" not in manifest.files
    model = timm.create_model(manifest.recipe["timm_model"], pretrained=False, num_classes=0,
                              **manifest.recipe.get("model_kwargs", {}))
    model.load_state_dict(load_file(str(out / "recipe_weights.safetensors")), strict=True)
    model.eval()
    images = normalize(load_image_folder(calib_dir, manifest.input_size).pixels[:6], manifest.mean, manifest.std)
    with torch.no_grad():
        stock = model(torch.from_numpy(images)).numpy()
    bundle = _embed(out, np.zeros(manifest.selected, np.float32), images)
    assert np.abs(stock - bundle).max() <= 1e-4 * max(1.0, float(np.abs(bundle).max()))


def test_the_release_scale_takes_that_share_of_the_merged_step(adapted: Path, tmp_path: Path) -> None:
    """`edgecl release --scale s` releases s x the merged delta (in the devices' int4): every masked
    weight moves by s times the delta's value there, within int4's rounding; nothing else moves."""
    from edgecl.formats.weights import load_weights
    from edgecl.formats.weights_patch import quantize_step, released_delta
    from edgecl.host.apply import apply_delta
    from edgecl.release import scaled_step

    d = tmp_path / "d.safetensors"
    assert runner.invoke(app, ["delta", str(adapted), "-o", str(d), "--values", "fp32"]).exit_code == 0
    delta = delta_format.load_file(d)
    manifest = mf.load_manifest(adapted)
    vector = delta.to_dense(manifest.selected)
    assert np.count_nonzero(vector) > 0 and scaled_step(vector, 1.0) is vector
    base = load_weights(adapted / mf.WEIGHTS)
    mask = Mask.load_file(adapted / mf.MASK)
    moved = {}
    for scale in (1.0, 0.5):
        out = tmp_path / f"v2-{scale}"
        apply_delta(adapted, released_delta(delta, quantize_step(scaled_step(vector, scale))), out, progress=False)
        new = load_weights(out / mf.WEIGHTS)
        moved[scale] = np.concatenate([new[n].reshape(-1)[mask.indices[n]] - base[n].reshape(-1)[mask.indices[n]]
                                       for n in mask.slices()])
        for name in mask.slices():
            untouched = np.ones(base[name].size, bool)
            untouched[mask.indices[name]] = False
            assert (new[name].reshape(-1)[untouched] == base[name].reshape(-1)[untouched]).all()
        # int4 with a scale per 64 values: each value within half a step of its block's largest / 7
        assert np.abs(moved[scale] - scale * vector).max() <= scale * np.abs(vector).max() / 7
    assert 0.45 < float(np.abs(moved[0.5]).sum() / np.abs(moved[1.0]).sum()) < 0.55


@pytest.mark.parametrize("scale", ["0", "-1", "2.5", "nan"])
def test_release_refuses_an_absurd_scale_in_one_line(tmp_path: Path, scale: str) -> None:
    result = runner.invoke(app, ["release", "some-bundle", "--heldout", str(tmp_path), "--server", "http://127.0.0.1:9",
                                 "--token", "t", "--scale", scale])
    assert result.exit_code == 1, result.output
    assert f"scale {float(scale)} is outside (0, 2.0]" in result.output and "--scale" in result.output
    assert "Traceback" not in result.output


def test_class_data_recomputes_the_current_classes_under_the_candidate(adapted: Path, calib_dir: Path,
                                                                       tmp_path: Path) -> None:
    """`edgecl release --class-data DIR`: the candidate's statistics of the classes DIR has images of
    are those images' mean embedding under the candidate (count = images), not the drift estimate;
    the manifest names the rewritten file, so the bundle still opens and checks."""
    from edgecl.device.state import open_bundle
    from edgecl.formats.prototypes import Prototypes
    from edgecl.host.apply import apply_delta
    from edgecl.release import _embed, recompute_current_classes

    d = tmp_path / "d.safetensors"
    assert runner.invoke(app, ["delta", str(adapted), "-o", str(d), "--values", "fp32"]).exit_code == 0
    out = tmp_path / "candidate"
    manifest = mf.load_manifest(adapted)
    apply_delta(adapted, delta_format.load_file(d), out, progress=False,
                classes=Prototypes.empty(manifest.embedding_dim))
    estimated = Prototypes.load_file(out / mf.PROTOTYPES)
    # Half of each class's images: their mean and count differ from the estimate (which, on this tiny
    # bundle whose exemplars are all its images, equals the mean of all of them).
    half = tmp_path / "half"
    for folder in sorted(calib_dir.iterdir()):
        (half / folder.name).mkdir(parents=True)
        for png in sorted(folder.iterdir())[::2]:
            shutil.copyfile(png, half / folder.name / png.name)
    known = recompute_current_classes(out, half)
    exact = Prototypes.load_file(out / mf.PROTOTYPES)
    images = load_image_folder(half, manifest.input_size)
    assert sorted(known) == sorted(set(images.classes) & set(estimated.classes)) and known
    embedded = _embed(out, images.pixels)
    for name in known:
        rows = embedded[np.asarray([images.classes[i] for i in images.labels]) == name]
        i = exact.classes.index(name)
        np.testing.assert_allclose(exact.means[i], rows.mean(axis=0), rtol=1e-4, atol=1e-5)
        assert int(exact.counts[i]) == len(rows) < int(estimated.counts[estimated.classes.index(name)])
    open_bundle(out)      # every file still matches the manifest
    empty = tmp_path / "empty"
    write_image_folder(empty, per_class=2, seed=5, names=["bolt", "washer"])       # classes v1 does not know
    with pytest.raises(DataError, match="has no images of the current version's classes"):
        recompute_current_classes(out, empty)
