"""A real `edgecl serve` for tests: a uvicorn subprocess on 127.0.0.1 with a free port, a real
store (SQLite or PostgreSQL) and real files. Killable with SIGKILL and restartable on the same store."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from edgecl_test_deltas import make_manifest, make_mask

from edgecl.formats.mask import Mask
from edgecl.server.service import register_bundle_json
from edgecl.server.store import Store

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, store_dir: Path, db: str | None = None, max_upload_mb: float = 1.0, **options) -> None:
        self.store_dir, self.db, self.max_upload_mb = store_dir, db, max_upload_mb
        self.options = options          # more keyword arguments of edgecl.server.app.serve
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log = store_dir.parent / f"{store_dir.name}-server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0, port: int | None = None) -> ServerProcess:
        self.port = port or free_port()
        extra = "".join(f", {k}={v!r}" for k, v in self.options.items())
        code = (f"from edgecl.server.app import serve; serve(port={self.port}, store_dir={str(self.store_dir)!r}, "
                f"db={self.db!r}, max_upload_mb={self.max_upload_mb}, log_level='warning'{extra})")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=log, stderr=log,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError(f"server did not start in {timeout_s} s: {self.log.read_text()[-2000:]}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill9()


@dataclass
class Fleet:
    """A store with one registered bundle, devices (name -> (token, key)) and an admin."""

    store: Store
    mask: Mask
    manifest: dict
    devices: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    admin_token: str = ""

    def headers(self, device: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.devices[device][0]}"}

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}


def make_fleet(store_dir: Path, n_devices: int, db: str | None = None) -> Fleet:
    store = Store(store_dir, db)
    mask = make_mask()
    mask_bytes = mask.to_bytes()
    manifest = make_manifest(mask_bytes, mask.total_selected)
    register_bundle_json(store, manifest, mask_bytes)
    fleet = Fleet(store, mask, manifest)
    for i in range(n_devices):
        token, key = store.register_device(f"dev-{i}")
        fleet.devices[f"dev-{i}"] = (token, bytes.fromhex(key))
    fleet.admin_token, _ = store.register_device("ops", admin=True)
    return fleet


def bundle_payload(manifest: dict, mask_bytes: bytes) -> dict:
    return {"manifest": manifest, "mask_b64": base64.b64encode(mask_bytes).decode()}


def stored_files(store_dir: Path) -> set[str]:
    return {p.name for p in (store_dir / "blobs").rglob("*") if p.is_file()}


def make_bundle_dir(root: Path, bundle_id: str = "line-s", version: int = 1, weight_scale: float = 0.05,
                    seed: int = 0, parent: Path | None = None) -> Path:
    """A hand-made bundle folder the server can store whole: manifest.json (listing every file's
    sha256), mask, base weights, prototypes. Not runnable by a device (no graphs): for server tests."""
    import hashlib
    import json

    import numpy as np
    from edgecl_test_deltas import CLASSES, EMBED_DIM
    from safetensors.numpy import save as st_save

    from edgecl.formats.prototypes import Prototypes

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    mask = make_mask()
    mask_bytes = mask.to_bytes()
    (root / "mask.safetensors").write_bytes(mask_bytes)
    weights = {name: (rng.normal(0, weight_scale, mask.shapes[name])).astype(np.float32) for name in mask.order}
    (root / "weights.safetensors").write_bytes(st_save(weights))
    protos = Prototypes(list(CLASSES), rng.normal(size=(len(CLASSES), EMBED_DIM)).astype(np.float32),
                        np.full(len(CLASSES), 5, np.int64))
    (root / "prototypes.safetensors").write_bytes(protos.to_bytes())
    manifest = make_manifest(mask_bytes, mask.total_selected, bundle_id=bundle_id, version=version)
    manifest["files"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}
    if parent is not None:
        manifest["parent_sha256"] = hashlib.sha256((parent / "manifest.json").read_bytes()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return root
