"""Within-class scatter in a few kilobytes (edgecl.formats.scatter), as a statistics delta carries it
(delta format 5) and a released bundle ships it, and the LDA scoring the release gate uses."""

from __future__ import annotations

import numpy as np
import pytest
from edgecl_test_deltas import forge

from edgecl.device.heads import LdaHead
from edgecl.errors import BundleError
from edgecl.formats import delta as D
from edgecl.formats import scatter as sc
from edgecl.formats.prototypes import Prototypes
from edgecl.formats.scoring import score

KEY = bytes(range(32))


def _classes(seed: int = 0, dim: int = 24, per_class: int = 40, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Correlated Gaussian classes: a shared covariance with a few strong directions, shifted means."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(dim, dim)) * np.r_[np.full(4, 3.0), np.full(dim - 4, 0.3)][:, None]
    x = np.concatenate([rng.normal(size=(per_class, dim)) @ mix + 2.0 * rng.normal(size=dim) for _ in range(classes)])
    return x, np.repeat(np.arange(classes), per_class)


def test_low_rank_keeps_the_trace_and_the_strong_directions():
    x, y = _classes()
    dense, count, groups = sc.class_scatter(x, y)
    assert (count, groups) == (120, 3)
    low = sc.Scatter.from_dense(dense, count, groups, rank=6)
    approx = low.dense()
    assert np.trace(approx) == pytest.approx(np.trace(dense), rel=1e-9)       # the shrinkage target stays exact
    assert np.linalg.norm(approx - dense) / np.linalg.norm(dense) < 0.15          # 4 strong directions of 24 held
    # a rank-0 factor is all residual: the scatter's trace spread evenly (what LDA shrinks towards)
    flat = sc.Scatter.from_dense(dense, count, groups, rank=0).dense()
    np.testing.assert_allclose(flat, np.trace(dense) / 24 * np.eye(24), rtol=1e-9)


def test_class_scatter_is_what_the_lda_head_accumulates():
    x, y = _classes(1)
    head = LdaHead(dim=24)
    head.add(x, y)
    dense, count, groups = sc.class_scatter(x, y)
    np.testing.assert_allclose(head.scatter, dense)
    np.testing.assert_allclose(head.covariance(), sc.covariance(dense, count, groups))


def test_lda_scoring_matches_the_device_head():
    x, y = _classes(2)
    head = LdaHead(dim=24)
    head.add(x, y)
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    test, truth = _classes(3)
    truth_names = [f"c{c}" for c in truth]
    expected = float(np.mean(head.logits(test, means).argmax(1) == truth))
    got = score(test, truth_names, Prototypes(["c0", "c1", "c2"], means.astype(np.float32), np.full(3, 40)),
                covariance=head.covariance())
    assert got is not None and got["accuracy"] == pytest.approx(expected)


def _statistics_delta(scatter: sc.Scatter | None, base: sc.Scatter | None) -> D.Delta:
    x, y = _classes(4)
    means = np.stack([x[y == c].mean(0) for c in range(3)]).astype(np.float32)
    return D.Delta(bundle_id="b", bundle_version=2, base_sha256="0" * 64, mask_sha256="f" * 64, device_id="dev-a",
                   delta_k=10, positions=np.zeros(0, np.int32), values=np.zeros(0, np.float32),
                   samples_seen=120, metrics={"statistics_only": 1.0},
                   prototypes=Prototypes(["a", "b", "c"], means, np.full(3, 40)), scatter=scatter, base_scatter=base)


def test_statistics_delta_round_trips_the_scatter_as_version_5():
    x, y = _classes(4)
    scatter = sc.Scatter.of(x, y, rank=8)
    base = sc.Scatter.of(x * 1.1, y, rank=8)
    data = D.save(_statistics_delta(scatter, base), KEY)
    assert D.read_header(data).metadata["format_version"] == "5"
    back = D.load(data, KEY)
    assert back.scatter is not None and back.base_scatter is not None
    np.testing.assert_array_equal(back.scatter.factor, scatter.factor)   # float16 both ways: exact
    assert (back.scatter.count, back.scatter.groups) == (120, 3)
    assert back.base_scatter.residual == pytest.approx(base.residual)
    # without a scatter the file stays at the lowest version that holds its content
    assert D.read_header(D.save(_statistics_delta(None, None), KEY)).metadata["format_version"] == "2"


def test_a_scatter_that_does_not_describe_the_statistics_is_refused():
    x, y = _classes(4)
    good = D.save(_statistics_delta(sc.Scatter.of(x, y, rank=8), None), KEY)
    # counts other images than the class statistics
    with pytest.raises(D.DeltaShapeError, match="counts 999 images"):
        D.load(forge(good, KEY, meta={"scatter": D.canonical_json({"count": 999, "groups": 3, "residual": 1.0})}), KEY)
    # another number of classes
    with pytest.raises(D.DeltaShapeError, match="counts 2 classes"):
        D.load(forge(good, KEY, meta={"scatter": D.canonical_json({"count": 120, "groups": 2, "residual": 1.0})}), KEY)
    # a negative residual trace
    with pytest.raises(D.DeltaMetadataError, match="residual"):
        D.load(forge(good, KEY, meta={"scatter": D.canonical_json({"count": 120, "groups": 3, "residual": -1.0})}), KEY)
    # an older version cannot carry one
    with pytest.raises(D.DeltaMetadataError, match="version 5"):
        D.load(forge(good, KEY, meta={"format_version": "4"}), KEY)
    # NaN in the factor
    with pytest.raises(D.DeltaEncodeError, match="NaN"):
        bad = sc.Scatter.of(x, y, rank=8)
        bad.factor[0, 0] = np.nan
        D.save(_statistics_delta(bad, None), KEY)


def test_the_bundle_file_round_trips_and_refuses_damage(tmp_path):
    x, y = _classes(5)
    scatter = sc.Scatter.of(x, y, rank=8)
    path = tmp_path / "fleet_scatter.safetensors"
    sc.save_file(path, scatter, ["a", "b", "c"])
    back, classes, calibration = sc.load_file(path, 24)
    assert calibration is None                         # none fitted (edgecl release fits one)
    assert classes == ["a", "b", "c"]
    np.testing.assert_allclose(back.dense(), scatter.dense())
    with pytest.raises(BundleError, match="factor"):
        sc.load_file(path, 32)                         # another backbone's embedding size
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(BundleError, match="not a scatter file"):
        sc.load_file(path, 24)


def test_statistics_answer_is_one_devices_images_under_both_backbones():
    """restat (device) and the release's shared exemplars (host) build a statistics answer the same way:
    means and counts under the candidate and the current backbone, the scatter under both, version 5."""
    from types import SimpleNamespace

    from edgecl.formats.candidate import statistics_answer

    x, y = _classes(5)
    base = x * 0.5 + 1.0                                 # the same images under another backbone
    manifest = SimpleNamespace(bundle_id="b", version=2, base_sha256="0" * 64, mask_sha256="f" * 64, selected=10)
    # labels index ``classes``; a class with no image ("d") is left out, the others keep their order
    got = statistics_answer(manifest, "dev-a", ["a", "b", "c", "d"], y, x, base)
    assert got.prototypes is not None and got.base_prototypes is not None
    assert got.prototypes.classes == got.base_prototypes.classes == ["a", "b", "c"]
    assert got.prototypes.counts.tolist() == got.base_prototypes.counts.tolist() == [40, 40, 40]
    assert got.samples_seen == 120 and not len(got.positions)
    for c in range(3):
        assert np.allclose(got.prototypes.means[c], x[y == c].mean(0), atol=1e-5)
        assert np.allclose(got.base_prototypes.means[c], base[y == c].mean(0), atol=1e-5)
    assert got.scatter is not None and got.base_scatter is not None
    for scatter, emb in ((got.scatter, x), (got.base_scatter, base)):
        dense, count, groups = sc.class_scatter(emb, y)
        assert (scatter.count, scatter.groups) == (count, groups) == (120, 3)
        assert scatter.factor.shape[1] == sc.RANK_DEVICE
        assert np.trace(scatter.dense()) == pytest.approx(np.trace(dense), rel=1e-4)
    loaded = D.load(D.save(got, KEY))
    assert D.read_header(D.save(got, KEY)).metadata["format_version"] == "5"
    assert loaded.base_prototypes is not None and loaded.base_prototypes.classes == ["a", "b", "c"]
