"""Unknown detection and calibrated probabilities: the pure functions (formats/calibration.py,
device/unknown.py) on seeded Gaussians, then predict / eval on a real exported bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image_folder

from edgecl.device.heads import LdaHead
from edgecl.device.unknown import MahalanobisScorer, calibrate
from edgecl.formats.calibration import (
    CALIBRATION_FILE,
    SCORE_COSINE,
    SCORE_RELATIVE_MAHALANOBIS,
    auroc,
    calibrate_leave_one_out,
    check_record,
    cosine_scores,
    expected_calibration_error,
    fit_temperature,
    softmax,
)


def _gaussians(n_per_class: int, means: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(99).normal(size=(means.shape[1], means.shape[1])) * 0.3 + np.eye(means.shape[1])
    y = np.repeat(np.arange(len(means)), n_per_class)
    return means[y] + rng.normal(size=(len(y), means.shape[1])) @ mix, y


MEANS = np.random.default_rng(7).normal(size=(4, 16)) * 2.0


def test_fit_temperature_recovers_the_scale_of_over_confident_scores() -> None:
    """Labels drawn from softmax(s); the scores reported as 8 s: the fitted T is ~8."""
    rng = np.random.default_rng(0)
    s = rng.normal(size=(4000, 5)) * 2.0
    p = softmax(s)
    y = np.array([rng.choice(5, p=row) for row in p])
    t = fit_temperature(8.0 * s, y)
    assert t == pytest.approx(8.0, rel=0.1)
    before = expected_calibration_error(softmax(8.0 * s), y)
    after = expected_calibration_error(softmax(8.0 * s, t), y)
    assert before > 0.1 and after < 0.03


def test_ece_is_zero_for_a_perfectly_calibrated_constant_and_large_for_an_overconfident_one() -> None:
    y = np.array([0] * 70 + [1] * 30)
    right = np.tile([0.7, 0.3], (100, 1))
    assert expected_calibration_error(right, y) == pytest.approx(0.0)
    sure = np.tile([1.0, 0.0], (100, 1))
    assert expected_calibration_error(sure, y) == pytest.approx(0.3)


def test_auroc_equals_the_share_of_correctly_ordered_pairs() -> None:
    rng = np.random.default_rng(1)
    known, unknown = rng.integers(0, 20, 50).astype(float), rng.integers(5, 25, 40).astype(float)
    pairs = (unknown[None, :] > known[:, None]).mean() + 0.5 * (unknown[None, :] == known[:, None]).mean()
    assert auroc(known, unknown) == pytest.approx(pairs)


def test_relative_mahalanobis_matches_the_definition() -> None:
    x, y = _gaussians(100, MEANS, 0)
    lda = LdaHead(16, shrinkage=0.1)
    lda.add(x, y)
    scorer = MahalanobisScorer.create(lda, MEANS)
    probe = np.random.default_rng(3).normal(size=(7, 16))
    inv = np.linalg.inv(lda.covariance())
    d = probe[:, None, :] - MEANS[None]
    md = np.einsum("ncd,de,nce->nc", d, inv, d)
    centre = MEANS.mean(0)
    total = lda.scatter / (lda.count - lda.groups) + (MEANS - centre).T @ (MEANS - centre) / len(MEANS)
    background = 0.9 * total + 0.1 * np.trace(total) / 16 * np.eye(16)
    d0 = probe - centre
    md0 = np.einsum("nd,de,ne->n", d0, np.linalg.inv(background), d0)
    assert np.allclose(scorer.distances(probe), md)
    assert np.allclose(scorer.unknown_scores(probe), md.min(1) - md0)


def test_float32_scores_keep_the_ranking_at_a_lite0_sized_embedding() -> None:
    """The scorer applies its factors in float32 (one sgemm per batch); at D = 1280 with Lite0-like
    magnitudes its scores stay within 1e-4 of the float64 definition's spread, and order alike."""
    rng = np.random.default_rng(7)
    dim, classes = 1280, 10
    means = rng.gamma(2.0, 0.3, size=(classes, dim))          # non-negative, like pooled ReLU features
    y = np.repeat(np.arange(classes), 60)
    x = means[y] + rng.normal(0, 0.2, size=(len(y), dim))
    lda = LdaHead(dim)
    lda.add(x, y)
    probe = np.concatenate([means[y[:50]] + rng.normal(0, 0.2, (50, dim)), rng.gamma(2.0, 0.3, (50, dim))])
    scorer = MahalanobisScorer.create(lda, means)
    got = scorer.unknown_scores(probe)
    w = np.linalg.inv(np.linalg.cholesky(lda.covariance())).T
    zw, mw = probe @ w, means @ w
    centre = means.mean(0)
    total = lda.scatter / (lda.count - lda.groups) + (means - centre).T @ (means - centre) / classes
    background = 0.7 * total + 0.3 * np.trace(total) / dim * np.eye(dim)
    b = np.linalg.inv(np.linalg.cholesky(background)).T
    want = ((zw[:, None] - mw[None]) ** 2).sum(-1).min(1) - (((probe - centre) @ b) ** 2).sum(1)
    assert np.abs(got - want).max() <= 1e-4 * (want.max() - want.min())
    assert (np.argsort(got) == np.argsort(want)).mean() > 0.98


def test_the_triangular_factor_gives_the_full_quadratic_form_s_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    """Serving multiplies by the Cholesky factor of Q = S^-1 - B^-1 in triangular column blocks: the
    scores of the whole matrix Q (the form it replaces), with several blocks really used."""
    from edgecl.device import unknown as unknown_module

    monkeypatch.setattr(unknown_module, "_FACTOR_BLOCK", 5)  # D = 16: blocks of 5, 5, 5 and 1 columns
    x, y = _gaussians(100, MEANS, 0)
    lda = LdaHead(16, shrinkage=0.1)
    lda.add(x, y)
    scorer = MahalanobisScorer.create(lda, MEANS)
    assert [(first, block.shape) for first, block in scorer.factor] == [(0, (16, 5)), (5, (11, 5)), (10, (6, 5)),
                                                                        (15, (1, 1))]
    centre = MEANS.mean(0)
    total = lda.scatter / (lda.count - lda.groups) + (MEANS - centre).T @ (MEANS - centre) / len(MEANS)
    background = 0.9 * total + 0.1 * np.trace(total) / 16 * np.eye(16)
    q = np.linalg.inv(lda.covariance()) - np.linalg.inv(background)
    probe = np.random.default_rng(4).normal(size=(9, 16)) * 3
    lin = probe @ scorer.linear.astype(np.float64)
    want = np.einsum("nd,de,ne->n", probe, q, probe) + np.min(scorer.offsets[:-1] - 2 * lin[:, :-1], axis=1) \
        - (scorer.offsets[-1] - 2 * lin[:, -1])
    np.testing.assert_allclose(scorer.unknown_scores(probe), want, rtol=1e-5, atol=1e-4)


def test_one_class_statistics_score_without_a_factorisation_error() -> None:
    """With one class the background is the within-class Gaussian itself: Q = 0, which Cholesky refuses;
    the scorer factors it through its eigenvalues and scores the definition (the two distances cancel)."""
    means = MEANS[:1]
    x, y = _gaussians(50, means, 1)
    lda = LdaHead(16, shrinkage=0.1)
    lda.add(x, y)
    scorer = MahalanobisScorer.create(lda, means)
    probe = np.random.default_rng(5).normal(size=(6, 16))
    got = scorer.unknown_scores(probe)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, 0.0, atol=1e-4 * scorer.distances(probe).max())


def test_calibrated_threshold_flags_the_target_share_of_new_known_images_and_most_unknown_ones() -> None:
    train, y_train = _gaussians(300, MEANS, 0)
    held, y_held = _gaussians(250, MEANS, 1)
    test, _ = _gaussians(500, MEANS, 2)
    novel, _ = _gaussians(200, np.random.default_rng(8).normal(size=(2, 16)) * 2.0, 3)
    lda = LdaHead(16)
    lda.add(train, y_train)
    means = np.stack([train[y_train == c].mean(0) for c in range(4)])
    record = calibrate(held, y_held, means, lda, means, false_unknown_rate=0.1)
    assert record["score"] == SCORE_RELATIVE_MAHALANOBIS and set(record["temperature"]) == {"ncm", "lda"}
    scorer = MahalanobisScorer.create(lda, means)
    flagged = np.mean(scorer.unknown_scores(test) > record["threshold"])
    assert abs(flagged - 0.1) < 0.04
    assert np.mean(scorer.unknown_scores(novel) > record["threshold"]) > 0.5
    assert auroc(scorer.unknown_scores(test), scorer.unknown_scores(novel)) > 0.9
    assert check_record(json.dumps(record), "x") == record


def test_calibrate_without_lda_uses_the_cosine_score_and_the_ncm_head_only() -> None:
    held, y = _gaussians(50, MEANS, 1)
    record = calibrate(held, y, MEANS)
    assert record["score"] == SCORE_COSINE and set(record["temperature"]) == {"ncm"}
    assert record["threshold"] == pytest.approx(np.quantile(1 - cosine_scores(held, MEANS).max(1), 0.95))
    with pytest.raises(ValueError):
        calibrate(held, y + 4, MEANS)


def test_leave_one_out_scores_each_image_against_its_class_mean_without_it() -> None:
    x, y = _gaussians(6, MEANS, 4)
    record = calibrate_leave_one_out(x, y, false_unknown_rate=0.2)
    scores = []
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        means = np.stack([x[keep & (y == c)].mean(0) for c in range(4)])
        scores.append(1 - cosine_scores(x[i:i + 1], means).max())
    assert record["threshold"] == pytest.approx(np.quantile(scores, 0.8))
    with pytest.raises(ValueError):
        calibrate_leave_one_out(x[:7], y[:7])  # class 1 has one image


def test_lda_file_keeps_its_calibration_and_new_statistics_drop_it(tmp_path: Path) -> None:
    from edgecl.errors import DeviceError

    x, y = _gaussians(40, MEANS, 0)
    lda = LdaHead(16)
    lda.add(x, y)
    plain = lda.to_bytes()
    lda.calibration = calibrate(x, y, MEANS, lda)
    lda.save_file(tmp_path / "lda.safetensors")
    back = LdaHead.load_file(tmp_path / "lda.safetensors")
    assert back.calibration == lda.calibration
    back.calibration = None
    assert back.to_bytes() == plain  # a file without calibration is byte-identical to before
    back.calibration = lda.calibration
    back.add(x, y)
    assert back.calibration is None
    damaged = lda.to_bytes().replace(b'\\"threshold\\"', b'\\"thresh0ld\\"')
    assert damaged != lda.to_bytes()
    with pytest.raises(DeviceError, match="damaged"):
        LdaHead.from_bytes(damaged)


# -- through the real bundle -------------------------------------------------------------------------

def _odd_images(root: Path, n: int = 6) -> Path:
    """Images unlike the synthetic classes: random noise."""
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(5)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"noise{i}.png")
    return root


def test_export_writes_a_calibration_the_bundle_state_uses(tiny_bundle: Path, calib_dir: Path, tmp_path: Path) -> None:
    from edgecl.device.infer import evaluate, predict

    record = check_record(json.loads((tiny_bundle / CALIBRATION_FILE).read_text()), "bundle")
    assert record["score"] == SCORE_COSINE
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert CALIBRATION_FILE in manifest["files"]  # verified like every bundle file
    image = next((calib_dir / "class0").iterdir())
    [row] = predict(tiny_bundle, [image], head="ncm")
    assert row["calibrated"] is True and isinstance(row["unknown"], bool) and row["unknown_score"] is not None
    assert row["unknown"] == (row["unknown_score"] > record["threshold"])
    odd = _odd_images(tmp_path / "odd")
    report = evaluate(tiny_bundle, calib_dir, unknown_dirs=[odd], progress=False)
    u = report["unknown_detection"]
    assert u["score"] == SCORE_COSINE and u["unknown_images"] == 6 and u["known_images"] == report["images"]
    assert 0.0 <= u["auroc"] <= 1.0 and u["known_flagged"] is not None


def test_a_state_with_a_calibrated_lda_head_flags_unknowns_and_tempers_probabilities(
        bundle_copy: Path, calib_dir: Path, tmp_path: Path) -> None:
    """`edgecl adapt` commits the calibration inside the generation (the LDA statistics carry it):
    fitted on its held-out images against statistics that did not count them."""
    from edgecl.device.adapt import adapt
    from edgecl.device.infer import evaluate, predict
    from edgecl.device.plan import AdaptOptions
    from edgecl.device.state import load_current, open_bundle

    # New images of the bundle's classes (the calibration ones are counted already: none could judge)
    fresh = write_image_folder(tmp_path / "fresh", seed=11)
    adapt(bundle_copy, fresh, AdaptOptions(epochs=0, progress=False))
    state = load_current(open_bundle(bundle_copy))
    assert state.lda_path is not None
    lda = LdaHead.load_file(state.lda_path)
    assert lda.calibration is not None and lda.calibration["score"] == SCORE_RELATIVE_MAHALANOBIS
    t = lda.calibration["temperature"]["lda"]
    row = predict(bundle_copy, [next((calib_dir / "class1").iterdir())])[0]
    assert row["head"] == "lda" and row["calibrated"] is True
    assert row["unknown"] == (row["unknown_score"] > lda.calibration["threshold"])
    assert len(row["top_k"]) == 3  # every class listed: the softmax is over these
    assert row["top_k"][0]["probability"] == pytest.approx(
        float(softmax(np.array([[r["score"] for r in row["top_k"]]]), t)[0, 0]), rel=1e-4)
    odd = _odd_images(tmp_path / "odd")
    u = evaluate(bundle_copy, calib_dir, unknown_dirs=[odd], progress=False)["unknown_detection"]
    assert u["score"] == SCORE_RELATIVE_MAHALANOBIS and u["calibrated"]
    assert u["auroc"] is not None and u["auroc"] > 0.5  # noise is less like the classes than their own images


def test_cli_predict_json_and_eval_unknown(tiny_bundle: Path, calib_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgecl.cli.main import app

    image = next((calib_dir / "class2").iterdir())
    out = CliRunner().invoke(app, ["predict", str(tiny_bundle), str(image), "--json"])
    assert out.exit_code == 0, out.output
    [row] = json.loads(out.output)
    assert {"unknown", "unknown_score"} <= set(row)
    odd = _odd_images(tmp_path / "odd")
    out = CliRunner().invoke(app, ["eval", str(tiny_bundle), "--data", str(calib_dir), "--unknown", str(odd), "-q"])
    assert out.exit_code == 0, out.output
    assert "unknown detection (cosine score): AUROC" in out.output and "known images flagged unknown" in out.output
    out = CliRunner().invoke(app, ["eval", str(tiny_bundle), "--data", str(calib_dir), "--unknown",
                                   str(tmp_path / "nope"), "-q"])
    assert out.exit_code == 1 and "error:" in out.output


def test_a_bundle_without_calibration_reports_scores_but_no_flags(tiny_bundle: Path, calib_dir: Path,
                                                                  tmp_path: Path) -> None:
    from edgecl.device.infer import predict

    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    shutil.rmtree(old / "state", ignore_errors=True)  # a bundle no device used yet (nothing pinned its manifest)
    (old / CALIBRATION_FILE).unlink()
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["files"][CALIBRATION_FILE]
    manifest.get("sizes", {}).pop(CALIBRATION_FILE, None)
    (old / "manifest.json").write_text(json.dumps(manifest))
    [row] = predict(old, [next((calib_dir / "class0").iterdir())])
    assert row["unknown"] is None and row["calibrated"] is False and row["unknown_score"] is not None


def test_calibrate_held_out_maps_class_names_and_skips_unknown_classes() -> None:
    from edgecl.device.unknown import calibrate_held_out
    from edgecl.formats.prototypes import Prototypes

    x, y = _gaussians(60, MEANS, 0)
    held, y_held = _gaussians(30, MEANS, 1)
    lda = LdaHead(16)
    lda.add(x, y)
    protos = Prototypes.empty(16)
    for c in (2, 0, 1, 3):  # the state's order differs from the label ids
        protos.upsert(f"c{c}", x[y == c].mean(0), int((y == c).sum()))
        lda.means[f"c{c}"] = x[y == c].mean(0)
    names = [f"c{c}" for c in y_held] + ["never-seen"] * 5
    record = calibrate_held_out(protos, lda, np.vstack([held, np.zeros((5, 16))]), names)
    order = [protos.classes.index(f"c{c}") for c in y_held]
    assert record == calibrate(held, np.asarray(order), protos.means, lda, lda.means_for(protos.classes, protos.means))
    assert record["images"] == len(held)
    assert calibrate_held_out(protos, lda, np.zeros((2, 16)), ["x", "y"]) is None
