"""32 concurrent clients, bounded in count and time: every accepted delta listed and byte-identical,
every invalid one rejected; and kill -9 mid-run + restart loses nothing the server acknowledged."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from edgecl_test_deltas import make_delta
from edgecl_test_server import ServerProcess, make_fleet

from edgecl.formats import delta as D

N_CLIENTS = 32
PUSHES_PER_CLIENT = 8
TIME_BOUND_S = 20.0


def _client_run(url, fleet, device, seeds, deadline, invalid_every=4):
    """Push deltas; every ``invalid_every``-th one has a flipped body byte. Returns (accepted, rejected)."""
    accepted: dict[str, bytes] = {}
    rejected: list[str] = []
    key = fleet.devices[device][1]
    with httpx.Client(base_url=url, headers=fleet.headers(device), timeout=30) as client:
        for n, seed in enumerate(seeds):
            if time.monotonic() > deadline:
                break
            data = D.save(make_delta(fleet.manifest, device, seed), key, values=("fp32", "fp16", "int8")[seed % 3])
            if n % invalid_every == invalid_every - 1:
                data = data[:-1] + bytes([data[-1] ^ 1])
            response = client.post("/v1/deltas", content=data)
            if response.status_code in (200, 201):
                assert response.json()["sha256"] == hashlib.sha256(data).hexdigest()
                accepted[response.json()["sha256"]] = data
            else:
                assert response.json()["error"] == "body_hash_mismatch", response.text
                rejected.append(response.json()["error"])
            if n == 0:   # one duplicate per client: "already have it", still one row
                again = client.post("/v1/deltas", content=data)
                assert again.status_code == 200 and again.json()["status"] == "already_have_it"
    return accepted, rejected


def test_32_concurrent_clients(tmp_path):
    fleet = make_fleet(tmp_path / "store", N_CLIENTS)
    server = ServerProcess(tmp_path / "store").start()
    try:
        deadline = time.monotonic() + TIME_BOUND_S
        started = time.monotonic()
        with ThreadPoolExecutor(N_CLIENTS) as pool:
            futures = [pool.submit(_client_run, server.url, fleet, f"dev-{i}",
                                   range(i * 100, i * 100 + PUSHES_PER_CLIENT), deadline) for i in range(N_CLIENTS)]
            results = [f.result() for f in futures]
        elapsed = time.monotonic() - started
        accepted = {sha: data for acc, _ in results for sha, data in acc.items()}
        rejected = sum(len(rej) for _, rej in results)
        assert elapsed < TIME_BOUND_S + 5
        assert len(accepted) >= N_CLIENTS and rejected >= N_CLIENTS   # every client got through at least once each way
        listed = httpx.get(server.url + "/v1/deltas", headers=fleet.admin(), params={"bundle_id": "line-a"}).json()
        assert {r["sha256"] for r in listed["deltas"]} == set(accepted)
        with httpx.Client(base_url=server.url, headers=fleet.admin()) as client:
            for sha, data in accepted.items():
                assert client.get(f"/v1/deltas/{sha}").content == data
    finally:
        server.stop()
        fleet.store.close()


def test_kill_9_mid_run_loses_nothing_acknowledged(tmp_path):
    store_dir = tmp_path / "store"
    fleet = make_fleet(store_dir, 8)
    server = ServerProcess(store_dir).start()
    acked: dict[str, bytes] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def pusher(i: int) -> None:
        device, key = f"dev-{i}", fleet.devices[f"dev-{i}"][1]
        with httpx.Client(base_url=server.url, headers=fleet.headers(device), timeout=5) as client:
            seed = i * 10_000
            while not stop.is_set():
                seed += 1
                data = D.save(make_delta(fleet.manifest, device, seed), key)
                try:
                    response = client.post("/v1/deltas", content=data)
                except httpx.HTTPError:
                    return      # the server died: whatever was not acknowledged may be lost
                if response.status_code in (200, 201):
                    with lock:
                        acked[response.json()["sha256"]] = data

    threads = [threading.Thread(target=pusher, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 15
        while len(acked) < 60 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.kill9()                     # mid-run: requests are in flight right now
        stop.set()
        for t in threads:
            t.join(10)
        assert len(acked) >= 60
        # The database is intact and every acknowledged delta is there, byte for byte, after a restart.
        with sqlite3.connect(store_dir / "edgecl.sqlite3") as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        server.start()
        listed = {r["sha256"] for r in httpx.get(server.url + "/v1/deltas", headers=fleet.admin()).json()["deltas"]}
        assert set(acked) <= listed
        with httpx.Client(base_url=server.url, headers=fleet.admin()) as client:
            for sha, data in acked.items():
                assert client.get(f"/v1/deltas/{sha}").content == data
        # And it keeps working: a new push and a re-push of an acknowledged one.
        data = D.save(make_delta(fleet.manifest, "dev-0", 999_999), fleet.devices["dev-0"][1])
        assert httpx.post(server.url + "/v1/deltas", content=data, headers=fleet.headers("dev-0")).status_code == 201
        sha, old = next(iter(acked.items()))
        device = D.read_header(old).device_id
        again = httpx.post(server.url + "/v1/deltas", content=old, headers=fleet.headers(device))
        assert again.json() == {"status": "already_have_it", "sha256": sha}
    finally:
        stop.set()
        server.stop()
        fleet.store.close()
