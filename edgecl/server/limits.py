"""The server's size and time limits, defined once (no heavy imports: the CLI reads its defaults here)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_UPLOAD_BYTES = 16 << 20    # one delta push; a dense fp32 delta of a 5% EfficientNet-Lite0 mask is ~1 MB
DEFAULT_MAX_UPLOAD_MB = DEFAULT_MAX_UPLOAD_BYTES / (1 << 20)   # the same cap as `--max-upload-mb` spells it
DEFAULT_MAX_BLOB_BYTES = 1 << 30       # one bundle file (PUT /v1/blobs): the largest ONNX graph of a bundle
BUNDLE_UPLOAD_FACTOR = 8               # a bundle upload (mask as base64 JSON) may be this many times larger
DEFAULT_BODY_IDLE_S = 30.0             # longest wait for the next chunk of a request body
MIN_BODY_RATE_BPS = 1024               # after the first body_idle_s, a body must average at least this
JSON_LIMIT_BYTES = 1 << 20             # JSON bodies (releases, heartbeats, blob lists)


@dataclass(frozen=True)
class UploadLimits:
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES   # one delta push
    body_idle_s: float = DEFAULT_BODY_IDLE_S           # longest pause inside a request body
    max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES       # one bundle file (PUT /v1/blobs)
