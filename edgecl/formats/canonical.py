"""Canonical safetensors bytes: the same tensors and metadata always give the same bytes.

The safetensors library writes ``__metadata__`` from a hash map, so its key order (and the file's
sha256) changes from process to process. Files whose sha256 is an identity (the mask, pinned in
every manifest and delta) are written here instead: compact JSON with sorted keys, tensors laid out
by decreasing item size then name (every tensor stays aligned), header padded with spaces to a
multiple of 8 bytes as the safetensors spec allows. Any safetensors reader loads them.
"""

from __future__ import annotations

import json

import numpy as np

_TAGS = {np.dtype("float64"): "F64", np.dtype("float32"): "F32", np.dtype("float16"): "F16",
         np.dtype("int64"): "I64", np.dtype("int32"): "I32", np.dtype("int16"): "I16", np.dtype("int8"): "I8",
         np.dtype("uint8"): "U8", np.dtype("uint16"): "U16", np.dtype("uint32"): "U32", np.dtype("uint64"): "U64",
         np.dtype("bool"): "BOOL"}


def canonical_parts(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> tuple[bytes, bytes, dict]:
    """(header JSON without its padding, body, header object): what a signature covers (delta files)."""
    arrays = {n: np.ascontiguousarray(a) for n, a in tensors.items()}
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(arrays, key=lambda n: (-arrays[n].dtype.itemsize, n)):
        array = arrays[name]
        raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _TAGS[array.dtype], "shape": [int(s) for s in array.shape],
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return text.encode("ascii"), b"".join(chunks), header


def canonical_safetensors(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    text, body, _ = canonical_parts(tensors, metadata)
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + body


def read_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` object of safetensors bytes (empty when absent); no tensor is decoded."""
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + header_len]).get("__metadata__", {}) or {}
