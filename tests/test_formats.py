"""Formats shared by all sides: exact bytes, round trips, one clear error per failure."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from edgecl.errors import BundleError, ConfigError, DataError, EdgeclError
from edgecl.formats.atomic import atomic_dir, atomic_write_bytes
from edgecl.formats.config import load_profile, load_recipe
from edgecl.formats.images import load_image_folder, random_view, scan_image_folder, two_views
from edgecl.formats.manifest import BundleManifest
from edgecl.formats.mask import Mask, overlap_from_bytes, overlap_to_bytes
from edgecl.formats.prototypes import Prototypes

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]


def golden_mask() -> Mask:
    return Mask(order=["conv.weight", "conv.bias"], shapes={"conv.weight": (2, 1, 2, 2), "conv.bias": (2,)},
                indices={"conv.weight": np.array([1, 6]), "conv.bias": np.array([0, 1])},
                overlap={"conv.weight": np.array([0, 3])}, total_params=10)


def test_mask_exact_bytes() -> None:
    """The spec in docs/bundle-format.md, byte for byte (regenerate only on a format version bump)."""
    expected = (FIXTURES / "mask_golden.safetensors").read_bytes()
    assert golden_mask().to_bytes() == expected


def test_mask_round_trip_and_derived_values() -> None:
    mask = Mask.from_bytes(golden_mask().to_bytes())
    assert mask.order == ["conv.weight", "conv.bias"]
    assert mask.counts == [2, 2] and mask.offsets == [0, 2] and mask.total_selected == 4
    assert mask.selected_fraction == pytest.approx(0.4)
    assert mask.overlap_vector().tolist() == [0, 3, 0, 0]
    base = {"conv.weight": np.zeros((2, 1, 2, 2), np.float32), "conv.bias": np.ones(2, np.float32)}
    out = mask.scatter(np.array([1, 2, 3, 4], np.float32), base)
    assert out["conv.weight"].reshape(-1).tolist() == [0, 1, 0, 0, 0, 0, 2, 0]
    assert out["conv.bias"].tolist() == [4, 5]
    assert base["conv.bias"].tolist() == [1, 1], "scatter must not modify the base in place"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "indices_out_of_range"])
def test_mask_damage_is_one_clear_error(damage: str) -> None:
    data = golden_mask().to_bytes()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = b"not a safetensors file at all"
    else:
        bad = golden_mask()
        bad.indices["conv.weight"] = np.array([1, 99], np.int32)
        with pytest.raises(BundleError, match="indices"):
            bad.validate()
        return
    with pytest.raises(BundleError, match="mask"):
        Mask.from_bytes(data)


def test_overlap_round_trip() -> None:
    ov = {"a.weight": (np.array([1, 5]), np.array([2, 1]))}
    back = overlap_from_bytes(overlap_to_bytes(ov))
    assert back["a.weight"][0].tolist() == [1, 5] and back["a.weight"][1].tolist() == [2, 1]


def test_prototypes_round_trip_and_upsert() -> None:
    p = Prototypes.empty(3)
    p.upsert("a", np.array([1, 2, 3]), 5)
    p.upsert("b", np.array([0, 0, 1]), 2)
    p.upsert("a", np.array([3, 2, 1]), 7)
    back = Prototypes.from_bytes(p.to_bytes())
    assert back.classes == ["a", "b"]
    assert back.means.tolist() == [[3, 2, 1], [0, 0, 1]] and back.counts.tolist() == [7, 2]
    with pytest.raises(BundleError):
        Prototypes.from_bytes(p.to_bytes()[:40])


def test_manifest_rejects_newer_format_and_missing_keys() -> None:
    ok = {"bundle_id": "x", "version": 1, "model_name": "m", "input_size": [8, 8], "mean": [0.5] * 3,
          "std": [0.5] * 3, "embedding_dim": 4, "proj_dim": 2, "total_params": 10, "selected": 1,
          "select_rate": 0.1, "drop_rate": 0.9, "base_sha256": "0" * 64, "mask_sha256": "1" * 64}
    assert BundleManifest.from_json(ok).selected == 1
    with pytest.raises(BundleError, match="newer"):
        BundleManifest.from_json({**ok, "format_version": 99})
    with pytest.raises(BundleError, match="lacks selected"):
        BundleManifest.from_json({k: v for k, v in ok.items() if k != "selected"})


def test_all_shipped_recipes_and_profiles_load() -> None:
    for path in sorted((REPO / "models").glob("*.toml")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            recipe = load_recipe(path)
        assert recipe.name and len(recipe.input_size) == 2
    profiles = sorted((REPO / "devices").glob("*.toml"))
    assert len(profiles) >= 4
    for path in profiles:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert load_profile(path).name


def test_config_unknown_key_warns_missing_key_errors(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text('name = "x"\ntimm_model = "test_vit"\ncolour = "blue"\n')
    with pytest.warns(UserWarning, match="colour"):
        load_recipe(path)
    path.write_text('timm_model = "test_vit"\n')
    with pytest.raises(ConfigError, match="lacks required key"):
        load_recipe(path)
    path.write_text('name = "x"\ntimm_model = [\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_recipe(path)


def test_image_folder_skips_corrupt_and_counts(tmp_path: Path) -> None:
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.fromarray(np.full((10, 12), 40 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    folder = scan_image_folder(tmp_path)
    assert folder.classes == ["a", "b"] and len(folder.ignored) == 1
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        loaded = load_image_folder(tmp_path, (8, 8))
    assert loaded.pixels.shape == (4, 8, 8, 3) and loaded.pixels.dtype == np.uint8
    assert len(loaded.skipped) == 1 and loaded.labels.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("layout", ["missing", "flat", "empty"])
def test_image_folder_layout_errors(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "flat":
        (root / "x.png").write_bytes(b"")
    if layout == "empty":
        (root / "cls").mkdir()
    with pytest.raises(DataError):
        load_image_folder(root, (8, 8))


def test_augmentations_are_seeded_and_shaped() -> None:
    img = np.random.default_rng(0).integers(0, 255, (16, 16, 3)).astype(np.uint8)
    a = random_view(img, np.random.default_rng(5))
    b = random_view(img, np.random.default_rng(5))
    assert a.shape == img.shape and np.array_equal(a, b)
    views = two_views(np.stack([img, img]), np.random.default_rng(1), [0.5] * 3, [0.5] * 3)
    assert views.shape == (4, 3, 16, 16) and views.dtype == np.float32
    assert views.min() >= -1.0 - 1e-6 and views.max() <= 1.0 + 1e-6
    gray = random_view(img, np.random.default_rng(0), p_gray=1.0, p_flip=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert np.array_equal(gray[..., 0], gray[..., 1])


def test_atomic_writes_leave_old_state_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    with atomic_dir(tmp_path / "d") as d:
        (d / "payload").write_text("old folder")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "d", overwrite=True) as d:
        (d / "payload").write_text("half of the new folder")
        raise RuntimeError("killed mid-write")
    assert (tmp_path / "d" / "payload").read_text() == "old folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.bin"], "no temp files may be left behind"
    assert target.read_bytes() == b"old"
    with atomic_dir(tmp_path / "d", overwrite=True) as d:
        (d / "payload").write_text("new folder")
    assert (tmp_path / "d" / "payload").read_text() == "new folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.bin"]


def test_atomic_dir_overwrite_never_leaves_the_path_empty(tmp_path: Path) -> None:
    """A reader in another process polls the folder while it is replaced 300 times: it must always be
    there (RENAME_EXCHANGE). The old rename-aside-then-rename-in code was seen missing ~700 times."""
    target = tmp_path / "bundle"
    with atomic_dir(target) as d:
        (d / "f").write_text("0")
    stop = tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", f"""
import os
missing = reads = 0
while not os.path.exists({str(stop)!r}):
    reads += 1
    missing += not os.path.exists({str(target)!r})
print(missing, reads)
"""], stdout=subprocess.PIPE, text=True)
    time.sleep(0.2)
    for i in range(300):
        with atomic_dir(target, overwrite=True) as d:
            (d / "f").write_text(str(i))
    stop.write_text("")
    missing, reads = map(int, reader.communicate(timeout=30)[0].split())
    assert reads > 1000, "the reader did not run alongside the writes"
    assert missing == 0
    assert (target / "f").read_text() == "299"


_KILLED_WRITER = """
import os, signal, sys
from edgecl.formats.atomic import atomic_dir
with atomic_dir(sys.argv[1]) as d:
    (d / "half.bin").write_bytes(b"x" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_temps_of_killed_writers_are_removed_by_the_next_write(tmp_path: Path) -> None:
    from edgecl.formats.atomic import clean_stale_temps

    killed = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(tmp_path / "bundle")], cwd=REPO,
                            timeout=60)
    assert killed.returncode == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".bundle.tmp-"), left
    # A live writer's young temp folder is kept; an hour-old one of a live pid (a reused pid) is not.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".other.tmp-{sleeper.pid}-abc"
        live.mkdir()
        ancient = tmp_path / f".third.tmp-{sleeper.pid}-def"
        ancient.write_bytes(b"left by a pid now reused")
        os.utime(ancient, (time.time() - 7200, time.time() - 7200))
        # The old version set aside by a swap that was killed before the new one was renamed in.
        aside = tmp_path / ".state.old-999999999-0123"
        aside.mkdir()
        (aside / "HEAD.json").write_text("{}")
        atomic_write_bytes(tmp_path / "other.bin", b"new")
        assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "other.bin", "state"]
        assert (tmp_path / "state" / "HEAD.json").read_text() == "{}", "the set-aside version is put back"
        assert clean_stale_temps(tmp_path) == []
    finally:
        sleeper.kill()
        sleeper.wait()
    assert clean_stale_temps(tmp_path) == [live]


def test_full_disk_on_a_real_tmpfs(tmp_path: Path) -> None:
    """ENOSPC from a real 1 MiB file system (not a monkeypatched os call): one EdgeclError, the previous
    file and folder intact, no temp left."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a 1 MiB tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()})")
    try:
        atomic_write_bytes(mnt / "f.bin", b"o" * 300_000)
        with atomic_dir(mnt / "d") as d:
            (d / "w.bin").write_bytes(b"o" * 300_000)
        with pytest.raises(EdgeclError, match="no space left"):
            atomic_write_bytes(mnt / "f.bin", b"n" * 600_000)
        with pytest.raises(EdgeclError, match="no space left"), atomic_dir(mnt / "d", overwrite=True) as d:
            (d / "w.bin").write_bytes(b"n" * 600_000)
        assert (mnt / "f.bin").read_bytes() == b"o" * 300_000
        assert (mnt / "d" / "w.bin").read_bytes() == b"o" * 300_000
        assert sorted(p.name for p in mnt.iterdir()) == ["d", "f.bin"]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_mask_small_tensor_policies() -> None:
    from edgecl.host.masking import select_mask

    rng = np.random.default_rng(0)
    scores = {"w": rng.random((40, 50)).astype(np.float32), "b": rng.random(40).astype(np.float32)}
    full = select_mask(scores, 0.1)
    assert full.indices["b"].size == 40  # 1-D tensors fully trainable (fits in a quarter of the budget)
    ranked = select_mask(scores, 0.1, small_tensors="ranked")
    assert ranked.indices["b"].size == 4  # ranked like the weights: 10% of 40
    for mask in (full, ranked):
        assert abs(mask.selected_fraction - 0.1) < 0.005
    top = np.sort(np.argsort(-scores["w"].reshape(-1))[: ranked.indices["w"].size])
    assert np.array_equal(ranked.indices["w"], top), "the mask keeps each tensor's top elements by score"
    with pytest.raises(ConfigError):
        select_mask(scores, 0.1, small_tensors="none")
