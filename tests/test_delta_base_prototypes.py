"""The delta's base-space prototypes (format 3): an adapted device's classes as the bundle's own
backbone would place them, which the fleet's release gate needs for its frozen baseline and only the
device (holding the images) can compute. Real tiny bundle, real onnxruntime training, real images."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from test_device_adapt import make_image_folder

from edgecl.device.adapt import AdaptOptions, adapt
from edgecl.device.deltafile import make_delta
from edgecl.device.state import load_current, open_bundle
from edgecl.formats import delta as delta_format


def _prototypes(bundle: Path) -> dict[str, np.ndarray]:
    p = load_current(open_bundle(bundle)).prototypes
    return {c: p.means[i].astype(np.float64) for i, c in enumerate(p.classes)}


def test_an_adapted_device_sends_its_classes_moved_back_to_the_bundles_backbone(tiny_bundle, tmp_path):
    data = make_image_folder(tmp_path / "data", {"bolt": 12, "nut": 12}, seed=21)
    adapted, frozen = tmp_path / "adapted", tmp_path / "frozen"
    shutil.copytree(tiny_bundle, adapted)
    shutil.copytree(tiny_bundle, frozen)
    adapt(adapted, data, AdaptOptions(epochs=2, lr=0.05, gate=False, progress=False))
    # The truth the device approximates: the same images embedded by the bundle's backbone (no training).
    adapt(frozen, data, AdaptOptions(epochs=0, progress=False))

    def sent() -> tuple[delta_format.Delta, dict[str, np.ndarray]]:
        # fp32 values and prototypes: this test compares the recorded table to float noise
        make_delta(adapted, tmp_path / "adapted.safetensors", values="fp32", device_id="line-a")
        d = delta_format.load_file(tmp_path / "adapted.safetensors")
        assert np.any(d.values) and delta_format.read_header(
            (tmp_path / "adapted.safetensors").read_bytes()).metadata["format_version"] == "3"
        # only the device's new classes: the bundle's own prototypes are base-space and exact already
        assert d.base_prototypes.classes == ["bolt", "nut"] and d.base_prototypes.counts.tolist() == [12, 12]
        return d, {c: d.base_prototypes.means[i].astype(np.float64) for i, c in enumerate(d.base_prototypes.classes)}

    moved, truth = _prototypes(adapted), _prototypes(frozen)
    # adapt recorded them from every image under the bundle's backbone: the frozen copy's own prototypes
    _, base = sent()
    for c in ("bolt", "nut"):
        np.testing.assert_allclose(base[c], truth[c], rtol=1e-4, atol=1e-5 * np.abs(truth[c]).max())
        assert np.linalg.norm(moved[c] - truth[c]) > 1e-3 * np.linalg.norm(truth[c])   # the backbone did move
    # A state without that record (from an older edgecl): moved back by the class's exemplars' drift,
    # much nearer the truth than the adapted prototype is.
    state = load_current(open_bundle(adapted))
    state.base_prototypes_path.unlink()
    _forget_file(state.base_prototypes_path)  # as that older edgecl wrote it: checksummed without the file
    _, estimate = sent()
    for c in ("bolt", "nut"):
        far, near = np.linalg.norm(moved[c] - truth[c]), np.linalg.norm(estimate[c] - truth[c])
        assert near < 0.5 * far, (c, near, far)


def _forget_file(path):
    """Take a deleted file out of its generation's checksums (meta.json's files, HEAD's meta_sha256)."""
    import hashlib
    import json
    meta_path = path.parent / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["files"][path.name]
    meta_path.write_text(json.dumps(meta))
    head_path = path.parent.parent / "HEAD.json"
    head = json.loads(head_path.read_text())
    head["meta_sha256"][path.parent.name] = hashlib.sha256(meta_path.read_bytes()).hexdigest()
    head_path.write_text(json.dumps(head))


def test_a_device_whose_backbone_did_not_change_sends_none(tiny_bundle, tmp_path):
    data = make_image_folder(tmp_path / "data", {"bolt": 6}, seed=22)
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    adapt(bundle, data, AdaptOptions(epochs=0, progress=False))       # its prototypes are base-space already
    make_delta(bundle, tmp_path / "d.safetensors", device_id="line-b")
    d = delta_format.load_file(tmp_path / "d.safetensors")
    assert not np.any(d.values) and d.base_prototypes is None and "bolt" in d.prototypes.classes
    assert delta_format.read_header((tmp_path / "d.safetensors").read_bytes()).metadata["format_version"] == "2"
