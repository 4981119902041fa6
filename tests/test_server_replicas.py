"""Two API replicas that share nothing but PostgreSQL (issue 22's acceptance): two `edgecl server
start` processes, each with its own --store folder, one PostgreSQL started by the test, blobs in the
database, one release key file both read. A delta pushed to the first is listed by and downloaded
byte-identical from the second; a release made through the second is pulled through the first
with a valid signature."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import pytest
from edgecl_test_deltas import make_delta
from edgecl_test_postgres import postgres  # noqa: F401 (fixture)
from edgecl_test_server import REPO, free_port, make_bundle_dir

from edgecl.formats import delta as D
from edgecl.formats.signing import manifest_object, parse_public_key, verify_manifest
from edgecl.server.store import Store

pytestmark = pytest.mark.postgres
_CLI = [sys.executable, "-c", "from edgecl.cli.main import main; main()"]


class Replica:
    """`edgecl server start` as an operator runs it, on its own store folder."""

    def __init__(self, folder: Path, db: str, key_file: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder.parent / f"{folder.name}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(_CLI + ["server", "start", "--port", str(self.port), "--store", str(folder),
                                                 "--db", db, "--blobs", "database", "--release-key-file", str(key_file),
                                                 "--max-upload-mb", "1", "--log-level", "warning"],
                                         cwd=REPO, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(self.log.read_text()[-2000:])
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)


def test_two_replicas_share_nothing_but_postgresql(postgres, tmp_path):  # noqa: F811 (the imported fixture)
    key_file = tmp_path / "release.key"
    made = subprocess.run(_CLI + ["server", "key", "--new", str(key_file)], cwd=REPO, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    public = made.stdout.strip()
    assert key_file.stat().st_mode & 0o777 == 0o600
    # the operator registers devices and the bundle (rows in the database; bytes in the database too)
    admin_store = Store(tmp_path / "ops", postgres, blobs="database", release_key_file=key_file)
    device_token, device_key = admin_store.register_device("cam-1")
    admin_token, _ = admin_store.register_device("ops", admin=True)
    admin_store.close()
    bundle = make_bundle_dir(tmp_path / "bundle", bundle_id="line-r")
    manifest = json.loads((bundle / "manifest.json").read_text())
    device = {"Authorization": f"Bearer {device_token}"}
    admin = {"Authorization": f"Bearer {admin_token}"}

    first = Replica(tmp_path / "a", postgres, key_file)
    second = Replica(tmp_path / "b", postgres, key_file)
    try:
        for replica in (first, second):
            health = httpx.get(replica.url + "/health").json()
            assert health["storage"] == "postgresql" and health["blobs"] == "database"
            assert httpx.get(replica.url + "/v1/server-key").json()["public_key"] == public, "one key for all"
        # the bundle is uploaded through the second replica only
        files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in bundle.iterdir()}
        missing = httpx.post(second.url + "/v1/blobs/missing", json={"sha256": list(files.values())},
                             headers=admin).json()["missing"]
        assert sorted(missing) == sorted(set(files.values()))
        for name, sha in files.items():
            assert httpx.put(f"{second.url}/v1/blobs/{sha}", content=(bundle / name).read_bytes(),
                             headers=admin).status_code == 201
        assert httpx.post(first.url + "/v1/blobs/missing", json={"sha256": list(files.values())},
                          headers=admin).json()["missing"] == [], "the first replica sees the second's uploads"
        assert httpx.post(second.url + "/v1/bundles", json={"files": files}, headers=admin).status_code == 201

        # a delta pushed to the first is listed by and downloaded byte-identical from the second
        data = D.save(make_delta(manifest, "cam-1", seed=3), bytes.fromhex(device_key))
        pushed = httpx.post(first.url + "/v1/deltas", content=data, headers=device)
        assert pushed.status_code == 201, pushed.text
        sha = pushed.json()["sha256"]
        listed = httpx.get(second.url + "/v1/deltas", params={"bundle_id": "line-r"}, headers=admin).json()["deltas"]
        assert [r["sha256"] for r in listed] == [sha]
        assert httpx.get(f"{second.url}/v1/deltas/{sha}", headers=admin).content == data
        assert httpx.get(f"{second.url}/v1/deltas/{sha}", headers=device).content == data

        # a release made through the second is pulled through the first with a valid signature
        released = httpx.post(second.url + "/v1/releases", json={"bundle_id": "line-r", "version": 1},
                              headers=admin)
        assert released.status_code == 201, released.text
        latest = httpx.get(first.url + "/v1/releases/latest", params={"bundle_id": "line-r"}, headers=device).json()
        assert latest["version"] == 1 and latest["public_key"] == public
        got_manifest = httpx.get(first.url + "/v1/bundles/line-r/1/files/manifest.json", headers=device).content
        verify_manifest(parse_public_key(public), manifest_object(got_manifest), latest["signature"])
        for name, want in json.loads(got_manifest)["files"].items():
            plain = httpx.get(f"{first.url}/v1/bundles/line-r/1/files/{name}", headers=device)
            assert hashlib.sha256(plain.content).hexdigest() == want, name
            packed = httpx.get(f"{first.url}/v1/bundles/line-r/1/files/{name}", params={"encoding": "zlib"},
                               headers=device)
            body = zlib.decompress(packed.content) if packed.headers["X-Edgecl-Encoding"] == "zlib" else packed.content
            assert hashlib.sha256(body).hexdigest() == want, name

        # the first replica's local folder is only a cache: emptied, it serves the same bytes again
        for path in (tmp_path / "a" / "blobs").rglob("*"):
            if path.is_file():
                path.unlink()
        assert httpx.get(f"{first.url}/v1/deltas/{sha}", headers=admin).content == data
    finally:
        first.stop()
        second.stop()
