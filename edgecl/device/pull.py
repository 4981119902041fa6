"""`edgecl pull`: fetch the newest released version of this device's bundle, verify it, upgrade.

    1. ask the server for the newest release of the bundle's lineage this device may pull
       (``GET /v1/releases/latest``; a canary release only reaches the devices it names);
    2. download ``manifest.json`` and check the release signature (Ed25519, the server key pinned
       at ``edgecl device init``) BEFORE anything else: the signed manifest lists every other
       file's sha256, so nothing unsigned is ever trusted;
    3. build the new bundle in a temp folder beside the old one from the files a device keeps
       (the manifest's ``files``; ``server_files`` such as the host's recipe_weights.safetensors
       stay on the server): each file whose sha256 the old bundle already has (checked on disk)
       is copied locally (content-addressed: graphs that read their weights from
       weights.safetensors do not change between versions); the weights come as the release's
       patch against the device's own (``weights_patches``, edgecl/formats/weights_patch.py); the
       rest is downloaded compressed, as a patch against the old file of the same name when the
       sizes match (zlib of old XOR new). Every download is capped by its signed size (else a
       hard cap) and every result is hashed against the signed manifest;
    4. run ``edgecl.device.upgrade.upgrade(old, new)`` (the device's exemplars, local classes, LDA
       statistics) inside that temp folder, then rename it into place.

Any failure (wrong signature, a file altered on the way, a full disk, an upgrade check) removes
the temp folder: the old bundle and its state are never written to. A full disk is a DiskError
naming the path (never retried, never called a network failure); a malformed release answer is
one DeviceError. The new folder is
``<old name without .vN>.v<version>`` beside the old one (or ``out``); with a device config whose
``bundle`` is the old folder, the config then points at the new one.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecl.errors import DeviceError, EdgeclError
from edgecl.formats import manifest as mf
from edgecl.formats.atomic import atomic_dir
from edgecl.formats.hashing import sha256_file
from edgecl.formats.signing import manifest_object, parse_public_key, verify_manifest
from edgecl.formats.weights_patch import apply_patch, patched_mask, read_header
from edgecl.http_client import (
    DISK_ERRNOS,
    MAX_DOWNLOAD_BYTES,
    DiskError,
    MalformedAnswer,
    RetryPolicy,
    ServerRejected,
    api_json,
    disk_error,
    download,
)

from .state import OpenBundle, open_bundle


@dataclass
class PullReport:
    status: str                      # "up_to_date" | "upgraded"
    bundle_id: str
    old_dir: str
    old_version: int
    version: int                     # the version the device now has
    bundle_dir: str = ""             # the new bundle folder ("" when up to date)
    downloaded_bytes: int = 0        # bytes that crossed the network (the downlink; compressed / patches)
    copied_bytes: int = 0            # bytes reused from the old bundle (same sha256)
    total_bytes: int = 0             # the new bundle's size
    downloaded: list[str] = field(default_factory=list)
    wire_bytes: dict[str, int] = field(default_factory=dict)   # per downloaded file: bytes on the network
    copied: list[str] = field(default_factory=list)
    patched: list[str] = field(default_factory=list)          # downloaded as the release's patch against the old file
    derived: list[str] = field(default_factory=list)          # made on the device from that patch (the mask), not sent
    upgrade: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        if self.status == "up_to_date":
            return f"up to date: {self.bundle_id} v{self.version} ({self.old_dir})"
        chose = self.upgrade.get("chose") or {}
        judged = (f"; for {', '.join(chose['classes'])} kept the {chose['kept']} statistics"
                  + (f" ({100 * chose['released_accuracy']:.1f}% released vs {100 * chose['device_accuracy']:.1f}% "
                     f"the device's own, on {chose['images']} images it holds)" if chose.get("images") else
                     f" ({chose.get('why', '')})")) if chose else ""
        return (f"upgraded {self.bundle_id} v{self.old_version} -> v{self.version}: {self.bundle_dir}; downloaded "
                f"{self.downloaded_bytes:,} B ({len(self.downloaded)} files), reused {self.copied_bytes:,} B "
                f"({len(self.copied)} files) of {self.total_bytes:,} B; signature and sha256 verified{judged}")


def default_target(old_dir: Path, version: int) -> Path:
    base = re.sub(r"\.v\d+$", "", old_dir.name)
    return old_dir.parent / f"{base}.v{version}"


def _local_files(old_dir: Path, old_files: dict[str, str]) -> dict[str, Path]:
    """sha256 -> a file of the old bundle with that content (hashed now: a file damaged on the
    device is downloaded again rather than copied)."""
    out: dict[str, Path] = {}
    for name, sha in old_files.items():
        path = old_dir / name
        if sha not in out and path.is_file() and sha256_file(path) == sha:
            out[sha] = path
    return out


MAX_MANIFEST_BYTES = 4 << 20    # a manifest is a few kB; nothing signed says its size before it is read


@dataclass
class ReleaseInfo:
    """The parts of the server's (unsigned) release answer that pull uses, checked."""

    version: int                     # 0: nothing released to this device
    signature: str = ""
    files: dict[str, dict[str, Any]] = field(default_factory=dict)   # name -> {sha256, size_bytes}


def parse_release(answer: object, bundle_id: str) -> ReleaseInfo:
    """Check the server's release JSON: a malformed answer is one MalformedAnswer, never a traceback.
    Nothing here is trusted beyond where to look: the signed manifest decides every byte."""
    def bad(what: str) -> MalformedAnswer:
        return MalformedAnswer(f"the server's release of {bundle_id} is malformed ({what})",
                               "check that --server is an edgecl server of this version; ask the operator")

    if not isinstance(answer, dict):
        raise bad("not a JSON object")
    if not answer:
        return ReleaseInfo(0)
    version = answer.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version < 2**31:
        raise bad(f"version {str(version)[:40]!r} is not a whole number from 1")
    files = answer.get("files")
    if not isinstance(files, dict):
        raise bad("files is not an object")
    for name, entry in files.items():
        size = entry.get("size_bytes") if isinstance(entry, dict) else None
        if (not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str)
                or not (size is None or (isinstance(size, int) and not isinstance(size, bool) and size >= 0))):
            raise bad(f"files entry {str(name)[:40]!r} is not {{sha256, size_bytes}}")
    signature = answer.get("signature", "")
    if not isinstance(signature, str):
        raise bad("signature is not a string")
    return ReleaseInfo(version, signature, files)


@dataclass
class PatchedFiles:
    """What the release's weights patch made from the device's own files (each checked against the
    signed manifest): the weights, and from a version 2 patch the mask with its new overlap counts."""

    wire_bytes: int
    files: dict[str, bytes]          # name -> bytes whose sha256 the signed manifest lists


def _fetch_patched_weights(fetch_file: Callable[[str, str, Path, int], int], manifest: mf.BundleManifest,
                           old_dir: Path, scratch_dir: Path) -> PatchedFiles | None:
    """The weights as the release's patch against the device's own (and, when the patch is the
    release's int4 step over the device's mask, the next mask derived from it): None when there is
    no patch for them or it fails (the caller then downloads the files)."""
    old_weights, old_mask = old_dir / mf.WEIGHTS, old_dir / mf.MASK
    old_sha = sha256_file(old_weights) if old_weights.is_file() else ""
    name = manifest.weights_patches.get(old_sha)
    if not name or name not in manifest.server_files or mf.WEIGHTS not in manifest.sizes:
        return None
    scratch = scratch_dir / f".{name}"
    try:
        # At most the size the signed manifest gives the patch, and never more than the file itself.
        wire = fetch_file(name, manifest.server_files[name], scratch,
                          min(manifest.sizes.get(name, manifest.sizes[mf.WEIGHTS]), manifest.sizes[mf.WEIGHTS]))
        patch = scratch.read_bytes()
        mask = old_mask.read_bytes() if old_mask.is_file() else None
        new = apply_patch(old_weights.read_bytes(), patch, mask)
        if hashlib.sha256(new).hexdigest() != manifest.files[mf.WEIGHTS]:
            return None
        out = PatchedFiles(wire, {mf.WEIGHTS: new})
        if mask is not None and read_header(patch)["format_version"] >= 2:
            # The mask changes each release only by its overlap counts (+1 where the step moved a
            # weight): derived here, taken only when it is the file the manifest signs.
            derived = patched_mask(mask, patch)
            if hashlib.sha256(derived).hexdigest() == manifest.files.get(mf.MASK):
                out.files[mf.MASK] = derived
        return out
    except DiskError:
        raise           # the whole file would fail the same way
    except EdgeclError:
        # No such patch, a damaged one (the server refuses to serve a blob that fails its hash: 500
        # store_damaged), one for another file or mask: the whole file instead; a network that is
        # down fails there.
        return None
    finally:
        scratch.unlink(missing_ok=True)


def server_public_key(server: str, token: str, server_key: str, what: str) -> Any:
    """The pinned server key that verifies ``what`` (a pulled version, the candidate), after checking
    that a server and a token are given: what `pull` and `restat` need before they ask anything."""
    if not server or not token:
        raise EdgeclError("no server or token", "run `edgecl device init` or pass --server and --token")
    if not server_key:
        raise EdgeclError(f"no pinned server key: {what} cannot be verified",
                          "run `edgecl device init ... --server-key KEY` with the key `edgecl server key` prints")
    return parse_public_key(server_key)


def fetch_release(old: OpenBundle, release: ReleaseInfo, bundle_id: str, server: str, token: str, public: Any,
                  target: Path, report: PullReport, policy: RetryPolicy | None = None,
                  then: Callable[[Path], None] | None = None, max_bytes: int = MAX_DOWNLOAD_BYTES) -> None:
    """Download ``release`` (of lineage ``bundle_id``) into ``target``, verified: the signature first,
    then every file against the signed manifest's sha256; files the old bundle has are copied, the
    rest come compressed, the weights as a patch against the device's own when the release has one.
    ``then(tmp)`` runs inside the temp folder before it is renamed into place; any failure leaves
    nothing behind. ``max_bytes``: the most one file may write when the signed manifest gives no size."""
    old_dir, version, files = old.root, release.version, release.files
    if mf.MANIFEST not in files:
        raise DeviceError(f"the release of {bundle_id} v{version} lists no manifest.json", "ask the operator")

    def fetch_file(name: str, sha256: str, dest: Path, size: int | None, old_file: Path | None = None) -> int:
        # Compressed; for a file the old bundle has under the same name and size, a patch against
        # it (zlib of old XOR new). ``size`` (signed) caps what is written; without it, max_bytes.
        return download(server, token, f"/v1/bundles/{bundle_id}/{version}/files/{name}", dest, sha256, policy,
                        old=old_file if old_file is not None and old_file.is_file() else None, size=size,
                        compressed=True, max_bytes=max_bytes)

    # The signature first: nothing of this release is trusted (or written beside the bundle) before it.
    scratch = target.parent / f".{target.name}.manifest.tmp"
    try:
        report.wire_bytes[mf.MANIFEST] = download(
            server, token, f"/v1/bundles/{bundle_id}/{version}/files/{mf.MANIFEST}", scratch,
            str(files[mf.MANIFEST]["sha256"]), policy, compressed=True, max_bytes=MAX_MANIFEST_BYTES)
        report.downloaded_bytes += report.wire_bytes[mf.MANIFEST]
        manifest_bytes = scratch.read_bytes()
    finally:
        scratch.unlink(missing_ok=True)
    manifest_obj = manifest_object(manifest_bytes)
    verify_manifest(public, manifest_obj, release.signature)
    if manifest_obj.get("bundle_id") != bundle_id or manifest_obj.get("version") != version:
        raise DeviceError(f"the signed manifest is for {str(manifest_obj.get('bundle_id'))[:64]} "
                          f"v{str(manifest_obj.get('version'))[:16]}, not {bundle_id} v{version}",
                          "refused: ask the operator to check the release")
    manifest = mf.BundleManifest.from_json(manifest_obj, where="the signed manifest")
    listed = dict(manifest.files)     # what a device keeps; server_files (the host's, patches) are not
    if not listed or any(not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", n) for n in listed):
        raise DeviceError("the signed manifest lists no files or a bad file name", "refused: ask the operator")

    def size_of(name: str) -> int | None:
        # The signed size; an older manifest has none: the server's word, else max_bytes.
        signed = manifest.sizes.get(name)
        claimed = (files.get(name) or {}).get("size_bytes")
        return signed if signed is not None else claimed

    local = _local_files(old_dir, dict(old.manifest.files or {}))
    report.downloaded.append(mf.MANIFEST)
    try:
        with atomic_dir(target) as tmp:
            (tmp / mf.MANIFEST).write_bytes(manifest_bytes)
            # The weights (and the mask they imply) as the release's patch, when the device lacks them.
            from_patch = ((_fetch_patched_weights(fetch_file, manifest, old_dir, tmp)
                           if mf.WEIGHTS in listed and listed[mf.WEIGHTS] not in local else None)
                          or PatchedFiles(0, {}))
            for name, sha in sorted(listed.items()):
                dest = tmp / name
                if sha in local:
                    shutil.copyfile(local[sha], dest)
                    if hashlib.sha256(dest.read_bytes()).hexdigest() != sha:   # changed while we copied
                        raise DeviceError(f"{local[sha]} changed while it was copied", "run `edgecl pull` again")
                    report.copied.append(name)
                    report.copied_bytes += dest.stat().st_size
                    continue
                if name in from_patch.files:
                    dest.write_bytes(from_patch.files[name])
                    if name == mf.WEIGHTS:   # the patch's bytes count once, with the file it made
                        report.patched.append(name)
                        wire = from_patch.wire_bytes
                    else:
                        report.derived.append(name)
                        continue
                else:
                    wire = fetch_file(name, sha, dest, size_of(name), old_dir / name)
                report.wire_bytes[name] = wire
                report.downloaded_bytes += wire
                report.downloaded.append(name)
            if then is not None:
                then(tmp)
    except OSError as exc:
        if exc.errno in DISK_ERRNOS:
            raise disk_error(Path(exc.filename or target), exc) from None
        raise


def pull(bundle_dir: str | Path, server: str, token: str, server_key: str, out: str | Path | None = None,
         policy: RetryPolicy | None = None, max_bytes: int = MAX_DOWNLOAD_BYTES) -> PullReport:
    """``max_bytes``: the most one file may write when the signed manifest gives no size."""
    public = server_public_key(server, token, server_key, "a pulled version")
    old = open_bundle(bundle_dir)
    old_dir = old.root
    bundle_id, old_version = old.manifest.bundle_id, old.manifest.version
    try:
        answer = api_json(server, token, "GET", f"/v1/releases/latest?bundle_id={bundle_id}", policy=policy)
    except ServerRejected as exc:
        if exc.code != "not_found":
            raise
        answer = {}            # nothing released to this device yet
    release = parse_release(answer, bundle_id)
    version = release.version
    report = PullReport("up_to_date", bundle_id, str(old_dir), old_version, max(version, old_version))
    if version <= old_version:
        return report
    target = Path(out) if out else default_target(old_dir, version)
    if target.exists():
        raise DeviceError(f"{target} already exists", "remove it (a pull that did not finish?) or pass --out DIR")

    def carry_state(tmp: Path) -> None:
        from .upgrade import upgrade

        report.upgrade = upgrade(old_dir, tmp)

    fetch_release(old, release, bundle_id, server, token, public, target, report, policy, then=carry_state,
                  max_bytes=max_bytes)
    report.total_bytes = sum(p.stat().st_size for p in target.iterdir() if p.is_file())
    report.status, report.version, report.bundle_dir = "upgraded", version, str(target)
    try:    # a heartbeat is news for the dashboard, not a condition of the upgrade
        api_json(server, token, "POST", "/v1/heartbeat", {"event": "upgraded", "bundle_id": bundle_id,
                                                           "version": version},
                 policy=RetryPolicy(retries=1, timeout_s=(policy or RetryPolicy()).timeout_s))
    except EdgeclError:
        pass
    return report


def pull_configured(bundle_dir: str | Path | None, config_path: str | Path | None = None, server: str = "",
                    token: str = "", server_key: str = "", out: str | Path | None = None,
                    policy: RetryPolicy | None = None) -> PullReport:
    """``edgecl pull``: the device config gives what the flags do not; a config whose ``bundle`` is
    the pulled folder is pointed at the new version."""
    from .provision import load_device_config, set_bundle

    cfg = load_device_config(config_path)
    bundle = bundle_dir or (cfg.bundle if cfg else "")
    if not bundle:
        raise EdgeclError("no bundle folder", "pass BUNDLE_DIR or set bundle in the device config (device init --bundle)")
    report = pull(bundle, server or (cfg.server if cfg else ""), token or (cfg.token if cfg else ""),
                  server_key or (cfg.server_key if cfg else ""), out, policy)
    if (report.status == "upgraded" and cfg is not None and cfg.bundle
            and Path(cfg.bundle).resolve() == Path(bundle).resolve()):
        set_bundle(cfg.source, report.bundle_dir)
    return report
