"""`edgecl pull` against a real server: only changed files travel, the signature and every sha256 are
checked, the upgrade runs, and a tampered file or a wrong signature leaves the device as it was."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
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


def _next_version(v1: Path, out: Path, new_class: str = "fleet-class", move_weights: float = 0.0,
                  version: int | None = None) -> Path:
    """v2 of a bundle as the fleet would ship it: a new class's prototype and, with ``move_weights``,
    that share of the weights moved a little (what a merged delta does; same file size); version + 1,
    parent = v1's manifest."""
    from edgecl.formats.weights import load_weights, save_weights, weights_sha256

    shutil.copytree(v1, out, ignore=shutil.ignore_patterns("state"))
    manifest = json.loads((out / mf.MANIFEST).read_text())
    if move_weights:
        weights = load_weights(out / mf.WEIGHTS)
        rng = np.random.default_rng(1)
        for w in weights.values():
            flat = w.reshape(-1)
            picked = rng.random(flat.size) < move_weights
            flat[picked] += rng.normal(0, 1e-3, int(picked.sum())).astype(np.float32)
        save_weights(out / mf.WEIGHTS, weights)
        manifest["base_sha256"] = weights_sha256(weights)
        manifest["files"][mf.WEIGHTS] = hashlib.sha256((out / mf.WEIGHTS).read_bytes()).hexdigest()
    protos = Prototypes.load_file(out / mf.PROTOTYPES)
    rng = np.random.default_rng(0)
    protos.upsert(new_class, rng.normal(size=protos.means.shape[1]).astype(np.float32), 7)
    protos.save_file(out / mf.PROTOTYPES)
    manifest["version"] = version or manifest["version"] + 1
    manifest["parent_sha256"] = hashlib.sha256((v1 / mf.MANIFEST).read_bytes()).hexdigest()
    manifest["files"][mf.PROTOTYPES] = hashlib.sha256((out / mf.PROTOTYPES).read_bytes()).hexdigest()
    manifest["classes"] = list(protos.classes)
    manifest["sizes"] = {n: (out / n).stat().st_size for n in {**manifest["files"], **manifest["server_files"]}}
    (out / mf.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def serve_release(store_dir: Path, v1: Path, v2: Path, devices: list[str]) -> Iterator[dict]:
    """A real server on a store holding v1 and v2, v2 released, ``devices`` registered: yields the
    store, the server, each device's (token, key) and the release key; stops both after."""
    store = Store(store_dir)
    for folder in (v1, v2):
        add_bundle_dir(store, folder)
    manifest = mf.load_manifest(v2)
    release_version(store, manifest.bundle_id, manifest.version)
    creds = {d: store.register_device(d) for d in devices}
    server = ServerProcess(store_dir).start()
    try:
        yield {"store": store, "server": server, "creds": creds, "public": store.release_public_key(),
               "bundle_id": manifest.bundle_id}
    finally:
        server.stop()
        store.close()


@pytest.fixture(scope="module")
def fleet(tiny_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("pull")
    v2 = _next_version(tiny_bundle, root / "v2", move_weights=0.02)
    for served in serve_release(root / "store", tiny_bundle, v2, ["cam-1", "cam-2"]):
        (token, key), (other, _) = served["creds"]["cam-1"], served["creds"]["cam-2"]
        yield {**served, "token": token, "key": key, "other": other, "v2": v2}


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
    assert sorted(report["downloaded"]) == [mf.MANIFEST, mf.PROTOTYPES, mf.WEIGHTS], "unchanged files are copied"
    changed_bytes = sum((fleet["v2"] / n).stat().st_size for n in report["downloaded"])
    # weights.safetensors travels as a patch against the device's old copy (2% of its values moved)
    weights_size = (fleet["v2"] / mf.WEIGHTS).stat().st_size
    assert report["wire_bytes"][mf.WEIGHTS] < 0.2 * weights_size, report["wire_bytes"]
    assert report["downloaded_bytes"] == sum(report["wire_bytes"].values()) < 0.5 * changed_bytes
    print(f"downlink {report['downloaded_bytes']:,} B for {changed_bytes:,} B of changed files "
          f"({report['wire_bytes']}), {report['total_bytes']:,} B in all")
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
    sha = hashlib.sha256((fleet["v2"] / mf.PROTOTYPES).read_bytes()).hexdigest()
    blob = fleet["store"].blob_path(sha)
    original = blob.read_bytes()
    # Altered on the way: every form the server may send it in (the file, and the compressed copy an
    # earlier pull left in the store's encoded/ cache) is served with one byte flipped.
    served = [blob, *(fleet["store"].root / "encoded").glob(f"*{sha}")]
    saved = {p: p.read_bytes() for p in served}
    blob.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    for p in served[1:]:
        p.unlink()
    try:
        # The server re-hashes a blob before serving it (docs/server.md): a damaged one is a 500
        # store_damaged, never sent; were it altered after that, the device's own sha256 check refuses it.
        with pytest.raises(EdgeclError, match="store_damaged|hashes to"):
            pull(old, fleet["server"].url, fleet["token"], fleet["public"])
        assert not list((fleet["store"].root / "encoded").glob(f"*{sha}")), "a damaged blob is never cached"
    finally:
        for p, data in saved.items():
            p.write_bytes(data)
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


def test_patch_base_must_be_a_file_the_device_may_know(fleet, tmp_path):
    """A patch reveals old XOR new: the server never patches against a file the caller may not see."""
    import httpx

    store, server = fleet["store"], fleet["server"]
    v4 = _next_version(fleet["v2"], tmp_path / "v4", "fleet-class-4", move_weights=0.01, version=4)
    add_bundle_dir(store, v4)
    release_version(store, fleet["bundle_id"], 4, canary=["cam-1"])          # cam-2 may not see v4
    secret = store.bundle_files(fleet["bundle_id"], 4)[mf.WEIGHTS]["sha256"]
    url = f"{server.url}/v1/bundles/{fleet['bundle_id']}/2/files/{mf.WEIGHTS}"
    answer = httpx.get(url, params={"from_sha256": secret}, headers={"Authorization": f"Bearer {fleet['other']}"})
    assert answer.status_code == 200 and answer.headers["x-edgecl-encoding"] == "identity"
    assert answer.content == (fleet["v2"] / mf.WEIGHTS).read_bytes()
    old = store.bundle_files(fleet["bundle_id"], 1)[mf.WEIGHTS]["sha256"]      # an older version: allowed
    patch = httpx.get(url, params={"from_sha256": old}, headers={"Authorization": f"Bearer {fleet['other']}"})
    assert patch.headers["x-edgecl-encoding"] == "xor-zlib" and len(patch.content) < len(answer.content) / 5


def test_a_zlib_bomb_is_refused_not_expanded(tmp_path):
    import io
    import zlib

    from edgecl.http_client import _Sink

    sink = _Sink(io.BytesIO(), tmp_path / "f", limit=1000)
    sink.headers({"X-Edgecl-Encoding": "zlib"})
    with pytest.raises(EdgeclError, match="larger than the 1,000 bytes"):
        sink(zlib.compress(b"\0" * 10_000_000))
    assert sink.size <= 1000
