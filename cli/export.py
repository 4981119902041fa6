"""`edgecl export` (host): recipe + calibration images -> sparse trainable bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import JsonFlag, echo_json


def export(
    recipe: Annotated[Path, typer.Argument(help="Model recipe (models/*.toml).")],
    data: Annotated[Path, typer.Option("--data", help="Calibration image folder: DIR/<class>/<images>.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle folder to write.")],
    device: Annotated[Path | None, typer.Option("--device", help="Device profile (devices/*.toml).")] = None,
    select_rate: Annotated[float, typer.Option(help="Share of ALL parameters made trainable, in (0, 1].")] = 0.05,
    drop_rate: Annotated[float, typer.Option(help="Per-step probability a selected gradient is dropped.")] = 0.9,
    overlap: Annotated[Path | None, typer.Option(help="Overlap counts from `edgecl merge` (earlier rounds).")] = None,
    lr: Annotated[float, typer.Option(help="Default device learning rate on the sparse delta.")] = 1e-3,
    epochs: Annotated[int, typer.Option(help="Default device epochs.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed for shuffling, augmentation and head init.")] = 1993,
    exemplars_per_class: Annotated[int, typer.Option(help="Calibration images per class shipped in the bundle so "
                                                     "the device can refresh their prototypes (0 = none).")] = 20,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    as_json: JsonFlag = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Score weights by MI-Fisher information, keep the top few percent, export a trainable ONNX bundle."""
    from edgecl.host.export import ExportOptions, export_bundle

    opts = ExportOptions(select_rate=select_rate, drop_rate=drop_rate, seed=seed, lr_backbone=lr, epochs=epochs,
                         overwrite=overwrite, overlap_path=str(overlap) if overlap else None,
                         exemplars_per_class=exemplars_per_class, progress=not quiet)
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


def register(app: typer.Typer) -> None:
    app.command("export")(export)
