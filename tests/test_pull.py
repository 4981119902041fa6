"""`edgecl pull` against a real server: only changed files travel, the signature and every sha256 are
checked, the upgrade runs, and a tampered file or a wrong signature leaves the device as it was."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from edgecl_test_server import ServerProcess
from typer.testing import CliRunner

from edgecl.cli.main import app
from edgecl.device.pull import pull
from edgecl.errors import EdgeclError
from edgecl.formats import manifest as mf
from edgecl.formats.prototypes import Prototypes
from edgecl.formats.signing import SignatureError
from edgecl.server.service import release_version
from edgecl.server.store import Store, add_bundle_dir

runner = CliRunner()


def _next_version(v1: Path, out: Path, new_class: str = "fleet-class") -> Path:
    """v2 of a bundle as the fleet would ship it when only the prototypes changed (a new class):
    same weights and graphs, new prototypes file, version + 1, parent = v1's manifest."""
    shutil.copytree(v1, out, ignore=shutil.ignore_patterns("state"))
    protos = Prototypes.load_file(out / mf.PROTOTYPES)
    rng = np.random.default_rng(0)
    protos.upsert(new_class, rng.normal(size=protos.means.shape[1]).astype(np.float32), 7)
    protos.save_file(out / mf.PROTOTYPES)
    manifest = json.loads((out / mf.MANIFEST).read_text())
    manifest["version"] += 1
    manifest["parent_sha256"] = hashlib.sha256((v1 / mf.MANIFEST).read_bytes()).hexdigest()
    manifest["files"][mf.PROTOTYPES] = hashlib.sha256((out / mf.PROTOTYPES).read_bytes()).hexdigest()
    manifest["classes"] = list(protos.classes)
    (out / mf.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def fleet(tiny_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("pull")
    v2 = _next_version(tiny_bundle, root / "v2")
    store = Store(root / "store")
    for folder in (tiny_bundle, v2):
        add_bundle_dir(store, folder)
    manifest = mf.load_manifest(v2)
    release_version(store, manifest.bundle_id, manifest.version)
    token, key = store.register_device("cam-1")
    other, _ = store.register_device("cam-2")
    server = ServerProcess(root / "store").start()
    yield {"store": store, "server": server, "token": token, "key": key, "other": other, "v2": v2,
           "bundle_id": manifest.bundle_id, "public": store.release_public_key()}
    server.stop()
    store.close()


def _device(tiny_bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "dev" / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


def test_pull_downloads_only_what_changed_and_upgrades(fleet, tiny_bundle, tmp_path):
    old = _device(tiny_bundle, tmp_path)
    before = _tree(old)
    cfg = tmp_path / "device.toml"
    result = runner.invoke(app, ["device", "init", "--server", fleet["server"].url, "--name", "cam-1", "--token",
                                 fleet["token"], "--key", fleet["key"], "--server-key", fleet["public"],
                                 "--bundle", str(old), "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["pull", "--config", str(cfg), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    new = Path(report["bundle_dir"])
    assert report["status"] == "upgraded" and report["version"] == 2 and new == old.parent / "bundle.v2"
    assert sorted(report["downloaded"]) == [mf.MANIFEST, mf.PROTOTYPES], "unchanged files are copied, not sent"
    v2_bytes = sum((fleet["v2"] / n).stat().st_size for n in (mf.MANIFEST, mf.PROTOTYPES))
    assert report["downloaded_bytes"] == v2_bytes and report["copied_bytes"] > 10 * v2_bytes
    print(f"downlink {report['downloaded_bytes']:,} B of {report['total_bytes']:,} B")
    # the new folder is v2 byte for byte (plus the device state the upgrade wrote)
    got = {k: v for k, v in _tree(new).items() if not k.startswith("state")}
    assert got == _tree(fleet["v2"])
    assert json.loads((new / "state" / "HEAD.json").read_text())["current"] is not None
    assert "fleet-class" in report["upgrade"]["classes"]
    assert _tree(old) == before, "the old bundle is never written to"
    # the config now points at v2; pulling again is a no-op
    again = runner.invoke(app, ["pull", "--config", str(cfg)])
    assert again.exit_code == 0 and again.output.startswith("up to date: "), again.output
    devices = {d["name"]: d for d in fleet["store"].list_devices()}
    assert devices["cam-1"]["last_event"] in ("upgraded", "check") and devices["cam-1"]["last_version"] == 2


def test_tampered_file_is_refused_and_nothing_changes(fleet, tiny_bundle, tmp_path):
    old = _device(tiny_bundle, tmp_path)
    before = _tree(old)
    blob = fleet["store"].blob_path(hashlib.sha256((fleet["v2"] / mf.PROTOTYPES).read_bytes()).hexdigest())
    original = blob.read_bytes()
    blob.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))    # altered on the server's disk / on the way
    try:
        with pytest.raises(EdgeclError, match="hashes to"):
            pull(old, fleet["server"].url, fleet["token"], fleet["public"])
    finally:
        blob.write_bytes(original)
    assert _tree(old) == before
    assert sorted(p.name for p in old.parent.iterdir()) == ["bundle"], "no new folder, no temp left"


def test_wrong_signature_is_refused_and_nothing_changes(fleet, tiny_bundle, tmp_path):
    from edgecl.formats.signing import generate_private_key, public_key

    old = _device(tiny_bundle, tmp_path)
    before = _tree(old)
    impostor = public_key(generate_private_key()).hex()        # the device pinned another server's key
    with pytest.raises(SignatureError, match="does not verify"):
        pull(old, fleet["server"].url, fleet["token"], impostor)
    with pytest.raises(EdgeclError, match="no pinned server key"):
        pull(old, fleet["server"].url, fleet["token"], "")
    assert _tree(old) == before and sorted(p.name for p in old.parent.iterdir()) == ["bundle"]


def test_canary_release_reaches_only_its_devices(fleet, tiny_bundle, tmp_path):
    store, server = fleet["store"], fleet["server"]
    v3 = _next_version(fleet["v2"], tmp_path / "v3", "fleet-class-3")
    add_bundle_dir(store, v3)
    release_version(store, fleet["bundle_id"], 3, canary=["cam-1"])
    # cam-2 sees v2 as the newest; its pull from v2 says up to date
    v2_device = tmp_path / "cam2" / "bundle.v2"
    shutil.copytree(fleet["v2"], v2_device)
    report = pull(v2_device, server.url, fleet["other"], fleet["public"])
    assert report.status == "up_to_date" and report.version == 2
    report = pull(v2_device, server.url, fleet["token"], fleet["public"])      # cam-1 is the canary
    assert report.status == "upgraded" and report.version == 3 and report.downloaded == [mf.MANIFEST, mf.PROTOTYPES]
