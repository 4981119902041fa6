"""The fleet server over real HTTP (uvicorn subprocess, SQLite, files): API, every rejection with
its reason and nothing stored, merge, bundle registration, the admin CLI."""

from __future__ import annotations

import hashlib
import json
import re
import struct
import time

import httpx
import numpy as np
import pytest
from edgecl_test_deltas import forge, make_delta, make_manifest, make_mask
from edgecl_test_server import ServerProcess, bundle_payload, make_fleet, stored_files
from typer.testing import CliRunner

from edgecl.formats import delta as D
from edgecl.formats.mask import overlap_from_bytes
from edgecl.formats.merge import merge_deltas
from edgecl.formats.scatter import Scatter


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
        ("unknown format version", forge(good, key, meta={"format_version": "9"}), h, 400, "format_unsupported"),
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
    # A merge is a background job: 202 with its id at once; its status (progress, then the answer) by GET.
    response = httpx.post(server.url + "/v1/bundles/line-a/1/merge", headers=fleet.admin())
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["state"] in ("queued", "running", "done") and response.headers["location"] == job["status_url"]
    deadline = time.monotonic() + 60
    while job["state"] != "done":
        assert job["state"] != "failed" and time.monotonic() < deadline, job
        time.sleep(0.05)
        job = httpx.get(server.url + job["status_url"], headers=fleet.admin()).json()
    assert httpx.get(server.url + job["status_url"], headers=fleet.headers("dev-0")).status_code == 403
    assert httpx.get(server.url + "/v1/merge-jobs/" + "0" * 32, headers=fleet.admin()).status_code == 404
    summary = job
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
    assert httpx.post(server.url + "/v1/bundles/line-a/1/merge", params={"wait_s": 60},
                      headers=fleet.admin()).json()["sha256"] == summary["sha256"]
    assert httpx.post(server.url + "/v1/bundles/nope/1/merge", headers=fleet.admin()).json()["error"] == "bundle_unknown"


# -- the admin CLI (`edgecl server device add / bundle add`, `edgecl merge`) ----------------------
def _cli(args):
    from edgecl.cli.main import app

    return CliRunner().invoke(app, args)


def test_admin_cli(tmp_path):
    store = tmp_path / "store"
    result = _cli(["server", "device", "add", "cam-7", "--store", str(store)])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines()[1:3])
    assert lines["token"].startswith("ecl_") and len(bytes.fromhex(lines["key"])) == 32
    again = _cli(["server", "device", "add", "cam-7", "--store", str(store)])
    assert again.exit_code == 1 and "already registered" in again.output
    assert _cli(["server", "device", "add", "../x", "--store", str(store)]).exit_code == 1
    # the old spelling still works for one version, with a one-line note on stderr
    old = _cli(["serve", "register-device", "cam-8", "--store", str(store)])
    assert old.exit_code == 0 and old.stdout.splitlines()[1].startswith("token  ecl_")
    assert old.stderr.strip() == ("warning: `edgecl serve register-device` is deprecated and goes away in 0.3: "
                                  "use `edgecl server device add`")
    listed = _cli(["server", "device", "list", "--json", "--store", str(store)])
    assert [d["name"] for d in json.loads(listed.stdout)] == ["cam-7", "cam-8"]
    assert _cli(["server", "device", "revoke", "cam-8", "--store", str(store)]).exit_code == 0
    rotated = _cli(["server", "device", "rotate", "cam-8", "--store", str(store)])
    assert rotated.exit_code == 0 and "token  ecl_" in rotated.stdout
    # add-bundle from a bundle folder (manifest.json + mask.safetensors).
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    mask = make_mask()
    mask_bytes = mask.to_bytes()        # once: safetensors writes metadata keys in random order
    (bundle / "mask.safetensors").write_bytes(mask_bytes)
    manifest = make_manifest(mask_bytes, mask.total_selected)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    result = _cli(["server", "bundle", "add", str(bundle), "--store", str(store)])
    assert result.exit_code == 0 and "added: bundle line-a v1" in result.output, result.output
    assert "already registered" in _cli(["serve", "add-bundle", str(bundle), "--store", str(store)]).output
    missing = _cli(["server", "bundle", "add", str(tmp_path / "nope"), "--store", str(store)])
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


def test_server_and_http_client_never_import_torch():
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"      # any `import torch` now raises ImportError
            "import edgecl.formats.delta, edgecl.formats.merge, edgecl.formats.signing, edgecl.server.app, "
            "edgecl.server.service, edgecl.server.bounds, edgecl.server.dashboard, "
            "edgecl.http_client, edgecl.device.push, edgecl.device.pull, edgecl.device.provision, edgecl.cli.server, edgecl.cli.pull\n"
            "assert 'torch' not in {m for m, v in sys.modules.items() if v is not None}")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- issue 13: red-team cases, devices, whole bundles, releases, JSON errors ---------------------------------
def _push(server, fleet, device, data):
    return httpx.post(server.url + "/v1/deltas", content=data, headers=fleet.headers(device))


def test_absurd_counts_and_values_are_refused_with_a_reason(env):
    fleet, server = env
    key = fleet.devices["dev-0"][1]
    good = _delta_bytes(fleet, "dev-0", seed=301)
    before = fleet.store.count_deltas()
    cases = [
        ("9e18 samples", forge(good, key, meta={"samples_seen": "9000000000000000000"}), 422, "count_out_of_range"),
        ("samples just over 1e9", forge(good, key, meta={"samples_seen": "1000000001"}), 422, "count_out_of_range"),
        ("steps over 1e12", forge(good, key, meta={"steps": "9999999999999"}), 422, "count_out_of_range"),
        ("version past int32", forge(good, key, meta={"bundle_version": "99999999999"}), 400, "metadata_invalid"),
    ]
    header = D.read_header(good)
    values = header.tensors["delta.values"]
    body = bytearray(good[8 + header.header_bytes:])
    body[values.begin:values.begin + 4] = np.array([3e38], "<f4").tobytes()
    cases.append(("3e38 value", forge(good, key, body=bytes(body)), 422, "values_out_of_range"))
    counts = header.tensors["prototypes.counts"]
    body = bytearray(good[8 + header.header_bytes:])
    body[counts.begin:counts.begin + 8] = np.array([10**12], "<i8").tobytes()
    cases.append(("prototype count 1e12", forge(good, key, body=bytes(body)), 422, "count_out_of_range"))
    means = header.tensors["prototypes.means"]
    body = bytearray(good[8 + header.header_bytes:])
    body[means.begin:means.begin + 4] = np.array([1e30], "<f4").tobytes()
    cases.append(("1e30 prototype", forge(good, key, body=bytes(body)), 422, "values_out_of_range"))
    # a statistics delta whose scatter claims an absurd spread (trace 1e30 per image): what the release's
    # LDA head would turn into a useless covariance
    absurd = D.load(good, key)
    assert absurd.prototypes is not None
    absurd.scatter = Scatter(np.zeros((absurd.prototypes.means.shape[1], 2), np.float32), 1e30 * 64,
                             int(absurd.prototypes.counts.sum()), len(absurd.prototypes.classes))
    cases.append(("1e30 scatter", D.save(absurd, key), 422, "values_out_of_range"))
    for name, data, status, code in cases:
        response = _push(server, fleet, "dev-0", data)
        assert (response.status_code, response.json()["error"]) == (status, code), (name, response.text)
        assert ": " in response.json()["message"]
    assert fleet.store.count_deltas() == before
    assert _push(server, fleet, "dev-0", good).status_code == 201        # the honest one still goes in


def test_values_bounded_by_the_bundles_own_weights(env, tmp_path):
    """A stored bundle's weights set the bound: 10 x max|W0| of the tensor (floor 1e-3)."""
    from edgecl_test_server import make_bundle_dir

    from edgecl.server.store import add_bundle_dir

    fleet, server = env
    folder = make_bundle_dir(tmp_path / "b", bundle_id="line-w", weight_scale=0.01)
    add_bundle_dir(fleet.store, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    from safetensors.numpy import load_file

    w0 = load_file(folder / "weights.safetensors")
    bound0 = 10 * max(float(np.abs(w0["layer0.weight"]).max()), 1e-3)
    key = fleet.devices["dev-1"][1]
    base = make_delta(manifest, "dev-1", 7, changed=1.0)
    k0 = fleet.mask.counts[0]
    ok_values, bad_values = base.to_dense(), base.to_dense()
    ok_values[0], bad_values[0] = 0.9 * bound0, 1.1 * bound0
    for vector, status in ((ok_values, 201), (bad_values, 422)):
        d = D.Delta.from_dense(vector, **{f: getattr(base, f) for f in (
            "bundle_id", "bundle_version", "base_sha256", "mask_sha256", "device_id", "steps", "samples_seen",
            "metrics", "created_utc", "prototypes")})
        response = _push(server, fleet, "dev-1", D.save(d, key))
        assert response.status_code == status, response.text
    assert "layer0.weight" in response.json()["message"] and response.json()["error"] == "values_out_of_range"
    assert k0 > 0


def test_revoked_device_is_refused_and_rotate_gives_new_credentials(env):
    fleet, server = env
    token, _ = fleet.store.register_device("cam-revoke")
    key = fleet.store.rotate_device("cam-revoke")[1]          # rotate once: the first token stops working
    assert httpx.get(server.url + "/v1/bundles", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    token, key = fleet.store.rotate_device("cam-revoke")
    h = {"Authorization": f"Bearer {token}"}
    data = D.save(make_delta(fleet.manifest, "cam-revoke", 1), bytes.fromhex(key))
    assert httpx.post(server.url + "/v1/deltas", content=data, headers=h).status_code == 201
    fleet.store.revoke_device("cam-revoke")
    for response in (httpx.post(server.url + "/v1/deltas", content=data, headers=h),
                     httpx.get(server.url + "/v1/bundles", headers=h)):
        assert response.status_code == 403 and response.json()["error"] == "device_revoked", response.text
    listed = {d["name"]: d for d in httpx.get(server.url + "/v1/devices", headers=fleet.admin()).json()["devices"]}
    assert listed["cam-revoke"]["revoked"] is True
    assert httpx.get(server.url + "/v1/devices", headers=fleet.headers("dev-0")).json()["error"] == "forbidden"
    with pytest.raises(Exception, match="no device named"):
        fleet.store.revoke_device("nobody")


def test_devices_list_last_seen_version_and_accuracy(env):
    fleet, server = env
    d = make_delta(fleet.manifest, "dev-2", 77)
    d.heldout = {"before": {"accuracy": 0.5, "images": 10}, "after": {"accuracy": 0.8, "images": 10,
                                                                     "per_class": {"bolt": 0.9}}}
    assert _push(server, fleet, "dev-2", D.save(d, fleet.devices["dev-2"][1])).status_code == 201
    row = next(r for r in httpx.get(server.url + "/v1/devices", headers=fleet.admin()).json()["devices"]
               if r["name"] == "dev-2")
    assert (row["last_bundle"], row["last_version"], row["last_event"]) == ("line-a", 1, "push")
    assert row["last_seen_utc"] and row["last_heldout"]["after"]["per_class"] == {"bolt": 0.9}
    stored = [r for r in fleet.store.list_deltas(device="dev-2") if r["heldout"]]
    assert stored[-1]["heldout"]["before"]["accuracy"] == 0.5
    # A push of a delta without a report keeps the last report (the heartbeat only moves last_seen).
    assert _push(server, fleet, "dev-2", _delta_bytes(fleet, "dev-2", seed=78)).status_code == 201
    row2 = next(r for r in fleet.store.list_devices() if r["name"] == "dev-2")
    assert row2["last_heldout"] == row["last_heldout"] and row2["last_seen_ns"] >= row["last_seen_ns"]


def test_double_push_counts_once_and_exclusions(env):
    fleet, server = env
    name = "twice"
    token, key = fleet.store.register_device(name)
    h = {"Authorization": f"Bearer {token}"}
    mask = make_mask(sizes=(30,), select=(5,), seed=3)
    manifest = make_manifest(mask.to_bytes(), mask.total_selected, bundle_id="line-2x")
    register_bundle = httpx.post(server.url + "/v1/bundles", json=bundle_payload(manifest, mask.to_bytes()),
                                 headers=fleet.admin())
    assert register_bundle.status_code in (200, 201)
    first = D.save(make_delta(manifest, name, 1, changed=1.0), bytes.fromhex(key))
    second = D.save(make_delta(manifest, name, 2, changed=1.0), bytes.fromhex(key))
    other = D.save(make_delta(manifest, "dev-0", 3, changed=1.0), fleet.devices["dev-0"][1])
    for data, headers in ((first, h), (second, h), (other, fleet.headers("dev-0"))):
        assert httpx.post(server.url + "/v1/deltas", content=data, headers=headers).status_code == 201
    merge = httpx.post(server.url + "/v1/bundles/line-2x/1/merge", params={"wait_s": 60}, headers=fleet.admin()).json()
    assert merge["inputs"] == 2 and merge["deltas"] == [hashlib.sha256(second).hexdigest(),
                                                        hashlib.sha256(other).hexdigest()]
    one = httpx.post(server.url + "/v1/bundles/line-2x/1/merge", params={"exclude_device": "dev-0", "wait_s": 60},
                     headers=fleet.admin()).json()
    merged = D.load(fleet.store.get_blob(one["sha256"]))
    np.testing.assert_array_equal(merged.to_dense(), D.load(second).to_dense())
    back = httpx.post(server.url + "/v1/bundles/line-2x/1/merge", headers=fleet.admin(),
                      params={"exclude_delta": hashlib.sha256(second).hexdigest(), "exclude_device": "dev-0",
                              "wait_s": 60}).json()
    assert back["deltas"] == [hashlib.sha256(first).hexdigest()], "an excluded delta falls back to the older one"
    median = httpx.post(server.url + "/v1/bundles/line-2x/1/merge", params={"strategy": "median", "wait_s": 60},
                        headers=fleet.admin())
    assert median.status_code == 200 and median.json()["strategy"] == "median"
    nothing = httpx.post(server.url + "/v1/bundles/line-2x/1/merge", headers=fleet.admin(),
                         params={"exclude_device": [name, "dev-0"]})
    assert nothing.status_code == 409 and nothing.json()["error"] == "nothing_to_merge"


def test_no_plain_text_errors(env):
    fleet, server = env
    h = fleet.admin()
    answers = [httpx.get(server.url + "/nope"), httpx.delete(server.url + "/v1/deltas", headers=h),
               httpx.get(server.url + "/v1/deltas", params={"version": "abc"}, headers=h),
               httpx.get(server.url + "/v1/deltas", params={"version": str(10**30)}, headers=h),
               httpx.post(server.url + "/v1/bundles/line-a/99999999999/merge", headers=h),
               httpx.post(server.url + "/v1/releases", content=b"not json", headers=h),
               httpx.post(server.url + "/v1/bundles", content=b"[1,2]", headers=h),
               httpx.post(server.url + "/v1/heartbeat", json={"version": "x"}, headers=fleet.headers("dev-0"))]
    for response in answers:
        assert response.headers["content-type"].startswith("application/json"), (response.url, response.text)
        body = response.json()
        assert set(body) == {"error", "message"} and response.status_code >= 400, body


def test_damaged_store_gives_a_json_500(tmp_path):
    """A damaged store answers the documented JSON shape and names the damage: the mask's bytes no
    longer hash to its name, so they are never used (store_damaged, not a bug's traceback)."""
    fleet = make_fleet(tmp_path / "store", n_devices=1)
    server = ServerProcess(tmp_path / "store").start()
    try:
        mask_blob = fleet.store.blob_path(fleet.manifest["mask_sha256"])
        mask_blob.write_bytes(b"garbage instead of a mask")
        response = _push(server, fleet, "dev-0", _delta_bytes(fleet, "dev-0", seed=5))
        assert response.status_code == 500 and response.json()["error"] == "store_damaged", response.text
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        server.stop()
        fleet.store.close()


def test_blob_store_rewrites_a_wrong_file_of_the_right_size(env):
    fleet, server = env
    data = _delta_bytes(fleet, "dev-1", seed=404)
    sha = hashlib.sha256(data).hexdigest()
    path = fleet.store.blob_path(sha)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * len(data))            # an orphan of the right size, wrong bytes
    assert _push(server, fleet, "dev-1", data).status_code == 201
    assert path.read_bytes() == data
    assert httpx.get(f"{server.url}/v1/deltas/{sha}", headers=fleet.admin()).content == data


def test_docs_work_offline_and_declare_bearer_auth(env):
    import importlib.util

    fleet, server = env
    page = httpx.get(server.url + "/docs").text
    assert "cdn" not in page.lower() and "http" not in page.replace("/openapi.json", "")
    if importlib.util.find_spec("swagger_ui") is None:      # the server extra installs swagger-ui-py
        assert "swagger-ui-py" in page
        pytest.skip("swagger-ui-py is not installed: /docs says so, /openapi.json is checked elsewhere")
    assert "/docs/assets/swagger-ui-bundle.js" in page
    js = httpx.get(server.url + "/docs/assets/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 100_000 and b"SwaggerUIBundle" in js.content
    assert httpx.get(server.url + "/docs/assets/..%2Fedgecl.sqlite3").status_code == 404
    schema = httpx.get(server.url + "/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert schema["paths"]["/v1/deltas"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in schema["paths"]["/health"]["get"]


def test_whole_bundle_release_and_download(env, tmp_path):
    from edgecl_test_server import make_bundle_dir

    from edgecl.formats.signing import manifest_object, parse_public_key, verify_manifest

    fleet, server = env
    result = _cli(["server", "bundle", "add", str(make_bundle_dir(tmp_path / "b", bundle_id="line-r")),
                   "--store", str(fleet.store.root)])
    assert result.exit_code == 0 and "4 files" in result.output, result.output
    # not released yet: a device cannot see it, an admin can download its files
    latest = httpx.get(server.url + "/v1/releases/latest", params={"bundle_id": "line-r"}, headers=fleet.headers("dev-0"))
    assert latest.status_code == 404 and latest.json()["error"] == "not_found"
    url = server.url + "/v1/bundles/line-r/1/files/weights.safetensors"
    assert httpx.get(url, headers=fleet.headers("dev-0")).status_code == 404
    assert httpx.get(url, headers=fleet.admin()).content == (tmp_path / "b" / "weights.safetensors").read_bytes()
    # canary release: only dev-1 sees it
    r = httpx.post(server.url + "/v1/releases", json={"bundle_id": "line-r", "version": 1, "canary": ["dev-1"]},
                   headers=fleet.admin())
    assert r.status_code == 201, r.text
    assert httpx.get(server.url + "/v1/releases/latest", params={"bundle_id": "line-r"},
                     headers=fleet.headers("dev-0")).status_code == 404
    info = httpx.get(server.url + "/v1/releases/latest", params={"bundle_id": "line-r"},
                     headers=fleet.headers("dev-1")).json()
    key = _cli(["server", "key", "--store", str(fleet.store.root)]).output.strip()
    assert info["public_key"] == key and set(info["files"]) == {"manifest.json", "mask.safetensors",
                                                                "weights.safetensors", "prototypes.safetensors"}
    manifest_bytes = httpx.get(server.url + "/v1/bundles/line-r/1/files/manifest.json",
                               headers=fleet.headers("dev-1")).content
    assert manifest_bytes == (tmp_path / "b" / "manifest.json").read_bytes()
    verify_manifest(parse_public_key(key), manifest_object(manifest_bytes), info["signature"])
    assert _cli(["server", "release", "promote", "line-r", "1", "--store", str(fleet.store.root)]).exit_code == 0
    assert httpx.get(server.url + "/v1/releases/latest", params={"bundle_id": "line-r"},
                     headers=fleet.headers("dev-0")).json()["version"] == 1
    assert (fleet.store.root / "release.key").stat().st_mode & 0o777 == 0o600
    # upload over HTTP: a blob that does not hash to its name is refused; list what is missing
    bad = httpx.put(server.url + "/v1/blobs/" + "0" * 64, content=b"hello", headers=fleet.admin())
    assert bad.status_code == 400 and bad.json()["error"] == "body_hash_mismatch"
    sha = hashlib.sha256(b"hello").hexdigest()
    missing = httpx.post(server.url + "/v1/blobs/missing", json={"sha256": [sha, info["files"]["manifest.json"]["sha256"]]},
                         headers=fleet.admin()).json()["missing"]
    assert missing == [sha]
    assert httpx.put(server.url + "/v1/blobs/" + sha, content=b"hello", headers=fleet.admin()).status_code == 201
    assert httpx.put(server.url + "/v1/blobs/" + sha, content=b"hello", headers=fleet.headers("dev-0")).status_code == 403


def test_deprecated_serve_still_starts_the_server(tmp_path):
    import subprocess
    import sys
    import time

    from edgecl_test_server import REPO, free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", "from edgecl.cli.main import main; main()", "serve", "--port",
                             str(port), "--store", str(tmp_path / "store"), "--log-level", "warning"],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise AssertionError("edgecl serve did not start")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert err.splitlines()[0] == ("warning: `edgecl serve` is deprecated and goes away in 0.3: use "
                                   "`edgecl server start`")


def test_bundle_add_over_http_sends_only_missing_files(env, tmp_path):
    from edgecl_test_server import make_bundle_dir

    fleet, server = env
    folder = make_bundle_dir(tmp_path / "h", bundle_id="line-h")
    args = ["server", "bundle", "add", str(folder), "--server", server.url, "--token", fleet.admin_token]
    first = _cli([*args, "--release"])
    assert first.exit_code == 0 and "stored on" in first.output and "released: line-h v1" in first.output, first.output
    assert fleet.store.bundle_files("line-h", 1)["weights.safetensors"]["size_bytes"] == \
        (folder / "weights.safetensors").stat().st_size
    again = _cli(args)
    assert again.exit_code == 0 and "uploaded 0 B" in again.output
    # a file changed after export is refused before anything is sent
    v2 = make_bundle_dir(tmp_path / "h2", bundle_id="line-h", version=2, seed=5)
    (v2 / "weights.safetensors").write_bytes(b"changed")
    bad = _cli(["server", "bundle", "add", str(v2), "--server", server.url, "--token", fleet.admin_token])
    assert bad.exit_code == 1 and "does not match its manifest" in bad.output
    assert fleet.store.get_bundle("line-h", 2) is None
    denied = _cli(["server", "bundle", "add", str(folder), "--server", server.url, "--token", fleet.devices["dev-0"][0]])
    assert denied.exit_code == 1 and "forbidden" in denied.output


def test_merge_job_client_waits_and_reports_a_failed_job(tmp_path):
    """merge_and_wait (what `edgecl release` calls) returns the job's answer; a job that fails while
    it runs (here: a counted delta's file damaged after its row was listed) raises its code."""
    from edgecl.errors import EdgeclError
    from edgecl.server.jobclient import merge_and_wait

    fleet = make_fleet(tmp_path / "store", n_devices=2)
    server = ServerProcess(tmp_path / "store").start()
    try:
        shas = []
        for i, device in enumerate(fleet.devices):
            response = _push(server, fleet, device, _delta_bytes(fleet, device, seed=700 + i))
            shas.append(response.json()["sha256"])

        def call(method, path):
            return httpx.request(method, server.url + path, headers=fleet.admin(), timeout=30).json()

        seen = []
        done = merge_and_wait(call, "line-a", 1, "strategy=median", poll_s=0.02, on_progress=seen.append)
        assert done["state"] == "done" and done["inputs"] == 2 and done["deltas"] == shas
        assert all(0 <= j["done"] <= j["total"] for j in seen)
        fleet.store.blob_path(shas[1]).write_bytes(b"damaged")
        with pytest.raises(EdgeclError, match="store_damaged"):
            merge_and_wait(call, "line-a", 1, "strategy=trimmed-mean", poll_s=0.02)
    finally:
        server.stop()
        fleet.store.close()


def test_canary_version_is_invisible_and_closed_outside_its_canary(tmp_path):
    import json

    from edgecl_test_server import make_bundle_dir

    from edgecl.server.service import release_version
    from edgecl.server.store import add_bundle_dir

    fleet = make_fleet(tmp_path / "store", n_devices=2)
    bundle = make_bundle_dir(tmp_path / "bundle", bundle_id="line-c")
    manifest = json.loads((bundle / "manifest.json").read_text())
    add_bundle_dir(fleet.store, bundle)
    release_version(fleet.store, "line-c", 1, canary=["dev-0"])
    server = ServerProcess(tmp_path / "store").start()
    try:
        def listed(device):
            bundles = httpx.get(server.url + "/v1/bundles", headers=fleet.headers(device)).json()["bundles"]
            return {(b["bundle_id"], b["version"]) for b in bundles}

        def push(device, seed):
            data = D.save(make_delta(manifest, device, seed), fleet.devices[device][1])
            return httpx.post(server.url + "/v1/deltas", content=data, headers=fleet.headers(device))

        assert ("line-c", 1) in listed("dev-0") and ("line-a", 1) in listed("dev-1")
        assert ("line-c", 1) not in listed("dev-1"), "a canary version is invisible outside its canary"
        refused = push("dev-1", 1)
        assert refused.status_code == 422 and refused.json()["error"] == "bundle_unknown", refused.text
        assert push("dev-0", 2).status_code == 201
        assert fleet.store.list_deltas("line-c", 1, "dev-1") == [], "nothing stored for the refused push"
        fleet.store.promote_release("line-c", 1)
        assert ("line-c", 1) in listed("dev-1") and push("dev-1", 3).status_code == 201
    finally:
        server.stop()
        fleet.store.close()


def test_damaged_blob_and_encoded_cache_entry_are_never_served(tmp_path):
    import zlib

    from edgecl_test_server import make_bundle_dir

    from edgecl.server.service import release_version
    from edgecl.server.store import add_bundle_dir

    fleet = make_fleet(tmp_path / "store", n_devices=1)
    bundle = make_bundle_dir(tmp_path / "bundle", bundle_id="line-z")
    add_bundle_dir(fleet.store, bundle)
    release_version(fleet.store, "line-z", 1)
    server = ServerProcess(tmp_path / "store").start()
    url = server.url + "/v1/bundles/line-z/1/files/weights.safetensors"
    want = (bundle / "weights.safetensors").read_bytes()
    try:
        first = httpx.get(url, params={"encoding": "zlib"}, headers=fleet.headers("dev-0"))
        assert first.headers["x-edgecl-encoding"] == "zlib" and zlib.decompress(first.content) == want
        [entry] = (fleet.store.root / "encoded").iterdir()
        damaged = bytearray(entry.read_bytes())
        damaged[len(damaged) // 2] ^= 0xFF                  # same size, mtime moves on: bit rot
        entry.write_bytes(bytes(damaged))
        again = httpx.get(url, params={"encoding": "zlib"}, headers=fleet.headers("dev-0"))
        assert zlib.decompress(again.content) == want, "a damaged cache entry is rebuilt, not served"
        [rebuilt] = (fleet.store.root / "encoded").iterdir()
        assert hashlib.sha256(rebuilt.read_bytes()).hexdigest() == rebuilt.name.rsplit("-", 1)[1]
        blob = fleet.store.blob_path(hashlib.sha256(want).hexdigest())
        blob.write_bytes(want[:-1] + bytes([want[-1] ^ 1]))
        for params in ({}, {"encoding": "zlib"}):
            bad = httpx.get(url, params=params, headers=fleet.headers("dev-0"))
            assert bad.status_code == 500 and bad.json()["error"] == "store_damaged", "a damaged blob is never sent"
    finally:
        server.stop()
        fleet.store.close()


def test_shared_exemplars_bounded_by_size_and_by_what_the_device_counted(env):
    """A delta sharing exemplars (profile share_exemplars) is refused with a named reason when its images
    are not the bundle's input size, or when a class shares more images than its prototype counts."""
    from edgecl.formats.exemplars import ExemplarMemory

    fleet, server = env
    key = fleet.devices["dev-2"][1]
    before = fleet.store.count_deltas()

    def sharing(n: int, size: int, seed: int) -> bytes:
        d = make_delta(fleet.manifest, "dev-2", seed, classes=["bolt"])
        counted = int(d.prototypes.counts[0])
        rng = np.random.default_rng(seed)
        d.exemplars = ExemplarMemory(["bolt"], rng.integers(0, 256, (n or counted, size, size, 3), dtype=np.uint8),
                                     np.zeros(n or counted, np.int64))
        return D.save(d, key)

    wrong_size = _push(server, fleet, "dev-2", sharing(0, 16, 401))
    assert (wrong_size.status_code, wrong_size.json()["error"]) == (422, "exemplar_shape"), wrong_size.text
    over = _push(server, fleet, "dev-2", sharing(200, 8, 402))      # counts are at most 49: 200 images is more
    assert (over.status_code, over.json()["error"]) == (422, "count_over_seen"), over.text
    assert "shares 200 exemplars" in over.json()["message"]
    assert fleet.store.count_deltas() == before
    ok = sharing(0, 8, 403)
    assert _push(server, fleet, "dev-2", ok).status_code == 201
    assert httpx.get(f"{server.url}/v1/deltas/{hashlib.sha256(ok).hexdigest()}", headers=fleet.admin()).content == ok
