"""The fleet server on a real PostgreSQL server that this test starts (initdb + postgres on a free
loopback port), never a mock: concurrent pushes, duplicates, rejections, merge, kill -9 + restart."""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from edgecl_test_deltas import make_delta
from edgecl_test_server import ServerProcess, free_port, make_fleet

from edgecl.formats import delta as D

pytestmark = pytest.mark.postgres


def _pg_bin() -> Path | None:
    candidates = [os.environ.get("EDGECL_PG_BIN", "")] + sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    return next((Path(c) for c in candidates if c and (Path(c) / "initdb").exists()), None)


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    pg_bin = _pg_bin()
    if pg_bin is None:
        pytest.skip("PostgreSQL binaries not found (apt-get install postgresql, or set EDGECL_PG_BIN)")
    as_root = os.geteuid() == 0
    # PostgreSQL refuses to run as root. As root we run it as `nobody`, which cannot enter pytest's
    # root-only (0700) tmp folders, so its data lives in a fresh /tmp folder that `nobody` owns.
    if as_root:
        root = Path(tempfile.mkdtemp(prefix="edgecl-pg-"))
        shutil.chown(root, "nobody")
        prefix = ["runuser", "-u", "nobody", "--"]
    else:
        root, prefix = tmp_path_factory.mktemp("pg"), []
    data, sock = root / "data", root / "sock"
    proc, log = None, None
    try:
        subprocess.run(prefix + [str(pg_bin / "initdb"), "-D", str(data), "-U", "edgecl", "--auth=trust", "-E", "UTF8",
                                 "--no-sync"], check=True, capture_output=True, timeout=60)
        sock.mkdir()
        if as_root:
            shutil.chown(sock, "nobody")
        port = free_port()
        log = open(root / "postgres.log", "wb")  # noqa: SIM115 (kept open for the server's lifetime)
        proc = subprocess.Popen(prefix + [str(pg_bin / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sock),
                                          "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200"],
                                stdout=log, stderr=log)
        url = f"postgresql://edgecl@127.0.0.1:{port}/postgres"
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(url, connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((root / "postgres.log").read_text()[-2000:]) from None
                time.sleep(0.1)
        yield url
    finally:
        if proc is not None and proc.poll() is None:
            # pg_ctl, not a signal to our child: `runuser` does not forward SIGINT to postgres.
            subprocess.run(prefix + [str(pg_bin / "pg_ctl"), "stop", "-D", str(data), "-m", "fast"],
                           capture_output=True, timeout=60)
            proc.wait(30)
        if log is not None:
            log.close()
        shutil.rmtree(root, ignore_errors=True)


def test_fleet_on_postgresql(postgres, tmp_path):
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
        merge = httpx.post(server.url + "/v1/bundles/line-a/1/merge", headers=fleet.admin()).json()
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
