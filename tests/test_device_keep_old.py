"""Issue 6 on the device: replaying exemplars, moving old prototypes by their exemplars' drift, and
carrying the device's memory to the next model version (`edgecl upgrade`). Real tiny bundle, real
onnxruntime training, real image files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_device_adapt import make_image_folder
from typer.testing import CliRunner

from edgecl.cli.main import app
from edgecl.errors import DeviceError

runner = CliRunner()


@pytest.fixture(scope="module")
def first_task(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("t1") / "data", {"cat": 10, "dog": 10}, seed=4)


@pytest.fixture(scope="module")
def second_task(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("t2") / "data", {"fox": 12}, seed=5)


def _adapt(bundle: Path, data: Path, **kw):
    from edgecl.device.adapt import AdaptOptions, adapt

    kw.setdefault("progress", False)
    kw.setdefault("epochs", 1)
    kw.setdefault("lr", 0.05)
    kw.setdefault("gate", False)  # replay counts below are of every exemplar; the gate has its own tests
    return adapt(bundle, data, AdaptOptions(**kw))


def _embed_mean(bundle: Path, pixels: np.ndarray, delta: np.ndarray) -> np.ndarray:
    from edgecl.device.infer import create_runner, embed_and_score, resolve_profile
    from edgecl.device.state import open_bundle

    b = open_bundle(bundle)
    return embed_and_score(create_runner(b, resolve_profile(None)), b, pixels, delta)[0].mean(axis=0)


def test_replay_repeats():
    from edgecl.device.adapt import replay_repeats

    assert replay_repeats(600, 40, 0.0) == 1          # each exemplar once
    assert replay_repeats(600, 40, 0.5) == 15         # 600 exemplar images beside 600 task images
    assert replay_repeats(600, 160, 0.5) == 4
    assert replay_repeats(10, 400, 0.5) == 1          # never fewer than once
    assert replay_repeats(600, 0, 0.5) == 1
    with pytest.raises(DeviceError, match="replay share"):
        replay_repeats(600, 40, 1.0)


def test_replay_trains_on_old_exemplars_and_moves_old_prototypes_by_their_drift(bundle_copy, first_task,
                                                                                 second_task):
    from edgecl.device.state import load_current, open_bundle
    from edgecl.formats.exemplars import ExemplarMemory

    first = _adapt(bundle_copy, first_task)
    # the bundle ships calibration exemplars (class0-2): the first task already replays them
    shipped = ExemplarMemory.load_file(bundle_copy / "exemplars.safetensors")
    assert first.replayed == len(shipped.labels) > 0
    before = load_current(open_bundle(bundle_copy))
    memory = ExemplarMemory.load_file(before.exemplars_path)
    assert {"cat", "dog", "class0", "class1", "class2"} <= set(memory.classes)

    report = _adapt(bundle_copy, second_task, replay_share=0.5)
    old = list(memory.classes)
    n_old = sum(len(memory.of_class(c)) for c in old)
    from edgecl.device.adapt import replay_repeats
    assert report.replayed == n_old * replay_repeats(12, n_old, 0.5)
    after = load_current(open_bundle(bundle_copy))
    assert set(report.from_exemplars) == set(old) and report.drift_compensated == []
    for name in ("cat", "class1"):
        pixels = memory.of_class(name)
        moved = _embed_mean(bundle_copy, pixels, after.delta) - _embed_mean(bundle_copy, pixels, before.delta)
        expected = before.prototypes.means[before.prototypes.classes.index(name)] + moved
        got = after.prototypes.means[after.prototypes.classes.index(name)]
        assert np.allclose(got, expected, atol=1e-4), name
        assert np.abs(moved).max() > 0  # the backbone did move


def test_no_replay_trains_on_the_task_images_only(bundle_copy, first_task):
    report = _adapt(bundle_copy, first_task, replay=False)
    assert report.replayed == 0 and report.images == 20


def test_upgrade_carries_exemplars_and_local_classes_to_the_next_version(bundle_copy, first_task, second_task,
                                                                         tmp_path):
    from edgecl.device.state import load_current, open_bundle
    from edgecl.formats.exemplars import ExemplarMemory

    _adapt(bundle_copy, first_task)
    delta = tmp_path / "d.safetensors"   # fp32: v2 is then exactly this device's model (int4, the default, is not)
    assert runner.invoke(app, ["delta", str(bundle_copy), "-o", str(delta), "--values", "fp32"]).exit_code == 0
    v2 = tmp_path / "v2"
    assert runner.invoke(app, ["apply", str(bundle_copy), str(delta), "-o", str(v2)]).exit_code == 0
    assert load_current(open_bundle(v2)).exemplars_path is None  # a fresh version knows no device memory

    # the wrong direction is refused, and writes nothing
    result = runner.invoke(app, ["upgrade", str(v2), str(bundle_copy)])
    assert result.exit_code != 0 and "was not made from" in result.output
    assert not (v2 / "state").exists()

    result = runner.invoke(app, ["upgrade", str(bundle_copy), str(v2)])
    assert result.exit_code == 0, result.output
    assert "exemplars of 5 classes" in result.output
    state = load_current(open_bundle(v2))
    device_memory = ExemplarMemory.load_file(load_current(open_bundle(bundle_copy)).exemplars_path)
    carried = ExemplarMemory.load_file(state.exemplars_path)
    assert carried.classes == device_memory.classes
    assert np.array_equal(carried.pixels, device_memory.pixels)
    assert not state.delta.any()  # the new version's own weights
    # v2 is this device's own delta baked in: the drift its exemplars measure is ~0, so its classes and
    # its LDA statistics arrive as they were (moved by float noise only)
    from edgecl.device.heads import LdaHead
    device = load_current(open_bundle(bundle_copy))
    lda_old, lda_new = LdaHead.load_file(device.lda_path), LdaHead.load_file(state.lda_path)
    assert set(lda_new.means) == set(lda_old.means)
    assert all(np.allclose(lda_new.means[c], lda_old.means[c], rtol=1e-3, atol=1e-6) for c in lda_old.means)
    assert {"cat", "dog", "class0"} <= set(state.prototypes.classes)
    for name in ("cat", "dog"):  # the device's new classes: the bundle ships no exemplars of them
        i, j = state.prototypes.classes.index(name), device.prototypes.classes.index(name)
        assert np.allclose(state.prototypes.means[i], device.prototypes.means[j], rtol=1e-3, atol=1e-6)
        assert np.array_equal(state.prototypes.seen[name], device.prototypes.seen[name])

    # a second upgrade would overwrite the device's state on v2: refused
    result = runner.invoke(app, ["upgrade", str(bundle_copy), str(v2)])
    assert result.exit_code != 0 and "already has device state" in result.output

    # adapting v2 replays every carried class and moves their prototypes; rollback undoes the upgrade
    report = _adapt(v2, second_task)
    assert set(report.from_exemplars) == set(carried.classes) and report.replayed == len(carried.labels)
    assert runner.invoke(app, ["rollback", str(v2)]).exit_code == 0
    assert runner.invoke(app, ["rollback", str(v2)]).exit_code != 0  # one level only
    shutil.rmtree(v2 / "state")
    assert runner.invoke(app, ["upgrade", str(bundle_copy), str(v2), "--json"]).exit_code == 0


def _fleet_version(bundle_copy: Path, first_task: Path, second_task: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Device A trains on cat and dog, device B adds fox without training; v2 = v1 + both deltas
    (`edgecl apply`). Returns device B's bundle and v2."""
    device_a, device_b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(bundle_copy, device_a)
    shutil.copytree(bundle_copy, device_b)
    _adapt(device_a, first_task, epochs=3, lr=0.5)
    _adapt(device_b, second_task, epochs=0)
    deltas = []
    for name, bundle in (("a", device_a), ("b", device_b)):
        deltas.append(str(tmp_path / f"{name}.safetensors"))
        assert runner.invoke(app, ["delta", str(bundle), "-o", deltas[-1], "--device-id", f"line-{name}"]).exit_code == 0
    v2 = tmp_path / "v2"
    assert runner.invoke(app, ["apply", str(bundle_copy), *deltas, "-o", str(v2)]).exit_code == 0
    return device_b, v2


def test_upgrade_moves_the_devices_own_classes_into_a_fleet_version_by_their_exemplars(
        bundle_copy, first_task, second_task, tmp_path):
    """Device B added fox without training; v2 carries device A's trained delta. The host could move
    fox's prototype only by the calibration exemplars' drift; the upgrade moves it by fox's own."""
    from edgecl.device.state import load_current, open_bundle
    from edgecl.formats.images import load_image_folder

    device_b, v2 = _fleet_version(bundle_copy, first_task, second_task, tmp_path)
    fleet = load_current(open_bundle(v2)).prototypes
    result = runner.invoke(app, ["upgrade", str(device_b), str(v2), "--json"])
    assert result.exit_code == 0, result.output
    assert '"moved_by_own_exemplars": [\n    "fox"\n  ]' in result.output and '"lda_moved": true' in result.output
    # the do-no-harm rule for versions: v2's fox (the host's estimate) against the device's own moved
    # fox, both scored on the images the device holds of fox: the device's is kept, and it says so
    chose = json.loads(result.output)["chose"]
    assert chose["kept"] == "device" and chose["classes"] == ["fox"] and chose["images"] > 0, chose
    assert chose["device_accuracy"] > chose["released_accuracy"], chose
    upgraded = load_current(open_bundle(v2)).prototypes

    m = open_bundle(v2).manifest
    fox = load_image_folder(second_task, m.input_size, m.interpolation)
    truth = _embed_mean(v2, fox.pixels, np.zeros(open_bundle(v2).mask.total_selected, np.float32))
    moved = upgraded.means[upgraded.classes.index("fox")]
    hosts = fleet.means[fleet.classes.index("fox")]
    # the host's SDC estimate (from the calibration classes' drift) is more than twice as far from fox's mean
    assert np.linalg.norm(moved - truth) < 0.5 * np.linalg.norm(hosts - truth), \
        (np.linalg.norm(moved - truth), np.linalg.norm(hosts - truth))
    # a class the device has no exemplars of keeps the fleet's prototype
    assert np.array_equal(upgraded.means[upgraded.classes.index("cat")], fleet.means[fleet.classes.index("cat")])
    # the calibration device B's adapt fitted travels with the LDA statistics upgrade moved, marked, so
    # the lda head's probabilities stay tempered (no held-out images to refit it on here)
    from edgecl.device.heads import LdaHead
    before_lda = LdaHead.load_file(load_current(open_bundle(device_b)).lda_path)
    after_lda = LdaHead.load_file(load_current(open_bundle(v2)).lda_path)
    assert before_lda.calibration is not None  # adapt --epochs 0 held images out to calibrate
    assert after_lda.calibration is not None and "carried_by" in after_lda.calibration
    assert after_lda.calibration["temperature"] == before_lda.calibration["temperature"]


def test_lda_head_statistics_are_kept_by_adapt_and_used_by_eval_and_predict(bundle_copy, first_task,
                                                                           second_task):
    from edgecl.device.heads import LdaHead
    from edgecl.device.infer import evaluate, predict
    from edgecl.device.state import load_current, open_bundle

    with pytest.raises(DeviceError, match="no LDA statistics"):
        evaluate(bundle_copy, first_task, head="lda")
    assert _adapt(bundle_copy, first_task).lda_moved  # the backbone moved: the bundle's classes' means follow
    first = LdaHead.load_file(load_current(open_bundle(bundle_copy)).lda_path)
    assert first.count == 20 and first.groups == 2 and np.allclose(first.scatter, first.scatter.T)
    assert set(first.means) == {"cat", "dog", "class0", "class1", "class2"}
    report = _adapt(bundle_copy, second_task)
    second = LdaHead.load_file(load_current(open_bundle(bundle_copy)).lda_path)
    assert second.count == 32 and second.groups == 3 and report.lda_moved  # pooled over both rounds
    assert not np.allclose(second.means["cat"], first.means["cat"])  # carried through the drift map
    assert not _adapt(bundle_copy, second_task, epochs=0).lda_moved  # no training, nothing to move

    lda = evaluate(bundle_copy, first_task)  # auto: the statistics exist
    ncm = evaluate(bundle_copy, first_task, head="ncm")
    assert lda["head"] == "lda" and ncm["head"] == "ncm" and lda["images"] == ncm["images"] == 20
    assert lda["accuracy"] >= 0.9  # two well separated synthetic classes
    out = predict(bundle_copy, [first_task / "cat" / "000.png"], head="lda")
    assert out[0]["head"] == "lda" and out[0]["class"] == "cat"
    with pytest.raises(DeviceError, match="unknown head"):
        evaluate(bundle_copy, first_task, head="svm")

    path = load_current(open_bundle(bundle_copy)).lda_path
    path.write_bytes(path.read_bytes()[:100])
    result = runner.invoke(app, ["eval", str(bundle_copy), "--data", str(first_task)])
    assert result.exit_code == 1 and "lda.safetensors does not match its sha256 in meta.json" in result.output


def test_upgrade_recomputes_the_devices_own_classes_a_version_made_from_its_shared_exemplars(
        bundle_copy, first_task, second_task, tmp_path):
    """Mode 2: v2 ships fox's exemplars (device B shared them) and fox's statistics made from those
    alone, here a poor mean. The pull judges them against fox recomputed under v2 from every image B
    holds of it, keeps the better (B's), says so, and installs exactly that mean."""
    from edgecl.device.state import load_current, open_bundle
    from edgecl.formats import manifest as mf
    from edgecl.formats.exemplars import ExemplarMemory
    from edgecl.formats.hashing import sha256_file
    from edgecl.formats.images import load_image_folder
    from edgecl.formats.prototypes import Prototypes

    device_b, v2 = _fleet_version(bundle_copy, first_task, second_task, tmp_path)
    # what a mode-2 release ships: fox's exemplars, and fox's mean from them (made poor here: the cat's)
    shared = ExemplarMemory.load_file(load_current(open_bundle(device_b)).exemplars_path)
    shipped = ExemplarMemory.load_file(v2 / mf.EXEMPLARS)
    shipped.joined(shared, ["fox"]).save_file(v2 / mf.EXEMPLARS)
    table = Prototypes.load_file(v2 / mf.PROTOTYPES)
    table.upsert("fox", table.means[table.classes.index("cat")], 3)
    table.save_file(v2 / mf.PROTOTYPES)
    m = mf.load_manifest(v2)
    for name in (mf.EXEMPLARS, mf.PROTOTYPES):
        m.files[name] = sha256_file(v2 / name)
        if name in m.sizes:
            m.sizes[name] = (v2 / name).stat().st_size
    m.save(v2)

    result = runner.invoke(app, ["upgrade", str(device_b), str(v2), "--json"])
    assert result.exit_code == 0, result.output
    chose = json.loads(result.output)["chose"]
    assert chose["recomputed"] == ["fox"] and chose["classes"] == ["fox"], chose
    assert chose["kept"] == "device" and chose["device_accuracy"] > chose["released_accuracy"], chose
    assert "recomputed_means" not in chose
    fox = load_image_folder(second_task, m.input_size, m.interpolation)
    assert chose["images"] == len(fox.labels)          # the task folder; its exemplars are among those images
    truth = _embed_mean(v2, fox.pixels, np.zeros(open_bundle(v2).mask.total_selected, np.float32))
    upgraded = load_current(open_bundle(v2)).prototypes
    i = upgraded.classes.index("fox")
    np.testing.assert_allclose(upgraded.means[i], truth, rtol=1e-4, atol=1e-5)
    assert upgraded.counts[i] == len(fox.labels)
    # the classes it did not learn keep v2's statistics
    assert np.array_equal(upgraded.means[upgraded.classes.index("cat")], table.means[table.classes.index("cat")])
