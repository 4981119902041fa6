"""`edgecl pull`: fetch the newest released version of this device's bundle, verify it, upgrade.

    1. ask the server for the newest release of the bundle's lineage this device may pull
       (``GET /v1/releases/latest``; a canary release only reaches the devices it names);
    2. download ``manifest.json`` and check the release signature (Ed25519, the server key pinned
       at ``edgecl device init``) BEFORE anything else: the signed manifest lists every other
       file's sha256, so nothing unsigned is ever trusted;
    3. build the new bundle in a temp folder beside the old one: each file whose sha256 the old
       bundle already has (checked on disk) is copied locally; the rest is downloaded compressed,
       as a patch against the old file of the same name when the sizes match (zlib of old XOR new:
       a version moves a few percent of the weights), and the result is hashed;
    4. run ``edgecl.device.upgrade.upgrade(old, new)`` (the device's exemplars, local classes, LDA
       statistics) inside that temp folder, then rename it into place.

Any failure (wrong signature, a file altered on the way, a full disk, an upgrade check) removes
the temp folder: the old bundle and its state are never written to. The new folder is
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

from .state import Bundle, open_bundle
from .sync import RetryPolicy, ServerRejected, api_json, download


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


def fetch_release(old: Bundle, release: dict[str, Any], server: str, token: str, public: Any, target: Path,
                  report: PullReport, policy: RetryPolicy | None = None,
                  then: Callable[[Path], None] | None = None) -> None:
    """Download a release (``GET /v1/releases/latest``'s answer) into ``target``, verified: the
    signature first, then every file against the signed manifest's sha256; files the old bundle has
    are copied, the rest come compressed or as patches against it. ``then(tmp)`` runs inside the temp
    folder before it is renamed into place; any failure leaves nothing behind."""
    old_dir = old.root
    bundle_id, version = str(release.get("bundle_id", "")), int(release.get("version", 0))
    files = release.get("files") or {}
    if mf.MANIFEST not in files:
        raise DeviceError(f"the release of {bundle_id} v{version} lists no manifest.json", "ask the operator")

    def fetch(name: str, sha256: str, dest: Path) -> int:
        # Compressed; and for a file the old bundle has under the same name and size, a patch
        # against it (zlib of old XOR new: a version moves a few percent of the weights).
        size = (files.get(name) or {}).get("size_bytes")
        old_file = old_dir / name
        return download(server, token, f"/v1/bundles/{bundle_id}/{version}/files/{name}", dest, sha256, policy,
                        old=old_file if old_file.is_file() else None, size=size, compressed=True)

    # The signature first: nothing of this release is trusted (or written beside the bundle) before it.
    scratch = old_dir.parent / f".{target.name}.manifest.tmp"
    try:
        report.wire_bytes[mf.MANIFEST] = fetch(mf.MANIFEST, files[mf.MANIFEST]["sha256"], scratch)
        report.downloaded_bytes += report.wire_bytes[mf.MANIFEST]
        manifest_bytes = scratch.read_bytes()
    finally:
        scratch.unlink(missing_ok=True)
    manifest = manifest_object(manifest_bytes)
    verify_manifest(public, manifest, release.get("signature", ""))
    if manifest.get("bundle_id") != bundle_id or int(manifest.get("version", 0)) != version:
        raise DeviceError(f"the signed manifest is for {manifest.get('bundle_id')} v{manifest.get('version')}, "
                          f"not {bundle_id} v{version}", "refused: ask the operator to check the release")
    listed: dict[str, str] = dict(manifest.get("files") or {})
    if not listed or any(not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", n) for n in listed):
        raise DeviceError("the signed manifest lists no files or a bad file name", "refused: ask the operator")

    local = _local_files(old_dir, dict(old.manifest.files or {}))
    report.downloaded.append(mf.MANIFEST)
    with atomic_dir(target) as tmp:
        (tmp / mf.MANIFEST).write_bytes(manifest_bytes)
        for name, sha in sorted(listed.items()):
            dest = tmp / name
            if sha in local:
                shutil.copyfile(local[sha], dest)
                if hashlib.sha256(dest.read_bytes()).hexdigest() != sha:   # changed while we copied
                    raise DeviceError(f"{local[sha]} changed while it was copied", "run `edgecl pull` again")
                report.copied.append(name)
                report.copied_bytes += dest.stat().st_size
            else:
                report.wire_bytes[name] = fetch(name, sha, dest)
                report.downloaded_bytes += report.wire_bytes[name]
                report.downloaded.append(name)
        if then is not None:
            then(tmp)


def pull(bundle_dir: str | Path, server: str, token: str, server_key: str, out: str | Path | None = None,
         policy: RetryPolicy | None = None) -> PullReport:
    if not server or not token:
        raise EdgeclError("no server or token", "run `edgecl device init` or pass --server and --token")
    if not server_key:
        raise EdgeclError("no pinned server key: a pulled version cannot be verified",
                          "run `edgecl device init ... --server-key KEY` with the key `edgecl server key` prints")
    public = parse_public_key(server_key)
    old = open_bundle(bundle_dir)
    old_dir = old.root
    bundle_id, old_version = old.manifest.bundle_id, old.manifest.version
    try:
        release = api_json(server, token, "GET", f"/v1/releases/latest?bundle_id={bundle_id}", policy=policy)
    except ServerRejected as exc:
        if exc.code != "not_found":
            raise
        release = {}            # nothing released to this device yet
    version = int(release.get("version", 0))
    report = PullReport("up_to_date", bundle_id, str(old_dir), old_version, max(version, old_version))
    if version <= old_version:
        return report
    target = Path(out) if out else default_target(old_dir, version)
    if target.exists():
        raise DeviceError(f"{target} already exists", "remove it (a pull that did not finish?) or pass --out DIR")

    def carry_state(tmp: Path) -> None:
        from .upgrade import upgrade

        report.upgrade = upgrade(old_dir, tmp)

    fetch_release(old, release, server, token, public, target, report, policy, then=carry_state)
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
