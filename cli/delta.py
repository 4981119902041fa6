"""`edgecl delta` (device): write the adapted state as a small signed delta file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .device import BundleArg, ConfigOpt, resolve_bundle


def delta(
    out: Annotated[Path, typer.Option("--out", "-o", help="Delta file to write (.safetensors).")],
    bundle: BundleArg = None,
    values: Annotated[str, typer.Option(help="Value encoding: int4 (the default: smallest, B3 lost 0.0-0.4 "
                                             "points), int8, fp16 or fp32 (exact).")] = "int4",
    device_id: Annotated[str | None, typer.Option(help="Device name (default: $EDGECL_DEVICE_ID, else the "
                                                      "device config's name).")] = None,
    prototypes: Annotated[str | None, typer.Option(help="Prototype encoding: fp32 or fp16 (default: fp32 "
                                                      "with fp32 values, else fp16).")] = None,
    key: Annotated[str | None, typer.Option(help="Device key, 64 hex digits (default: $EDGECL_DEVICE_KEY, else "
                                               "the device config's); signs the delta with HMAC-SHA256.")] = None,
    config: ConfigOpt = None,
    share_exemplars: Annotated[bool | None, typer.Option("--share-exemplars/--no-share-exemplars", help=(
        "Add this device's stored exemplar images of the classes it added (the release round embeds them "
        "under the next version; images leave the device). Default: the device profile's share_exemplars."))] = None,
) -> None:
    """Write the changed delta entries, prototypes and provenance as a delta file."""
    from edgecl.device.deltafile import make_delta
    from edgecl.device.provision import load_device_config

    bundle, _ = resolve_bundle(bundle, config)
    report = make_delta(bundle, out, values=values, device_id=device_id, key_hex=key, prototypes_dtype=prototypes,
                        config=load_device_config(config), share_exemplars=share_exemplars)
    typer.echo(f"wrote {report.path}: {report.bytes:,} B ({100 * report.bytes / report.base_fp32_bytes:.2f}% of the "
               f"{report.base_fp32_bytes / 1e6:.1f} MB fp32 model), {report.changed:,} of the {report.selected:,} "
               f"trainable weights changed (values {report.values}), "
               f"{'signed' if report.signed else 'UNSIGNED (no --key)'}")
    if report.exemplars:
        typer.echo(f"shares {report.exemplars} exemplar images of {report.exemplar_classes} class(es): "
                   f"{report.exemplar_bytes:,} B of the file (zlib); these images leave the device")
    typer.echo(f"next: edgecl push {report.path}")


def register(app: typer.Typer) -> None:
    app.command("delta")(delta)
