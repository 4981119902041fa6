"""`edgecl delta`: the device's adapted state -> a small signed delta file (docs/delta-format.md)."""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecl import classstats
from edgecl.device.state import DeviceState, OpenBundle, bundle_prototypes, load_current, open_bundle
from edgecl.errors import DeviceError
from edgecl.formats import delta as delta_format
from edgecl.formats.exemplars import ExemplarMemory
from edgecl.formats.prototypes import Prototypes

from .provision import DeviceConfig

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
    exemplars: int = 0        # shared exemplar images (profile share_exemplars), 0 when none
    exemplar_classes: int = 0
    exemplar_bytes: int = 0   # what they take in the file (zlib pixels + labels)


def heldout_from_gate(gate: Any) -> dict[str, Any] | None:
    """The delta's ``heldout`` report from adapt's ``report.gate`` (its held-out evaluation before and
    after the adaptation, in ``edgecl.device.infer.evaluate``'s shape); None when there is none."""
    if not isinstance(gate, dict):
        return None
    if "adapted_accuracy" in gate:
        # adapt's gate: "before" = the classes' prototypes on the backbone as it was, "after" = what the
        # device kept (the adapted backbone, or the old one when the gate refused the adaptation).
        images = gate.get("held_out_images")
        before = gate.get("prototypes_only_accuracy")
        after = gate["adapted_accuracy"] if gate.get("kept", "adapted") == "adapted" else before
        gate = {when: {"accuracy": value, **({"images": images} if isinstance(images, int) else {}),
                       **({"per_class": gate[f"{when}_per_class"]} if f"{when}_per_class" in gate else {})}
                for when, value in (("before", before), ("after", after)) if isinstance(value, (int, float))}
    out: dict[str, Any] = {}
    for when in ("before", "after"):
        part = gate.get(when)
        if not isinstance(part, dict) or not isinstance(part.get("accuracy"), (int, float)):
            continue
        report: dict[str, Any] = {"accuracy": float(part["accuracy"])}
        if isinstance(part.get("images"), int):
            report["images"] = int(part["images"])
        per_class = part.get("per_class")
        if isinstance(per_class, dict):
            report["per_class"] = {str(name): float(v["accuracy"] if isinstance(v, dict) else v)
                                   for name, v in per_class.items()
                                   if isinstance(v, (int, float)) or (isinstance(v, dict) and "accuracy" in v)}
        out[when] = report
    if not out:
        return None
    try:
        return delta_format.check_heldout(out)
    except delta_format.DeltaError as exc:   # a report we cannot carry must not cost the device its delta
        warnings.warn(f"the adaptation's held-out report is not carried in the delta ({exc.problem})", stacklevel=3)
        return None


def base_space_prototypes(bundle: OpenBundle, state: DeviceState) -> Prototypes | None:
    """This device's new classes as the bundle's own backbone (no delta) places them: what the fleet's
    release gate compares the merged version against (the frozen baseline), which the host cannot
    compute without the device's images. Only the classes the bundle does not ship (its own are
    base-space and exact): a few kB. Exact where `edgecl adapt` recorded them (every task image
    embedded by the bundle's backbone, ``base_prototypes.safetensors`` in the state); otherwise (a
    state from before that, or carried by `edgecl upgrade`) moved back by the class's exemplars' drift
    from the adapted backbone, p + mean(base) - mean(adapted). None when the backbone is unchanged
    (the prototypes are base-space already)."""
    if not np.any(state.delta) or not len(state.prototypes):
        return None
    shipped = set(bundle_prototypes(bundle).classes)
    wanted = [c for c in state.prototypes.classes if c not in shipped]
    recorded = (Prototypes.load_file(state.base_prototypes_path) if state.base_prototypes_path is not None
                else Prototypes.empty(int(state.prototypes.means.shape[1])))
    rows: dict[str, tuple[np.ndarray, int]] = {}
    for c in wanted:
        if c in recorded.classes:
            j = recorded.classes.index(c)
            rows[c] = (recorded.means[j].astype(np.float64), int(recorded.counts[j]))
    rest = [c for c in wanted if c not in rows]
    if rest and state.exemplars_path is not None:
        from .upgrade import embed_both

        memory = ExemplarMemory.load_file(state.exemplars_path)
        adapted, base = embed_both(bundle, bundle, memory, state.delta)
        for c in rest:
            if c in adapted:
                i = state.prototypes.classes.index(c)
                # moved back: before = the adapted backbone, after = the bundle's own
                rows[c] = (classstats.shift_by_exemplars(state.prototypes.means[i], adapted[c], base[c]),
                           int(state.prototypes.counts[i]))
    names = [c for c in wanted if c in rows]
    if not names:
        return None
    return Prototypes(names, np.stack([rows[c][0] for c in names]).astype(np.float32),
                      np.asarray([rows[c][1] for c in names], np.int64))


def device_identity(device_id: str | None, key_hex: str | None, config: DeviceConfig | None
                    ) -> tuple[str, bytes | None]:
    """The name and signing key a delta is made under: the arguments, else $EDGECL_DEVICE_ID /
    $EDGECL_DEVICE_KEY, else the device config (``edgecl device init``), else (name only) the
    hostname with a warning: the server accepts a delta only under the registered name."""
    key_text = key_hex if key_hex is not None else (os.environ.get(KEY_ENV) or (config.key if config else ""))
    key = delta_format.parse_key(key_text) if key_text else None
    name = device_id or os.environ.get(DEVICE_ID_ENV) or (config.name if config else "")
    if not name:
        name = socket.gethostname()
        warnings.warn(f"no device name configured: the delta says {name!r} (the hostname); the server refuses it "
                      "unless that is the registered name (run `edgecl device init`)", stacklevel=3)
    return name, key


def own_classes(bundle: OpenBundle, state: DeviceState) -> Prototypes | None:
    """The classes this device saw images of, as its backbone places them: those it added (the
    bundle does not ship them), and those the bundle ships that it counted more images of (the same
    product under its camera, B6), each with the count of images the DEVICE added (so the server's
    bound, counts <= samples_seen, holds). A class it saw no image of is never sent: the fleet takes
    its statistics from the version that shipped it (docs/server.md). The release round reads only
    the added classes; a single device's `edgecl apply` also the updated ones."""
    shipped = bundle_prototypes(bundle)
    rows, counts = [], []
    for i, c in enumerate(state.prototypes.classes):
        count = int(state.prototypes.counts[i])
        if c not in shipped.classes:
            rows.append(i)
            counts.append(count)
        elif count > int(shipped.counts[shipped.classes.index(c)]):
            rows.append(i)
            counts.append(count - int(shipped.counts[shipped.classes.index(c)]))
    if not rows:
        return None
    return Prototypes([state.prototypes.classes[i] for i in rows], state.prototypes.means[rows],
                      np.asarray(counts, np.int64))


def shared_exemplars(bundle: OpenBundle, state: DeviceState, table: Prototypes | None) -> ExemplarMemory | None:
    """The exemplars a delta shares (profile ``share_exemplars``): this device's stored images of the
    classes it added (the classes of ``table`` the bundle does not ship: what the release round reads),
    its own images only (a bundle's shipped exemplars are not), at most as many per class as the class
    counts (the server refuses more). None when it holds none."""
    if table is None or state.exemplars_path is None:
        return None
    from edgecl.formats import manifest as mf
    from edgecl.formats.prototypes import image_fingerprints

    memory = ExemplarMemory.load_file(state.exemplars_path)
    shipped_path = bundle.path(mf.EXEMPLARS)
    shipped = (image_fingerprints(ExemplarMemory.load_file(shipped_path).pixels) if shipped_path.exists()
               else np.zeros(0, np.uint64))
    known = set(bundle_prototypes(bundle).classes)
    names: list[str] = []
    pixels: list[np.ndarray] = []
    for i, name in enumerate(table.classes):
        if name in known:
            continue
        images = memory.of_class(name)
        images = images[~np.isin(image_fingerprints(images), shipped)][: int(table.counts[i])]
        if len(images):
            names.append(name)
            pixels.append(images)
    if not names:
        return None
    return ExemplarMemory(names, np.concatenate(pixels).astype(np.uint8),
                          np.concatenate([np.full(len(p), j, np.int64) for j, p in enumerate(pixels)]))


def profile_shares(bundle: OpenBundle, config: DeviceConfig | None) -> bool:
    """The device profile's ``share_exemplars``: the config's profile, else the bundle's own."""
    from .infer import resolve_profile

    return bool(resolve_profile(config.profile if config is not None and config.profile else None, bundle)
                .share_exemplars)


DEFAULT_VALUES = "int4"   # B3: 0.86% of the model, 0.0-0.4 points from fp32 (docs/benchmarks.md)


def make_delta(bundle_dir: str | Path, out: str | Path, values: str = DEFAULT_VALUES, device_id: str | None = None,
               key_hex: str | None = None, prototypes_dtype: str | None = None,
               config: DeviceConfig | None = None, share_exemplars: bool | None = None) -> DeltaReport:
    """Write the current device state of ``bundle_dir`` as a delta file (atomically).

    Device name and key: the arguments, else $EDGECL_DEVICE_ID / $EDGECL_DEVICE_KEY, else the
    device config (``edgecl device init``), else (name only) the hostname with a warning: the
    server accepts a delta only under the name the device was registered with.

    ``prototypes_dtype`` None: fp32 with fp32 values, else fp16 (2^-11 relative error, far below what
    a quantised delta already costs, and it halves the prototypes' share of the file).

    ``share_exemplars`` None: the device profile's (``profile_shares``); True adds this device's stored
    exemplars of the classes it added (docs/delta-format.md#shared-exemplars): images leave the device.
    """
    bundle = open_bundle(bundle_dir)
    state = load_current(bundle)
    if state.generation is None:
        raise DeviceError(f"{bundle_dir} has not been adapted on this device yet",
                          "run `edgecl adapt BUNDLE --data DIR` first")
    name, key = device_identity(device_id, key_hex, config)
    report = state.meta.get("report", {})
    metrics = {k: float(v) for k, v in report.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k == "final_loss"}
    own = own_classes(bundle, state)
    share = profile_shares(bundle, config) if share_exemplars is None else share_exemplars
    exemplars = shared_exemplars(bundle, state, own) if share else None
    d = delta_format.Delta.from_dense(
        state.delta, bundle_id=bundle.manifest.bundle_id, bundle_version=bundle.manifest.version,
        base_sha256=bundle.manifest.base_sha256, mask_sha256=bundle.manifest.mask_sha256,
        device_id=name, steps=int(state.meta.get("steps_total", 0)),
        samples_seen=int(state.meta.get("samples_seen", 0)), metrics=metrics, prototypes=own,
        heldout=heldout_from_gate(report.get("gate") if isinstance(report, dict) else None),
        base_prototypes=base_space_prototypes(bundle, state), exemplars=exemplars)
    protos = prototypes_dtype or ("fp32" if values == "fp32" else "fp16")
    data = delta_format.save_file(d, out, key, values=values, prototypes_dtype=protos)
    # Count what the file says changed: int8/int4 round the smallest entries to 0 (= unchanged).
    changed = int(delta_format.load(data, key).changed_positions().size)
    return DeltaReport(path=str(out), bytes=len(data), changed=changed,
                       selected=bundle.mask.total_selected, base_fp32_bytes=bundle.manifest.total_params * 4,
                       values=values, signed=key is not None,
                       exemplars=int(len(exemplars.labels)) if exemplars is not None else 0,
                       exemplar_classes=len(exemplars.classes) if exemplars is not None else 0,
                       exemplar_bytes=delta_format.read_header(data).exemplar_bytes)
