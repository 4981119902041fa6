"""The fleet server over real HTTP (uvicorn subprocess, SQLite, files): API, every rejection with
its reason and nothing stored, merge, bundle registration, the admin CLI."""

from __future__ import annotations

import hashlib
import json
import re
import struct

import httpx
import numpy as np
import pytest
from edgecl_test_deltas import forge, make_delta, make_manifest, make_mask
from edgecl_test_server import ServerProcess, bundle_payload, make_fleet, stored_files
from typer.testing import CliRunner

from edgecl.formats import delta as D
from edgecl.formats.mask import overlap_from_bytes
from edgecl.server.merge import merge_deltas


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    fleet = make_fleet(root / "store", n_devices=3)
    server = ServerProcess(root / "store", max_upload_mb=1.0).start()
    yield fleet, server
    server.stop()
    fleet.store.close()


def _delta_bytes(fleet, device="dev-0", seed=0, **kw) -> bytes:
    return D.save(make_delta(fleet.manifest, device, seed, **kw), fleet.devices[device][1])


def test_health_and_openapi(env):
    fleet, server = env
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["storage"] == "sqlite" and health["max_upload_bytes"] == 1 << 20
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    assert {"/health", "/v1/deltas", "/v1/deltas/{sha256}", "/v1/bundles",
            "/v1/bundles/{bundle_id}/{version}/merge"} <= set(paths)


def test_push_duplicate_list_download(env):
    fleet, server = env
    data = _delta_bytes(fleet, "dev-1", seed=11)
    sha = hashlib.sha256(data).hexdigest()
    with httpx.Client(base_url=server.url, headers=fleet.headers("dev-1")) as client:
        first = client.post("/v1/deltas", content=data)
        assert first.status_code == 201 and first.json() == {"status": "stored", "sha256": sha}
        again = client.post("/v1/deltas", content=data)
        assert again.status_code == 200 and again.json() == {"status": "already_have_it", "sha256": sha}
        rows = client.get("/v1/deltas", params={"bundle_id": "line-a", "version": 1, "device": "dev-1"}).json()["deltas"]
        assert [r["sha256"] for r in rows].count(sha) == 1
        assert rows[0]["samples_seen"] == 64 and rows[0]["size_bytes"] == len(data)
        assert client.get(f"/v1/deltas/{sha}").content == data
    # A device sees only its own deltas; an admin sees all.
    other = httpx.get(server.url + "/v1/deltas", headers=fleet.headers("dev-2")).json()["deltas"]
    assert sha not in [r["sha256"] for r in other]
    assert httpx.get(f"{server.url}/v1/deltas/{sha}", headers=fleet.headers("dev-2")).status_code == 404
    assert httpx.get(f"{server.url}/v1/deltas/{sha}", headers=fleet.admin()).content == data


def _rejections(fleet):
    """(name, bytes, headers, expected status, expected code) for every documented rejection."""
    dev, key = "dev-0", fleet.devices["dev-0"][1]
    good = _delta_bytes(fleet, dev, seed=101)
    header = D.read_header(good)
    body_at = 8 + header.header_bytes
    tampered = bytearray(good)
    tampered[-3] ^= 0x40
    values = header.tensors["delta.values"]
    nan_body = bytearray(good[body_at:])
    nan_body[values.begin:values.begin + 4] = np.array([np.nan], "<f4").tobytes()
    h = fleet.headers(dev)
    other_mask = make_mask(select=(8, 7))
    return [
        ("tampered body byte", bytes(tampered), h, 400, "body_hash_mismatch"),
        ("tampered header", re.sub(rb'"steps":"(\d+)"', lambda m: b'"steps":"%d"' % (int(m[1]) ^ 1), good), h, 403,
         "signature_invalid"),
        ("truncated", good[:-10], h, 400, "truncated"),
        ("truncated header", good[:50], h, 400, "truncated"),
        ("trailing data", good + b"\0\0", h, 400, "trailing_data"),
        ("wrong bundle", _delta_bytes_for({**fleet.manifest, "bundle_id": "line-zz"}, dev, key), h, 422,
         "bundle_unknown"),
        ("wrong version", _delta_bytes_for({**fleet.manifest, "version": 9}, dev, key), h, 422, "bundle_unknown"),
        ("wrong base", _delta_bytes_for({**fleet.manifest, "base_sha256": "e" * 64}, dev, key), h, 422,
         "base_mismatch"),
        ("wrong mask", _delta_bytes_for(make_manifest(other_mask.to_bytes(), other_mask.total_selected), dev, key),
         h, 422, "mask_mismatch"),
        ("wrong K", forge(good, key, meta={"delta_k": str(header.delta_k + 1)}), h, 422, "k_mismatch"),
        ("wrong token", good, {"Authorization": "Bearer ecl_not-a-token"}, 401, "auth_invalid"),
        ("no token", good, {}, 401, "auth_missing"),
        ("other device's token", good, fleet.headers("dev-1"), 403, "device_mismatch"),
        ("signed with another key", D.save(make_delta(fleet.manifest, dev, 101), fleet.devices["dev-1"][1]), h,
         403, "signature_invalid"),
        ("unsigned", D.save(make_delta(fleet.manifest, dev, 101)), h, 403, "signature_invalid"),
        ("NaN values", forge(good, key, body=bytes(nan_body)), h, 422, "values_not_finite"),
        ("no samples", _delta_bytes_for(fleet.manifest, dev, key, samples_seen=0), h, 422, "no_samples"),
        ("oversize upload", b"\0" * (2 << 20), h, 413, "too_large"),
        ("header cap", struct.pack("<Q", D.MAX_HEADER_BYTES + 8) + b" " * 64, h, 400, "header_too_large"),
        ("not a delta", b"GIF89a" + b"\0" * 100, h, 400, "header_too_large"),
        ("garbage header", struct.pack("<Q", 16) + b"{not json}      ", h, 400, "header_invalid"),
        ("path traversal in bundle id", forge(good, key, meta={"bundle_id": "../../etc"}), h, 400,
         "metadata_invalid"),
        ("path traversal in device id", forge(good, key, meta={"device_id": "../dev-0"}), h, 400,
         "metadata_invalid"),
        ("unknown format version", forge(good, key, meta={"format_version": "3"}), h, 400, "format_unsupported"),
    ]


def _delta_bytes_for(manifest, device, key, **kw) -> bytes:
    return D.save(make_delta(manifest, device, 5, **kw), key)


def test_every_rejection_has_its_reason_and_stores_nothing(env):
    fleet, server = env
    before_rows, before_files = fleet.store.count_deltas(), stored_files(fleet.store.root)
    with httpx.Client(base_url=server.url) as client:
        for name, data, headers, status, code in _rejections(fleet):
            response = client.post("/v1/deltas", content=data, headers=headers)
            body = response.json()
            assert (response.status_code, body.get("error")) == (status, code), f"{name}: {body}"
            assert ": " in body["message"] and "\n" not in body["message"], f"{name}: problem: fix, one line"
    assert fleet.store.count_deltas() == before_rows
    assert stored_files(fleet.store.root) == before_files


def test_path_traversal_in_urls_and_names(env):
    fleet, server = env
    h = fleet.admin()
    for path in ("/v1/deltas/..%2F..%2Fetc%2Fpasswd", "/v1/deltas/../../etc/passwd", "/v1/overlaps/..%2Fedgecl.sqlite3",
                 "/v1/deltas/" + "a" * 63 + "%2F", "/v1/deltas/" + "A" * 64):
        response = httpx.get(server.url + path, headers=h, follow_redirects=True)
        assert response.status_code in (400, 404), path
        assert b"root:" not in response.content and b"SQLite" not in response.content
    assert httpx.get(server.url + "/v1/deltas/notasha", headers=h).json()["error"] == "bad_id"
    with pytest.raises(Exception, match="not a valid device name"):
        fleet.store.register_device("../evil")
    with pytest.raises(Exception, match="not a sha256"):
        fleet.store.blob_path("../../etc/passwd")


def test_bundle_registration_endpoint(env, tmp_path):
    fleet, server = env
    mask = make_mask(sizes=(30,), select=(5,), seed=3)
    mask_bytes = mask.to_bytes()
    manifest = make_manifest(mask_bytes, mask.total_selected, bundle_id="line-b")
    payload = bundle_payload(manifest, mask_bytes)
    assert httpx.post(server.url + "/v1/bundles", json=payload, headers=fleet.headers("dev-0")).status_code == 403
    first = httpx.post(server.url + "/v1/bundles", json=payload, headers=fleet.admin())
    assert first.status_code == 201 and first.json()["bundle"]["delta_k"] == 5
    assert httpx.post(server.url + "/v1/bundles", json=payload, headers=fleet.admin()).status_code == 200
    bad = bundle_payload({**manifest, "mask_sha256": "0" * 64}, mask_bytes)
    response = httpx.post(server.url + "/v1/bundles", json=bad, headers=fleet.admin())
    assert response.status_code == 422 and "mask_sha256" in response.json()["message"]
    evil = make_manifest(mask_bytes, mask.total_selected, bundle_id="../evil")
    response = httpx.post(server.url + "/v1/bundles", json=bundle_payload(evil, mask_bytes), headers=fleet.admin())
    assert response.status_code == 422 and "not a valid name" in response.json()["message"]
    listed = httpx.get(server.url + "/v1/bundles", headers=fleet.headers("dev-0")).json()["bundles"]
    assert {(b["bundle_id"], b["version"]) for b in listed} >= {("line-a", 1), ("line-b", 1)}
    # Now devices can push for it.
    data = D.save(make_delta(manifest, "dev-2", 4), fleet.devices["dev-2"][1])
    assert httpx.post(server.url + "/v1/deltas", content=data, headers=fleet.headers("dev-2")).status_code == 201


def test_merge_endpoint_matches_the_pure_merge(env):
    fleet, server = env
    pushed = []
    for i, device in enumerate(fleet.devices):
        data = _delta_bytes(fleet, device, seed=200 + i, samples_seen=10 * (i + 1))
        assert httpx.post(server.url + "/v1/deltas", content=data, headers=fleet.headers(device)).status_code in (200, 201)
        pushed.append(data)
    assert httpx.post(server.url + "/v1/bundles/line-a/1/merge", headers=fleet.headers("dev-0")).status_code == 403
    response = httpx.post(server.url + "/v1/bundles/line-a/1/merge", headers=fleet.admin())
    assert response.status_code == 200, response.text
    summary = response.json()
    merged = D.load(httpx.get(f"{server.url}/v1/deltas/{summary['sha256']}", headers=fleet.admin()).content,
                    fleet.store.merge_key())
    assert merged.device_id == "merge"
    # The server merged each device's newest delta of the bundle so far (not the merged ones).
    latest = {}
    for r in fleet.store.list_deltas("line-a", 1):          # oldest first
        if r["device"] != "merge":
            latest[r["device"]] = r
    rows = sorted(latest.values(), key=lambda r: r["received_ns"])
    assert summary["inputs"] == len(rows) == 3 and summary["deltas"] == [r["sha256"] for r in rows]
    assert [r["sha256"] for r in rows][-3:] == [hashlib.sha256(d).hexdigest() for d in pushed]
    expected = merge_deltas([D.load(fleet.store.get_blob(r["sha256"])) for r in rows], fleet.mask)
    np.testing.assert_array_equal(merged.to_dense(), expected.delta.to_dense())
    overlap = overlap_from_bytes(httpx.get(f"{server.url}/v1/overlaps/{summary['overlap_sha256']}",
                                           headers=fleet.admin()).content)
    for name, (indices, counts) in expected.overlap.items():
        np.testing.assert_array_equal(overlap[name][0], indices)
        np.testing.assert_array_equal(overlap[name][1], counts)
    # Same deltas -> same merged bytes (idempotent).
    assert httpx.post(server.url + "/v1/bundles/line-a/1/merge", headers=fleet.admin()).json()["sha256"] == summary["sha256"]
    assert httpx.post(server.url + "/v1/bundles/nope/1/merge", headers=fleet.admin()).json()["error"] == "bundle_unknown"


# -- the admin CLI (`edgecl serve register-device / add-bundle`, `edgecl merge`) ----------------------
def _cli(args):
    from edgecl.cli.main import app

    return CliRunner().invoke(app, args)


def test_admin_cli(tmp_path):
    store = tmp_path / "store"
    result = _cli(["serve", "register-device", "cam-7", "--store", str(store)])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(None, 1) for line in result.output.splitlines()[1:3])
    assert lines["token"].startswith("ecl_") and len(bytes.fromhex(lines["key"])) == 32
    again = _cli(["serve", "register-device", "cam-7", "--store", str(store)])
    assert again.exit_code == 1 and "already registered" in again.output
    assert _cli(["serve", "register-device", "../x", "--store", str(store)]).exit_code == 1
    # add-bundle from a bundle folder (manifest.json + mask.safetensors).
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    mask = make_mask()
    mask_bytes = mask.to_bytes()        # once: safetensors writes metadata keys in random order
    (bundle / "mask.safetensors").write_bytes(mask_bytes)
    manifest = make_manifest(mask_bytes, mask.total_selected)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    result = _cli(["serve", "add-bundle", str(bundle), "--store", str(store)])
    assert result.exit_code == 0 and "added: bundle line-a v1" in result.output, result.output
    assert "already registered" in _cli(["serve", "add-bundle", str(bundle), "--store", str(store)]).output
    missing = _cli(["serve", "add-bundle", str(tmp_path / "nope"), "--store", str(store)])
    assert missing.exit_code == 1 and "cannot read" in missing.output
    # merge from the CLI on the store: nothing yet, then after one push (through the library).
    empty = _cli(["merge", "line-a", "--store", str(store), "-o", str(tmp_path / "m.safetensors")])
    assert empty.exit_code == 1 and "no device delta" in empty.output
    from edgecl.server.service import push_bytes
    from edgecl.server.store import Store

    s = Store(store)
    device = s.device_for_token(lines["token"])
    push_bytes(s, D.save(make_delta(manifest, "cam-7", 1), device.hmac_key), device, 1 << 20)
    result = _cli(["merge", "line-a", "--store", str(store), "-o", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 0, result.output
    merged = D.load_file(tmp_path / "m.safetensors")
    assert merged.device_id == "merge" and merged.samples_seen == 64
    assert set(overlap_from_bytes((tmp_path / "m.overlap.safetensors").read_bytes())) == set(mask.order)


def test_server_and_sync_never_import_torch():
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"      # any `import torch` now raises ImportError
            "import edgecl.formats.delta, edgecl.server.app, edgecl.server.merge, edgecl.server.service, "
            "edgecl.device.sync\n"
            "assert 'torch' not in {m for m, v in sys.modules.items() if v is not None}")
    subprocess.run([sys.executable, "-c", code], check=True)
