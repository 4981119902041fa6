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


def test_the_host_reads_shared_images_of_the_devices_own_classes_only():
    """Issue 21's poison rule: a delta's images of a class the current version knows are never read,
    nor images of another size."""
    from edgecl.formats.prototypes import Prototypes
    from edgecl.shared_exemplars import own_exemplars

    rng = np.random.default_rng(2)
    memory = ExemplarMemory(["class0", "bolt", "nut"], rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8),
                            np.array([0, 0, 1, 1, 2, 2]))
    d = delta_format.Delta.from_dense(np.zeros(4, np.float32), bundle_id="b", bundle_version=1, base_sha256="0" * 64,
                                      mask_sha256="0" * 64, device_id="line-a", samples_seen=9,
                                      prototypes=Prototypes(["class0", "bolt", "nut"], np.zeros((3, 2), np.float32),
                                                            np.array([2, 2, 2])), exemplars=memory)
    got = own_exemplars(d, ["bolt"], (8, 8))
    assert got is not None and got.classes == ["bolt"] and got.labels.tolist() == [0, 0]
    assert np.array_equal(got.pixels, memory.of_class("bolt"))
    assert own_exemplars(d, [], (8, 8)) is None                  # only classes the current version knows
    assert own_exemplars(d, ["bolt"], (16, 16)) is None          # another input size
    d.exemplars = None
    assert own_exemplars(d, ["bolt"], (8, 8)) is None


def test_released_bundle_lists_and_hashes_the_fleets_exemplars(tiny_bundle, tmp_path):
    from edgecl.formats.prototypes import Prototypes
    from edgecl.shared_exemplars import SharedStatistics, attach_fleet_exemplars

    bundle = tmp_path / "v2"
    shutil.copytree(tiny_bundle, bundle)
    size = tuple(mf.load_manifest(bundle).input_size)
    rng = np.random.default_rng(3)
    fleet = ExemplarMemory(["bolt", "gear"], rng.integers(0, 256, (5, *size, 3), dtype=np.uint8),
                           np.array([0, 0, 0, 1, 1]))
    before = ExemplarMemory.load_file(bundle / mf.EXEMPLARS)
    attach_fleet_exemplars(bundle, SharedStatistics({}, Prototypes.empty(4), fleet), ["bolt"])  # gear not shipped
    opened = open_bundle(bundle)                                  # every listed file's sha256 checked
    shipped = ExemplarMemory.load_file(opened.path(mf.EXEMPLARS))
    assert shipped.classes == [*before.classes, "bolt"]
    assert np.array_equal(shipped.of_class("bolt"), fleet.of_class("bolt"))
    assert mf.load_manifest(bundle).sizes.get(mf.EXEMPLARS, (bundle / mf.EXEMPLARS).stat().st_size) == \
        (bundle / mf.EXEMPLARS).stat().st_size
    # a flipped byte in it is refused by the device
    raw = bytearray((bundle / mf.EXEMPLARS).read_bytes())
    raw[-1] ^= 0xFF
    (bundle / mf.EXEMPLARS).write_bytes(bytes(raw))
    from edgecl.errors import BundleError

    with pytest.raises(BundleError):
        open_bundle(bundle)


def test_adapt_replays_the_bundles_fleet_exemplars_within_the_budget(tiny_bundle, tmp_path):
    """A device whose memory lacks classes its bundle ships exemplars of (and its statistics know)
    replays them; over the budget every class shrinks to its share."""
    from edgecl.device.episode import with_fleet_exemplars
    from edgecl.formats.config import DeviceProfile
    from edgecl.formats.prototypes import Prototypes

    bundle = open_bundle(tiny_bundle)
    shipped = ExemplarMemory.load_file(bundle.path(mf.EXEMPLARS))
    state = load_current(bundle)
    h, w = bundle.manifest.input_size
    rng = np.random.default_rng(5)
    mine = ExemplarMemory(["bolt"], rng.integers(0, 256, (4, h, w, 3), dtype=np.uint8), np.zeros(4, np.int64))
    state.prototypes = Prototypes([*state.prototypes.classes, "bolt"],
                                  np.zeros((len(state.prototypes.classes) + 1, 4), np.float32),
                                  np.ones(len(state.prototypes.classes) + 1, np.int64))
    roomy = DeviceProfile(name="t", exemplar_budget_mb=16)
    got = with_fleet_exemplars(mine, bundle, state, roomy, use=True)
    assert got.classes == ["bolt", *shipped.classes] and len(got.labels) == 4 + len(shipped.labels)
    assert with_fleet_exemplars(mine, bundle, state, roomy, use=False) is mine
    tight = DeviceProfile(name="t", exemplar_budget_mb=0)
    assert len(with_fleet_exemplars(mine, bundle, state, tight, use=True).labels) == 0


def test_a_devices_restat_answer_wins_over_its_shared_images(tiny_bundle):
    """Phase 2: a covered device that answered keeps its answer (it counts every image it holds, the
    shared ones among them: both would count those twice); one that did not is answered by its images."""
    from edgecl.formats.candidate import statistics_delta
    from edgecl.formats.prototypes import Prototypes
    from edgecl.shared_exemplars import SharedStatistics, answer_from_shared

    manifest = mf.load_manifest(tiny_bundle)
    answered = statistics_delta(manifest, "line-a", Prototypes(["bolt"], np.ones((1, 4), np.float32), np.array([12])))
    gear = statistics_delta(manifest, "line-b", Prototypes(["gear"], np.full((1, 4), 2, np.float32), np.array([6])))
    shared = SharedStatistics({"line-a": statistics_delta(manifest, "line-a", Prototypes(
                                   ["bolt"], np.zeros((1, 4), np.float32), np.array([5]))),
                               "line-b": gear},
                              Prototypes.empty(4), ExemplarMemory.empty((8, 8)))
    received = {"line-a": answered}
    assert answer_from_shared(received, shared, ["line-a", "line-b"]) == ["line-b"]
    assert received["line-a"] is answered and received["line-b"] is gear
    assert answer_from_shared({}, None, ["line-a"]) == []


def test_fleet_memory_joins_the_versions_and_the_devices_exemplars_and_names_what_has_none(tmp_path):
    """`release --consolidate`'s training data: the current version's exemplars plus each device's shared
    ones of its own classes, one label space; a class nobody holds an image of is named."""
    from edgecl.shared_exemplars import fleet_memory

    rng = np.random.default_rng(0)

    def memory(classes: list[str], per: int) -> ExemplarMemory:
        labels = np.repeat(np.arange(len(classes)), per).astype(np.int64)
        return ExemplarMemory(classes, rng.integers(0, 255, (len(labels), 8, 8, 3), np.uint8), labels)

    version = memory(["a", "b"], 3)
    version.save_file(tmp_path / "exemplars.safetensors")
    shared = {"dev-1": memory(["c"], 2), "dev-2": memory(["d", "e"], 4)}
    own = {"dev-1": ["c"], "dev-2": ["d", "e"], "dev-3": ["f"]}
    joined, missing = fleet_memory(tmp_path / "exemplars.safetensors", ["a", "b"], own, shared, (8, 8))
    assert missing == ["f"]
    assert joined.classes == ["a", "b", "c", "d", "e"]
    assert [int((joined.labels == i).sum()) for i in range(5)] == [3, 3, 2, 4, 4]
    assert np.array_equal(joined.of_class("d"), shared["dev-2"].of_class("d"))
    assert np.array_equal(joined.of_class("a"), version.of_class("a"))
    # no exemplar file in the version: its classes are named too
    _, missing = fleet_memory(tmp_path / "none.safetensors", ["a", "b"], own, shared, (8, 8))
    assert missing == ["a", "b", "f"]
