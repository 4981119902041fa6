"""The fleet server on a real PostgreSQL server that this test starts (initdb + postgres on a free
loopback port), never a mock: concurrent pushes, duplicates, rejections, merge, kill -9 + restart."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from edgecl_test_deltas import make_delta
from edgecl_test_postgres import postgres  # noqa: F401 (fixture)
from edgecl_test_server import ServerProcess, make_fleet

from edgecl.formats import delta as D

pytestmark = pytest.mark.postgres


def test_fleet_on_postgresql(postgres, tmp_path):  # noqa: F811 (the imported fixture)
    fleet = make_fleet(tmp_path / "store", 16, db=postgres)
    server = ServerProcess(tmp_path / "store", db=postgres).start()
    try:
        assert httpx.get(server.url + "/health").json()["storage"] == "postgresql"

        def client(i: int) -> dict[str, bytes]:
            device, key = f"dev-{i}", fleet.devices[f"dev-{i}"][1]
            accepted = {}
            with httpx.Client(base_url=server.url, headers=fleet.headers(device), timeout=30) as c:
                for seed in range(i * 10, i * 10 + 4):
                    data = D.save(make_delta(fleet.manifest, device, seed), key, values="fp16")
                    r = c.post("/v1/deltas", content=data)
                    assert r.status_code == 201, r.text
                    accepted[r.json()["sha256"]] = data
                    assert c.post("/v1/deltas", content=data).json()["status"] == "already_have_it"
                    bad = c.post("/v1/deltas", content=data[:-1] + bytes([data[-1] ^ 1]))
                    assert bad.json()["error"] == "body_hash_mismatch"
            return accepted

        with ThreadPoolExecutor(16) as pool:
            accepted = {k: v for part in pool.map(client, range(16)) for k, v in part.items()}
        assert len(accepted) == 64
        listed = httpx.get(server.url + "/v1/deltas", headers=fleet.admin()).json()["deltas"]
        assert {r["sha256"] for r in listed} == set(accepted)
        merge = httpx.post(server.url + "/v1/bundles/line-a/1/merge", params={"wait_s": 60}, headers=fleet.admin()).json()
        assert merge["inputs"] == 16, "each device's newest delta counts once"
        newest = {}
        for row in listed:
            newest[row["device"]] = row["sha256"]
        assert sorted(merge["deltas"]) == sorted(newest.values())
        devices = httpx.get(server.url + "/v1/devices", headers=fleet.admin()).json()["devices"]
        assert all(d["last_version"] == 1 and d["last_event"] == "push" for d in devices if d["role"] == "device")
        # kill -9, restart: every acknowledged delta (and the merge) is still there, byte-identical.
        server.kill9()
        server.start()
        with httpx.Client(base_url=server.url, headers=fleet.admin()) as c:
            for sha, data in accepted.items():
                got = c.get(f"/v1/deltas/{sha}").content
                assert got == data and hashlib.sha256(got).hexdigest() == sha
            assert D.load(c.get(f"/v1/deltas/{merge['sha256']}").content).device_id == "merge"
    finally:
        server.stop()
        fleet.store.close()
