"""``weights.safetensors``: a bundle's base weights W0, by parameter name (float32).

One owner for the bytes: canonical safetensors (formats/canonical.py), so the file's sha256 IS the
bundle's ``base_sha256`` and the same weights always give the same file. The device reads the masked
tensors from it to patch the inference graph's initializers; `edgecl apply` reads it as W0.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from safetensors.numpy import load as _st_load

from edgecl.errors import BundleError
from edgecl.formats.atomic import atomic_write_bytes
from edgecl.formats.canonical import canonical_safetensors
from edgecl.formats.hashing import sha256_bytes


def weights_to_bytes(weights: dict[str, np.ndarray]) -> bytes:
    return canonical_safetensors({n: np.ascontiguousarray(w, np.float32) for n, w in weights.items()}, {})


def weights_sha256(weights: dict[str, np.ndarray]) -> str:
    """The bundle's ``base_sha256``: sha256 of the canonical bytes of the weights."""
    return sha256_bytes(weights_to_bytes(weights))


def save_weights(path: str | Path, weights: dict[str, np.ndarray]) -> None:
    atomic_write_bytes(Path(path), weights_to_bytes(weights))


def tensor_offsets(data: bytes) -> dict[str, tuple[int, int]]:
    """name -> (byte offset in the file, byte length) of every tensor of safetensors bytes (header only).

    `inference.onnx` stores its weights as ONNX external data pointing INTO weights.safetensors at these
    offsets (one copy of W0 on disk), so the device can patch them in memory (device/ort.py).
    """
    import json

    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    start = 8 + header_len
    return {name: (start + info["data_offsets"][0], info["data_offsets"][1] - info["data_offsets"][0])
            for name, info in header.items() if name != "__metadata__"}


def load_weights(path: str | Path, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """All tensors, or only ``names`` (a missing one is a BundleError)."""
    try:
        values = dict(_st_load(Path(path).read_bytes()))
    except Exception as exc:
        raise BundleError(f"{path} is unreadable ({type(exc).__name__}: {exc})",
                          "re-copy the bundle from the host") from exc
    if names is None:
        return values
    wanted = list(names)
    missing = [n for n in wanted if n not in values]
    if missing:
        raise BundleError(f"{path} lacks the weight {missing[0]}", "re-copy the bundle from the host")
    return {n: values[n] for n in wanted}
