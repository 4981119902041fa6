"""Device hardening (issue 10): what a user or a bad disk can do to a bundle, and the one line they get.

Most tests run on a hand-made bundle: real files in tmp_path with the exact layout, hashes and mask of
an exported one, but placeholder graphs (no torch needed to build it); these exercise open_bundle, the
state folder, the lock and the config checks. The tests that run a graph use the exported tiny_bundle.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgecl.errors import BundleError, ConfigError, DataError, DeviceError
from edgecl.formats import manifest as mf
from edgecl.formats.hashing import sha256_bytes, sha256_file
from edgecl.formats.mask import Mask
from edgecl.formats.prototypes import Prototypes

REPO = Path(__file__).resolve().parents[1]
EMBED_DIM = 4


# -- a hand-made bundle ------------------------------------------------------------------------------

def make_bundle(root: Path, version: int = 1, bundle_id: str = "line-a", device_profile: dict | None = None) -> Path:
    """manifest.json + every required file; the graphs are placeholder bytes (nothing here runs them)."""
    root.mkdir(parents=True)
    mask = Mask(order=["conv.weight", "fc.bias"], shapes={"conv.weight": (2, 1, 2, 2), "fc.bias": (3,)},
                indices={"conv.weight": np.array([1, 6], np.int32), "fc.bias": np.array([0, 2], np.int32)},
                total_params=11)
    (root / mf.MASK).write_bytes(mask.to_bytes())
    protos = Prototypes(["bolt", "nut"], np.eye(2, EMBED_DIM, dtype=np.float32), np.array([3, 4], np.int64))
    (root / mf.PROTOTYPES).write_bytes(protos.to_bytes())
    for name in (mf.TRAIN_STEP, mf.INFERENCE_MODEL, mf.WEIGHTS, mf.HEAD_INIT):
        (root / name).write_bytes(f"placeholder {name} of {bundle_id} v{version}".encode() * 50)
    files = {p.name: sha256_file(p) for p in sorted(root.iterdir())}
    manifest = mf.BundleManifest(
        bundle_id=bundle_id, version=version, model_name="hand-made", input_size=[8, 8], mean=[0.5] * 3,
        std=[0.5] * 3, embedding_dim=EMBED_DIM, proj_dim=2, total_params=11, selected=mask.total_selected,
        select_rate=0.4, drop_rate=0.9, base_sha256=sha256_bytes(b"base"), mask_sha256=files[mf.MASK],
        classes=["bolt", "nut"], files=files, device_profile=device_profile or {})
    manifest.save(root)
    return root


def commit(bundle_dir: Path, tag: str = "x") -> str:
    from edgecl.device.state import PROTOTYPES, TRAINABLE, commit_generation, open_bundle, save_trainable

    bundle = open_bundle(bundle_dir)

    def write(tmp: Path) -> None:
        save_trainable(tmp / TRAINABLE, {mf.DELTA_PARAM: np.full(bundle.mask.total_selected, 0.5, np.float32)})
        Prototypes(["bolt", "nut", tag], np.eye(3, EMBED_DIM, dtype=np.float32),
                   np.array([1, 1, 1], np.int64)).save_file(tmp / PROTOTYPES)

    return commit_generation(bundle, write, {"tag": tag})


def rewrite_manifest(bundle_dir: Path, **changes) -> None:
    obj = json.loads((bundle_dir / mf.MANIFEST).read_text())
    obj.update(changes)
    (bundle_dir / mf.MANIFEST).write_text(json.dumps(obj))


def edgecl(*args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgecl.cli.main", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    lines = [x for x in done.stderr.splitlines() if x.strip()]
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


@pytest.fixture
def hand_bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "bundle")


# -- 1. files verified against the manifest -----------------------------------------------------------

def test_a_changed_file_is_refused_naming_it(hand_bundle: Path) -> None:
    from edgecl.device.state import open_bundle

    open_bundle(hand_bundle)
    path = hand_bundle / mf.INFERENCE_MODEL
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError) as info:
        open_bundle(hand_bundle)
    assert str(info.value) == ("bundle file inference.onnx does not match its sha256 in manifest.json: "
                               "re-copy the bundle from the host")


def test_listed_optional_file_missing_is_an_error(tmp_path: Path) -> None:
    from edgecl.device.state import open_bundle

    bundle = make_bundle(tmp_path / "b")
    (bundle / mf.EXEMPLARS).write_bytes(b"exemplar bytes")
    rewrite_manifest(bundle, files={**mf.load_manifest(bundle).files, mf.EXEMPLARS: sha256_file(bundle / mf.EXEMPLARS)})
    open_bundle(bundle)
    (bundle / mf.EXEMPLARS).unlink()
    with pytest.raises(BundleError, match="bundle file exemplars.safetensors listed in manifest.json is missing"):
        open_bundle(bundle)


def test_prototypes_deleted_after_opening_is_an_error_not_zero_classes(hand_bundle: Path) -> None:
    from edgecl.device.state import load_current, open_bundle

    bundle = open_bundle(hand_bundle)
    (hand_bundle / mf.PROTOTYPES).unlink()
    with pytest.raises(BundleError, match="prototypes.safetensors is missing"):
        load_current(bundle)


def test_a_same_size_change_with_the_mtime_kept_is_caught(hand_bundle: Path) -> None:
    """Every file is hashed on every use: no (size, mtime) shortcut lets a same-size edit (or bit rot,
    which changes neither) through. One line naming the file, exit 1, nothing written."""
    from edgecl.device.state import open_bundle

    commit(hand_bundle)  # a state folder exists: the old cache lived there
    path = hand_bundle / mf.WEIGHTS
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    before = _tree(hand_bundle)
    with pytest.raises(BundleError, match="weights.safetensors does not match its sha256"):
        open_bundle(hand_bundle)
    assert one_error_line(edgecl("eval", hand_bundle, "--data", hand_bundle)) == (
        "error: bundle file weights.safetensors does not match its sha256 in manifest.json: "
        "re-copy the bundle from the host")
    assert _tree(hand_bundle) == before


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("files", [None, "drop-weights", "drop-exemplars"])
def test_a_manifest_without_files_does_not_turn_the_check_off(tmp_path: Path, files: str | None) -> None:
    bundle = make_bundle(tmp_path / "b")
    (bundle / mf.EXEMPLARS).write_bytes(b"exemplar bytes")
    listed = {**mf.load_manifest(bundle).files, mf.EXEMPLARS: sha256_file(bundle / mf.EXEMPLARS)}
    if files is None:
        obj = json.loads((bundle / mf.MANIFEST).read_text())
        del obj["files"]
        (bundle / mf.MANIFEST).write_text(json.dumps(obj))
        expect = "train_step.onnx, inference.onnx, weights.safetensors, head.safetensors, mask.safetensors, " \
                 "prototypes.safetensors, exemplars.safetensors"
    else:
        del listed[mf.WEIGHTS if files == "drop-weights" else mf.EXEMPLARS]
        rewrite_manifest(bundle, files=listed)
        expect = mf.WEIGHTS if files == "drop-weights" else mf.EXEMPLARS
    line = one_error_line(edgecl("eval", bundle, "--data", tmp_path))
    assert line == (f"error: {bundle / mf.MANIFEST} lists no sha256 for {expect} (its `files`), so they cannot be "
                    "checked: re-copy the bundle from the host, or re-export it")
    assert not (bundle / "state").exists()


def test_an_edited_manifest_is_caught_against_the_pinned_sha256(bundle_copy: Path, tmp_path: Path) -> None:
    """The manifest is pinned (state/pinned.json) at the first successful use; editing its `mean`
    afterwards (which would silently move every prediction) is one line, exit 1."""
    from edgecl.device.state import PINNED

    first, _ = _image_folders(tmp_path)
    image = first / "class0" / "000.png"
    assert edgecl("predict", bundle_copy, image).returncode == 0
    pin = json.loads((bundle_copy / "state" / PINNED).read_text())
    assert pin["manifest_sha256"] == sha256_file(bundle_copy / mf.MANIFEST)
    rewrite_manifest(bundle_copy, mean=[0.4, 0.456, 0.406])
    before = _tree(bundle_copy)
    for args in (("predict", bundle_copy, image), ("eval", bundle_copy, "--data", first),
                 ("adapt", bundle_copy, "--data", first, "--epochs", 0), ("delta", bundle_copy, "-o", tmp_path / "d")):
        line = one_error_line(edgecl(*args))
        assert line == (f"error: {bundle_copy / mf.MANIFEST} changed since this device first used the bundle (its "
                        f"sha256 is pinned in {bundle_copy / 'state' / PINNED}): re-copy the bundle from the host or "
                        "`edgecl pull` it; a new bundle goes in a new folder"), args
    assert _tree(bundle_copy) == before and not (tmp_path / "d").exists()


def test_a_generation_records_its_manifest(hand_bundle: Path) -> None:
    """With the pin deleted, the generation's own record of the manifest still refuses an edited one."""
    from edgecl.device.state import PINNED, load_current, open_bundle

    commit(hand_bundle)
    (hand_bundle / "state" / PINNED).unlink()
    rewrite_manifest(hand_bundle, mean=[0.1, 0.2, 0.3])
    with pytest.raises(BundleError, match="manifest.json changed since gen-000001 was written for it"):
        load_current(open_bundle(hand_bundle))


def test_a_pin_without_the_bundle_identity_still_pins_the_manifest(hand_bundle: Path) -> None:
    from edgecl.device.state import PINNED, open_bundle

    (hand_bundle / "state").mkdir()
    (hand_bundle / "state" / PINNED).write_text(json.dumps({"manifest_sha256": "0" * 64}))
    with pytest.raises(BundleError, match="manifest.json changed since this device first used the bundle"):
        open_bundle(hand_bundle, verify=False)


def test_a_read_only_bundle_opens_without_pinning(tmp_path: Path) -> None:
    from edgecl.device.state import PINNED, load_current, open_bundle, save_verified

    if os.geteuid() != 0:
        bundle = make_bundle(tmp_path / "b")
        commit(bundle)
        (bundle / "state" / PINNED).unlink()
        (bundle / "state").chmod(0o500)
    else:  # root ignores permission bits: a real read-only file system
        mnt = tmp_path / "ro"
        mnt.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)]).returncode != 0:
            pytest.skip("cannot mount a tmpfs here")
        bundle = make_bundle(mnt / "b")
        commit(bundle)
        (bundle / "state" / PINNED).unlink()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    try:
        opened = open_bundle(bundle)
        state = load_current(opened)
        save_verified(opened)
        assert state.prototypes.classes == ["bolt", "nut", "x"]
        assert not (bundle / "state" / PINNED).exists()
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(mnt)], check=False)
        else:
            (bundle / "state").chmod(0o755)


def test_an_older_bundle_format_is_refused_clearly(hand_bundle: Path) -> None:
    from edgecl.device.state import open_bundle

    rewrite_manifest(hand_bundle, format_version=1)
    with pytest.raises(BundleError, match="format version 1; this edgecl runs format 2"):
        open_bundle(hand_bundle)


# -- 1b. the state belongs to its bundle ------------------------------------------------------------------

def test_generations_record_their_bundle_and_a_foreign_state_is_refused(hand_bundle: Path) -> None:
    from edgecl.device.state import load_current, open_bundle

    name = commit(hand_bundle)
    original = (hand_bundle / mf.MANIFEST).read_bytes()
    meta = json.loads((hand_bundle / "state" / name / "meta.json").read_text())
    assert {k: meta[k] for k in ("bundle_id", "bundle_version", "mask_sha256", "manifest_sha256", "tag")} == {
        "bundle_id": "line-a", "bundle_version": 1, "mask_sha256": sha256_file(hand_bundle / mf.MASK),
        "manifest_sha256": sha256_bytes(original), "tag": "x"}
    # The next version's files copied over the folder, its old state/ left in place:
    rewrite_manifest(hand_bundle, version=2)
    with pytest.raises(DeviceError, match=r"belongs to bundle line-a v1, not line-a v2"):
        load_current(open_bundle(hand_bundle))
    rewrite_manifest(hand_bundle, version=1, bundle_id="line-b")
    with pytest.raises(DeviceError, match=r"belongs to bundle line-a v1, not line-b v1"):
        load_current(open_bundle(hand_bundle))
    rewrite_manifest(hand_bundle, bundle_id="line-a")  # the same values, other bytes: not the pinned manifest
    with pytest.raises(BundleError, match=r"manifest.json changed since this device first used the bundle"):
        load_current(open_bundle(hand_bundle))
    (hand_bundle / mf.MANIFEST).write_bytes(original)
    assert load_current(open_bundle(hand_bundle)).prototypes.classes == ["bolt", "nut", "x"]


# -- 2. one writer at a time -------------------------------------------------------------------------------

_HOLDER = """
import sys, time
from pathlib import Path
from edgecl.device.state import bundle_lock, open_bundle
with bundle_lock(open_bundle(sys.argv[1]), "adapt"):
    print("locked", flush=True)
    while not Path(sys.argv[2]).exists():
        time.sleep(0.05)
"""


def _hold_lock(bundle: Path, release: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(bundle), str(release)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_writer_gets_one_line_naming_the_first(tmp_path: Path) -> None:
    old = make_bundle(tmp_path / "v1")
    new = make_bundle(tmp_path / "v2", version=2)
    rewrite_manifest(new, parent_sha256=sha256_file(old / mf.MANIFEST))
    commit(old)
    release = tmp_path / "release"
    holder = _hold_lock(old, release)
    try:
        rolled = edgecl("rollback", old)
        assert one_error_line(rolled) == (f"error: another edgecl adapt (pid {holder.pid}) is using {old}: "
                                          "wait for it to finish")
        upgraded = edgecl("upgrade", old, new)
        assert f"another edgecl adapt (pid {holder.pid}) is using {old}" in one_error_line(upgraded)
        assert not (new / "state").exists(), "the refused upgrade wrote nothing"
    finally:
        release.write_text("")
        holder.wait(timeout=30)
    assert sorted(p.name for p in (old / "state").iterdir()) == ["HEAD.json", "gen-000001", "pinned.json"], \
        "the lock file is removed on release"
    rolled = edgecl("rollback", old, "--json")
    assert rolled.returncode == 0, rolled.stderr
    assert json.loads(rolled.stdout) == {"undone": "gen-000001", "current": "bundle"}


def test_a_killed_holder_does_not_leave_the_bundle_locked(hand_bundle: Path, tmp_path: Path) -> None:
    commit(hand_bundle)
    holder = _hold_lock(hand_bundle, tmp_path / "never")
    assert "another edgecl adapt" in one_error_line(edgecl("rollback", hand_bundle))
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    rolled = edgecl("rollback", hand_bundle)
    assert rolled.returncode == 0 and "rolled back" in rolled.stdout, rolled.stderr


def test_a_failed_locked_command_leaves_no_state_folder(hand_bundle: Path) -> None:
    done = edgecl("rollback", hand_bundle)
    assert "no earlier state" in one_error_line(done)
    assert not (hand_bundle / "state").exists()


# -- 3. values type- and range-checked on load --------------------------------------------------------------

@pytest.mark.parametrize("key,value,expect", [
    ("epochs", "x", "epochs must be an integer (got 'x')"),
    ("input_size", 64, "input_size must be a list of integers (got 64)"),
    ("batch_size", -4, "batch_size must be >= 1 (got -4)"),
    ("drop_rate", 2, "drop_rate must be < 1 (got 2.0)"),
    ("select_rate", 0.0, "select_rate must be > 0 (got 0.0)"),
    ("std", [0.5, 0.0, 0.5], "std must be > 0 (got 0.0)"),
    ("lr_backbone", "fast", "lr_backbone must be a number (got 'fast')"),
    ("classes", ["a", 3], "classes must be a list of strings"),
    ("files", {"inference.onnx": "not-a-digest"}, "files must map plain file names to sha256 hex digests"),
    ("device_profile", {"name": "pi", "threads": "two"}, "threads must be an integer (got 'two')"),
    ("interpolation", "lanczos", "interpolation must be one of bilinear, bicubic, nearest"),
    ("epochs", True, "epochs must be an integer (got True)"),
])
def test_manifest_values_are_checked(hand_bundle: Path, key: str, value: object, expect: str) -> None:
    rewrite_manifest(hand_bundle, **{key: value})
    with pytest.raises(BundleError) as info:
        mf.load_manifest(hand_bundle)
    message = str(info.value)
    assert message.startswith(str(hand_bundle / mf.MANIFEST)) and expect in message, message
    assert "\n" not in message


@pytest.mark.parametrize("body,expect", [
    ('name = "pi"\nthreads = "two"\n', "threads must be an integer (got 'two')"),
    ('name = "pi"\nbatch_size = -1\n', "batch_size must be >= 1 (got -1)"),
    ('name = "pi"\nstore_images = "no"\n', "store_images must be true or false (got 'no')"),
    ('name = "pi"\nimage_size = [64]\n', "image_size must be [] or [H, W]"),
    ('name = "pi"\nexecution_provider = "GPU"\n', "execution_provider must be an onnxruntime provider name such as CPUExecutionProvider"),
    ('name = "pi"\nthreads = 1.5\n', "threads must be an integer (got 1.5)"),
])
def test_profile_values_are_checked(tmp_path: Path, body: str, expect: str) -> None:
    from edgecl.formats.config import load_profile

    path = tmp_path / "pi.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert str(info.value).startswith(f"device profile {path}: ") and expect in str(info.value), str(info.value)


@pytest.mark.parametrize("body,expect", [
    ('name = "r"\ntimm_model = "test_vit"\ninput_size = 64\n', "input_size must be a list of integers (got 64)"),
    ('name = "r"\ntimm_model = "test_vit"\nproj_dim = "x"\n', "proj_dim must be an integer (got 'x')"),
    ('name = "r"\ntimm_model = "test_vit"\nmean = [0.5, 0.5]\n', "mean must have 3 values (got 2)"),
    ('name = "r"\ntimm_model = "test_vit"\nproj_dim = 0\nstd = [0, 1, 1]\n', "std must be > 0 (got 0.0); proj_dim must be >= 1 (got 0)"),
    ('name = "r"\n', "set exactly one of timm_model or factory"),
])
def test_recipe_values_are_checked(tmp_path: Path, body: str, expect: str) -> None:
    from edgecl.formats.config import load_recipe

    path = tmp_path / "r.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"recipe {path}: ") and expect in str(info.value), str(info.value)


def test_a_bad_profile_is_one_line_from_the_cli(hand_bundle: Path, tmp_path: Path) -> None:
    profile = tmp_path / "pi.toml"
    profile.write_text('name = "pi"\nthreads = "two"\n')
    line = one_error_line(edgecl("eval", hand_bundle, "--data", tmp_path, "--device", profile))
    assert line == f"error: device profile {profile}: threads must be an integer (got 'two'): fix the file"


# -- 4. the bundle's own profile is the default ---------------------------------------------------------------

def test_the_bundle_profile_is_the_default_and_an_explicit_one_wins(tmp_path: Path) -> None:
    from edgecl.device.infer import resolve_profile
    from edgecl.device.state import open_bundle
    from edgecl.formats.config import DeviceProfile, load_profile

    pi = load_profile(REPO / "devices" / "raspberry_pi5.toml")
    bundle = open_bundle(make_bundle(tmp_path / "b", device_profile={**vars(pi), "future_key": 1}))
    chosen = resolve_profile(None, bundle)
    assert (chosen.name, chosen.store_images, chosen.threads) == ("raspberry_pi5", False, 4)
    explicit = resolve_profile(REPO / "devices" / "x86_cpu.toml", bundle)
    assert (explicit.name, explicit.store_images) == ("x86_cpu", True)
    assert resolve_profile(DeviceProfile(name="given"), bundle).name == "given"
    plain = open_bundle(make_bundle(tmp_path / "plain"))
    assert resolve_profile(None, plain).name == "default" and resolve_profile(None).name == "default"


# -- 5. predict: no hang on a FIFO, strict JSON, probabilities ---------------------------------------------

def test_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "camera.png"
    os.mkfifo(fifo)
    code = (f"from edgecl.formats.images import load_rgb\nfrom edgecl.errors import DataError\n"
            f"try:\n    load_rgb({str(fifo)!r}, (8, 8))\nexcept DataError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == f"{fifo} is a FIFO, not an image file: pass regular image files", done.stderr
    with pytest.raises(DataError, match="is a folder"):
        from edgecl.formats.images import load_rgb
        load_rgb(tmp_path, (8, 8))


def test_a_fifo_in_a_class_folder_is_not_scanned(tmp_path: Path) -> None:
    from PIL import Image

    from edgecl.formats.images import load_image_folder

    (tmp_path / "a").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "ok.png")
    os.mkfifo(tmp_path / "a" / "pipe.png")
    assert load_image_folder(tmp_path, (4, 4)).pixels.shape == (1, 4, 4, 3)


def test_ncm_probability_is_the_tempered_softmax_of_the_cosines() -> None:
    from edgecl.device.infer import NCM_TEMPERATURE, probabilities

    cosines = np.array([[0.9, 0.8, 0.1], [0.2, 0.2, 0.2]])
    p = probabilities(cosines, "ncm")
    assert np.allclose(p.sum(axis=1), 1.0) and np.allclose(p[1], 1 / 3)
    assert p[0, 0] / p[0, 1] == pytest.approx(np.exp(0.1 / NCM_TEMPERATURE))
    assert list(np.argsort(-p[0])) == [0, 1, 2]


def test_lda_probability_is_the_gaussian_posterior() -> None:
    """softmax of the discriminant scores = p(class | x) for Gaussians with the head's shared covariance
    and equal priors, computed here from the densities directly."""
    from edgecl.device.heads import LdaHead
    from edgecl.device.infer import probabilities

    rng = np.random.default_rng(0)
    means = np.array([[0.0, 0.0, 1.0], [1.0, 0.5, 0.0], [0.0, 1.5, 0.5]])
    y = np.repeat([0, 1, 2], 200)
    x = means[y] + rng.normal(size=(600, 3)) @ np.array([[1.0, 0.3, 0.0], [0.0, 0.5, 0.2], [0.0, 0.0, 0.7]])
    head = LdaHead(3, shrinkage=0.0)
    head.add(x, y)
    probe = rng.normal(size=(5, 3))
    p = probabilities(head.logits(probe, means), "lda")
    inv = np.linalg.inv(head.covariance())
    d = probe[:, None, :] - means[None]
    density = np.exp(-0.5 * np.einsum("ncd,de,nce->nc", d, inv, d))
    assert np.allclose(p, density / density.sum(axis=1, keepdims=True), atol=1e-9)


def test_json_output_never_holds_a_bare_nan() -> None:
    from edgecl.cli.options import jsonable
    from edgecl.device.infer import finite_or_none, probabilities

    p = probabilities(np.array([[np.nan, 0.3]]), "ncm")
    row = {"score": finite_or_none(np.float32("nan")), "probability": finite_or_none(p[0, 1]),
           "inf": float("inf"), "n": np.int64(3), "x": np.float32(0.25), "path": Path("a/b")}
    text = json.dumps(jsonable(row), allow_nan=False)
    assert json.loads(text) == {"score": None, "probability": None, "inf": None, "n": 3, "x": 0.25, "path": "a/b"}


# -- 7. progress bars only on a terminal --------------------------------------------------------------------

_BAR = """
import sys, time
from edgecl.progress import progress_bar
with progress_bar(3, "decode", enabled=sys.argv[1] == "on") as bar:
    for _ in range(3):
        bar.update(1)
print("done")
"""


@pytest.mark.parametrize("terminal,enabled,shown", [(True, "on", True), (True, "off", False), (False, "on", False)])
def test_progress_bar_only_on_a_terminal(terminal: bool, enabled: str, shown: bool) -> None:
    import pty

    if terminal:
        import fcntl
        import struct
        import termios

        parent, child = pty.openpty()
        fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
        proc = subprocess.Popen([sys.executable, "-c", _BAR, enabled], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=child, text=True)
        os.close(child)
        out = proc.communicate(timeout=60)[0]
        err = b""
        while True:
            try:
                chunk = os.read(parent, 4096)
            except OSError:
                break
            if not chunk:
                break
            err += chunk
        os.close(parent)
        err_text = err.decode(errors="replace")
    else:
        done = subprocess.run([sys.executable, "-c", _BAR, enabled], cwd=REPO, capture_output=True, text=True,
                              timeout=60)
        out, err_text = done.stdout, done.stderr
    assert out == "done\n", "the bar never writes to stdout"
    assert ("decode:" in err_text and "/3 [" in err_text) is shown, err_text


# -- 8. one CLI vocabulary ------------------------------------------------------------------------------------

def test_every_command_of_the_device_and_host_cli_takes_json() -> None:
    import typer.main

    from edgecl.cli.main import app
    from edgecl.cli.options import Head
    from edgecl.device.infer import HEADS

    command = typer.main.get_command(app)
    for name in ("export", "apply", "rollback", "upgrade", "inspect", "predict", "eval"):
        options = {opt for param in command.commands[name].params for opt in param.opts}
        assert "--json" in options, name
    assert tuple(h.value for h in Head) == HEADS


def test_head_choices_reach_the_library_and_others_are_usage_errors(hand_bundle: Path, tmp_path: Path) -> None:
    line = one_error_line(edgecl("eval", hand_bundle, "--data", tmp_path, "--head", "lda"))
    assert "this state has no LDA statistics" in line
    done = edgecl("eval", hand_bundle, "--data", tmp_path, "--head", "knn")
    flat = " ".join(done.stderr.replace("│", " ").split())
    assert done.returncode == 2 and "Invalid value for '--head'" in flat, done.stderr
    assert "'knn' is not one of 'auto', 'ncm', 'lda'" in flat and "Traceback" not in done.stderr
    done = edgecl("--log-level", "loud", "inspect", hand_bundle)
    assert done.returncode == 2 and "'loud' is not one of 'debug', 'info', 'warning', 'error'" in " ".join(
        done.stderr.replace("│", " ").split())


# -- on a real exported bundle (tiny_bundle: needs the host export and the device runtime) -------------------

def _image_folders(root: Path) -> tuple[Path, Path]:
    from conftest import write_image_folder

    first = write_image_folder(root / "task1", classes=3, per_class=4, seed=11)
    second = write_image_folder(root / "task2", classes=3, per_class=2, seed=12)
    return first, second


def test_predict_and_eval_on_a_real_bundle(bundle_copy: Path, tmp_path: Path) -> None:
    first, second = _image_folders(tmp_path)
    image = first / "class1" / "000.png"
    done = edgecl("predict", bundle_copy, image, "--json", "--top-k", 3)
    assert done.returncode == 0, done.stderr
    (result,) = json.loads(done.stdout, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert result["head"] == "ncm" and result["state"] == "bundle"
    probs = [t["probability"] for t in result["top_k"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert len(result["top_k"]) == 3 and sum(probs) == pytest.approx(1.0, abs=1e-5), "3 classes: all listed"
    scores = np.array([t["score"] for t in result["top_k"]])
    # the temperature `edgecl export` calibrated on the bundle's own images (calibration.json)
    temperature = json.loads((bundle_copy / "calibration.json").read_text())["temperature"]["ncm"]
    z = scores / temperature
    expect = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    assert np.allclose(probs, expect, atol=1e-5)
    text = edgecl("predict", bundle_copy, image)
    assert text.returncode == 0 and text.stdout.startswith(f"{image}: {result['class']} p=")
    assert "[head ncm, state bundle]" in text.stdout

    evaluated = edgecl("eval", bundle_copy, "--data", first, "--data", second, "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)
    folders = report["folders"]
    assert [f["data"] for f in folders] == [str(first), str(second)]
    assert [f["images"] for f in folders] == [12, 6] and report["images"] == 18
    assert report["correct"] == sum(f["correct"] for f in folders)
    assert report["accuracy"] == pytest.approx(report["correct"] / 18)
    text = edgecl("eval", bundle_copy, "--data", first, "--data", second)
    assert f"{first}: accuracy" in text.stdout and "overall accuracy" in text.stdout


def test_a_fifo_given_to_predict_is_reported_not_waited_on(bundle_copy: Path, tmp_path: Path) -> None:
    first, _ = _image_folders(tmp_path)
    fifo = tmp_path / "cam.png"
    os.mkfifo(fifo)
    started = time.monotonic()
    done = edgecl("predict", bundle_copy, first / "class0" / "000.png", fifo, "--json", timeout=60)
    assert time.monotonic() - started < 60
    assert done.returncode == 1
    results = json.loads(done.stdout)
    assert results[1] == {"path": str(fifo), "error": f"{fifo} is a FIFO, not an image file"}
    assert "class" in results[0]


def test_a_flipped_byte_in_the_graph_is_one_line(bundle_copy: Path, tmp_path: Path) -> None:
    first, _ = _image_folders(tmp_path)
    path = bundle_copy / mf.INFERENCE_MODEL
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x04
    path.write_bytes(bytes(data))
    line = one_error_line(edgecl("predict", bundle_copy, first / "class0" / "000.png"))
    assert line == ("error: bundle file inference.onnx does not match its sha256 in manifest.json: "
                    "re-copy the bundle from the host")


def test_a_broken_graph_with_a_matching_hash_is_one_line(bundle_copy: Path, tmp_path: Path) -> None:
    """Past the hash check (a manifest re-hashed by hand), onnxruntime's own failure is still one line."""
    first, _ = _image_folders(tmp_path)
    path = bundle_copy / mf.INFERENCE_MODEL
    path.write_bytes(path.read_bytes()[: 2000])
    rewrite_manifest(bundle_copy, files={**mf.load_manifest(bundle_copy).files, mf.INFERENCE_MODEL: sha256_file(path)})
    line = one_error_line(edgecl("eval", bundle_copy, "--data", first))
    assert "inference.onnx" in line and "Traceback" not in line, line


def test_log_level_error_hides_warnings(hand_bundle: Path, tmp_path: Path) -> None:
    profile = tmp_path / "pi.toml"
    profile.write_text('name = "pi"\ncolour = "blue"\n')
    (tmp_path / "data" / "bolt").mkdir(parents=True)
    args = ("eval", hand_bundle, "--data", tmp_path / "data", "--device", profile, "--head", "lda")
    shown = edgecl(*args)
    assert f"warning: device profile {profile}: unknown keys ignored: colour" in shown.stderr.splitlines()
    hidden = edgecl("--log-level", "error", *args)
    assert hidden.returncode == 1 and [line for line in hidden.stderr.splitlines() if line.strip()] == [
        "error: this state has no LDA statistics (they are made by `edgecl adapt`): run `edgecl adapt BUNDLE "
        "--data DIR` (--epochs 0 is enough), or use --head ncm"]


# -- issue 20: state files, HEAD, adapt options, file names ----------------------------------------------

def _flip_bit(path: Path, offset_from_end: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 1 << bit
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_state_file_is_refused(hand_bundle: Path, tmp_path: Path) -> None:
    """One flipped exponent bit in trainable.safetensors once gave a delta value of -8.1e35 that predict
    used and `edgecl delta` signed. Each generation's files are checked against meta.json's sha256."""
    gen = commit(hand_bundle)
    trainable = hand_bundle / "state" / gen / "trainable.safetensors"
    _flip_bit(trainable, 2, 6)  # the last float32's exponent: 0.5 -> 2**127 (a finite value, so no NaN check)
    before = _tree(hand_bundle)
    fix = ("run `edgecl rollback` to go back to the previous state, or delete BUNDLE/state to start again from "
           "the bundle's own state")
    expect = (f"error: device state state/{gen}/trainable.safetensors does not match its sha256 in meta.json "
              f"(changed, or a damaged disk): {fix}")
    assert one_error_line(edgecl("delta", hand_bundle, "-o", tmp_path / "d.safetensors")) == expect
    assert one_error_line(edgecl("predict", hand_bundle, tmp_path / "any.png")) == expect
    assert _tree(hand_bundle) == before and not (tmp_path / "d.safetensors").exists()


def test_meta_json_and_unlisted_files_of_a_generation_are_refused(hand_bundle: Path) -> None:
    from edgecl.device.state import load_current, open_bundle

    gen = commit(hand_bundle)
    meta_path = hand_bundle / "state" / gen / "meta.json"
    meta = meta_path.read_text()
    meta_path.write_text(meta.replace('"tag": "x"', '"tag": "y"'))
    with pytest.raises(DeviceError, match=f"state/{gen}/meta.json does not match its sha256 in HEAD.json"):
        load_current(open_bundle(hand_bundle))
    meta_path.write_text(meta)
    (hand_bundle / "state" / gen / "lda.safetensors").write_bytes(b"planted")
    with pytest.raises(DeviceError, match=f"state/{gen} holds lda.safetensors, which its meta.json does not list"):
        load_current(open_bundle(hand_bundle))


@pytest.mark.parametrize("head,problem", [
    ({"current": "../../outside"}, "current must be null or a generation of this state folder such as gen-000001 "
                                   "(got '../../outside')"),
    ({"current": "ABS"}, "current must be null or a generation of this state folder such as gen-000001 (got 'ABS')"),
    ({"current": 5}, "current must be null or a generation of this state folder such as gen-000001 (got 5)"),
    ({"current": "gen-000001", "previous": "../gen-000001"},
     "previous must be null or a generation of this state folder such as gen-000001 (got '../gen-000001')"),
    ({"current": "gen-000001", "can_rollback": "yes"}, "can_rollback must be true or false (got 'yes')"),
    ({"current": "gen-000001", "meta_sha256": {}},
     "no meta_sha256 for gen-000001 (a state written before generations were checksummed)"),
])
def test_head_names_only_the_bundles_own_generations(hand_bundle: Path, tmp_path: Path, head: dict,
                                                     problem: str) -> None:
    """HEAD.json's current/previous once accepted an absolute or ../ path (state loaded from outside the
    bundle; a rollback then dropped the real generation), and {"current": 5} was a traceback."""
    gen = commit(hand_bundle)
    outside = tmp_path / "outside"
    import shutil
    shutil.copytree(hand_bundle / "state" / gen, outside)  # a valid generation, outside the bundle
    real = json.loads((hand_bundle / "state" / "HEAD.json").read_text())
    head = {"previous": None, "can_rollback": True, "meta_sha256": real["meta_sha256"], **head}
    if head["current"] == "ABS":
        head["current"] = str(outside)
        problem = problem.replace("'ABS'", repr(str(outside)))
    (hand_bundle / "state" / "HEAD.json").write_text(json.dumps(head))
    before = _tree(hand_bundle)
    path = hand_bundle / "state" / "HEAD.json"
    expect = f"error: {path} is damaged ({problem}): delete BUNDLE/state to start again from the bundle's own state"
    from conftest import write_image_folder
    data = write_image_folder(tmp_path / "data", classes=1, per_class=2, size=8)
    for args in (("eval", hand_bundle, "--data", data), ("delta", hand_bundle, "-o", tmp_path / "d"),
                 ("rollback", hand_bundle), ("adapt", hand_bundle, "--data", data, "--epochs", 0, "--max-step-fraction", 0)):
        assert one_error_line(edgecl(*args)) == expect, args
    assert _tree(hand_bundle) == before and (hand_bundle / "state" / gen).is_dir()


@pytest.mark.parametrize("flag,value,problem", [
    ("--batch-size", 0, "--batch-size (images per step) must be >= 1 (got 0): pass e.g. --batch-size 32"),
    ("--checkpoint-every", 0, "--checkpoint-every (steps between checkpoints) must be >= 1 (got 0): pass e.g. "
                              "--checkpoint-every 50"),
    ("--lr", "nan", "--lr (the backbone learning rate) must be a finite number (got nan): pass e.g. --lr 0.01"),
    ("--replay-share", 1, "--replay-share (the replay share) must be < 1 (got 1.0): pass e.g. --replay-share 0.5"),
])
def test_adapt_refuses_a_zero_batch_size_and_checkpoint_interval(hand_bundle: Path, tmp_path: Path, flag: str,
                                                                 value: object, problem: str) -> None:
    """--batch-size 0 once fell back to the default silently (`0 or default`), --checkpoint-every 0 was
    accepted; both are refused by AdaptOptions before adapt opens or writes anything."""
    (tmp_path / "data" / "bolt").mkdir(parents=True)
    before = _tree(hand_bundle)
    line = one_error_line(edgecl("adapt", hand_bundle, "--data", tmp_path / "data", flag, value))
    assert line == f"error: {problem}"
    assert _tree(hand_bundle) == before and not (hand_bundle / "state").exists()


def test_an_empty_class_folder_is_warned_about(tmp_path: Path) -> None:
    from conftest import write_image_folder

    from edgecl.formats.images import load_image_folder

    root = write_image_folder(tmp_path / "data", classes=2, per_class=2)
    (root / "class9").mkdir()
    (root / "class9" / "notes.txt").write_text("the images did not arrive")
    with pytest.warns(UserWarning, match=rf"class folder\(s\) without an image file in {root}, not learned: "
                                         r"class9 \(add images to them or remove them\)"):
        loaded = load_image_folder(root, (8, 8))
    assert loaded.classes == ["class0", "class1"]


def test_non_utf8_file_names_and_an_empty_class_through_the_cli(bundle_copy: Path, tmp_path: Path) -> None:
    """A file name that is not UTF-8 once killed adapt with a UnicodeEncodeError (adapt._fingerprint);
    predict, eval and adapt now take it, and an empty class folder is a warning on adapt's and eval's stderr."""
    first, _ = _image_folders(tmp_path)
    odd = os.fsdecode(bytes(first / "class1") + b"/\xff\xfe-camera.png")
    Path(odd).write_bytes((first / "class1" / "000.png").read_bytes())
    (first / "class7").mkdir()
    done = edgecl("adapt", bundle_copy, "--data", first, "--epochs", 1, "--json", "-q")
    assert done.returncode == 0, done.stderr
    assert f"warning: class folder(s) without an image file in {first}, not learned: class7 (add images to them " \
           "or remove them)" in done.stderr
    assert json.loads(done.stdout)["images"] == 13 and "Traceback" not in done.stderr
    predicted = edgecl("predict", bundle_copy, odd, "--json")
    assert predicted.returncode == 0, predicted.stderr
    assert json.loads(predicted.stdout)[0]["path"] == odd and "class" in json.loads(predicted.stdout)[0]
    text = subprocess.run([sys.executable, "-m", "edgecl.cli.main", "predict", bundle_copy, odd], cwd=REPO,
                          capture_output=True, timeout=120)  # bytes: the name is printed as the file system has it
    assert text.returncode == 0 and b"/\xff\xfe-camera.png: class" in text.stdout, text.stderr
    evaluated = edgecl("eval", bundle_copy, "--data", first, "--json")
    assert evaluated.returncode == 0 and json.loads(evaluated.stdout)["images"] == 13, evaluated.stderr
    assert "not learned: class7" in evaluated.stderr
