"""Shared helpers for the delta / server / merge / push tests: hand-made masks and deltas.

No model: a delta "made on a device" is built directly with edgecl.formats.delta from a small
hand-made mask, exactly what `edgecl delta` would write for it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import numpy as np

from edgecl.formats import delta as D
from edgecl.formats.mask import Mask
from edgecl.formats.prototypes import Prototypes

CLASSES = ["bolt", "nut", "washer"]
EMBED_DIM = 4


def make_mask(sizes: tuple[int, ...] = (40, 24), select: tuple[int, ...] = (8, 6), seed: int = 0) -> Mask:
    rng = np.random.default_rng(seed)
    order = [f"layer{i}.weight" for i in range(len(sizes))]
    indices = {n: np.sort(rng.choice(size, k, replace=False)).astype(np.int32)
               for n, size, k in zip(order, sizes, select, strict=True)}
    return Mask(order=order, shapes={n: (s,) for n, s in zip(order, sizes, strict=True)}, indices=indices,
                total_params=int(sum(sizes)))


def make_manifest(mask_bytes: bytes, k: int, bundle_id: str = "line-a", version: int = 1) -> dict[str, Any]:
    """The manifest fields the server uses (a real export writes many more)."""
    return {"bundle_id": bundle_id, "version": version, "model_name": "hand-made", "input_size": [8, 8],
            "mean": [0.5] * 3, "std": [0.5] * 3, "embedding_dim": EMBED_DIM, "proj_dim": 2,
            "total_params": 64, "selected": k, "select_rate": 0.2, "drop_rate": 0.9,
            "base_sha256": hashlib.sha256(f"base of {bundle_id}".encode()).hexdigest(),
            "mask_sha256": hashlib.sha256(mask_bytes).hexdigest(), "format_version": 1}


def make_delta(manifest: dict[str, Any], device_id: str, seed: int, *, changed: float = 0.5,
               samples_seen: int = 64, classes: list[str] | None = None) -> D.Delta:
    rng = np.random.default_rng(seed)
    k = int(manifest["selected"])
    vector = np.where(rng.random(k) < changed, rng.normal(0, 0.01, k), 0).astype(np.float32)
    names = CLASSES[: 1 + seed % len(CLASSES)] if classes is None else classes
    protos = Prototypes(list(names), rng.normal(size=(len(names), EMBED_DIM)).astype(np.float32),
                        # a class counts no more images than the delta saw (the server refuses more)
                        np.minimum(rng.integers(1, 50, len(names)), max(samples_seen, 1)).astype(np.int64))
    return D.Delta.from_dense(vector, bundle_id=manifest["bundle_id"], bundle_version=manifest["version"],
                              base_sha256=manifest["base_sha256"], mask_sha256=manifest["mask_sha256"],
                              device_id=device_id, steps=10 + seed, samples_seen=samples_seen,
                              metrics={"acc": 0.5 + (seed % 7) / 20}, created_utc="2025-03-04T05:06:07Z",
                              prototypes=protos)


def forge(data: bytes, key: bytes | None, *, meta: dict[str, str] | None = None,
          body: bytes | None = None, header_patch: dict[str, Any] | None = None) -> bytes:
    """Rewrite a delta's metadata/body and re-hash + re-sign it, so that the ONE defect a test wants
    (NaN, bad name, wrong version...) is what the reader meets, not a hash mismatch."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    old_body = data[8 + n:]
    body = old_body if body is None else body
    header["__metadata__"].update(meta or {})
    header.update(header_patch or {})
    header["__metadata__"]["body_sha256"] = hashlib.sha256(body).hexdigest()
    header["__metadata__"]["hmac_sha256"] = ""
    if key is not None:
        header["__metadata__"]["hmac_sha256"] = D.compute_hmac(key, D.canonical_json(header).encode())
    raw = D.canonical_json(header).encode()
    raw += b" " * ((-len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw + body
