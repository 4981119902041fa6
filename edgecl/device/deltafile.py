"""`edgecl delta`: the device's adapted state -> a small signed delta file (docs/delta-format.md)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from edgecl.device.state import load_current, open_bundle
from edgecl.errors import DeviceError
from edgecl.formats import delta as delta_format

KEY_ENV = "EDGECL_DEVICE_KEY"
DEVICE_ID_ENV = "EDGECL_DEVICE_ID"


@dataclass
class DeltaReport:
    path: str
    bytes: int
    changed: int          # delta entries that are non-zero
    selected: int         # K
    base_fp32_bytes: int  # the whole base model in fp32, for scale
    values: str
    signed: bool


def make_delta(bundle_dir: str | Path, out: str | Path, values: str = "fp32", device_id: str | None = None,
               key_hex: str | None = None, prototypes_dtype: str | None = None) -> DeltaReport:
    """Write the current device state of ``bundle_dir`` as a delta file (atomically).

    ``prototypes_dtype`` None: fp32 with fp32 values, else fp16 (2^-11 relative error, far below what
    a quantised delta already costs, and it halves the prototypes' share of the file).
    """
    bundle = open_bundle(bundle_dir)
    state = load_current(bundle)
    if state.generation is None:
        raise DeviceError(f"{bundle_dir} has not been adapted on this device yet",
                          "run `edgecl adapt BUNDLE --data DIR` first")
    key_text = key_hex if key_hex is not None else os.environ.get(KEY_ENV)
    key = delta_format.parse_key(key_text) if key_text else None
    report = state.meta.get("report", {})
    metrics = {k: float(v) for k, v in report.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k in ("final_loss", "seconds_per_step")}
    d = delta_format.Delta.from_dense(
        state.delta, bundle_id=bundle.manifest.bundle_id, bundle_version=bundle.manifest.version,
        base_sha256=bundle.manifest.base_sha256, mask_sha256=bundle.manifest.mask_sha256,
        device_id=device_id or os.environ.get(DEVICE_ID_ENV) or socket.gethostname(),
        steps=int(state.meta.get("steps_total", 0)), samples_seen=int(state.meta.get("samples_seen", 0)),
        metrics=metrics, prototypes=state.prototypes)
    protos = prototypes_dtype or ("fp32" if values == "fp32" else "fp16")
    data = delta_format.save_file(d, out, key, values=values, prototypes_dtype=protos)
    # Count what the file says changed: int8/int4 round the smallest entries to 0 (= unchanged).
    changed = int(delta_format.load(data, key).changed_positions().size)
    return DeltaReport(path=str(out), bytes=len(data), changed=changed,
                       selected=bundle.mask.total_selected, base_fp32_bytes=bundle.manifest.total_params * 4,
                       values=values, signed=key is not None)
