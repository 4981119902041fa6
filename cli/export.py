"""`edgecl export` (host): recipe + calibration images -> sparse trainable bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from edgecl.formats import manifest as mf  # the device defaults, held once (no torch import)

from .options import JsonFlag, MaskPolicy, echo_json


def export(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="Model recipe (models/*.toml).")],
    data: Annotated[Path, typer.Option("--data", help="Calibration image folder: DIR/<class>/<images>.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle folder to write.")],
    device: Annotated[Path | None, typer.Option("--device", help="Device profile (devices/*.toml); it becomes "
                                                                  "the bundle's default on the device.")] = None,
    select_rate: Annotated[float | None, typer.Option(help="Share of ALL parameters made trainable, in (0, 1] "
                                                           "(default 0.05).")] = None,
    drop_rate: Annotated[float | None, typer.Option(help="Per-step probability a selected gradient is dropped "
                                                         "(default 0.9).")] = None,
    mask_policy: Annotated[MaskPolicy | None, typer.Option(help="Tensors the mask may select: all, or no-depthwise "
                                                                "(depthwise conv weights stay constant: a faster "
                                                                "step; the default).")] = None,
    lr: Annotated[float | None, typer.Option(help="Default device learning rate on the sparse delta, finite and "
                                                  f">= 0 (default {mf.DEFAULT_LR_BACKBONE:g}).")] = None,
    epochs: Annotated[int | None, typer.Option(help=f"Default device epochs, >= 0 (default {mf.DEFAULT_EPOCHS}).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for shuffling, augmentation and head init.")] = None,
    exemplars_per_class: Annotated[int | None, typer.Option(help="Calibration images per class shipped in the "
                                                                 "bundle so the device can refresh their prototypes "
                                                                 "(0 = none; default 20; none with a profile that "
                                                                 "has store_images = false).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    as_json: JsonFlag = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress.")] = False,
) -> None:
    """Score weights by MI-Fisher information, keep the top few percent, export a trainable ONNX bundle."""
    from edgecl.host.export import ExportOptions, export_bundle

    # Unset flags take ExportOptions' defaults (manifest.DEFAULT_*); export_bundle checks every value against
    # the manifest's ranges (host/export.py check_options) before it writes anything.
    given: dict[str, Any] = {"select_rate": select_rate, "drop_rate": drop_rate, "lr_backbone": lr, "epochs": epochs, "seed": seed,
             "exemplars_per_class": exemplars_per_class,
             "mask_policy": mask_policy.value if mask_policy is not None else None}
    opts = ExportOptions(**{k: v for k, v in given.items() if v is not None}, overwrite=overwrite,
                         progress=not quiet)
    report = export_bundle(recipe, data, out, profile=device, options=opts)
    if as_json:
        echo_json(report)
        return
    total_bytes = sum(report.files.values())
    typer.echo(f"wrote {report.bundle_dir}: {report.model_name}, {report.total_params:,} parameters, "
               f"{report.selected:,} trainable ({100 * report.selected_fraction:.2f}%), "
               f"{len(report.classes)} classes from {report.images_used} images"
               + (f" ({report.images_skipped} unreadable skipped)" if report.images_skipped else "")
               + f", {total_bytes / 1e6:.1f} MB")
    typer.echo(f"next: copy {report.bundle_dir} to the device, or store it on the fleet server: "
               f"`edgecl server bundle add {report.bundle_dir}`")


def register(app: typer.Typer) -> None:
    app.command("export")(export)
