"""`edgecl apply` (host): deltas -> patched weights + the next bundle version."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import JsonFlag, echo_json


def apply(
    bundle: Annotated[Path, typer.Argument(help="The bundle the deltas were made for.")],
    deltas: Annotated[list[Path], typer.Argument(help="Delta file(s): one device's, or the server's merged one (`edgecl merge`); several are merged here by the weighted mean.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the next bundle version.")],
    data: Annotated[Path | None, typer.Option("--data", help="Calibration images: re-score a fresh MI-Fisher "
                                                 "mask for the next round (default: keep the mask).")] = None,
    recipe: Annotated[Path | None, typer.Option(help="Recipe file, if not the one stamped in the bundle.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    as_json: JsonFlag = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Bake deltas into the base weights; write weights.safetensors, inference.onnx and a new bundle version."""
    from edgecl.host.apply import apply_delta, merge_files
    from edgecl.progress import phases

    # The bundle writer announces its phases (graphs, files); how many depends on the options: unnumbered.
    with phases(0, "apply", enabled=not (quiet or as_json)):
        report = apply_delta(bundle, merge_files(bundle, deltas), out, data_dir=data, recipe_path=recipe,
                             overwrite=overwrite, progress=not quiet)
    if as_json:
        echo_json(report)
        return
    typer.echo(f"wrote {report.bundle_dir}: version {report.version}, {report.deltas} "
               f"{'delta' if report.deltas == 1 else 'deltas'}, "
               f"{report.changed_elements:,} elements changed, {len(report.classes)} classes, "
               f"{'new' if report.remasked else 'same'} mask; max |embedding diff| of the new version vs the old "
               f"bundle + delta: {report.max_abs_output_diff:.2e}")
    typer.echo(f"next: edgecl eval {report.bundle_dir} --data HELDOUT   (or `edgecl release`, which checks it on "
               "held-out images before publishing)")


def register(app: typer.Typer) -> None:
    app.command("apply")(apply)
