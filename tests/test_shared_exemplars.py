"""The fleet round's "exemplars shared" mode (issue 21), on the device: a profile with
``share_exemplars = true`` makes `edgecl delta` carry the device's stored exemplars of the classes it
added (its own images only, never a class it did not train, never more than it counted); the default
profile sends none. Real tiny bundle, real onnxruntime training, real images."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from test_device_adapt import make_image_folder

from edgecl.device.adapt import AdaptOptions, adapt
from edgecl.device.deltafile import make_delta
from edgecl.device.provision import make_device_config
from edgecl.device.state import load_current, open_bundle
from edgecl.errors import ConfigError
from edgecl.formats import delta as delta_format
from edgecl.formats import manifest as mf
from edgecl.formats.config import load_profile
from edgecl.formats.exemplars import ExemplarMemory
from edgecl.formats.prototypes import image_fingerprints


def _profile(path: Path, share: bool, store: bool = True) -> Path:
    path.write_text(f'name = "t"\nstore_images = {str(store).lower()}\nshare_exemplars = {str(share).lower()}\n')
    return path


def test_profile_key_is_checked(tmp_path):
    assert load_profile(_profile(tmp_path / "a.toml", True)).share_exemplars is True
    assert load_profile(_profile(tmp_path / "b.toml", False)).share_exemplars is False
    with pytest.raises(ConfigError, match="share_exemplars = true needs store_images = true"):
        load_profile(_profile(tmp_path / "c.toml", True, store=False))
    (tmp_path / "d.toml").write_text('name = "t"\nshare_exemplars = "yes"\n')
    with pytest.raises(ConfigError, match="share_exemplars must be true or false"):
        load_profile(tmp_path / "d.toml")


def test_delta_shares_own_classes_exemplars_only_when_the_profile_says(tiny_bundle, tmp_path):
    device = tmp_path / "device"
    shutil.copytree(tiny_bundle, device)
    data = make_image_folder(tmp_path / "data", {"bolt": 12, "nut": 10}, seed=31)
    adapt(device, data, AdaptOptions(epochs=1, lr=0.05, gate=False, progress=False))
    sharing = make_device_config("http://127.0.0.1:1", "line-a", "t", "ab" * 32,
                                 profile=str(_profile(tmp_path / "share.toml", True)))
    default = make_device_config("http://127.0.0.1:1", "line-a", "t", "ab" * 32)

    report = make_delta(device, tmp_path / "plain.safetensors", config=default)
    assert report.exemplars == 0 and report.exemplar_bytes == 0
    assert delta_format.load_file(tmp_path / "plain.safetensors").exemplars is None

    report = make_delta(device, tmp_path / "shared.safetensors", config=sharing)
    d = delta_format.load_file(tmp_path / "shared.safetensors")
    assert d.exemplars is not None and d.exemplars.classes == ["bolt", "nut"]
    # the device's own stored images of those classes, byte for byte, and never a calibration image
    state = load_current(open_bundle(device))
    memory = ExemplarMemory.load_file(state.exemplars_path)
    for name in ("bolt", "nut"):
        assert np.array_equal(d.exemplars.of_class(name), memory.of_class(name))
    shipped = ExemplarMemory.load_file(device / mf.EXEMPLARS)
    assert not set(shipped.classes) & set(d.exemplars.classes)
    assert not np.isin(image_fingerprints(d.exemplars.pixels), image_fingerprints(shipped.pixels)).any()
    # bounded by what the device counted, and reported with its size
    for i, name in enumerate(d.exemplars.classes):
        assert np.sum(d.exemplars.labels == i) <= d.prototypes.counts[d.prototypes.classes.index(name)]
    assert report.exemplars == len(d.exemplars.labels) > 0
    assert 0 < report.exemplar_bytes < report.bytes
    assert report.bytes > (tmp_path / "plain.safetensors").stat().st_size
    # an explicit choice overrides the profile
    assert make_delta(device, tmp_path / "off.safetensors", config=sharing, share_exemplars=False).exemplars == 0
