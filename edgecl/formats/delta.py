"""The delta file (``delta.safetensors``): what a device sends home. Spec: docs/delta-format.md.

numpy + stdlib + safetensors only: host, device and server all import this module.

The writer produces canonical bytes (sorted compact JSON header, fixed tensor order), so the same
delta always has the same sha256: the server stores deltas by it. ``body_sha256`` covers the
tensor bytes and ``hmac_sha256`` covers the header (which holds ``body_sha256``), so neither has
to cover itself.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as _st_load

from edgecl.errors import EdgeclError
from edgecl.formats.atomic import atomic_write_bytes
from edgecl.formats.canonical import canonical_parts
from edgecl.formats.exemplars import ExemplarMemory
from edgecl.formats.prototypes import Prototypes
from edgecl.formats.scatter import MAX_RANK, Scatter

DELTA_FORMAT = "edgecl-delta"
DELTA_FORMAT_VERSION = 5            # 2 added the optional ``heldout`` report, 3 the optional base-space
READ_FORMAT_VERSIONS = (1, 2, 3, 4, 5)  # prototypes (``base_classes``), 4 the shared exemplars, 5 the classes'
                                        # within-class scatter (``scatter``, ``base_scatter``); each written
                                        # only when the file holds what it added
# Shared exemplars (version 4): a delta holds at most this many images, and their decoded pixels at
# most this many bytes, whatever its zlib stream claims (a decompression bomb stops here).
MAX_EXEMPLAR_IMAGES = 4096
MAX_EXEMPLAR_PIXEL_BYTES = 64 << 20
MAX_HEADER_BYTES = 1 << 20          # safetensors itself allows 100 MB; a delta header is < 10 kB
DEFAULT_INT8_BLOCK = 1024           # values per int8 scale: 0.4% overhead, most blocks in one tensor
DEFAULT_INT4_BLOCK = 64             # values per int4 scale: 4 bit + 0.5 bit of scale per value
VALUE_DTYPES = ("fp32", "fp16", "int8", "int4")
LAYOUTS = ("dense", "bitmap", "indices")   # tie-break order of the "auto" layout choice
MERGE_DEVICE_ID = "merge"

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_UINT_RE = re.compile(r"0|[1-9][0-9]{0,18}")
_TIME_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
_MAX_CLASS_NAME = 256

# safetensors dtype tag <-> little-endian numpy dtype
_DTYPES: dict[str, np.dtype] = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"),
           "I32": np.dtype("<i4"), "I64": np.dtype("<i8")}
_TAG_OF = {"fp32": "F32", "fp16": "F16", "int8": "I8", "int4": "U8"}
_ENC_OF = {v: k for k, v in _TAG_OF.items()}

T_POSITIONS, T_BITMAP, T_VALUES, T_SCALES = "delta.positions", "delta.bitmap", "delta.values", "delta.scales"
T_MEANS, T_COUNTS = "prototypes.means", "prototypes.counts"
T_BASE_MEANS, T_BASE_COUNTS = "base_prototypes.means", "base_prototypes.counts"
T_EXEMPLAR_PIXELS, T_EXEMPLAR_LABELS = "exemplars.pixels_zlib", "exemplars.labels"
# Version 5: the scatter of the images ``prototypes`` counts, under the delta's bundle (``scatter``) and
# under the backbone before it (``base_scatter``), each a low-rank factor (formats.scatter).
SCATTER_KEYS = {"scatter": "scatter.factor", "base_scatter": "base_scatter.factor"}

_REQUIRED_KEYS = ("format", "format_version", "bundle_id", "bundle_version", "base_sha256", "mask_sha256",
                  "device_id", "delta_k", "layout", "values_dtype", "steps", "samples_seen", "metrics",
                  "created_utc", "body_sha256", "hmac_sha256")
_OPTIONAL_KEYS = ("int8_block", "int4_block", "classes", "heldout", "base_classes", "exemplar_classes",
                  "exemplar_shape", "scatter", "base_scatter")
_MAX_REPORT_CLASSES = 1024          # per-class accuracies a held-out report may carry (bounds the header)
_BLOCK_KEY = {"int8": "int8_block", "int4": "int4_block"}   # quantised encodings and their block-size key
_QMAX = {"int8": 127, "int4": 7}


# -- errors: one class per failure; ``code`` is the server's error code --------------------------
class DeltaError(EdgeclError):
    code = "delta_invalid"


class DeltaTruncatedError(DeltaError):
    code = "truncated"


class DeltaTrailingDataError(DeltaError):
    code = "trailing_data"


class DeltaHeaderTooLargeError(DeltaError):
    code = "header_too_large"


class DeltaHeaderError(DeltaError):
    code = "header_invalid"


class DeltaVersionError(DeltaError):
    code = "format_unsupported"


class DeltaMetadataError(DeltaError):
    code = "metadata_invalid"


class DeltaShapeError(DeltaError):
    code = "shape_invalid"


class DeltaValueError(DeltaError):
    code = "values_not_finite"


class DeltaBodyHashError(DeltaError):
    code = "body_hash_mismatch"


class DeltaSignatureError(DeltaError):
    code = "signature_invalid"


class DeltaEncodeError(DeltaError):
    code = "encode_failed"


_REMAKE = "make the delta again with `edgecl delta` (the file is damaged or was not written by edgecl)"


# -- the in-memory delta ---------------------------------------------------------------------------
@dataclass
class Delta:
    bundle_id: str                      # manifest.bundle_id
    bundle_version: int                 # manifest.version the device adapted
    base_sha256: str                    # manifest.base_sha256
    mask_sha256: str                    # manifest.mask_sha256
    device_id: str                      # registered device name ("merge" for merged deltas)
    delta_k: int                        # K: length of the bundle's delta vector
    positions: np.ndarray               # int32 [M], strictly increasing, in [0, K)
    values: np.ndarray                  # float32 [M], decoded W - W0 at those positions
    steps: int = 0                      # optimizer steps on the device
    samples_seen: int = 0               # training images seen (repeats counted); merge weight
    metrics: dict[str, float] = field(default_factory=dict)  # eval metrics, finite numbers
    created_utc: str = ""               # "YYYY-MM-DDTHH:MM:SSZ"; empty = now, at save time
    prototypes: Prototypes | None = None  # the device's class prototypes
    heldout: dict[str, Any] | None = None  # the device's held-out accuracy before/after adapting (spec)
    # Its classes as the bundle's own backbone (no delta) sees them: what the release gate's frozen
    # baseline needs, which only the device (holding the images) can compute. A subset of prototypes'.
    base_prototypes: Prototypes | None = None
    # Shared exemplars (opt-in, profile ``share_exemplars``): stored images of its own classes (a subset
    # of prototypes' classes), so the host can embed them under any backbone (version 4).
    exemplars: ExemplarMemory | None = None
    # Within-class scatter of the images ``prototypes`` counts (a statistics delta, `edgecl restat`):
    # under this delta's bundle, and under the backbone before it (the release's frozen baseline),
    # what the LDA head needs besides the means (version 5).
    scatter: Scatter | None = None
    base_scatter: Scatter | None = None
    # Filled in by load(): how the file stored the values, and its integrity fields.
    values_dtype: str = "fp32"
    body_sha256: str = ""
    hmac_sha256: str = ""

    @classmethod
    def from_dense(cls, vector: np.ndarray, **provenance: Any) -> Delta:
        """A delta from the device's full K-vector: the changed (nonzero) entries are kept."""
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        positions = np.flatnonzero(vector).astype(np.int32)
        return cls(delta_k=int(vector.size), positions=positions, values=vector[positions], **provenance)

    def to_dense(self, k: int | None = None) -> np.ndarray:
        """The full K-vector (zeros where nothing changed); ``k`` checks the expected K."""
        if k is not None and k != self.delta_k:
            raise DeltaShapeError(f"delta has K={self.delta_k} entries but the bundle's mask selects {k}",
                                  "use a delta made for this bundle (same mask)")
        out = np.zeros(self.delta_k, np.float32)
        out[self.positions] = self.values
        return out

    def changed_positions(self) -> np.ndarray:
        """Positions whose decoded value is nonzero: what "changed" means everywhere (spec)."""
        return self.positions[self.values != 0]


@dataclass
class TensorInfo:
    dtype: str                          # safetensors tag, e.g. "F32"
    shape: tuple[int, ...]
    begin: int                          # offsets inside the body
    end: int


@dataclass
class DeltaHeader:
    """The header alone: enough for the server to accept or refuse before reading the body."""

    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    header_bytes: int                   # N (padded)
    body_bytes: int                     # length of the tensor data
    signed_bytes: bytes                 # canonical header JSON with hmac_sha256 = "" (what the HMAC covers)

    @property
    def total_bytes(self) -> int:
        return 8 + self.header_bytes + self.body_bytes

    # Typed views of the metadata (validated by read_header).
    @property
    def bundle_id(self) -> str:
        return self.metadata["bundle_id"]

    @property
    def bundle_version(self) -> int:
        return int(self.metadata["bundle_version"])

    @property
    def base_sha256(self) -> str:
        return self.metadata["base_sha256"]

    @property
    def mask_sha256(self) -> str:
        return self.metadata["mask_sha256"]

    @property
    def device_id(self) -> str:
        return self.metadata["device_id"]

    @property
    def delta_k(self) -> int:
        return int(self.metadata["delta_k"])

    @property
    def steps(self) -> int:
        return int(self.metadata["steps"])

    @property
    def samples_seen(self) -> int:
        return int(self.metadata["samples_seen"])

    @property
    def created_utc(self) -> str:
        return self.metadata["created_utc"]

    @property
    def body_sha256(self) -> str:
        return self.metadata["body_sha256"]

    @property
    def hmac_sha256(self) -> str:
        return self.metadata["hmac_sha256"]

    @property
    def classes(self) -> list[str]:
        return json.loads(self.metadata["classes"]) if "classes" in self.metadata else []

    @property
    def base_classes(self) -> list[str]:
        return json.loads(self.metadata["base_classes"]) if "base_classes" in self.metadata else []

    @property
    def heldout(self) -> dict[str, Any] | None:
        return json.loads(self.metadata["heldout"]) if "heldout" in self.metadata else None

    @property
    def exemplar_classes(self) -> list[str]:
        return json.loads(self.metadata["exemplar_classes"]) if "exemplar_classes" in self.metadata else []

    @property
    def exemplar_shape(self) -> tuple[int, ...] | None:
        """[M, H, W, 3] of the shared exemplars' pixels, None when the delta carries none."""
        return tuple(json.loads(self.metadata["exemplar_shape"])) if "exemplar_shape" in self.metadata else None

    @property
    def exemplar_bytes(self) -> int:
        """Bytes the shared exemplars take in the file (compressed pixels and labels)."""
        return sum(self.tensors[t].end - self.tensors[t].begin for t in (T_EXEMPLAR_PIXELS, T_EXEMPLAR_LABELS)
                   if t in self.tensors)

    @property
    def prototype_dim(self) -> int | None:
        info = self.tensors.get(T_MEANS)
        return info.shape[1] if info is not None else None


# -- canonical JSON --------------------------------------------------------------------------------
def canonical_json(obj: Any) -> str:
    """The one serialization the spec allows (sorted keys, no spaces, ASCII only, no NaN)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def compute_hmac(key: bytes, signed_bytes: bytes) -> str:
    return hmac.new(key, signed_bytes, hashlib.sha256).hexdigest()


def parse_key(text: str) -> bytes:
    """A device key as printed by ``edgecl server device add`` (64 hex digits) -> 32 bytes."""
    text = text.strip()
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise DeltaMetadataError("the device key is not 64 hex digits",
                                 "copy the key printed by `edgecl server device add`")
    return bytes.fromhex(text)


# -- writing ---------------------------------------------------------------------------------------
def _now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _encode_values(values: np.ndarray, encoding: str, int8_block: int) -> dict[str, np.ndarray]:
    """``int8_block`` is the block size of whichever quantised encoding is asked for."""
    if encoding == "fp32":
        return {T_VALUES: values.astype("<f4")}
    if encoding == "fp16":
        if values.size and float(np.max(np.abs(values))) > 65504.0:
            raise DeltaEncodeError("a delta value exceeds the fp16 range (65504)", "save with values='fp32'")
        return {T_VALUES: values.astype("<f2")}
    # int8 / int4: symmetric per block of `block` consecutive stored values (0 = one block).
    qmax = _QMAX[encoding]
    m = values.size
    block = m if int8_block == 0 else int8_block
    n_blocks = 1 if int8_block == 0 else -(-m // block)
    q = np.zeros(m, np.int8)
    scales = np.zeros(n_blocks, "<f4")
    for b in range(n_blocks):
        chunk = values[b * block:(b + 1) * block]
        if chunk.size == 0:
            continue
        scale = np.float32(np.max(np.abs(chunk)) / np.float32(qmax))
        scales[b] = scale
        if scale > 0:
            q[b * block:(b + 1) * block] = np.clip(np.rint(chunk / scale), -qmax, qmax).astype(np.int8)
    if encoding == "int4":
        return {T_VALUES: pack_int4(q), T_SCALES: scales}
    return {T_VALUES: q, T_SCALES: scales}


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 values in [-7, 7] -> bytes, two per byte: value 2i in the low nibble, 2i+1 in the high one
    (4-bit two's complement); an odd count leaves the last high nibble 0."""
    nibbles = (np.asarray(q, np.int8).astype(np.uint8) & 0x0F)
    if nibbles.size % 2:
        nibbles = np.concatenate([nibbles, np.zeros(1, np.uint8)])
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, n: int) -> np.ndarray:
    """The inverse of ``pack_int4`` for ``n`` values: int8 [n] (the padding nibble is returned separately)."""
    packed = np.asarray(packed, np.uint8)
    nibbles = np.empty(packed.size * 2, np.uint8)
    nibbles[0::2] = packed & 0x0F
    nibbles[1::2] = packed >> 4
    signed = nibbles.astype(np.int8)
    signed[signed > 7] -= 16
    return signed[:n]


def _choose_layout(k: int, m: int, value_bytes: float) -> str:
    sizes = {"dense": k * value_bytes, "bitmap": -(-k // 8) + m * value_bytes, "indices": m * (4 + value_bytes)}
    return min(LAYOUTS, key=lambda name: (sizes[name], LAYOUTS.index(name)))


def _layout_key(name: str, dtype_tag: str) -> tuple[int, str]:
    return (-_DTYPES[dtype_tag].itemsize, name)


def _encode_table(tensors: dict[str, np.ndarray], metadata: dict[str, str], table: Prototypes, t_means: str,
                  t_counts: str, key: str, what: str, dtype: str) -> None:
    means = np.asarray(table.means, np.float32)
    if not np.all(np.isfinite(means)):
        raise DeltaEncodeError(f"a {what} holds NaN or infinite values", "recompute the prototypes")
    if dtype == "fp16" and means.size and float(np.max(np.abs(means))) > 65504.0:
        raise DeltaEncodeError(f"a {what} exceeds the fp16 range", "save with prototypes_dtype='fp32'")
    tensors[t_means] = means.astype("<f2" if dtype == "fp16" else "<f4")
    tensors[t_counts] = np.asarray(table.counts, np.int64).astype("<i8")
    metadata[key] = canonical_json(list(table.classes))


def _encode_exemplars(tensors: dict[str, np.ndarray], metadata: dict[str, str], memory: ExemplarMemory,
                      classes: list[str]) -> None:
    """The shared exemplars: uint8 pixels [M, H, W, 3] as one zlib stream (level 9), labels int64 [M]
    into ``exemplar_classes`` (classes with at least one image, each one the delta has a prototype of)."""
    pixels = np.ascontiguousarray(memory.pixels, np.uint8)
    if pixels.ndim != 4 or pixels.shape[3] != 3 or len(pixels) != len(memory.labels):
        raise DeltaEncodeError(f"exemplar pixels are {list(pixels.shape)}, expected [M, H, W, 3] with one label "
                               "each", "pass an ExemplarMemory")
    used = [c for i, c in enumerate(memory.classes) if np.any(memory.labels == i)]
    stray = [c for c in used if c not in classes]
    if stray:
        raise DeltaEncodeError(f"exemplars of {', '.join(stray)[:200]}, which the delta has no prototype of",
                               "share exemplars only of the classes the delta carries")
    if len(pixels) > MAX_EXEMPLAR_IMAGES or pixels.nbytes > MAX_EXEMPLAR_PIXEL_BYTES:
        raise DeltaEncodeError(f"{len(pixels)} exemplars ({pixels.nbytes} B of pixels), over the "
                               f"{MAX_EXEMPLAR_IMAGES} images / {MAX_EXEMPLAR_PIXEL_BYTES} B a delta holds",
                               "share fewer exemplars (a smaller exemplar_budget_mb)")
    remap = np.asarray([used.index(c) if c in used else -1 for c in memory.classes], np.int64)
    tensors[T_EXEMPLAR_PIXELS] = np.frombuffer(zlib.compress(pixels.tobytes(), 9), np.uint8)
    tensors[T_EXEMPLAR_LABELS] = remap[np.asarray(memory.labels, np.int64)].astype("<i8")
    metadata["exemplar_classes"] = canonical_json(used)
    metadata["exemplar_shape"] = canonical_json([int(s) for s in pixels.shape])


def _decode_exemplars(header: DeltaHeader, tensors: dict[str, np.ndarray]) -> ExemplarMemory | None:
    """Inflate exactly M * H * W * 3 bytes (never more: a stream that would give more, or less, or
    carries trailing bytes is refused), labels in range, every listed class with an image."""
    shape = header.exemplar_shape
    if shape is None:
        return None
    expected = int(np.prod(shape, dtype=np.int64))
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(tensors[T_EXEMPLAR_PIXELS].tobytes(), expected)
    except zlib.error as exc:
        raise DeltaShapeError(f"the shared exemplars' pixels are not a zlib stream ({exc})", _REMAKE) from exc
    if len(raw) != expected or not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        raise DeltaShapeError(f"the shared exemplars' pixels do not inflate to exactly {expected} bytes "
                              f"({list(shape)})", _REMAKE)
    labels = tensors[T_EXEMPLAR_LABELS].astype(np.int64)
    classes = header.exemplar_classes
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DeltaShapeError("a shared exemplar's label is outside exemplar_classes", _REMAKE)
    if np.any(np.bincount(labels, minlength=len(classes)) == 0):
        raise DeltaShapeError("exemplar_classes lists a class with no shared exemplar", _REMAKE)
    return ExemplarMemory(classes, np.frombuffer(raw, np.uint8).reshape(shape).copy(), labels)


def _encode_scatter(tensors: dict[str, np.ndarray], metadata: dict[str, str], scatter: Scatter, key: str,
                    tensor: str) -> None:
    factor = np.asarray(scatter.factor, np.float32)
    if not np.all(np.isfinite(factor)) or not np.isfinite(scatter.residual) or scatter.residual < 0:
        raise DeltaEncodeError(f"the {key} holds NaN, infinite or negative values", "recompute the statistics")
    if factor.size and float(np.max(np.abs(factor))) > 65504.0:
        raise DeltaEncodeError(f"the {key} exceeds the fp16 range", "recompute the statistics")
    tensors[tensor] = factor.astype("<f2")
    metadata[key] = canonical_json({"count": int(scatter.count), "groups": int(scatter.groups),
                                    "residual": float(scatter.residual)})


def _decode_scatter(tensors: dict[str, np.ndarray], meta: dict[str, str], key: str) -> Scatter | None:
    if key not in meta:
        return None
    fields = json.loads(meta[key])
    factor = tensors[SCATTER_KEYS[key]].astype(np.float32)
    if not np.all(np.isfinite(factor)):
        raise DeltaValueError(f"the {key} holds NaN or infinite values", _REMAKE)
    return Scatter(factor, float(fields["residual"]), int(fields["count"]), int(fields["groups"]))


def _serialize(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> tuple[bytes, bytes, dict]:
    """(header object without padding as bytes, body, header object) in the canonical layout."""
    for name, array in tensors.items():
        if array.dtype not in _DTYPES.values():
            raise DeltaEncodeError(f"tensor {name} has dtype {array.dtype}, not one the spec allows", _REMAKE)
    return canonical_parts(tensors, metadata)


def save(delta: Delta, key: bytes | None = None, *, values: str = "fp32", layout: str = "auto",
         int8_block: int = DEFAULT_INT8_BLOCK, prototypes_dtype: str = "fp32",
         int4_block: int = DEFAULT_INT4_BLOCK) -> bytes:
    """Serialize ``delta`` to canonical bytes, signed with the device ``key`` (None: unsigned)."""
    if values not in VALUE_DTYPES:
        raise DeltaEncodeError(f"unknown value encoding {values!r}", f"use one of {', '.join(VALUE_DTYPES)}")
    if layout != "auto" and layout not in LAYOUTS:
        raise DeltaEncodeError(f"unknown layout {layout!r}", f"use auto or one of {', '.join(LAYOUTS)}")
    if prototypes_dtype not in ("fp32", "fp16"):
        raise DeltaEncodeError(f"unknown prototype encoding {prototypes_dtype!r}", "use fp32 or fp16")
    if int8_block < 0 or int4_block < 0:
        raise DeltaEncodeError("the block size is negative", "use 0 (one scale per file) or a positive block size")
    k = int(delta.delta_k)
    positions = np.asarray(delta.positions, dtype=np.int64).reshape(-1)
    vals = np.asarray(delta.values, dtype=np.float32).reshape(-1)
    if positions.shape != vals.shape:
        raise DeltaEncodeError(f"{positions.size} positions but {vals.size} values", "pass one value per position")
    if positions.size and (positions[0] < 0 or positions[-1] >= k or np.any(np.diff(positions) <= 0)):
        raise DeltaEncodeError("positions are not strictly increasing inside [0, K)",
                               "build the delta with Delta.from_dense(vector)")
    if not np.all(np.isfinite(vals)):
        raise DeltaEncodeError("the delta holds NaN or infinite values", "the adaptation diverged: lower the lr")
    # Only changed entries are stored (spec: "changed" = nonzero).
    keep = vals != 0
    positions, vals = positions[keep], vals[keep]
    m = int(positions.size)

    value_bytes = {"fp32": 4, "fp16": 2, "int8": 1, "int4": 0.5}[values]
    block = int4_block if values == "int4" else int8_block
    chosen = _choose_layout(k, m, value_bytes) if layout == "auto" else layout
    tensors: dict[str, np.ndarray] = {}
    if chosen == "dense":
        dense = np.zeros(k, np.float32)
        dense[positions] = vals
        tensors.update(_encode_values(dense, values, block))
    else:
        tensors.update(_encode_values(vals, values, block))
        if chosen == "indices":
            tensors[T_POSITIONS] = positions.astype("<i4")
        else:
            bits = np.zeros(k, np.uint8)
            bits[positions] = 1
            tensors[T_BITMAP] = np.packbits(bits, bitorder="little")

    metadata = {
        "format": DELTA_FORMAT,
        "bundle_id": delta.bundle_id,
        "bundle_version": str(int(delta.bundle_version)),
        "base_sha256": delta.base_sha256,
        "mask_sha256": delta.mask_sha256,
        "device_id": delta.device_id,
        "delta_k": str(k),
        "layout": chosen,
        "values_dtype": values,
        "steps": str(int(delta.steps)),
        "samples_seen": str(int(delta.samples_seen)),
        "metrics": canonical_json(_check_metrics(delta.metrics, DeltaEncodeError)),
        "created_utc": delta.created_utc or _now_utc(),
        "body_sha256": "",
        "hmac_sha256": "",
    }
    if values in _BLOCK_KEY:
        metadata[_BLOCK_KEY[values]] = str(int(block))
    if delta.heldout is not None:
        metadata["heldout"] = canonical_json(check_heldout(delta.heldout, DeltaEncodeError))
    if delta.prototypes is not None and len(delta.prototypes):
        _encode_table(tensors, metadata, delta.prototypes, T_MEANS, T_COUNTS, "classes", "prototype", prototypes_dtype)
        if delta.base_prototypes is not None and len(delta.base_prototypes):
            _encode_table(tensors, metadata, delta.base_prototypes, T_BASE_MEANS, T_BASE_COUNTS, "base_classes",
                          "base-space prototype", prototypes_dtype)
    if delta.exemplars is not None and len(delta.exemplars.labels):
        _encode_exemplars(tensors, metadata, delta.exemplars, list(delta.prototypes.classes)
                          if delta.prototypes is not None else [])
    for section, tensor in SCATTER_KEYS.items():
        if getattr(delta, section) is not None:
            _encode_scatter(tensors, metadata, getattr(delta, section), section, tensor)
    # The lowest version that holds the content: a delta without base-space prototypes stays
    # readable by version-2 readers (devices and servers are not upgraded at once).
    metadata["format_version"] = ("5" if "scatter" in metadata or "base_scatter" in metadata
                                  else "4" if "exemplar_classes" in metadata else "3" if "base_classes" in metadata
                                  else "2")

    # The body does not depend on the metadata: hash it, then sign the header that holds the hash.
    _, body, _ = _serialize(tensors, metadata)
    metadata["body_sha256"] = hashlib.sha256(body).hexdigest()
    _check_metadata(metadata, DeltaEncodeError)
    signed, _, header = _serialize(tensors, metadata)
    _check_tensors(header, metadata, DeltaEncodeError)
    if key is not None:
        metadata["hmac_sha256"] = compute_hmac(key, signed)
    header_json, body, _ = _serialize(tensors, metadata)
    pad = (-len(header_json)) % 8
    return struct.pack("<Q", len(header_json) + pad) + header_json + b" " * pad + body


def save_file(delta: Delta, path: str | Path, key: bytes | None = None, **encoding: Any) -> bytes:
    """``save`` to ``path`` atomically (temp file, fsync, rename); returns the bytes written."""
    data = save(delta, key, **encoding)
    atomic_write_bytes(path, data)
    return data


# -- reading ---------------------------------------------------------------------------------------
def header_size(first8: bytes) -> int:
    """N from the first 8 bytes, refusing a header over the cap before anything else is read."""
    if len(first8) < 8:
        raise DeltaTruncatedError(f"the file is {len(first8)} bytes, shorter than a delta's 8-byte prefix", _REMAKE)
    n = struct.unpack("<Q", first8[:8])[0]
    if n > MAX_HEADER_BYTES:
        raise DeltaHeaderTooLargeError(f"the header claims {n} bytes, over the {MAX_HEADER_BYTES}-byte cap",
                                       "this is not an edgecl delta; " + _REMAKE)
    return int(n)


def read_header(source: bytes | bytearray | memoryview | str | Path) -> DeltaHeader:
    """Parse and check the header only (at most 8 + N bytes are read from a path)."""
    if isinstance(source, (str, Path)):
        try:
            with open(source, "rb") as f:
                first8 = f.read(8)
                prefix = first8 + f.read(header_size(first8))
        except OSError as exc:
            raise DeltaError(f"cannot read {source} ({exc.strerror})", "check the path") from exc
    else:
        prefix = bytes(source[: 8 + header_size(bytes(source[:8]))])
    n = header_size(prefix[:8])
    if len(prefix) < 8 + n:
        raise DeltaTruncatedError(f"the header needs {n} bytes but only {len(prefix) - 8} are there", _REMAKE)
    raw = prefix[8:8 + n]
    stripped = raw.rstrip(b" ")
    if n % 8 or len(raw) - len(stripped) > 7:
        raise DeltaHeaderError("the header is not padded to 8 bytes with at most 7 spaces", _REMAKE)
    try:
        header = json.loads(stripped.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DeltaHeaderError(f"the header is not ASCII JSON ({exc})", _REMAKE) from exc
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise DeltaHeaderError("the header has no __metadata__ object", _REMAKE)
    try:
        canonical = canonical_json(header).encode("ascii")
    except ValueError as exc:
        raise DeltaHeaderError(f"the header holds a non-finite number ({exc})", _REMAKE) from exc
    if canonical != stripped:
        raise DeltaHeaderError("the header is not in canonical form (sorted keys, no spaces)", _REMAKE)
    metadata = header["__metadata__"]
    if metadata.get("format") != DELTA_FORMAT:
        raise DeltaVersionError(f"format is {metadata.get('format')!r}, not {DELTA_FORMAT!r}",
                                "pass a delta written by `edgecl delta`")
    if metadata.get("format_version") not in [str(v) for v in READ_FORMAT_VERSIONS]:
        raise DeltaVersionError(f"delta format version {metadata.get('format_version')!r} is not supported "
                                f"(this edgecl reads versions {', '.join(map(str, READ_FORMAT_VERSIONS))})",
                                "use the same edgecl version on the device and here")
    if metadata.get("format_version") == "1" and "heldout" in metadata:
        raise DeltaMetadataError("a version 1 delta carries heldout (added in version 2)", _REMAKE)
    if metadata.get("format_version") in ("1", "2") and "base_classes" in metadata:
        raise DeltaMetadataError(f"a version {metadata['format_version']} delta carries base_classes (added in "
                                 "version 3)", _REMAKE)
    if metadata.get("format_version") in ("1", "2", "3") and ("exemplar_classes" in metadata
                                                             or "exemplar_shape" in metadata):
        raise DeltaMetadataError(f"a version {metadata['format_version']} delta carries shared exemplars (added "
                                 "in version 4)", _REMAKE)
    if metadata.get("format_version") in ("1", "2", "3", "4") and ("scatter" in metadata
                                                                  or "base_scatter" in metadata):
        raise DeltaMetadataError(f"a version {metadata['format_version']} delta carries a scatter (added in "
                                 "version 5)", _REMAKE)
    _check_metadata(metadata, DeltaMetadataError)
    tensors = _check_tensors(header, metadata, DeltaShapeError)
    body_bytes = max((t.end for t in tensors.values()), default=0)
    unsigned = dict(header, __metadata__=dict(metadata, hmac_sha256=""))
    return DeltaHeader(metadata=dict(metadata), tensors=tensors, header_bytes=n, body_bytes=body_bytes,
                       signed_bytes=canonical_json(unsigned).encode("ascii"))


def verify_hmac(header: DeltaHeader, key: bytes) -> None:
    """Check the file was signed with ``key`` (constant-time compare)."""
    if not header.hmac_sha256:
        raise DeltaSignatureError("the delta is not signed", "make it with the device key (`edgecl delta`)")
    if not hmac.compare_digest(compute_hmac(key, header.signed_bytes), header.hmac_sha256):
        raise DeltaSignatureError(f"the delta's signature does not match device {header.device_id}'s key",
                                  "sign it with this device's key, or re-register the device")


def check_length(header: DeltaHeader, length: int) -> None:
    if length < header.total_bytes:
        raise DeltaTruncatedError(f"the file has {length} bytes, its header says {header.total_bytes}",
                                  "copy or send the whole file again")
    if length > header.total_bytes:
        raise DeltaTrailingDataError(f"the file has {length - header.total_bytes} bytes after its last tensor",
                                     _REMAKE)


def verify_body(header: DeltaHeader, body: bytes | memoryview) -> None:
    if hashlib.sha256(body).hexdigest() != header.body_sha256:
        raise DeltaBodyHashError("the tensor bytes do not match body_sha256 (the file was altered or damaged)",
                                 "copy or send the original file again")


def load(data: bytes, key: bytes | None = None) -> Delta:
    """Parse and check everything (the HMAC only when ``key`` is given) -> a decoded ``Delta``."""
    data = bytes(data)
    header = read_header(data)
    check_length(header, len(data))
    start = 8 + header.header_bytes
    verify_body(header, memoryview(data)[start:])
    if key is not None:
        verify_hmac(header, key)
    return decode(header, data)


def load_file(path: str | Path, key: bytes | None = None) -> Delta:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DeltaError(f"cannot read {path} ({exc.strerror})", "check the path") from exc
    return load(data, key)


def _int4_count(meta: dict[str, str], tensors: dict[str, np.ndarray], k: int) -> int:
    """How many int4 values are packed: K (dense), one per position (indices), one per set bit (bitmap)."""
    if meta["layout"] == "dense":
        return k
    if meta["layout"] == "indices":
        return int(tensors[T_POSITIONS].size)
    return int(np.unpackbits(tensors[T_BITMAP], bitorder="little")[:k].sum())


def _decode_table(tensors: dict[str, np.ndarray], t_means: str, t_counts: str, classes: list[str],
                  what: str) -> Prototypes | None:
    if t_means not in tensors:
        return None
    means = tensors[t_means].astype(np.float32)
    counts = tensors[t_counts].astype(np.int64)
    if not np.all(np.isfinite(means)):
        raise DeltaValueError(f"a {what} holds NaN or infinite values", "recompute the prototypes")
    if np.any(counts < 1):
        raise DeltaShapeError(f"a {what} count is below 1", _REMAKE)
    return Prototypes(classes, means, counts)


def decode(header: DeltaHeader, data: bytes) -> Delta:
    """Tensors -> ``Delta`` with every value check (finite, positions in range, no q=-128)."""
    tensors = _st_load(data)     # offsets were validated by read_header, so this cannot misread
    meta = header.metadata
    k = header.delta_k
    encoding = meta["values_dtype"]
    stored = tensors[T_VALUES]
    if encoding in _BLOCK_KEY:
        if encoding == "int4":
            n = _int4_count(meta, tensors, k)
            if stored.size != -(-n // 2) or (n % 2 and stored.size and stored[-1] >> 4):
                raise DeltaShapeError(f"{T_VALUES} holds {stored.size} bytes, expected {-(-n // 2)} for {n} int4 "
                                      "values (padding nibble 0)", _REMAKE)
            stored = unpack_int4(stored, n)
            block = int(meta["int4_block"]) or max(n, 1)
            if tensors[T_SCALES].shape != ((1 if int(meta["int4_block"]) == 0 else -(-n // block)),):
                raise DeltaShapeError(f"{T_SCALES} does not hold one scale per {block} int4 values", _REMAKE)
        scales = tensors[T_SCALES].astype(np.float32)
        if not np.all(np.isfinite(scales)) or np.any(scales < 0):
            raise DeltaValueError(f"an {encoding} scale is negative, NaN or infinite", _REMAKE)
        if np.any(stored == -_QMAX[encoding] - 1):
            raise DeltaValueError(f"an {encoding} value is {-_QMAX[encoding] - 1} (the encoding is symmetric, "
                                  f"-{_QMAX[encoding]}..{_QMAX[encoding]})", _REMAKE)
        if encoding == "int8":
            block = int(meta["int8_block"]) or max(stored.size, 1)
        per_value_scale = np.repeat(scales, block)[: stored.size]
        decoded = stored.astype(np.float32) * per_value_scale
    else:
        decoded = stored.astype(np.float32)
    if not np.all(np.isfinite(decoded)):
        raise DeltaValueError("the delta holds NaN or infinite values", "the adaptation diverged: lower the lr "
                              "and adapt again")
    layout = meta["layout"]
    if layout == "dense":
        positions = np.flatnonzero(decoded).astype(np.int32)
        decoded = decoded[positions]
    elif layout == "indices":
        positions = tensors[T_POSITIONS].astype(np.int32)
        if positions.size and (positions[0] < 0 or positions[-1] >= k or np.any(np.diff(positions) <= 0)):
            raise DeltaShapeError(f"positions are not strictly increasing inside [0, {k})", _REMAKE)
    else:
        bits = np.unpackbits(tensors[T_BITMAP], bitorder="little")
        if np.any(bits[k:]):
            raise DeltaShapeError("bitmap padding bits past K are set", _REMAKE)
        positions = np.flatnonzero(bits[:k].view(np.bool_)).astype(np.int32)   # bool: ~8x faster than uint8
        if positions.size != decoded.size:
            raise DeltaShapeError(f"the bitmap marks {positions.size} entries but {decoded.size} values are stored",
                                  _REMAKE)
    prototypes = _decode_table(tensors, T_MEANS, T_COUNTS, header.classes, "prototype")
    base_prototypes = _decode_table(tensors, T_BASE_MEANS, T_BASE_COUNTS, header.base_classes, "base-space prototype")
    scatters = {key: _decode_scatter(tensors, meta, key) for key in SCATTER_KEYS}
    for key, scatter in scatters.items():
        if scatter is not None and prototypes is not None and scatter.count != int(prototypes.counts.sum()):
            raise DeltaShapeError(f"the {key} counts {scatter.count} images, the class statistics "
                                  f"{int(prototypes.counts.sum())}", _REMAKE)
    return Delta(bundle_id=header.bundle_id, bundle_version=header.bundle_version,
                 base_sha256=header.base_sha256, mask_sha256=header.mask_sha256, device_id=header.device_id,
                 delta_k=k, positions=positions, values=decoded, steps=header.steps,
                 samples_seen=header.samples_seen, metrics=json.loads(meta["metrics"]),
                 created_utc=header.created_utc, prototypes=prototypes, heldout=header.heldout,
                 base_prototypes=base_prototypes, exemplars=_decode_exemplars(header, tensors),
                 scatter=scatters["scatter"], base_scatter=scatters["base_scatter"],
                 values_dtype=encoding,
                 body_sha256=header.body_sha256, hmac_sha256=header.hmac_sha256)


# -- validation shared by writer and reader ----------------------------------------------------------
def _check_metrics(metrics: Any, err: type[DeltaError]) -> dict[str, float]:
    if not isinstance(metrics, dict) or not all(isinstance(k, str) for k in metrics):
        raise err("metrics is not an object with string keys", "pass metrics as {name: number}")
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise err(f"metric {name!r} is {value!r}, not a finite number", "pass metrics as {name: number}")
    return metrics


def _check_metadata(meta: dict[str, Any], err: type[DeltaError]) -> None:
    fix = _REMAKE if err is DeltaMetadataError else "fix the value passed to Delta(...)"
    keys = set(meta)
    missing = [k for k in _REQUIRED_KEYS if k not in keys]
    extra = sorted(keys - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS))
    if missing or extra:
        raise err(f"metadata {'lacks ' + ', '.join(missing) if missing else 'has unknown keys ' + ', '.join(extra)}",
                  fix)
    if not all(isinstance(v, str) for v in meta.values()):
        raise err("a metadata value is not a string", fix)
    for name in ("bundle_id", "device_id"):
        if not NAME_RE.fullmatch(meta[name]):
            raise err(f"{name} {meta[name]!r} is not a name (letters, digits, '.', '_', '-'; at most 64; "
                      "no leading '.' or '-')", fix)
    for name in ("base_sha256", "mask_sha256", "body_sha256"):
        if not _SHA_RE.fullmatch(meta[name]):
            raise err(f"{name} is not 64 lowercase hex digits", fix)
    if meta["hmac_sha256"] and not _SHA_RE.fullmatch(meta["hmac_sha256"]):
        raise err("hmac_sha256 is neither empty nor 64 lowercase hex digits", fix)
    for name in ("bundle_version", "delta_k", "steps", "samples_seen"):
        if not _UINT_RE.fullmatch(meta[name]):
            raise err(f"{name} {meta[name]!r} is not a non-negative decimal integer", fix)
    if meta["bundle_version"] == "0":
        raise err("bundle_version is 0 (versions start at 1)", fix)
    if meta["layout"] not in LAYOUTS:
        raise err(f"layout {meta['layout']!r} is not one of {', '.join(LAYOUTS)}", fix)
    if meta["values_dtype"] not in VALUE_DTYPES:
        raise err(f"values_dtype {meta['values_dtype']!r} is not one of {', '.join(VALUE_DTYPES)}", fix)
    for enc, key in _BLOCK_KEY.items():
        if (meta["values_dtype"] == enc) != (key in meta):
            raise err(f"{key} must be present exactly when values_dtype is {enc}", fix)
        if key in meta and not _UINT_RE.fullmatch(meta[key]):
            raise err(f"{key} is not a non-negative decimal integer", fix)
    if not _TIME_RE.fullmatch(meta["created_utc"]):
        raise err(f"created_utc {meta['created_utc']!r} is not YYYY-MM-DDTHH:MM:SSZ", fix)
    for name, kind in (("metrics", dict), ("classes", list), ("heldout", dict), ("base_classes", list),
                       ("exemplar_classes", list), ("exemplar_shape", list), ("scatter", dict),
                       ("base_scatter", dict)):
        if name not in meta:
            continue
        try:
            parsed = json.loads(meta[name])
        except ValueError as exc:
            raise err(f"{name} is not JSON ({exc})", fix) from exc
        if not isinstance(parsed, kind):
            raise err(f"{name} is not a JSON {kind.__name__}", fix)
        if name == "metrics":
            _check_metrics(parsed, err)     # before canonical_json, which refuses NaN
        if name == "heldout":
            check_heldout(parsed, err)
        if name in SCATTER_KEYS and isinstance(parsed, dict):
            _check_scatter_fields(name, parsed, err, fix)
        if canonical_json(parsed) != meta[name]:
            raise err(f"{name} is not in canonical JSON form", fix)
        if name in ("classes", "base_classes", "exemplar_classes") and (not parsed or len(set(parsed)) != len(parsed)
              or not all(isinstance(c, str) and 0 < len(c) <= _MAX_CLASS_NAME for c in parsed)):
            raise err(f"{name} must be distinct non-empty names of at most 256 characters", fix)
    if "base_classes" in meta and not set(json.loads(meta["base_classes"])) <= set(json.loads(meta.get("classes", "[]"))):
        raise err("base_classes names a class the delta has no prototype of", fix)
    if ("exemplar_classes" in meta) != ("exemplar_shape" in meta):
        raise err("exemplar_classes and exemplar_shape must be present together", fix)
    if "exemplar_classes" in meta:
        # Only classes the delta carries: a device shares images of the classes it contributes.
        if not set(json.loads(meta["exemplar_classes"])) <= set(json.loads(meta.get("classes", "[]"))):
            raise err("exemplar_classes names a class the delta has no prototype of", fix)
        shape = json.loads(meta["exemplar_shape"])
        if (len(shape) != 4 or not all(type(s) is int for s in shape) or shape[3] != 3
                or not 1 <= shape[0] <= MAX_EXEMPLAR_IMAGES or not 1 <= shape[1] <= 4096 or not 1 <= shape[2] <= 4096
                or shape[0] * shape[1] * shape[2] * 3 > MAX_EXEMPLAR_PIXEL_BYTES):
            raise err(f"exemplar_shape {shape} is not [M, H, W, 3] with 1 <= M <= {MAX_EXEMPLAR_IMAGES} and at most "
                      f"{MAX_EXEMPLAR_PIXEL_BYTES} bytes of pixels", fix)


def _check_scatter_fields(name: str, fields: dict[str, Any], err: type[DeltaError], fix: str) -> None:
    """A scatter describes the images ``prototypes`` counts: as many, in as many classes (checked against
    the tensors in _check_tensors); its residual trace a finite number >= 0."""
    if set(fields) != {"count", "groups", "residual"} or not all(
            type(fields[k]) is int and fields[k] >= 1 for k in ("count", "groups")):
        raise err(f"{name} is not {{count, groups, residual}} with whole counts >= 1", fix)
    residual = fields["residual"]
    if isinstance(residual, bool) or not isinstance(residual, (int, float)) or not math.isfinite(residual) \
            or residual < 0:
        raise err(f"{name}.residual is {residual!r}, not a finite number >= 0", fix)


def _check_accuracy(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 1


def check_heldout(report: Any, err: type[DeltaError] = DeltaMetadataError) -> dict[str, Any]:
    """The ``heldout`` report (spec: "Held-out report"): {"before"?: R, "after"?: R}, at least one,
    each R = {"accuracy": a, "images"?: n, "per_class"?: {class: a}} with a in [0, 1]."""
    fix = "pass heldout as {'before': {'accuracy': a, 'per_class': {...}}, 'after': {...}} (accuracies in [0, 1])"
    if not isinstance(report, dict) or not report or not set(report) <= {"before", "after"}:
        raise err("heldout is not an object with 'before' and/or 'after'", fix)
    for when, part in report.items():
        if not isinstance(part, dict) or "accuracy" not in part or not set(part) <= {"accuracy", "images", "per_class"}:
            raise err(f"heldout.{when} is not {{accuracy, images?, per_class?}}", fix)
        if not _check_accuracy(part["accuracy"]):
            raise err(f"heldout.{when}.accuracy {part['accuracy']!r} is not a number in [0, 1]", fix)
        images = part.get("images", 0)
        if isinstance(images, bool) or not isinstance(images, int) or not 0 <= images < 10**12:
            raise err(f"heldout.{when}.images {images!r} is not a count", fix)
        per_class = part.get("per_class", {})
        if not isinstance(per_class, dict) or len(per_class) > _MAX_REPORT_CLASSES:
            raise err(f"heldout.{when}.per_class is not an object of at most {_MAX_REPORT_CLASSES} classes", fix)
        for name, value in per_class.items():
            if not 0 < len(name) <= _MAX_CLASS_NAME or not _check_accuracy(value):
                raise err(f"heldout.{when}.per_class[{name[:40]!r}] is {value!r}, not a number in [0, 1]", fix)
    return report


def _check_tensors(header: dict[str, Any], meta: dict[str, str], err: type[DeltaError]) -> dict[str, TensorInfo]:
    fix = _REMAKE if err is not DeltaEncodeError else "this is a bug in the writer; report it"
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if (not isinstance(entry, dict) or set(entry) != {"data_offsets", "dtype", "shape"}
                or entry["dtype"] not in _DTYPES or not isinstance(entry["shape"], list)
                or not all(type(s) is int and s >= 0 for s in entry["shape"])
                or not isinstance(entry["data_offsets"], list) or len(entry["data_offsets"]) != 2
                or not all(type(o) is int and o >= 0 for o in entry["data_offsets"])):
            raise DeltaHeaderError(f"tensor entry {name!r} is malformed", fix)
        begin, end = entry["data_offsets"]
        infos[name] = TensorInfo(entry["dtype"], tuple(entry["shape"]), begin, end)
    k, layout, enc = int(meta["delta_k"]), meta["layout"], meta["values_dtype"]
    expected = {T_VALUES} | {"indices": {T_POSITIONS}, "bitmap": {T_BITMAP}, "dense": set()}[layout]
    if enc in _BLOCK_KEY:
        expected.add(T_SCALES)
    if "classes" in meta:
        expected |= {T_MEANS, T_COUNTS}
    if "base_classes" in meta:
        expected |= {T_BASE_MEANS, T_BASE_COUNTS}
    if "exemplar_classes" in meta:
        expected |= {T_EXEMPLAR_PIXELS, T_EXEMPLAR_LABELS}
    expected |= {tensor for key, tensor in SCATTER_KEYS.items() if key in meta}
    if set(infos) != expected:
        raise err(f"tensors are {sorted(infos)}, expected {sorted(expected)} for layout {layout}, {enc}", fix)

    def need(name: str, dtypes: tuple[str, ...], shape: tuple[int, ...]) -> None:
        info = infos[name]
        if info.dtype not in dtypes or info.shape != shape:
            raise err(f"{name} is {info.dtype}{list(info.shape)}, expected {'/'.join(dtypes)}{list(shape)}", fix)

    values = infos[T_VALUES]
    if len(values.shape) != 1:
        raise err(f"{T_VALUES} is not a vector", fix)
    m = values.shape[0]
    if enc == "int4":
        # m values take ceil(m / 2) bytes; the count itself comes from the layout (checked in decode for bitmap).
        if layout == "dense":
            need(T_VALUES, ("U8",), (-(-k // 2),))
        elif layout == "indices":
            positions = infos[T_POSITIONS]
            m = positions.shape[0] if len(positions.shape) == 1 else -1
            need(T_POSITIONS, ("I32",), (m,))
            need(T_VALUES, ("U8",), (-(-m // 2),))
        else:
            need(T_VALUES, ("U8",), (m,))
    else:
        need(T_VALUES, (_TAG_OF[enc],), (k if layout == "dense" else m,))
    if layout == "indices":
        need(T_POSITIONS, ("I32",), (m,))
    elif layout == "bitmap":
        need(T_BITMAP, ("U8",), (-(-k // 8),))
    if enc == "int8":
        block = int(meta["int8_block"])
        need(T_SCALES, ("F32",), (1 if block == 0 else -(-m // block),))
    if "classes" in meta:
        c = len(json.loads(meta["classes"]))
        means = infos[T_MEANS]
        if len(means.shape) != 2 or means.shape[0] != c or means.shape[1] < 1:
            raise err(f"{T_MEANS} is {list(means.shape)}, expected [{c}, D]", fix)
        need(T_MEANS, ("F32", "F16"), means.shape)
        need(T_COUNTS, ("I64",), (c,))
    if "base_classes" in meta:      # _check_metadata made it a subset of classes, so T_MEANS is there
        c = len(json.loads(meta["base_classes"]))
        need(T_BASE_MEANS, ("F32", "F16"), (c, infos[T_MEANS].shape[1]))
        need(T_BASE_COUNTS, ("I64",), (c,))
    if "exemplar_classes" in meta:
        pixels = infos[T_EXEMPLAR_PIXELS]
        if pixels.dtype != "U8" or len(pixels.shape) != 1 or not 1 <= pixels.shape[0] <= MAX_EXEMPLAR_PIXEL_BYTES:
            raise err(f"{T_EXEMPLAR_PIXELS} is {pixels.dtype}{list(pixels.shape)}, expected U8[L] (a zlib stream)", fix)
        need(T_EXEMPLAR_LABELS, ("I64",), (json.loads(meta["exemplar_shape"])[0],))
    for key, tensor in SCATTER_KEYS.items():
        if key not in meta:
            continue
        if "classes" not in meta:
            raise err(f"a {key} without class statistics (it describes the images `prototypes` counts)", fix)
        factor, dim = infos[tensor], infos[T_MEANS].shape[1]
        if factor.dtype != "F16" or len(factor.shape) != 2 or factor.shape[0] != dim \
                or factor.shape[1] > min(MAX_RANK, dim - 1):
            raise err(f"{tensor} is {factor.dtype}{list(factor.shape)}, expected F16[{dim}, k <= "
                      f"{min(MAX_RANK, dim - 1)}]", fix)
        if json.loads(meta[key])["groups"] != len(json.loads(meta["classes"])):
            raise err(f"{key} counts {json.loads(meta[key])['groups']} classes, the delta carries "
                      f"{len(json.loads(meta['classes']))}", fix)
    # Byte extents: each tensor's bytes match its shape, laid out back to back in canonical order.
    offset = 0
    for name in sorted(infos, key=lambda n: _layout_key(n, infos[n].dtype)):
        info = infos[name]
        size = int(np.prod(info.shape, dtype=np.int64)) * _DTYPES[info.dtype].itemsize
        if info.begin != offset or info.end != offset + size:
            raise DeltaHeaderError(f"tensor {name} is at bytes {info.begin}..{info.end}, expected "
                                   f"{offset}..{offset + size} (canonical order, back to back)", fix)
        offset = info.end
    return infos
