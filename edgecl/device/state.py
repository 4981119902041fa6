"""The device's state next to a bundle (``BUNDLE_DIR/state/``): what adapt wrote, crash-safe.

Layout (docs/device.md):

    state/HEAD.json           {"current": "gen-000002" | null, "previous": "gen-000001" | null,
                               "can_rollback": bool, "meta_sha256": {generation: sha256 of its
                               meta.json}}; null = the bundle's own state (zero delta, the
                               bundle's prototypes.safetensors)
    state/gen-NNNNNN/         one committed adaptation, written whole with atomic_dir
        trainable.safetensors     the trainable parameters by their checkpoint names: edgecl_delta
                                  float32 [K], proj.weight, proj.bias (bit-exact float32)
        prototypes.safetensors    Prototypes after the adaptation
        exemplars.safetensors     optional exemplar memory
        lda.safetensors           the LDA head: pooled within-class scatter + its class means (heads.py)
        base_prototypes.safetensors  optional: the device's new classes as the bundle's own backbone
                                  places them, from every image (the release gate's frozen baseline)
        meta.json                 steps, epochs, seed, lr, classes, data, timings, peak memory, parent,
                                  and `files`: the sha256 of every other file of the generation
        steps.jsonl               the step log of the adaptation that made it
    state/run/                an adaptation in progress (see RunDir); removed once committed
    state/pinned.json         the sha256 of manifest.json when the device first used the bundle
    state/lock                held (flock) by the one adapt / rollback / upgrade at work on the bundle

What the device trusts, checked on every use (docs/device.md "What the device checks"): the
manifest against its pinned sha256, every bundle file against the manifest's `files`, a generation's
meta.json against HEAD.json's `meta_sha256` and its files against the meta's `files`. Every
generation's meta.json also records the bundle it was made for (bundle_id, bundle_version,
mask_sha256, manifest_sha256): a state/ folder left beside a replaced bundle is refused, not run
with the wrong weights.

Why not ORT checkpoints: onnxruntime's checkpoint holds every frozen weight too (the whole model,
~19 MB for EfficientNet-Lite0), while what training changes is K + the projection head; the
session is rebuilt from the bundle's checkpoint and these values are copied in (bit-exact).

Why generations + a pointer: a commit is one atomic rename of HEAD.json after the new generation
is complete on disk, so a crash or a full disk at any moment leaves either the old state or the
new one, and the previous generation is kept as it was for `edgecl rollback`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from edgecl.errors import BundleError, DeviceError, EdgeclError
from edgecl.formats import manifest as mf
from edgecl.formats.atomic import atomic_dir, atomic_write_bytes, atomic_write_json
from edgecl.formats.hashing import sha256_bytes, sha256_file
from edgecl.formats.mask import Mask
from edgecl.formats.prototypes import Prototypes

STATE_DIR = "state"
HEAD = "HEAD.json"
RUN_DIR = "run"
TRAINABLE = "trainable.safetensors"
PROTOTYPES = "prototypes.safetensors"
EXEMPLARS = "exemplars.safetensors"
LDA = "lda.safetensors"
BASE_PROTOTYPES = "base_prototypes.safetensors"
META = "meta.json"
STEP_LOG = "steps.jsonl"
PINNED = "pinned.json"
LOCK = "lock"
GENERATION_NAME = re.compile(r"gen-[0-9]{6,}")   # what _next_generation writes; HEAD may name nothing else
_SHA256 = re.compile(r"[0-9a-f]{64}")
_STATE_FIX = "run `edgecl rollback` to go back to the previous state, or delete BUNDLE/state to start again " \
             "from the bundle's own state"


@dataclass
class OpenBundle:
    root: Path
    manifest: mf.BundleManifest
    mask: Mask
    manifest_sha256: str = ""            # of the manifest.json bytes that were parsed
    pinned: bool = False                 # state/pinned.json already holds manifest_sha256

    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def state_dir(self) -> Path:
        return self.root / STATE_DIR


# The bundle files predict and eval read (train_step.onnx, head and exemplars are adapt's): they hash
# these only, half the Lite0 bundle's bytes (docs/device.md "What the device checks").
INFERENCE_FILES = (mf.INFERENCE_MODEL, mf.WEIGHTS, mf.MASK, mf.PROTOTYPES, mf.FLEET_SCATTER)


def open_bundle(bundle_dir: str | Path, verify: bool = True, uses: tuple[str, ...] | None = None) -> OpenBundle:
    """Validate a bundle folder and load its manifest and mask (no graph is loaded).

    The manifest must match the sha256 pinned in state/pinned.json (when the device first used the
    bundle, or when `edgecl pull` wrote it from a signed release), must list a sha256 for every file
    the device reads, and ``verify`` hashes every listed file on every call: a flipped byte, or a
    same-size edit with the mtime put back, is one BundleError naming the file, not an onnxruntime
    crash or a silent wrong answer. ``uses``: the files the command reads (None: every listed file).
    Opening writes nothing (``save_verified`` pins, after success)."""
    root = Path(bundle_dir)
    manifest, manifest_sha256 = mf.read_manifest(root)  # type and range checks live there
    if manifest.format_version < mf.FORMAT_VERSION:
        raise BundleError(f"bundle {root} has format version {manifest.format_version}; this edgecl runs "
                          f"format {mf.FORMAT_VERSION} (one train_step.onnx for plain onnxruntime)",
                          "re-export the bundle with this edgecl version on the host")
    pin = read_pin(root)
    if pin is not None:
        check_state_owner(root, manifest, manifest_sha256, pin, PINNED)
    mf.check_bundle_files(root)
    unlisted = mf.unlisted_files(root, manifest)
    if unlisted:
        raise BundleError(f"{root / mf.MANIFEST} lists no sha256 for {', '.join(unlisted)} (its `files`), so they "
                          "cannot be checked", "re-copy the bundle from the host, or re-export it")
    if verify:
        verify_files(root, manifest, uses)
    mask = Mask.load_file(root / mf.MASK)
    if mask.total_selected != manifest.selected:
        raise BundleError(f"mask selects {mask.total_selected} elements, the manifest says {manifest.selected}",
                          "re-copy the whole bundle folder from the host")
    return OpenBundle(root, manifest, mask, manifest_sha256, pin is not None)


# -- file verification -----------------------------------------------------------------------------

def read_pin(root: Path) -> dict[str, Any] | None:
    """state/pinned.json: the bundle's identity and manifest sha256; None when nothing is pinned yet."""
    path = root / STATE_DIR / PINNED
    try:
        pin = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path} is damaged ({exc})", f"delete {path} to pin the bundle's manifest again") from None
    if not isinstance(pin, dict) or not _SHA256.fullmatch(str(pin.get("manifest_sha256"))):
        raise BundleError(f"{path} is damaged (no manifest_sha256)", f"delete {path} to pin the bundle's manifest again")
    return pin


def verify_files(root: Path, manifest: mf.BundleManifest, uses: tuple[str, ...] | None = None) -> None:
    """Hash every file in manifest.files and compare: on every call, no (size, mtime) shortcut.

    A cache keyed by size and mtime let a same-size change with the mtime put back (or bit rot, which
    changes neither) run silently. What hashing costs on predict: docs/device.md "What the device checks"."""
    for name, expected in sorted(manifest.files.items()):
        if uses is not None and name not in uses:
            if not (root / name).is_file():  # still cheap to notice a listed file that is gone
                raise BundleError(f"bundle file {name} listed in manifest.json is missing from {root}",
                                  "re-copy the whole bundle folder from the host")
            continue
        try:
            actual = sha256_file(root / name)
        except FileNotFoundError:
            raise BundleError(f"bundle file {name} listed in manifest.json is missing from {root}",
                              "re-copy the whole bundle folder from the host") from None
        except IsADirectoryError:
            raise BundleError(f"bundle file {name} in {root} is a folder", "re-copy the bundle from the host") from None
        if actual != expected:
            raise BundleError(f"bundle file {name} does not match its sha256 in manifest.json",
                              "re-copy the bundle from the host")


def save_verified(bundle: OpenBundle) -> None:
    """After a command succeeded: pin the manifest's sha256 in state/pinned.json if none is pinned yet.

    From then on a changed manifest.json (an edited `mean`, a rewritten `files`) is refused. A
    read-only bundle just stays unpinned."""
    if bundle.pinned:
        return
    with contextlib.suppress(EdgeclError, OSError):
        bundle.state_dir.mkdir(exist_ok=True)
        atomic_write_json(bundle.state_dir / PINNED, {"format": 1, **bundle_identity(bundle)})
        bundle.pinned = True


# -- one writer at a time ----------------------------------------------------------------------------

@contextlib.contextmanager
def bundle_lock(bundle: OpenBundle, what: str) -> Iterator[None]:
    """Hold state/lock (flock, exclusive) while ``what`` ("adapt", "rollback", "upgrade") changes the state.

    A second writer fails at once with a DeviceError naming the holder's command and pid (read from the
    file); the kernel drops the lock when the holder dies, so a killed adapt never leaves it stuck.
    The file is removed on release (state/ too, if that leaves it empty): a failed command leaves nothing."""
    state_dir = bundle.state_dir
    created = not state_dir.exists()
    path = state_dir / LOCK
    for _ in range(10):
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DeviceError(f"cannot lock {bundle.root}'s device state ({exc.strerror})",
                              "run edgecl where the bundle folder is writable") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise DeviceError(f"another edgecl {holder} is using {bundle.root}", "wait for it to finish") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file between our open and our flock: retry
    else:
        raise DeviceError(f"cannot lock {bundle.root}'s device state (it keeps changing)", "try again")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "command": what}).encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still holding it; see the inode check above
        if created:
            with contextlib.suppress(OSError):
                state_dir.rmdir()  # only if empty
        os.close(fd)


def _lock_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0))
        return f"{info['command']} (pid {int(info['pid'])})"
    except (OSError, ValueError, KeyError, TypeError):
        return "command"


# -- trainable values file -----------------------------------------------------------------------

def save_trainable(path: Path, values: dict[str, np.ndarray]) -> None:
    atomic_write_bytes(path, _st_save({k: np.ascontiguousarray(v, np.float32) for k, v in values.items()},
                                      metadata={"format": "edgecl-trainable", "format_version": "1"}))


def load_trainable(path: Path, delta_size: int) -> dict[str, np.ndarray]:
    try:
        values = dict(_st_load(Path(path).read_bytes()))
    except Exception as exc:
        raise DeviceError(f"device state {path} is damaged ({exc})", "run `edgecl rollback`") from exc
    delta = values.get(mf.DELTA_PARAM)
    if delta is None or delta.shape != (delta_size,):
        raise DeviceError(f"{path} holds no {mf.DELTA_PARAM} of {delta_size} values",
                          "the state belongs to another bundle: delete BUNDLE/state or run `edgecl rollback`")
    bad = [name for name, value in values.items() if not np.all(np.isfinite(value))]
    if bad:  # training stops at a non-finite loss, so only damage puts NaN or inf here
        raise DeviceError(f"device state {path} holds non-finite values in {', '.join(bad)}", _STATE_FIX)
    return values


# -- committed generations ------------------------------------------------------------------------

@dataclass
class DeviceState:
    """What predict/eval/adapt start from."""
    generation: str | None             # None = the bundle's own state
    delta: np.ndarray                  # [K] float32
    prototypes: Prototypes
    trainable: dict[str, np.ndarray]   # checkpoint name -> value; {} = the bundle checkpoint's values
    exemplars_path: Path | None        # exemplars.safetensors if any
    meta: dict[str, Any] = field(default_factory=dict)
    lda_path: Path | None = None       # lda.safetensors if any
    base_prototypes_path: Path | None = None  # base_prototypes.safetensors if any


def read_head(state_dir: Path) -> dict[str, Any]:
    """HEAD.json, checked: it may name only this state folder's own generations (gen-NNNNNN), each
    with the sha256 of its meta.json; anything else (a path, a number, a missing checksum) is refused."""
    path = state_dir / HEAD
    if not path.exists():
        return {"current": None, "previous": None, "can_rollback": False, "meta_sha256": {}}
    try:
        head = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DeviceError(f"{path} is damaged ({exc})",
                          "delete BUNDLE/state to start again from the bundle's own state") from None
    problem = _head_problem(head)
    if problem:
        raise DeviceError(f"{path} is damaged ({problem})", "delete BUNDLE/state to start again from the bundle's own state")
    return head


def _head_problem(head: Any) -> str | None:
    if not isinstance(head, dict) or "current" not in head:
        return "no 'current' key"
    sums = head.get("meta_sha256", {})
    if not isinstance(sums, dict) or not all(isinstance(v, str) and _SHA256.fullmatch(v) for v in sums.values()):
        return "meta_sha256 must map generation names to sha256 hex digests"
    if not isinstance(head.get("can_rollback", False), bool):
        return f"can_rollback must be true or false (got {head['can_rollback']!r})"
    for key in ("current", "previous"):
        name = head.get(key)
        if name is None:
            continue
        if not isinstance(name, str) or not GENERATION_NAME.fullmatch(name):
            return f"{key} must be null or a generation of this state folder such as gen-000001 (got {name!r})"
        if name not in sums:
            return f"no meta_sha256 for {name} (a state written before generations were checksummed)"
    return None


def bundle_prototypes(bundle: OpenBundle) -> Prototypes:
    """The bundle's own prototypes (its calibration classes); a missing file is an error, not zero classes."""
    path = bundle.path(mf.PROTOTYPES)
    if not path.exists():
        raise BundleError(f"bundle file {mf.PROTOTYPES} is missing from {bundle.root}",
                          "re-copy the whole bundle folder from the host")
    return Prototypes.load_file(path)


def bundle_identity(bundle: OpenBundle) -> dict[str, Any]:
    """What a generation's meta.json (and state/pinned.json) records of the bundle it was made for."""
    return _identity(bundle.manifest, bundle.manifest_sha256)


def _identity(m: mf.BundleManifest, manifest_sha256: str) -> dict[str, Any]:
    return {"bundle_id": m.bundle_id, "bundle_version": m.version, "mask_sha256": m.mask_sha256,
            "manifest_sha256": manifest_sha256}


def check_state_owner(root: Path, manifest: mf.BundleManifest, manifest_sha256: str, record: dict[str, Any],
                      label: str) -> None:
    """Refuse state written for another bundle (or version, or mask) than the one beside it, or for
    another manifest.json (an edited `mean`, a rewritten `files`). ``record``: a generation's meta.json
    or state/pinned.json, named by ``label``."""
    ids = _identity(manifest, manifest_sha256)
    # A record without bundle_id (a generation from before identities were recorded) is not compared;
    # the delta length check still applies to it.
    if "bundle_id" in record and any(record.get(k) != ids[k] for k in ("bundle_id", "bundle_version", "mask_sha256")):
        state_dir = root / STATE_DIR
        raise DeviceError(f"{state_dir} ({label}) belongs to bundle {record.get('bundle_id')} "
                          f"v{record.get('bundle_version')}, not {manifest.bundle_id} v{manifest.version}"
                          + (" (another mask)" if record.get("bundle_id") == manifest.bundle_id
                             and record.get("bundle_version") == manifest.version else ""),
                          "the bundle files were replaced under their device state: run `edgecl rollback` if the "
                          f"previous state is this bundle's, or move {state_dir} away (then `edgecl upgrade "
                          "OLD NEW` carries it to a new version)")
    if record.get("manifest_sha256", manifest_sha256) != manifest_sha256:
        since = (f"this device first used the bundle (its sha256 is pinned in {root / STATE_DIR / PINNED})"
                 if label == PINNED else f"{label} was written for it")
        raise BundleError(f"{root / mf.MANIFEST} changed since {since}",
                          "re-copy the bundle from the host or `edgecl pull` it; a new bundle goes in a new folder")


def load_current(bundle: OpenBundle) -> DeviceState:
    head = read_head(bundle.state_dir)
    generation = head.get("current")
    if generation is None:
        return DeviceState(None, np.zeros(bundle.mask.total_selected, np.float32), bundle_prototypes(bundle), {}, None, {})
    gen_dir = bundle.state_dir / generation
    meta = read_generation(gen_dir, head["meta_sha256"][generation])
    check_state_owner(bundle.root, bundle.manifest, bundle.manifest_sha256, meta, generation)
    try:
        # A generation without trainable values (`edgecl upgrade`) runs the bundle's own weights.
        trainable = (load_trainable(gen_dir / TRAINABLE, bundle.mask.total_selected)
                     if (gen_dir / TRAINABLE).exists()
                     else {mf.DELTA_PARAM: np.zeros(bundle.mask.total_selected, np.float32)})
        prototypes = Prototypes.load_file(gen_dir / PROTOTYPES)
    except (OSError, ValueError, BundleError) as exc:
        raise DeviceError(f"device state {gen_dir} is damaged ({getattr(exc, 'problem', exc)})",
                          "run `edgecl rollback` or delete BUNDLE/state") from exc
    exemplars, lda, base = gen_dir / EXEMPLARS, gen_dir / LDA, gen_dir / BASE_PROTOTYPES
    return DeviceState(generation, trainable[mf.DELTA_PARAM].astype(np.float32), prototypes, trainable,
                       exemplars if exemplars.exists() else None, meta, lda if lda.exists() else None,
                       base if base.exists() else None)


def read_generation(gen_dir: Path, meta_sha256: str) -> dict[str, Any]:
    """A generation's meta.json, checked against HEAD's sha256, after checking every file of the
    generation against the meta's `files` (a flipped bit in trainable.safetensors is refused here,
    before predict uses it or `edgecl delta` signs it)."""
    where = f"device state {gen_dir.parent.name}/{gen_dir.name}"
    try:
        if gen_dir.is_symlink() or not gen_dir.is_dir():
            raise FileNotFoundError(f"{gen_dir.name} is not a folder of the state")
        data = (gen_dir / META).read_bytes()
        if sha256_bytes(data) != meta_sha256:
            raise DeviceError(f"{where}/{META} does not match its sha256 in HEAD.json", _STATE_FIX)
        meta = json.loads(data)
        if not isinstance(meta, dict):
            raise ValueError("meta.json is not an object")
    except (OSError, ValueError) as exc:
        raise DeviceError(f"{where} is damaged ({exc})", _STATE_FIX) from None
    files = meta.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, str) and "/" not in k and k not in ("", ".", "..")
                                              for k, v in files.items()):
        raise DeviceError(f"{where}/{META} lists no sha256 of the generation's files", _STATE_FIX)
    unlisted = sorted(p.name for p in gen_dir.iterdir() if p.name != META and p.name not in files)
    if unlisted:
        raise DeviceError(f"{where} holds {', '.join(unlisted)}, which its {META} does not list", _STATE_FIX)
    for name, expected in sorted(files.items()):
        try:
            actual = sha256_file(gen_dir / name)
        except OSError:
            raise DeviceError(f"{where}/{name} listed in its {META} is missing", _STATE_FIX) from None
        if actual != expected:
            raise DeviceError(f"{where}/{name} does not match its sha256 in {META} (changed, or a damaged disk)",
                              _STATE_FIX)
    return meta


def _next_generation(state_dir: Path) -> str:
    numbers = [int(p.name.split("-")[1]) for p in state_dir.glob("gen-*") if p.name.split("-")[1].isdigit()]
    return f"gen-{max(numbers, default=0) + 1:06d}"


def commit_generation(bundle: OpenBundle, write: Callable[[Path], None], meta: dict[str, Any]) -> str:
    """Write a new generation with ``write(tmp_dir)``, then point HEAD at it (previous = old current).

    Any failure before the HEAD rename (a full disk included) leaves HEAD and every existing
    generation untouched; the half-written generation is removed by atomic_dir.
    """
    state_dir = bundle.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    head = read_head(state_dir)
    name = _next_generation(state_dir)
    meta = {**meta, **bundle_identity(bundle), "parent": head.get("current"), "generation": name}
    with atomic_dir(state_dir / name) as tmp:
        write(tmp)
        # The checksums load_current checks on every use: of the files, then of meta.json in HEAD.
        meta["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        data = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
        atomic_write_bytes(tmp / META, data)
    previous = head.get("current")
    sums = {name: sha256_bytes(data), **({previous: head["meta_sha256"][previous]} if previous else {})}
    atomic_write_json(state_dir / HEAD, {"current": name, "previous": previous, "can_rollback": True,
                                         "meta_sha256": sums})
    _collect_garbage(state_dir)
    save_verified(bundle)
    return name


def _collect_garbage(state_dir: Path) -> None:
    # Keep only what HEAD can reach: current and previous. Failure to delete is harmless.
    head = read_head(state_dir)
    keep = {head.get("current"), head.get("previous")}
    for path in state_dir.glob("gen-*"):
        if path.is_dir() and path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)


def rollback(bundle_dir: str | Path) -> dict[str, Any]:
    """Return to the state before the last adaptation (one level; a second rollback is refused)."""
    bundle = open_bundle(bundle_dir, verify=False)  # only HEAD changes: the model files are not read
    with bundle_lock(bundle, "rollback"):
        return _rollback(bundle)


def _rollback(bundle: OpenBundle) -> dict[str, Any]:
    state_dir = bundle.state_dir
    head = read_head(state_dir)
    if not head.get("can_rollback"):
        raise DeviceError(f"{bundle.root} has no earlier state to roll back to",
                          "rollback undoes the last `edgecl adapt` once; adapt first")
    previous = head.get("previous")
    if previous is not None and not (state_dir / previous).is_dir():
        raise DeviceError(f"the previous state {previous} is missing", "delete BUNDLE/state to start from the bundle")
    run_dir = state_dir / RUN_DIR
    if run_dir.exists():
        # An interrupted adaptation started from the state being undone: it cannot be resumed.
        shutil.rmtree(run_dir, ignore_errors=True)
        warnings.warn("discarded an interrupted adaptation (it started from the state rolled back)", stacklevel=2)
    undone = head.get("current")
    sums = {previous: head["meta_sha256"][previous]} if previous else {}
    atomic_write_json(state_dir / HEAD, {"current": previous, "previous": None, "can_rollback": False,
                                         "meta_sha256": sums})
    _collect_garbage(state_dir)
    return {"undone": undone, "current": previous or "bundle"}


# -- the in-progress run ----------------------------------------------------------------------------

class RunDir:
    """``state/run/``: an adaptation in progress.

        run/config.json      what the run was started with (resume must match it)
        run/start.safetensors  embeddings of the task images before training (drift compensation)
        run/ckpt-NNNNNNNN/   checkpoint dirs (atomic_dir), each: trainable.safetensors,
                             resume.json (step, epoch, permutation, RNG states)
        run/LATEST.json      {"ckpt": "ckpt-NNNNNNNN"}: the last complete checkpoint
        run/steps.jsonl      step log, appended; cut back to the checkpoint's step on resume
        run/epoch-NNNN.safetensors  the trainable values at the end of epoch NNNN (with the gate on:
                             an earlier epoch it may keep when the last is worse held out)
    """

    def __init__(self, bundle: OpenBundle) -> None:
        self.path = bundle.state_dir / RUN_DIR

    def exists(self) -> bool:
        return (self.path / "config.json").exists()

    def start(self, config: dict[str, Any], start_arrays: dict[str, np.ndarray]) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)
        atomic_write_bytes(self.path / "start.safetensors",
                           _st_save({k: np.ascontiguousarray(v) for k, v in start_arrays.items()}))
        atomic_write_json(self.path / "config.json", config)  # written last: a run exists once it is there

    def config(self) -> dict[str, Any]:
        return json.loads((self.path / "config.json").read_text())

    def start_arrays(self) -> dict[str, np.ndarray]:
        return dict(_st_load((self.path / "start.safetensors").read_bytes()))

    def save_checkpoint(self, step: int, write: Callable[[Path], None], resume: dict[str, Any]) -> None:
        name = f"ckpt-{step:08d}"
        with atomic_dir(self.path / name, overwrite=True) as tmp:
            write(tmp)
            atomic_write_json(tmp / "resume.json", resume)
        latest = self.latest_name()
        atomic_write_json(self.path / "LATEST.json", {"ckpt": name})
        if latest and latest != name:
            shutil.rmtree(self.path / latest, ignore_errors=True)

    def save_epoch(self, epoch: int, values: dict[str, np.ndarray]) -> None:
        save_trainable(self.path / f"epoch-{epoch:04d}.safetensors", values)

    def epoch_states(self) -> dict[int, Path]:
        """epoch -> its saved trainable values, ascending."""
        found = {int(p.stem.split("-")[1]): p for p in self.path.glob("epoch-*.safetensors")}
        return dict(sorted(found.items()))

    def latest_name(self) -> str | None:
        path = self.path / "LATEST.json"
        if not path.exists():
            return None
        return json.loads(path.read_text()).get("ckpt")

    def latest(self) -> tuple[Path, dict[str, Any]] | None:
        name = self.latest_name()
        if name is None:
            return None
        ckpt = self.path / name
        return ckpt, json.loads((ckpt / "resume.json").read_text())

    @property
    def log_path(self) -> Path:
        return self.path / STEP_LOG

    def truncate_log(self, steps: int) -> None:
        """Keep the first ``steps`` lines (the steps the checkpoint contains); later ones are re-run."""
        if not self.log_path.exists():
            return
        lines = self.log_path.read_text().splitlines(keepends=True)
        complete = [line for line in lines if line.endswith("\n")]
        atomic_write_bytes(self.log_path, "".join(complete[:steps]).encode())

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def check_resumable(run: RunDir, config: dict[str, Any], current_generation: str | None) -> None:
    if not run.exists():
        raise DeviceError("there is no interrupted adaptation to resume", "run `edgecl adapt` without --resume")
    saved = run.config()
    if saved.get("parent") != current_generation:
        raise DeviceError("the interrupted adaptation started from another state (rollback or a newer adapt since)",
                          "run `edgecl adapt` without --resume")
    differing = sorted(k for k in config if k != "parent" and saved.get(k) != config[k])
    if differing:
        raise DeviceError(f"--resume with different settings than the interrupted run: {', '.join(differing)}",
                          "pass the same data and flags, or start again without --resume")



def commit_adaptation(bundle: OpenBundle, run_dir: RunDir, trainable: dict[str, np.ndarray], prototypes: Prototypes,
                      lda: Any, memory: Any | None, base_prototypes: Prototypes, meta: dict[str, Any]) -> str:
    """`edgecl adapt`'s commit: the kept trainable values, the class statistics (prototypes, the LDA
    head's, the base-space table of the device's own classes), the exemplar memory (None: the device
    keeps no images) and the run's step log, as one new generation; then the run folder goes."""
    def write(tmp: Path) -> None:
        save_trainable(tmp / TRAINABLE, trainable)
        prototypes.save_file(tmp / PROTOTYPES)
        lda.save_file(tmp / LDA)
        if len(base_prototypes):
            base_prototypes.save_file(tmp / BASE_PROTOTYPES)
        if memory is not None and len(memory.classes):
            memory.save_file(tmp / EXEMPLARS)
        (tmp / STEP_LOG).write_bytes(run_dir.log_path.read_bytes())

    generation = commit_generation(bundle, write, meta)
    run_dir.remove()
    return generation
